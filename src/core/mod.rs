//! The service's core, free of HTTP: the model registry, the per-device inference scheduler.

pub mod cpu_pool;
pub mod exemplars;
pub mod registry;
pub mod scheduler;

use thiserror::Error;

use crate::imaging::ImageError;
use crate::models::ModelError;

#[derive(Debug, Error, Clone)]
pub enum CoreError {
    #[error("model '{0}' is not loaded")]
    UnknownModel(String),
    #[error("{kind} '{id}' does not exist")]
    NotFound { kind: Resource, id: String },
    #[error("a model named '{0}' is already loaded")]
    ModelExists(String),
    #[error("model '{0}' was unloaded while this request waited")]
    ModelUnloaded(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("image {index}: {message}")]
    Image { index: usize, message: String, kind: ImageErrorKind },
    #[error("the inference queue is full; retry shortly")]
    Overloaded,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("model error: {0}")]
    Model(String),
    #[error("invalid model package: {0}")]
    InvalidPackage(String),
    #[error("{0}")]
    Internal(String),
}

/// Stored things a request can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Exemplar,
    Texture,
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resource::Exemplar => "exemplar",
            Resource::Texture => "texture",
        })
    }
}

/// What kind of image problem, kept apart from the message so the transport can pick a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageErrorKind {
    Empty,
    UnsupportedFormat,
    TooManyPixels,
    Corrupt,
}

impl CoreError {
    pub fn image(index: usize, error: &ImageError) -> Self {
        let kind = match error {
            ImageError::Empty => ImageErrorKind::Empty,
            ImageError::UnsupportedFormat => ImageErrorKind::UnsupportedFormat,
            ImageError::TooManyPixels { .. } => ImageErrorKind::TooManyPixels,
            ImageError::Corrupt(_) => ImageErrorKind::Corrupt,
        };
        CoreError::Image { index, message: error.to_string(), kind }
    }
}

impl From<ModelError> for CoreError {
    fn from(error: ModelError) -> Self {
        CoreError::Model(error.to_string())
    }
}
