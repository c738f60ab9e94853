//! Persistence behind traits: metadata (SQLite now; PostgreSQL can implement the same trait to serve
//! several replicas) and content-addressed blobs (a directory now; object storage later).

mod blobs;
mod sqlite;

use async_trait::async_trait;
use serde::Serialize;
use thiserror::Error;
use utoipa::ToSchema;

pub use blobs::FsBlobStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("blob store error: {0}")]
    Blob(String),
    #[error("blob {0} is missing")]
    MissingBlob(String),
    /// A row that others refer to was to be deleted.
    #[error("still referred to: {0}")]
    Referenced(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error.as_database_error() {
            Some(e) if e.is_foreign_key_violation() => StoreError::Referenced(e.message().to_string()),
            _ => StoreError::Database(error.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StoreError::Database(error.to_string())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExemplarRecord {
    pub id: String,
    pub image_blob: String,
    pub mask_blob: String,
    pub modified_blob: String,
    pub width: u32,
    pub height: u32,
    pub mask_fraction: f64,
    pub transform: Option<serde_json::Value>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct TextureRecord {
    pub id: String,
    #[serde(skip)]
    pub image_blob: String,
    pub width: u32,
    pub height: u32,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: String,
    pub action: String,
    pub subject: String,
    pub caller: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// A version's life: `pending` while its job runs, then `ready` or `failed`; `deleted` keeps the number taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    Pending,
    Ready,
    Failed,
    Deleted,
}

/// An edited version (numbers from 1; version 0, the base weights, has no record).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    pub model: String,
    pub number: u32,
    pub parent: u32,
    pub state: VersionState,
    pub layer: String,
    pub method: String,
    pub solver: String,
    pub parameters: serde_json::Value,
    pub statistics: Option<String>,
    pub description: Option<String>,
    pub exemplars: Vec<String>,
    pub metrics: Option<serde_json::Value>,
    pub error: Option<String>,
    pub job: String,
    /// sha256 of the change's safetensors in the blob store, once ready.
    pub delta_blob: Option<String>,
    pub stored_bytes: u64,
    pub created_at: String,
    pub ready_at: Option<String>,
}

/// How an edit job ended for its version.
#[derive(Debug, Clone, PartialEq)]
pub enum VersionOutcome {
    Ready { delta_blob: String, stored_bytes: u64, metrics: serde_json::Value, ready_at: String },
    Failed { error: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Edit,
    Statistics,
    Evaluation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub model: String,
    pub state: JobState,
    pub version: Option<u32>,
    /// The statistics a statistics job made.
    pub statistics: Option<String>,
    pub request: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub request_sha256: String,
    pub step: u64,
    pub total: u64,
    pub loss: Option<f64>,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// The second moment of the keys at one layer of one model, over a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct StatisticsRecord {
    pub id: String,
    pub model: String,
    pub layer: String,
    pub blob: String,
    pub images: u64,
    pub positions: u64,
    pub created_at: String,
}

/// A dataset: images (or pairs) with optional labels, stored as `dataset_items`.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRecord {
    pub id: String,
    pub name: Option<String>,
    /// `labelled`, `pairs` or `unlabelled`.
    pub kind: String,
    /// Images, or pairs for a pairs dataset.
    pub images: u64,
    /// Distinct labels.
    pub classes: u64,
    pub created_at: String,
}

/// One image of a dataset (a pair's original, with its transformed copy), in upload order.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetItemRecord {
    pub image_blob: String,
    pub transformed_blob: Option<String>,
    pub label: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EvaluationState {
    Pending,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<JobState> for EvaluationState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Queued | JobState::Running => EvaluationState::Pending,
            JobState::Succeeded => EvaluationState::Succeeded,
            JobState::Failed => EvaluationState::Failed,
            JobState::Cancelled => EvaluationState::Cancelled,
        }
    }
}

/// An evaluation of versions of a model on a dataset, run by its job; `results` once it succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationRecord {
    pub id: String,
    pub model: String,
    pub dataset: String,
    pub baseline: u32,
    pub versions: Vec<u32>,
    pub state: EvaluationState,
    pub job: String,
    pub excluded_classes: Vec<u32>,
    pub results: Option<serde_json::Value>,
    pub error: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
}

/// What a succeeded evaluation job made.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationOutcome {
    pub excluded_classes: Vec<u32>,
    pub results: serde_json::Value,
}

/// Exemplars and the textures their transforms paste.
#[async_trait]
pub trait ExemplarStore: Send + Sync {
    async fn insert_texture(&self, texture: &TextureRecord) -> Result<(), StoreError>;
    async fn texture(&self, id: &str) -> Result<Option<TextureRecord>, StoreError>;
    async fn insert_exemplar(&self, exemplar: &ExemplarRecord) -> Result<(), StoreError>;
    async fn exemplar(&self, id: &str) -> Result<Option<ExemplarRecord>, StoreError>;
    /// Whether a row was deleted.
    async fn delete_exemplar(&self, id: &str) -> Result<bool, StoreError>;
    /// Whether a version that is not deleted lists the exemplar.
    async fn exemplar_in_use(&self, id: &str) -> Result<bool, StoreError>;
}

/// Jobs (edit, statistics, evaluation) and what they write when they end.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Records a new pending version and the job that makes it, atomically; the version takes the next
    /// number of its model (deleted versions' numbers included), which is returned.
    async fn create_edit(&self, job: &JobRecord, version: &VersionRecord) -> Result<u32, StoreError>;
    async fn create_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;
    async fn job_by_idempotency_key(&self, key: &str) -> Result<Option<JobRecord>, StoreError>;
    async fn start_job(&self, id: &str, at: &str) -> Result<(), StoreError>;
    /// Writes a job's final state with, atomically, its version's outcome (the version is the job's), the
    /// statistics it made, and its evaluation's end (with the results when it succeeded).
    async fn finish_job(
        &self,
        job: &JobRecord,
        version: Option<&VersionOutcome>,
        statistics: Option<&StatisticsRecord>,
        evaluation: Option<&EvaluationOutcome>,
    ) -> Result<(), StoreError>;
    /// At start-up: jobs a stopped server left running fail, and so do their versions and evaluations;
    /// returns how many.
    async fn fail_running_jobs(&self, message: &str) -> Result<u64, StoreError>;
    /// Jobs still queued, oldest first.
    async fn queued_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    async fn statistics(&self, id: &str) -> Result<Option<StatisticsRecord>, StoreError>;
}

/// Versions, aliases and the weights a model name's versions are made on.
#[async_trait]
pub trait VersionStore: Send + Sync {
    /// Versions that are not deleted, newest first, numbered below `before`, at most `limit`.
    async fn versions(&self, model: &str, before: Option<u32>, limit: u32) -> Result<Vec<VersionRecord>, StoreError>;
    async fn version(&self, model: &str, number: u32) -> Result<Option<VersionRecord>, StoreError>;
    async fn latest_ready(&self, model: &str) -> Result<Option<u32>, StoreError>;
    /// Versions of the model that are pending or ready: those whose change is, or will be, on its weights.
    async fn live_versions(&self, model: &str) -> Result<u64, StoreError>;
    /// Versions that are not deleted whose parent is `number`.
    async fn children(&self, model: &str, number: u32) -> Result<u64, StoreError>;
    /// Marks a version deleted and forgets which exemplars it used.
    async fn delete_version(&self, model: &str, number: u32) -> Result<(), StoreError>;
    /// Stored aliases (custom ones and `default` when set), by name.
    async fn aliases(&self, model: &str) -> Result<Vec<(String, u32)>, StoreError>;
    async fn set_alias(&self, model: &str, alias: &str, number: u32) -> Result<(), StoreError>;
    /// Whether the alias existed.
    async fn delete_alias(&self, model: &str, alias: &str) -> Result<bool, StoreError>;
    /// The sha256 of the weights the model name's versions are made on, once recorded.
    async fn base_weights(&self, model: &str) -> Result<Option<String>, StoreError>;
    async fn set_base_weights(&self, model: &str, sha256: &str) -> Result<(), StoreError>;
}

/// Datasets and the evaluations run on them.
#[async_trait]
pub trait DatasetStore: Send + Sync {
    /// Records a dataset and its items (in order), atomically.
    async fn create_dataset(&self, dataset: &DatasetRecord, items: &[DatasetItemRecord]) -> Result<(), StoreError>;
    async fn dataset(&self, id: &str) -> Result<Option<DatasetRecord>, StoreError>;
    /// Every dataset, newest first.
    async fn datasets(&self) -> Result<Vec<DatasetRecord>, StoreError>;
    /// A dataset's items in order (none for an unknown dataset).
    async fn dataset_items(&self, id: &str) -> Result<Vec<DatasetItemRecord>, StoreError>;
    /// Whether a dataset was deleted (with its items; evaluations keep their results).
    async fn delete_dataset(&self, id: &str) -> Result<bool, StoreError>;
    /// Records a queued evaluation job and its pending evaluation, atomically.
    async fn create_evaluation(&self, job: &JobRecord, evaluation: &EvaluationRecord) -> Result<(), StoreError>;
    async fn evaluation(&self, id: &str) -> Result<Option<EvaluationRecord>, StoreError>;
    /// The model's evaluations, newest first, made before the evaluation `before` (when given), at most `limit`.
    async fn evaluations(
        &self,
        model: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EvaluationRecord>, StoreError>;
}

/// The audit log, and the blobs rows refer to (for the start-up sweep).
#[async_trait]
pub trait AuditStore: Send + Sync {
    async fn record_audit(
        &self,
        action: &str,
        subject: &str,
        caller: &str,
        detail: Option<serde_json::Value>,
    ) -> Result<(), StoreError>;
    /// Entries at or after `since` (RFC 3339), oldest first, at most `limit`.
    async fn audit_since(&self, since: &str, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
    /// Every blob a row refers to (deleted versions' changes excepted).
    async fn referenced_blobs(&self) -> Result<std::collections::HashSet<String>, StoreError>;
}

/// Everything the server keeps besides blobs, one store per resource; SQLite implements them all.
pub trait MetadataStore: ExemplarStore + JobStore + VersionStore + DatasetStore + AuditStore {}

impl<T: ExemplarStore + JobStore + VersionStore + DatasetStore + AuditStore> MetadataStore for T {}

#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under their sha256 (hex), which it returns; storing the same bytes twice is a no-op.
    async fn put(&self, bytes: Vec<u8>) -> Result<String, StoreError>;
    async fn get(&self, sha256: &str) -> Result<Vec<u8>, StoreError>;
    /// Removes every blob not in `keep`, and what a crash left half written; returns (blobs, bytes) removed.
    /// Only safe while nothing else writes: the server runs it at start-up, before it serves.
    async fn sweep(&self, keep: &std::collections::HashSet<String>) -> Result<(u64, u64), StoreError>;
}

/// An enum's serde name (`"pending"`, `"edit"`, ...): how states and kinds are stored and reported.
pub fn serde_name<T: Serialize>(value: T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Stored timestamps: RFC 3339 in UTC with exactly six fractional digits, so that they sort as text.
const TIMESTAMP: &[time::format_description::FormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// The current time as a stored timestamp.
pub fn now_rfc3339() -> String {
    format_timestamp(time::OffsetDateTime::now_utc())
}

/// Any RFC 3339 time as a stored timestamp (for comparing with stored ones), or None if it is not one.
pub fn normalize_rfc3339(text: &str) -> Option<String> {
    Some(format_timestamp(parse_rfc3339(text)?.to_offset(time::UtcOffset::UTC)))
}

/// Seconds from the stored timestamp `start` to `end` (now when None); None if either is not a timestamp.
pub fn seconds_between(start: &str, end: Option<&str>) -> Option<f64> {
    let end = match end {
        Some(text) => parse_rfc3339(text)?,
        None => time::OffsetDateTime::now_utc(),
    };
    Some((end - parse_rfc3339(start)?).as_seconds_f64().max(0.0))
}

fn parse_rfc3339(text: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

fn format_timestamp(at: time::OffsetDateTime) -> String {
    at.format(TIMESTAMP).unwrap_or_else(|_| "1970-01-01T00:00:00.000000Z".into())
}
