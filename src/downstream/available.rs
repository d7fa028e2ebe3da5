//! `GET /api/v2/notifications/availabletopics`, which SDK-based extensions call at
//! start: what Genesys answers for the proxy's OAuth client, filtered by the topic
//! policy, so that a desktop is offered only what it may subscribe to.
//!
//! Genesys is asked with a token minted for the purpose (and retired at once: no
//! channel's token is lent out, each stays with its channel), and the answer is
//! cached per query for [`CACHE_FOR`], one fetch at a time, so that a login storm
//! costs one call. If a refresh fails, the last answer is served. Only `expand`
//! and `includePreview` are passed on, checked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::error::ClientError;
use crate::auth::TokenSource;
use crate::front::topics::Policy;
use crate::genesys::Genesys;

/// How long an answer is served before it is fetched again.
pub const CACHE_FOR: Duration = Duration::from_secs(600);

pub struct AvailableTopics {
    genesys: Arc<Genesys>,
    tokens: Arc<TokenSource>,
    /// Canonical query → (when fetched, Genesys' answer). Held across a fetch: one
    /// at a time.
    cache: Mutex<HashMap<String, (Instant, Arc<Value>)>>,
}

impl AvailableTopics {
    pub fn new(genesys: Arc<Genesys>, tokens: Arc<TokenSource>) -> Self {
        Self {
            genesys,
            tokens,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The answer for the request's `query`, filtered by `policy`.
    pub async fn answer(&self, query: Option<&str>, policy: &Policy) -> Result<Value, ClientError> {
        let query = canonical_query(query.unwrap_or(""))?;
        let listing = self.listing(&query).await?;
        Ok(filtered(&listing, policy))
    }

    async fn listing(&self, query: &str) -> Result<Arc<Value>, ClientError> {
        let mut cache = self.cache.lock().await;
        let cached = cache.get(query).cloned();
        if let Some((at, listing)) = &cached
            && at.elapsed() < CACHE_FOR
        {
            return Ok(listing.clone());
        }
        match self.fetch(query).await {
            Ok(listing) => {
                let listing = Arc::new(listing);
                cache.insert(query.to_owned(), (Instant::now(), listing.clone()));
                Ok(listing)
            }
            Err(error) => match cached {
                Some((_, stale)) => {
                    tracing::warn!(%error, "availabletopics: refresh failed, serving the last answer");
                    Ok(stale)
                }
                None => {
                    tracing::warn!(%error, "availabletopics: Genesys Cloud could not be asked");
                    Err(ClientError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "service.unavailable",
                        "The available topics could not be read from Genesys Cloud; try again shortly",
                    ))
                }
            },
        }
    }

    async fn fetch(&self, query: &str) -> Result<Value, String> {
        let token = self.tokens.mint().await.map_err(|e| e.to_string())?;
        let answer = self
            .genesys
            .available_topics(&token.value, query)
            .await
            .map_err(|e| e.to_string());
        let genesys = self.genesys.clone();
        tokio::spawn(async move {
            // It holds no channel; if it cannot be retired it expires by itself.
            let _ = genesys.retire_token(&token.value).await;
        });
        parse(&answer?)
    }
}

fn parse(body: &Bytes) -> Result<Value, String> {
    let listing: Value = serde_json::from_slice(body)
        .map_err(|_| "the availabletopics answer is not JSON".to_owned())?;
    if !listing["entities"].is_array() {
        return Err("the availabletopics answer has no entities".into());
    }
    Ok(listing)
}

/// The query passed on: `expand` and `includePreview` only, in a fixed order, each
/// value checked (letters and commas; `true` or `false`).
fn canonical_query(query: &str) -> Result<String, ClientError> {
    let mut kept: Vec<(String, String)> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "expand"
                if !value.is_empty()
                    && value.chars().all(|c| c.is_ascii_alphabetic() || c == ',') => {}
            "includePreview" if value == "true" || value == "false" => {}
            "expand" | "includePreview" => {
                return Err(ClientError::bad_request(format!(
                    "Invalid value for {key}: expand takes field names, includePreview true or false"
                )));
            }
            _ => continue,
        }
        kept.push((key.into_owned(), value.into_owned()));
    }
    kept.sort();
    Ok(form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish())
}

/// `listing` with only the entities whose topic the policy lets a desktop use.
fn filtered(listing: &Value, policy: &Policy) -> Value {
    let mut answer = listing.clone();
    if let Some(entities) = answer["entities"].as_array_mut() {
        entities.retain(|entity| entity["id"].as_str().is_some_and(|id| policy.lists(id)));
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::topics::Pattern;
    use serde_json::json;

    #[test]
    fn only_known_parameters_pass_and_in_one_order() {
        assert_eq!(canonical_query("").unwrap(), "");
        assert_eq!(
            canonical_query("includePreview=false&expand=schema&token=x&expand=description")
                .unwrap(),
            "expand=description&expand=schema&includePreview=false"
        );
        assert!(canonical_query("includePreview=maybe").is_err());
        assert!(canonical_query("expand=schema%26x%3D1").is_err());
    }

    #[test]
    fn the_listing_is_filtered_by_the_policy() {
        let listing = json!({"entities": [
            {"id": "v2.users.{id}.presence", "description": "presence"},
            {"id": "v2.users.{id}.conversations"},
            {"id": "v2.analytics.queues.{id}.observations"},
            {"no id": true},
        ], "other": 1});
        let policy = Policy {
            allow: Some(vec![
                Pattern::parse("v2.users.*.presence").unwrap(),
                Pattern::parse("v2.users.*.conversations").unwrap(),
            ]),
            deny: vec![Pattern::parse("v2.users.*.conversations").unwrap()],
        };
        assert_eq!(
            filtered(&listing, &policy),
            json!({"entities": [{"id": "v2.users.{id}.presence", "description": "presence"}], "other": 1})
        );
        assert_eq!(
            filtered(&listing, &Policy::default())["entities"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }
}
