//! Errors answered to clients, in Genesys' shape: `{"message","code","status"}`,
//! with `Retry-After` on a 429.

use std::borrow::Cow;
use std::time::Duration;

use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::front::limits::Refusal;
use crate::http_server::{Response, json};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ClientError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    pub retry_after: Option<Duration>,
}

impl ClientError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad.request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not.found", message)
    }

    pub fn into_response(self) -> Response {
        let mut response = json(
            self.status,
            &json!({"message": self.message, "code": self.code, "status": self.status.as_u16()}),
        );
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<Refusal> for ClientError {
    fn from(refusal: Refusal) -> Self {
        Self {
            status: refusal.status,
            code: refusal.code.into(),
            message: refusal.message,
            retry_after: refusal.retry_after,
        }
    }
}
