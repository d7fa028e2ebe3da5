//! The two error shapes Genesys Cloud answers with: the OAuth endpoint's
//! `{"error","description","error_description"}` and the platform API's
//! `{"message","code","status"}`.

use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::json;

use crate::http_server::{Response, json};

/// Why the fake refused a call; also what `/__mock/stats` lists under `rejected`.
#[derive(Clone, Debug, Serialize)]
pub struct Rejection {
    #[serde(serialize_with = "serialize_status")]
    pub status: StatusCode,
    /// `invalid_client`, `bad.credentials`, `too.many.requests.retry.after`, …
    pub code: &'static str,
    pub message: String,
    #[serde(skip)]
    pub shape: Shape,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    OAuth,
    Api,
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

impl Rejection {
    pub fn oauth(error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: error,
            message: description.into(),
            shape: Shape::OAuth,
            retry_after_secs: None,
        }
    }

    pub fn api(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            shape: Shape::Api,
            retry_after_secs: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::api(StatusCode::BAD_REQUEST, "bad.request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::api(StatusCode::NOT_FOUND, "not.found", message)
    }

    pub fn unauthenticated(code: &'static str, message: impl Into<String>) -> Self {
        Self::api(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::api(StatusCode::FORBIDDEN, code, message)
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::api(
                StatusCode::TOO_MANY_REQUESTS,
                "too.many.requests.retry.after",
                format!(
                    "Rate limit exceeded the maximum. Retry the request in [{retry_after_secs}] seconds"
                ),
            )
        }
    }

    pub fn into_response(self) -> Response {
        let mut response = match self.shape {
            Shape::OAuth => json(
                self.status,
                &json!({"error": self.code, "description": self.message, "error_description": self.message}),
            ),
            Shape::Api => json(
                self.status,
                &json!({"message": self.message, "code": self.code, "status": self.status.as_u16()}),
            ),
        };
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
