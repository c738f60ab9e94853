//! The core's one error type, with the causes it keeps; `api/error.rs` maps it to HTTP once.

use std::sync::Arc;

use thiserror::Error;

use crate::edit::EditError;
use crate::imaging::ImageError;
use crate::models::ModelError;
use crate::store::StoreError;

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
    #[error("image {index}: {error}")]
    Image {
        index: usize,
        #[source]
        error: ImageError,
    },
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
    Model(#[source] Arc<ModelError>),
    #[error("invalid model package: {0}")]
    InvalidPackage(String),
    /// The metadata or blob store failed (its cause kept; shared so that one failure can answer several
    /// waiting requests).
    #[error(transparent)]
    Store(Arc<StoreError>),
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

impl CoreError {
    /// `kind` named `id` does not exist.
    pub fn not_found(kind: Resource, id: &str) -> Self {
        CoreError::NotFound { kind, message: format!("{kind} '{id}' does not exist") }
    }

    pub fn image(index: usize, error: &ImageError) -> Self {
        CoreError::Image { index, error: error.clone() }
    }
}

impl From<ModelError> for CoreError {
    fn from(error: ModelError) -> Self {
        CoreError::Model(Arc::new(error))
    }
}

impl From<StoreError> for CoreError {
    fn from(error: StoreError) -> Self {
        CoreError::Store(Arc::new(error))
    }
}

impl From<EditError> for CoreError {
    fn from(error: EditError) -> Self {
        match error {
            EditError::Invalid(message) | EditError::Unsupported(message) => CoreError::InvalidArgument(message),
            EditError::Cancelled => CoreError::Cancelled,
            other => CoreError::Internal(other.to_string()),
        }
    }
}
