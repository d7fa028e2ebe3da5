//! Where in the text an error is: the line of a byte offset, and for an error from
//! deserialization (an unknown key, a missing one, a wrong type), the dotted key at
//! its place in the document.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ConfigError;

/// 1-based line and column of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// A deserialization error, named by the key at its span.
pub(super) fn serde_error(
    origin: &str,
    text: &str,
    doc: &DeTable<'_>,
    error: &toml::de::Error,
) -> ConfigError {
    let (path, line) = match error.span() {
        Some(span) => (
            path_at(doc, span.start),
            Some(line_column(text, span.start).0),
        ),
        None => (Vec::new(), None),
    };
    let mut message = error.message().trim_end().to_owned();
    // serde's messages quote the offending value; an inline secret must not leak.
    if matches!(path.last(), Some(Seg::Key(key)) if key == "client_secret")
        && !message.starts_with("unknown field")
    {
        message = "must be a non-empty string (value not shown)".to_owned();
    }
    if message.ends_with("expected a duration") {
        message.push_str(" such as \"90s\", \"5m\" or \"1h 30m\"");
    }
    ConfigError::Invalid {
        origin: origin.to_owned(),
        key: render_path(&path),
        line,
        message,
    }
}

/// A step of a key path: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

fn contains(span: &std::ops::Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

/// The deepest key path whose key or value span contains `offset`.
fn path_at(table: &DeTable<'_>, offset: usize) -> Vec<Seg> {
    let mut best = Vec::new();
    let mut current = Vec::new();
    search_table(table, offset, &mut current, &mut best);
    best
}

fn search_table(table: &DeTable<'_>, offset: usize, current: &mut Vec<Seg>, best: &mut Vec<Seg>) {
    for (key, value) in table.iter() {
        current.push(Seg::Key(key.get_ref().to_string()));
        if (contains(&key.span(), offset) || contains(&value.span(), offset))
            && current.len() > best.len()
        {
            *best = current.clone();
        }
        search_value(value, offset, current, best);
        current.pop();
    }
}

fn search_value(
    value: &Spanned<DeValue<'_>>,
    offset: usize,
    current: &mut Vec<Seg>,
    best: &mut Vec<Seg>,
) {
    match value.get_ref() {
        DeValue::Table(table) => search_table(table, offset, current, best),
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                current.push(Seg::Index(index));
                if contains(&item.span(), offset) && current.len() > best.len() {
                    *best = current.clone();
                }
                search_value(item, offset, current, best);
                current.pop();
            }
        }
        _ => {}
    }
}
