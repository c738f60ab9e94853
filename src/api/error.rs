//! The one place where errors become HTTP statuses: `{"error": {"code", "message"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::core::{Conflict, CoreError, Resource};
use crate::imaging::ImageError;

#[derive(Debug)]
pub enum ApiError {
    Core(CoreError),
    PayloadTooLarge { limit: usize },
    UnsupportedMediaType(String),
    InvalidRequest(String),
    RouteNotFound(String),
    MethodNotAllowed,
}

impl From<CoreError> for ApiError {
    fn from(error: CoreError) -> Self {
        ApiError::Core(error)
    }
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Core(error) => match error {
                CoreError::UnknownModel(_) => (StatusCode::NOT_FOUND, "model_not_found"),
                CoreError::NotFound { kind, .. } => (
                    StatusCode::NOT_FOUND,
                    match kind {
                        Resource::Exemplar => "exemplar_not_found",
                        Resource::Texture => "texture_not_found",
                        Resource::Version => "version_not_found",
                        Resource::Alias => "alias_not_found",
                        Resource::Job => "job_not_found",
                        Resource::Statistics => "statistics_not_found",
                        Resource::Dataset => "dataset_not_found",
                        Resource::Evaluation => "evaluation_not_found",
                    },
                ),
                CoreError::Conflict(conflict, _) => (
                    StatusCode::CONFLICT,
                    match conflict {
                        Conflict::VersionNotReady => "version_not_ready",
                        Conflict::VersionInUse => "version_in_use",
                        Conflict::ExemplarInUse => "exemplar_in_use",
                        Conflict::BuiltinAlias => "builtin_alias",
                        Conflict::JobFinished => "job_finished",
                        Conflict::WeightsChanged => "model_weights_changed",
                    },
                ),
                CoreError::IdempotencyKeyReused => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
                // Only a job's own outcome; a request is never answered with it.
                CoreError::Cancelled => (StatusCode::CONFLICT, "cancelled"),
                CoreError::EditQueueFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "edit_queue_full"),
                CoreError::ModelExists(_) => (StatusCode::CONFLICT, "model_exists"),
                CoreError::ModelUnloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "model_unloaded"),
                CoreError::InvalidArgument(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_argument"),
                CoreError::Image { error, .. } => match error {
                    ImageError::Empty => (StatusCode::UNPROCESSABLE_ENTITY, "empty_image"),
                    ImageError::UnsupportedFormat => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image_format"),
                    ImageError::TooManyPixels { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "image_too_large"),
                    ImageError::Corrupt(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_image"),
                },
                CoreError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
                CoreError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
                CoreError::Model(_) => (StatusCode::INTERNAL_SERVER_ERROR, "model_error"),
                CoreError::InvalidPackage(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_model_package"),
                CoreError::Store(_) | CoreError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            },
            ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::InvalidRequest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::RouteNotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::Core(error) => error.to_string(),
            ApiError::PayloadTooLarge { limit } => format!("the request body is over the limit of {limit} bytes"),
            ApiError::UnsupportedMediaType(message) | ApiError::InvalidRequest(message) => message.clone(),
            ApiError::RouteNotFound(path) => format!("no route for {path}"),
            ApiError::MethodNotAllowed => "method not allowed on this route".into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // 503s (overload, unload, shutdown) are the service working as designed, not faults.
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(code, message = %self.message(), "request failed");
        }
        let mut response = (status, Json(json!({"error": {"code": code, "message": self.message()}}))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
