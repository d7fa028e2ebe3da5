//! `GET /api/v2/notifications/availabletopics`: the topics an OAuth client may
//! subscribe to, as templates (`v2.users.{id}.presence`).
//!
//! Genesys documents the query `expand` (description, enforced, schema, visibility,
//! transports, publicApiTemplateUriPaths, requiresPermissions, permissionDetails,
//! topicParameters) and `includePreview` (default true). The fake reads `expand` as
//! Genesys' SDK models it: each named field is added to every entity, which
//! otherwise carries its `id` and the `requiresCurrentUser…` flags; unknown names
//! are ignored. Preview topics are left out with `includePreview=false`, and topics
//! the OAuth clients may not see (`Settings::deny_topics`) are never listed.

use serde_json::{Map, Value, json};

/// One catalogue entry: template, description, permissions, preview or not.
struct Entry {
    id: &'static str,
    description: &'static str,
    permissions: &'static [&'static str],
    preview: bool,
}

const fn topic(
    id: &'static str,
    description: &'static str,
    permissions: &'static [&'static str],
) -> Entry {
    Entry {
        id,
        description,
        permissions,
        preview: false,
    }
}

/// A sample of Genesys' catalogue: what agent desktops use, and some they should not.
const CATALOGUE: &[Entry] = &[
    topic("v2.users.{id}.presence", "A user's presence", &[]),
    topic(
        "v2.users.{id}.routingStatus",
        "A user's routing status",
        &[],
    ),
    topic("v2.users.{id}.conversations", "A user's conversations", &[]),
    topic("v2.users.{id}.conversations.calls", "A user's calls", &[]),
    topic(
        "v2.users.{id}.conversations.callbacks",
        "A user's callbacks",
        &[],
    ),
    topic("v2.users.{id}.conversations.chats", "A user's chats", &[]),
    topic("v2.users.{id}.conversations.emails", "A user's emails", &[]),
    topic(
        "v2.users.{id}.conversations.messages",
        "A user's messages",
        &[],
    ),
    topic(
        "v2.users.{id}.conversationsummary",
        "A user's conversation counts",
        &[],
    ),
    topic("v2.users.{id}.station", "A user's station", &[]),
    topic(
        "v2.users.{id}.outofoffice",
        "A user's out-of-office state",
        &[],
    ),
    topic("v2.users.{id}.geolocation", "A user's location", &[]),
    topic("v2.users.{id}.activity", "A user's activity", &[]),
    topic(
        "v2.routing.queues.{id}.conversations",
        "A queue's conversations",
        &["routing:queue:view"],
    ),
    topic(
        "v2.routing.queues.{id}.users",
        "A queue's members",
        &["routing:queueMember:view"],
    ),
    topic(
        "v2.analytics.queues.{id}.observations",
        "A queue's observations",
        &["analytics:queueObservation:view"],
    ),
    topic(
        "v2.flows.outcomes.{id}",
        "A flow outcome's changes",
        &["architect:flowOutcome:view"],
    ),
    Entry {
        id: "v2.detail.events.conversation.{id}.customer.start",
        description: "A customer started a conversation",
        permissions: &["analytics:conversationDetail:view"],
        preview: true,
    },
];

/// The answer for `query`, leaving out templates `denied` refuses.
pub(super) fn listing(query: Option<&str>, denied: impl Fn(&str) -> bool) -> Value {
    let mut expand: Vec<String> = Vec::new();
    let mut include_preview = true;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "expand" => expand.extend(value.split(',').map(|v| v.trim().to_owned())),
            "includePreview" => include_preview = !value.eq_ignore_ascii_case("false"),
            _ => {}
        }
    }
    let wants = |field: &str| expand.iter().any(|e| e == field);
    let entities: Vec<Value> = CATALOGUE
        .iter()
        .filter(|entry| include_preview || !entry.preview)
        .filter(|entry| !denied(entry.id))
        .map(|entry| {
            let per_user = entry.id.starts_with("v2.users.");
            let mut entity = Map::new();
            entity.insert("id".into(), json!(entry.id));
            entity.insert("requiresCurrentUser".into(), json!(false));
            entity.insert("requiresCurrentUserOrPermission".into(), json!(per_user));
            let fields: [(&str, Value); 9] = [
                ("description", json!(entry.description)),
                ("enforced", json!(false)),
                (
                    "schema",
                    json!({"type": "object", "title": entry.description, "properties": {}}),
                ),
                (
                    "visibility",
                    json!(if entry.preview { "Preview" } else { "Public" }),
                ),
                ("transports", json!(["All"])),
                ("publicApiTemplateUriPaths", json!([])),
                ("requiresPermissions", json!(entry.permissions)),
                (
                    "permissionDetails",
                    json!(entry.permissions.iter().map(|p| json!({"type": "Single", "permissions": [p], "allowsCurrentUser": per_user, "enforced": false})).collect::<Vec<_>>()),
                ),
                (
                    "topicParameters",
                    if entry.id.contains("{id}") {
                        json!(["id"])
                    } else {
                        json!([])
                    },
                ),
            ];
            for (field, value) in fields {
                if wants(field) {
                    entity.insert(field.into(), value);
                }
            }
            Value::Object(entity)
        })
        .collect();
    json!({ "entities": entities })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_adds_fields_and_preview_can_be_left_out() {
        let plain = listing(None, |_| false);
        let first = &plain["entities"][0];
        assert_eq!(first["id"], "v2.users.{id}.presence");
        assert!(first.get("description").is_none());
        assert!(first.get("schema").is_none());
        let all = plain["entities"].as_array().unwrap().len();
        assert_eq!(all, CATALOGUE.len());

        let expanded = listing(
            Some("expand=description,schema&expand=topicParameters"),
            |_| false,
        );
        let first = &expanded["entities"][0];
        assert_eq!(first["description"], "A user's presence");
        assert_eq!(first["schema"]["type"], "object");
        assert_eq!(first["topicParameters"], json!(["id"]));
        assert!(first.get("visibility").is_none());

        let public = listing(Some("includePreview=false"), |_| false);
        assert_eq!(public["entities"].as_array().unwrap().len(), all - 1);
        let denied = listing(None, |id| id.starts_with("v2.analytics."));
        assert_eq!(denied["entities"].as_array().unwrap().len(), all - 1);
    }
}
