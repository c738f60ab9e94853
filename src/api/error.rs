//! The one place where errors become HTTP statuses: `{"error": {"code", "message"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::ToSchema;

use crate::core::{Conflict, CoreError, Resource};
use crate::imaging::ImageError;

/// Every error code the API answers with; the OpenAPI document lists them from this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    ModelNotFound,
    ExemplarNotFound,
    TextureNotFound,
    VersionNotFound,
    AliasNotFound,
    JobNotFound,
    StatisticsNotFound,
    DatasetNotFound,
    EvaluationNotFound,
    VersionNotReady,
    VersionInUse,
    ExemplarInUse,
    BuiltinAlias,
    JobFinished,
    ModelWeightsChanged,
    IdempotencyKeyReused,
    Cancelled,
    EditQueueFull,
    ModelExists,
    ModelUnloaded,
    InvalidArgument,
    EmptyImage,
    UnsupportedImageFormat,
    ImageTooLarge,
    InvalidImage,
    Overloaded,
    ShuttingDown,
    ModelError,
    InvalidModelPackage,
    InternalError,
    PayloadTooLarge,
    UnsupportedMediaType,
    InvalidRequest,
    NotFound,
    MethodNotAllowed,
    Unauthorized,
    Forbidden,
    DeadlineExceeded,
    TooManyRequests,
}

/// The body of every error answer: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    code: ErrorCode,
    /// A sentence for people; clients branch on `code`.
    message: String,
}

/// Whether `path` is one of the Open Inference Protocol's, whose errors take that protocol's shape.
pub fn speaks_protocol(path: &str) -> bool {
    path == "/v2" || path.starts_with("/v2/")
}

/// A refusal made before a handler runs (tokens, limits, deadline), in the shape of the route's protocol.
pub fn refusal_for(path: &str, error: ApiError) -> Response {
    if speaks_protocol(path) {
        ProtocolError(error).into_response()
    } else {
        error.into_response()
    }
}

/// An error answer of the operation at `path` as the OpenAPI document shows it, for refusals that many
/// operations share.
pub fn documented_refusal(path: &str, description: &str) -> RefOr<utoipa::openapi::Response> {
    let body = if speaks_protocol(path) { "ProtocolErrorBody" } else { "ErrorBody" };
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name(body))).build();
    ResponseBuilder::new().description(description).content("application/json", content).build().into()
}

#[derive(Debug)]
pub enum ApiError {
    Core(CoreError),
    PayloadTooLarge {
        limit: usize,
    },
    /// More images, parts or pixels in one request than the server takes.
    TooMany(String),
    UnsupportedMediaType(String),
    InvalidRequest(String),
    RouteNotFound(String),
    MethodNotAllowed,
    /// The caller has as many requests in flight as it may.
    TooManyRequests(String),
    /// The request took longer than the request timeout.
    DeadlineExceeded {
        seconds: u64,
    },
    /// No token, or an unknown one.
    Unauthorized(String),
    /// A token without the scope, or a peer the server does not serve.
    Forbidden(String),
}

impl From<CoreError> for ApiError {
    fn from(error: CoreError) -> Self {
        ApiError::Core(error)
    }
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        match self {
            ApiError::Core(error) => match error {
                CoreError::UnknownModel(_) => (StatusCode::NOT_FOUND, ErrorCode::ModelNotFound),
                CoreError::NotFound { kind, .. } => (
                    StatusCode::NOT_FOUND,
                    match kind {
                        Resource::Exemplar => ErrorCode::ExemplarNotFound,
                        Resource::Texture => ErrorCode::TextureNotFound,
                        Resource::Version => ErrorCode::VersionNotFound,
                        Resource::Alias => ErrorCode::AliasNotFound,
                        Resource::Job => ErrorCode::JobNotFound,
                        Resource::Statistics => ErrorCode::StatisticsNotFound,
                        Resource::Dataset => ErrorCode::DatasetNotFound,
                        Resource::Evaluation => ErrorCode::EvaluationNotFound,
                    },
                ),
                CoreError::Conflict(conflict, _) => (
                    StatusCode::CONFLICT,
                    match conflict {
                        Conflict::VersionNotReady => ErrorCode::VersionNotReady,
                        Conflict::VersionInUse => ErrorCode::VersionInUse,
                        Conflict::ExemplarInUse => ErrorCode::ExemplarInUse,
                        Conflict::BuiltinAlias => ErrorCode::BuiltinAlias,
                        Conflict::JobFinished => ErrorCode::JobFinished,
                        Conflict::WeightsChanged => ErrorCode::ModelWeightsChanged,
                    },
                ),
                CoreError::IdempotencyKeyReused => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::IdempotencyKeyReused),
                // Only a job's own outcome; a request is never answered with it.
                CoreError::Cancelled => (StatusCode::CONFLICT, ErrorCode::Cancelled),
                CoreError::EditQueueFull(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::EditQueueFull),
                CoreError::ModelExists(_) => (StatusCode::CONFLICT, ErrorCode::ModelExists),
                CoreError::ModelUnloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ModelUnloaded),
                CoreError::InvalidArgument(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidArgument),
                CoreError::Image { error, .. } => match error {
                    ImageError::Empty => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::EmptyImage),
                    ImageError::UnsupportedFormat => {
                        (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::UnsupportedImageFormat)
                    }
                    ImageError::TooManyPixels { .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::ImageTooLarge),
                    ImageError::Corrupt(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidImage),
                },
                CoreError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Overloaded),
                CoreError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ShuttingDown),
                CoreError::Model(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::ModelError),
                CoreError::InvalidPackage(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidModelPackage),
                CoreError::Store(_) | CoreError::Internal(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::InternalError)
                }
            },
            ApiError::PayloadTooLarge { .. } | ApiError::TooMany(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge)
            }
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::UnsupportedMediaType),
            ApiError::InvalidRequest(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidRequest),
            ApiError::RouteNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed),
            ApiError::DeadlineExceeded { .. } => (StatusCode::GATEWAY_TIMEOUT, ErrorCode::DeadlineExceeded),
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::Core(error) => error.to_string(),
            ApiError::PayloadTooLarge { limit } => format!("the request body is over the limit of {limit} bytes"),
            ApiError::UnsupportedMediaType(message)
            | ApiError::TooMany(message)
            | ApiError::TooManyRequests(message)
            | ApiError::InvalidRequest(message)
            | ApiError::Unauthorized(message)
            | ApiError::Forbidden(message) => message.clone(),
            ApiError::RouteNotFound(path) => format!("no route for {path}"),
            ApiError::MethodNotAllowed => "method not allowed on this route".into(),
            ApiError::DeadlineExceeded { seconds } => {
                format!("the request took longer than {seconds} s (--request-timeout-secs) and was abandoned")
            }
        }
    }
}

impl ApiError {
    /// The answer with its status and headers; `body` writes the code and message in a protocol's shape.
    fn respond<B: Serialize>(self, body: impl FnOnce(ErrorCode, String) -> B) -> Response {
        let (status, code) = self.status_and_code();
        // 503s (overload, unload, shutdown) are the service working as designed, not faults.
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(code = ?code, message = %self.message(), "request failed");
        }
        let mut response = (status, Json(body(code, self.message()))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.respond(|code, message| ErrorBody { error: ErrorDetail { code, message } })
    }
}

/// An error answered in the Open Inference Protocol's shape, `{"error": message}` (with `code` beside it),
/// at the status `ApiError` maps it to.
#[derive(Debug)]
pub struct ProtocolError(pub ApiError);

impl<E: Into<ApiError>> From<E> for ProtocolError {
    fn from(error: E) -> Self {
        ProtocolError(error.into())
    }
}

/// The body of an Open Inference Protocol error.
#[derive(Serialize, ToSchema)]
pub struct ProtocolErrorBody {
    error: String,
    code: ErrorCode,
}

impl IntoResponse for ProtocolError {
    fn into_response(self) -> Response {
        self.0.respond(|code, error| ProtocolErrorBody { error, code })
    }
}
