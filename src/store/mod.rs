//! Persistence behind traits: metadata (SQLite now; PostgreSQL can implement the same trait to serve
//! several replicas) and content-addressed blobs (a directory now; object storage later).

mod blobs;
mod sqlite;

use async_trait::async_trait;
use serde::Serialize;
use thiserror::Error;

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
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::Database(error.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StoreError::Database(error.to_string())
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExemplarRecord {
    pub id: String,
    #[serde(skip)]
    pub image_blob: String,
    #[serde(skip)]
    pub mask_blob: String,
    #[serde(skip)]
    pub modified_blob: String,
    pub width: u32,
    pub height: u32,
    pub mask_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transform: Option<serde_json::Value>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TextureRecord {
    pub id: String,
    #[serde(skip)]
    pub image_blob: String,
    pub width: u32,
    pub height: u32,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: String,
    pub action: String,
    pub subject: String,
    pub caller: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

#[async_trait]
pub trait MetadataStore: Send + Sync {
    async fn insert_texture(&self, texture: &TextureRecord) -> Result<(), StoreError>;
    async fn texture(&self, id: &str) -> Result<Option<TextureRecord>, StoreError>;
    async fn insert_exemplar(&self, exemplar: &ExemplarRecord) -> Result<(), StoreError>;
    async fn exemplar(&self, id: &str) -> Result<Option<ExemplarRecord>, StoreError>;
    /// Whether a row was deleted.
    async fn delete_exemplar(&self, id: &str) -> Result<bool, StoreError>;
    async fn record_audit(&self, action: &str, subject: &str, caller: &str, detail: Option<serde_json::Value>) -> Result<(), StoreError>;
    /// Entries at or after `since` (RFC 3339), oldest first, at most `limit`.
    async fn audit_since(&self, since: &str, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
}

#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under their sha256 (hex), which it returns; storing the same bytes twice is a no-op.
    async fn put(&self, bytes: Vec<u8>) -> Result<String, StoreError>;
    async fn get(&self, sha256: &str) -> Result<Vec<u8>, StoreError>;
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
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(format_timestamp(parsed.to_offset(time::UtcOffset::UTC)))
}

fn format_timestamp(at: time::OffsetDateTime) -> String {
    at.format(TIMESTAMP).unwrap_or_else(|_| "1970-01-01T00:00:00.000000Z".into())
}
