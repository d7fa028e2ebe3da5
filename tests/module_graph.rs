//! The module graph goes one way (ARCHITECTURE.md, "Invariants"): secret and the other
//! plumbing → config → genesys → auth → upstream → router → downstream → admin → app,
//! with the tools (CLI, demo, soak, simulated desktops) on top, and the fake Genesys
//! Cloud beside them using nothing of the proxy but the shared server plumbing. A
//! source scan is enough to hold it: every `crate::x` a module names must be below it.

use std::collections::BTreeSet;
use std::path::Path;

/// The layers, lowest first. A module may use the modules of lower layers, and the
/// plumbing from anywhere.
const LAYERS: &[&[&str]] = &[
    &[
        "secret",
        "bounds",
        "topic",
        "frame",
        "tls",
        "ws",
        "http_server",
        "backoff",
        "drain",
        "front",
        "metrics",
        "process",
        "tls_server",
    ],
    &["config"],
    &["genesys"],
    &["auth"],
    &["upstream"],
    &["router"],
    &["fleet"],
    &["downstream"],
    &["admin"],
    &["app"],
    &["cli", "demo", "sim", "soak"],
];

/// The fake judges the proxy independently: it may use only these of the crate.
const MOCK_MAY_USE: &[&str] = &["http_server", "ws"];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The crate modules `code` names (`crate::x`, `crate::{x, y}`), comments aside.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        named.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    named.insert(name);
                }
            }
        }
    }
    named
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    // Every top-level module in src/ must have a layer (or be the fake), so that a new
    // module cannot slip past the scan as if it were a crate-root item.
    let modules: BTreeSet<String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|entry| {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            name.trim_end_matches(".rs").to_owned()
        })
        .filter(|name| name != "lib" && name != "main")
        .collect();
    let mut violations: Vec<String> = modules
        .iter()
        .filter(|name| layer(name).is_none() && name.as_str() != "mock")
        .map(|name| format!("module {name} has no layer"))
        .collect();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let module = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let code = std::fs::read_to_string(file).unwrap();
        for used in named_modules(&code) {
            if used == module || !modules.contains(&used) {
                continue; // itself, or a crate-root item (install_crypto_provider)
            }
            let allowed = if module == "mock" {
                MOCK_MAY_USE.contains(&used.as_str())
            } else if used == "mock" {
                // Only the tools run the fake.
                layer(&module) == Some(LAYERS.len() - 1)
            } else {
                let (Some(mine), Some(theirs)) = (layer(&module), layer(&used)) else {
                    violations.push(format!(
                        "{}: module {module} has no layer",
                        relative.display()
                    ));
                    continue;
                };
                theirs == 0 || theirs < mine || mine == LAYERS.len() - 1
            };
            if !allowed {
                violations.push(format!("{} uses crate::{used}", relative.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layering:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scan_sees_what_it_should() {
    let code = "use crate::auth::Token;\nuse crate::{config, router::Router};\n// crate::admin in a comment\nlet x = crate::upstream::pool::limits(c);";
    let named: Vec<String> = named_modules(code).into_iter().collect();
    assert_eq!(named, ["auth", "config", "router", "upstream"]);
}
