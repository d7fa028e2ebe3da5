//! Errors answered to clients, in Genesys' shape: `{"message","code","status"}`.

use std::borrow::Cow;

use http::StatusCode;
use serde_json::json;

use crate::http_server::{Response, json};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ClientError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: String,
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
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad.request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not.found", message)
    }

    pub fn into_response(self) -> Response {
        json(
            self.status,
            &json!({"message": self.message, "code": self.code, "status": self.status.as_u16()}),
        )
    }
}
