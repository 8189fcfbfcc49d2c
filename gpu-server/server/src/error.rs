//! The HTTP edge's one error type: an OpenAI-shaped JSON body and the right status.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error returned to the client as `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn unsupported(param: &str) -> Self {
        Self {
            code: Some("unsupported_parameter"),
            ..Self::invalid(
                format!("parameter '{param}' is not supported by this server"),
                Some(param),
            )
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            code: Some("model_not_found"),
            ..Self::invalid(format!("the model '{model}' does not exist"), Some("model"))
        }
    }

    pub fn too_long(message: String) -> Self {
        Self {
            code: Some("context_length_exceeded"),
            ..Self::invalid(message, Some("messages"))
        }
    }

    pub fn queue_full() -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "the server is busy: request queue full, retry later".into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: "no such route".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
