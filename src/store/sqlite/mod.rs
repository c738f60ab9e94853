//! The SQLite metadata store: one file, WAL journal, migrations from `migrations/` applied at open. Rows and
//! their helpers are here; each resource's queries are in its own file.

mod audit;
mod datasets;
mod exemplars;
mod jobs;
mod versions;

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::Row;

use super::{
    now_rfc3339, serde_name, AuditEntry, AuditStore, DatasetItemRecord, DatasetRecord, DatasetStore, EvaluationOutcome,
    EvaluationRecord, EvaluationState, ExemplarRecord, ExemplarStore, JobKind, JobRecord, JobStore, StatisticsRecord,
    StoreError, TextureRecord, VersionOutcome, VersionRecord, VersionStore,
};

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Database(format!("{}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed row survives a power cut, not only a process kill.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }
}

fn exemplar_from_row(row: &SqliteRow) -> Result<ExemplarRecord, StoreError> {
    let transform: Option<String> = row.try_get("transform")?;
    Ok(ExemplarRecord {
        id: row.try_get("id")?,
        image_blob: row.try_get("image_blob")?,
        mask_blob: row.try_get("mask_blob")?,
        modified_blob: row.try_get("modified_blob")?,
        width: row.try_get::<i64, _>("width")? as u32,
        height: row.try_get::<i64, _>("height")? as u32,
        mask_fraction: row.try_get("mask_fraction")?,
        transform: transform.and_then(|t| serde_json::from_str(&t).ok()),
        created_at: row.try_get("created_at")?,
    })
}

fn enum_from<T: serde::de::DeserializeOwned>(text: String) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text.clone()))
        .map_err(|_| StoreError::Database(format!("unexpected stored value '{text}'")))
}

fn json_column(row: &SqliteRow, column: &str) -> Result<Option<serde_json::Value>, StoreError> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Database(format!("column {column}: {e}"))))
        .transpose()
}

fn version_from_row(row: &SqliteRow, exemplars: Vec<String>) -> Result<VersionRecord, StoreError> {
    Ok(VersionRecord {
        model: row.try_get("model")?,
        number: row.try_get::<i64, _>("number")? as u32,
        parent: row.try_get::<i64, _>("parent")? as u32,
        state: enum_from(row.try_get("state")?)?,
        layer: row.try_get("layer")?,
        method: row.try_get("method")?,
        solver: row.try_get("solver")?,
        parameters: json_column(row, "parameters")?.unwrap_or_default(),
        statistics: row.try_get("statistics")?,
        description: row.try_get("description")?,
        exemplars,
        metrics: json_column(row, "metrics")?,
        error: row.try_get("error")?,
        job: row.try_get("job")?,
        delta_blob: row.try_get("delta_blob")?,
        stored_bytes: row.try_get::<i64, _>("stored_bytes")? as u64,
        created_at: row.try_get("created_at")?,
        ready_at: row.try_get("ready_at")?,
    })
}

fn job_from_row(row: &SqliteRow) -> Result<JobRecord, StoreError> {
    Ok(JobRecord {
        id: row.try_get("id")?,
        kind: enum_from(row.try_get("kind")?)?,
        model: row.try_get("model")?,
        state: enum_from(row.try_get("state")?)?,
        version: row.try_get::<Option<i64>, _>("version")?.map(|v| v as u32),
        statistics: row.try_get("statistics")?,
        request: json_column(row, "request")?.unwrap_or_default(),
        idempotency_key: row.try_get("idempotency_key")?,
        request_sha256: row.try_get("request_sha256")?,
        step: row.try_get::<i64, _>("step")? as u64,
        total: row.try_get::<i64, _>("total")? as u64,
        loss: row.try_get("loss")?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn dataset_from_row(row: &SqliteRow) -> Result<DatasetRecord, StoreError> {
    Ok(DatasetRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        images: row.try_get::<i64, _>("images")? as u64,
        classes: row.try_get::<i64, _>("classes")? as u64,
        created_at: row.try_get("created_at")?,
    })
}

/// A JSON column that holds a list of numbers.
fn numbers_column(row: &SqliteRow, column: &str) -> Result<Vec<u32>, StoreError> {
    let value = json_column(row, column)?.unwrap_or_default();
    serde_json::from_value(value).map_err(|e| StoreError::Database(format!("column {column}: {e}")))
}

fn evaluation_from_row(row: &SqliteRow) -> Result<EvaluationRecord, StoreError> {
    Ok(EvaluationRecord {
        id: row.try_get("id")?,
        model: row.try_get("model")?,
        dataset: row.try_get("dataset")?,
        baseline: row.try_get::<i64, _>("baseline")? as u32,
        versions: numbers_column(row, "versions")?,
        state: enum_from(row.try_get("state")?)?,
        job: row.try_get("job")?,
        excluded_classes: numbers_column(row, "excluded_classes")?,
        results: json_column(row, "result")?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

impl SqliteStore {
    async fn exemplars_of(&self, model: &str, number: u32) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query("SELECT exemplar FROM version_exemplars WHERE model = ? AND number = ? ORDER BY position")
                .bind(model)
                .bind(i64::from(number))
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| Ok(r.try_get("exemplar")?)).collect()
    }

    async fn with_exemplars(&self, rows: Vec<SqliteRow>) -> Result<Vec<VersionRecord>, StoreError> {
        let mut versions = Vec::with_capacity(rows.len());
        for row in &rows {
            let (model, number): (String, i64) = (row.try_get("model")?, row.try_get("number")?);
            versions.push(version_from_row(row, self.exemplars_of(&model, number as u32).await?)?);
        }
        Ok(versions)
    }
}

const INSERT_JOB: &str = "INSERT INTO jobs (id, kind, model, state, version, statistics, request, idempotency_key, \
    request_sha256, step, total, loss, error, created_at, started_at, finished_at) \
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

fn bind_job<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    job: &'q JobRecord,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    query
        .bind(&job.id)
        .bind(serde_name(job.kind))
        .bind(&job.model)
        .bind(serde_name(job.state))
        .bind(job.version.map(i64::from))
        .bind(&job.statistics)
        .bind(job.request.to_string())
        .bind(&job.idempotency_key)
        .bind(&job.request_sha256)
        .bind(job.step as i64)
        .bind(job.total as i64)
        .bind(job.loss)
        .bind(&job.error)
        .bind(&job.created_at)
        .bind(&job.started_at)
        .bind(&job.finished_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exemplars_and_audit_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db/editserve.db");
        let record = ExemplarRecord {
            id: "e1".into(),
            image_blob: "a".into(),
            mask_blob: "b".into(),
            modified_blob: "c".into(),
            width: 4,
            height: 3,
            mask_fraction: 0.25,
            transform: Some(serde_json::json!({"kind": "fill", "rgb": [1, 2, 3]})),
            created_at: now_rfc3339(),
        };
        {
            let store = SqliteStore::open(&path).await.unwrap();
            store.insert_exemplar(&record).await.unwrap();
            store.record_audit("exemplar.create", "e1", "anonymous", None).await.unwrap();
        }
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.exemplar("e1").await.unwrap(), Some(record));
        let audit = store.audit_since("1970-01-01T00:00:00Z", 10).await.unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].action, "exemplar.create");
        assert!(store.delete_exemplar("e1").await.unwrap());
        assert!(!store.delete_exemplar("e1").await.unwrap());
        assert_eq!(store.exemplar("e1").await.unwrap(), None);
    }
}
