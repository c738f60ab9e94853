//! The service's core, free of HTTP: the model registry, the per-device inference scheduler, versions and
//! aliases, the jobs that edit models on the per-device edit worker, and the datasets and evaluations that
//! score versions.

pub mod cpu_pool;
pub mod datasets;
pub mod directories;
pub mod edit_worker;
pub mod evaluations;
pub mod exemplars;
pub mod jobs;
pub mod registry;
pub mod scheduler;
pub mod versions;

use thiserror::Error;

use crate::imaging::ImageError;
use crate::models::ModelError;

#[derive(Debug, Error, Clone)]
pub enum CoreError {
    #[error("model '{0}' is not loaded")]
    UnknownModel(String),
    #[error("{message}")]
    NotFound { kind: Resource, message: String },
    #[error("a model named '{0}' is already loaded")]
    ModelExists(String),
    #[error("model '{0}' was unloaded while this request waited")]
    ModelUnloaded(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("image {index}: {message}")]
    Image { index: usize, message: String, kind: ImageErrorKind },
    #[error("{1}")]
    Conflict(Conflict, String),
    #[error("the Idempotency-Key was first used with another request; use a new key for a new request")]
    IdempotencyKeyReused,
    #[error("the job was cancelled")]
    Cancelled,
    #[error("the inference queue is full; retry shortly")]
    Overloaded,
    #[error("the edit queue is full ({0} jobs wait); retry later")]
    EditQueueFull(usize),
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
    Version,
    Alias,
    Job,
    Statistics,
    Dataset,
    Evaluation,
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resource::Exemplar => "exemplar",
            Resource::Texture => "texture",
            Resource::Version => "version",
            Resource::Alias => "alias",
            Resource::Job => "job",
            Resource::Statistics => "statistics",
            Resource::Dataset => "dataset",
            Resource::Evaluation => "evaluation",
        })
    }
}

/// Why a request conflicts with the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// The version is pending or failed.
    VersionNotReady,
    /// An alias or a child version refers to the version, or it is version 0.
    VersionInUse,
    /// A version lists the exemplar.
    ExemplarInUse,
    /// `base` and `latest` are computed, never set.
    BuiltinAlias,
    /// The job already reached a final state.
    JobFinished,
    /// The model name has versions made on other weights than those being loaded.
    WeightsChanged,
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
    /// `kind` named `id` does not exist.
    pub fn not_found(kind: Resource, id: &str) -> Self {
        CoreError::NotFound { kind, message: format!("{kind} '{id}' does not exist") }
    }

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
