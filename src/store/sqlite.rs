//! The SQLite metadata store: one file, WAL journal, migrations from `migrations/` applied at open.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::Row;

use super::{
    now_rfc3339, serde_name, AuditEntry, DatasetItemRecord, DatasetRecord, EvaluationOutcome, EvaluationRecord,
    EvaluationState, ExemplarRecord, JobKind, JobRecord, MetadataStore, StatisticsRecord, StoreError, TextureRecord,
    VersionOutcome, VersionRecord,
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

#[async_trait]
impl MetadataStore for SqliteStore {
    async fn insert_texture(&self, texture: &TextureRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO textures (id, image_blob, width, height, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&texture.id)
            .bind(&texture.image_blob)
            .bind(i64::from(texture.width))
            .bind(i64::from(texture.height))
            .bind(&texture.created_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn texture(&self, id: &str) -> Result<Option<TextureRecord>, StoreError> {
        let row = sqlx::query("SELECT id, image_blob, width, height, created_at FROM textures WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(TextureRecord {
                id: row.try_get("id")?,
                image_blob: row.try_get("image_blob")?,
                width: row.try_get::<i64, _>("width")? as u32,
                height: row.try_get::<i64, _>("height")? as u32,
                created_at: row.try_get("created_at")?,
            })
        })
        .transpose()
    }

    async fn insert_exemplar(&self, e: &ExemplarRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO exemplars (id, image_blob, mask_blob, modified_blob, width, height, mask_fraction, transform, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&e.id)
        .bind(&e.image_blob)
        .bind(&e.mask_blob)
        .bind(&e.modified_blob)
        .bind(i64::from(e.width))
        .bind(i64::from(e.height))
        .bind(e.mask_fraction)
        .bind(e.transform.as_ref().map(|t| t.to_string()))
        .bind(&e.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn exemplar(&self, id: &str) -> Result<Option<ExemplarRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM exemplars WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(exemplar_from_row).transpose()
    }

    async fn delete_exemplar(&self, id: &str) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM exemplars WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(result.rows_affected() > 0)
    }

    async fn exemplar_in_use(&self, id: &str) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM version_exemplars e JOIN versions v ON v.model = e.model AND v.number = e.number \
             WHERE e.exemplar = ? AND v.state != 'deleted') AS used",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("used")? != 0)
    }

    async fn create_edit(&self, job: &JobRecord, v: &VersionRecord) -> Result<u32, StoreError> {
        let mut tx = self.pool.begin().await?;
        // One statement takes the number and writes the row, so two edits never get the same number.
        let row = sqlx::query(
            "INSERT INTO versions (model, number, parent, state, layer, method, solver, parameters, statistics, \
             description, metrics, error, job, delta_blob, stored_bytes, created_at, ready_at) \
             SELECT ?, COALESCE(MAX(number), 0) + 1, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, NULL, 0, ?, NULL \
             FROM versions WHERE model = ? RETURNING number",
        )
        .bind(&v.model)
        .bind(i64::from(v.parent))
        .bind(serde_name(v.state))
        .bind(&v.layer)
        .bind(&v.method)
        .bind(&v.solver)
        .bind(v.parameters.to_string())
        .bind(&v.statistics)
        .bind(&v.description)
        .bind(&v.job)
        .bind(&v.created_at)
        .bind(&v.model)
        .fetch_one(&mut *tx)
        .await?;
        let number: i64 = row.try_get("number")?;
        for (position, exemplar) in v.exemplars.iter().enumerate() {
            sqlx::query("INSERT INTO version_exemplars (model, number, position, exemplar) VALUES (?, ?, ?, ?)")
                .bind(&v.model)
                .bind(number)
                .bind(position as i64)
                .bind(exemplar)
                .execute(&mut *tx)
                .await?;
        }
        let job = JobRecord { version: Some(number as u32), ..job.clone() };
        bind_job(sqlx::query(INSERT_JOB), &job).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(number as u32)
    }

    async fn create_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        bind_job(sqlx::query(INSERT_JOB), job).execute(&self.pool).await?;
        Ok(())
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn job_by_idempotency_key(&self, key: &str) -> Result<Option<JobRecord>, StoreError> {
        let row =
            sqlx::query("SELECT * FROM jobs WHERE idempotency_key = ?").bind(key).fetch_optional(&self.pool).await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn start_job(&self, id: &str, at: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET state = 'running', started_at = ? WHERE id = ? AND state = 'queued'")
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn finish_job(
        &self,
        job: &JobRecord,
        version: Option<&VersionOutcome>,
        statistics: Option<&StatisticsRecord>,
        evaluation: Option<&EvaluationOutcome>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE jobs SET state = ?, statistics = ?, step = ?, total = ?, loss = ?, error = ?, started_at = ?, \
             finished_at = ? WHERE id = ?",
        )
        .bind(serde_name(job.state))
        .bind(&job.statistics)
        .bind(job.step as i64)
        .bind(job.total as i64)
        .bind(job.loss)
        .bind(&job.error)
        .bind(&job.started_at)
        .bind(&job.finished_at)
        .bind(&job.id)
        .execute(&mut *tx)
        .await?;
        let number = job.version.map(i64::from);
        match version {
            Some(VersionOutcome::Ready { delta_blob, stored_bytes, metrics, ready_at }) => {
                sqlx::query(
                    "UPDATE versions SET state = 'ready', metrics = ?, delta_blob = ?, stored_bytes = ?, ready_at = ? \
                     WHERE model = ? AND number = ?",
                )
                .bind(metrics.to_string())
                .bind(delta_blob)
                .bind(*stored_bytes as i64)
                .bind(ready_at)
                .bind(&job.model)
                .bind(number)
                .execute(&mut *tx)
                .await?;
            }
            Some(VersionOutcome::Failed { error }) => {
                sqlx::query("UPDATE versions SET state = 'failed', error = ? WHERE model = ? AND number = ?")
                    .bind(error)
                    .bind(&job.model)
                    .bind(number)
                    .execute(&mut *tx)
                    .await?;
            }
            None => {}
        }
        if let Some(s) = statistics {
            sqlx::query(
                "INSERT INTO statistics (id, model, layer, blob, images, positions, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&s.id)
            .bind(&s.model)
            .bind(&s.layer)
            .bind(&s.blob)
            .bind(s.images as i64)
            .bind(s.positions as i64)
            .bind(&s.created_at)
            .execute(&mut *tx)
            .await?;
        }
        if job.kind == JobKind::Evaluation {
            // Results only with success; the excluded classes grow by the exemplars' once known.
            let succeeded = evaluation.filter(|_| EvaluationState::from(job.state) == EvaluationState::Succeeded);
            sqlx::query(
                "UPDATE evaluations SET state = ?, excluded_classes = COALESCE(?, excluded_classes), result = ?, error = ?, \
                 finished_at = ? WHERE job = ?",
            )
            .bind(serde_name(EvaluationState::from(job.state)))
            .bind(succeeded.map(|e| json_text(&e.excluded_classes)))
            .bind(succeeded.map(|e| e.results.to_string()))
            .bind(&job.error)
            .bind(&job.finished_at)
            .bind(&job.id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn fail_running_jobs(&self, message: &str) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE versions SET state = 'failed', error = ? \
             WHERE state = 'pending' AND job IN (SELECT id FROM jobs WHERE state = 'running')",
        )
        .bind(message)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE evaluations SET state = 'failed', error = ?, finished_at = ? \
             WHERE state = 'pending' AND job IN (SELECT id FROM jobs WHERE state = 'running')",
        )
        .bind(message)
        .bind(now_rfc3339())
        .execute(&mut *tx)
        .await?;
        let failed =
            sqlx::query("UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE state = 'running'")
                .bind(message)
                .bind(now_rfc3339())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(failed)
    }

    async fn queued_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn versions(&self, model: &str, before: Option<u32>, limit: u32) -> Result<Vec<VersionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM versions WHERE model = ? AND number < ? AND state != 'deleted' ORDER BY number DESC LIMIT ?",
        )
        .bind(model)
        .bind(before.map_or(i64::MAX, i64::from))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        self.with_exemplars(rows).await
    }

    async fn version(&self, model: &str, number: u32) -> Result<Option<VersionRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM versions WHERE model = ? AND number = ?")
            .bind(model)
            .bind(i64::from(number))
            .fetch_all(&self.pool)
            .await?;
        Ok(self.with_exemplars(rows).await?.pop())
    }

    async fn latest_ready(&self, model: &str) -> Result<Option<u32>, StoreError> {
        let row = sqlx::query("SELECT MAX(number) AS latest FROM versions WHERE model = ? AND state = 'ready'")
            .bind(model)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("latest")?.map(|n| n as u32))
    }

    async fn live_versions(&self, model: &str) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM versions WHERE model = ? AND state IN ('pending', 'ready')")
            .bind(model)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")? as u64)
    }

    async fn children(&self, model: &str, number: u32) -> Result<u64, StoreError> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n FROM versions WHERE model = ? AND parent = ? AND state != 'deleted'")
                .bind(model)
                .bind(i64::from(number))
                .fetch_one(&self.pool)
                .await?;
        Ok(row.try_get::<i64, _>("n")? as u64)
    }

    async fn delete_version(&self, model: &str, number: u32) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE versions SET state = 'deleted' WHERE model = ? AND number = ?")
            .bind(model)
            .bind(i64::from(number))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM version_exemplars WHERE model = ? AND number = ?")
            .bind(model)
            .bind(i64::from(number))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn aliases(&self, model: &str) -> Result<Vec<(String, u32)>, StoreError> {
        let rows = sqlx::query("SELECT alias, number FROM aliases WHERE model = ? ORDER BY alias")
            .bind(model)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get("alias")?, r.try_get::<i64, _>("number")? as u32))).collect()
    }

    async fn set_alias(&self, model: &str, alias: &str, number: u32) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO aliases (model, alias, number, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (model, alias) DO UPDATE SET number = excluded.number, updated_at = excluded.updated_at",
        )
        .bind(model)
        .bind(alias)
        .bind(i64::from(number))
        .bind(now_rfc3339())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_alias(&self, model: &str, alias: &str) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM aliases WHERE model = ? AND alias = ?")
            .bind(model)
            .bind(alias)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn statistics(&self, id: &str) -> Result<Option<StatisticsRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM statistics WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.map(|row| {
            Ok(StatisticsRecord {
                id: row.try_get("id")?,
                model: row.try_get("model")?,
                layer: row.try_get("layer")?,
                blob: row.try_get("blob")?,
                images: row.try_get::<i64, _>("images")? as u64,
                positions: row.try_get::<i64, _>("positions")? as u64,
                created_at: row.try_get("created_at")?,
            })
        })
        .transpose()
    }

    async fn referenced_blobs(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT image_blob AS blob FROM exemplars UNION SELECT mask_blob FROM exemplars \
             UNION SELECT modified_blob FROM exemplars UNION SELECT image_blob FROM textures \
             UNION SELECT delta_blob FROM versions WHERE state != 'deleted' AND delta_blob IS NOT NULL \
             UNION SELECT blob FROM statistics \
             UNION SELECT image_blob FROM dataset_items \
             UNION SELECT transformed_blob FROM dataset_items WHERE transformed_blob IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("blob")?)).collect()
    }

    async fn create_dataset(&self, dataset: &DatasetRecord, items: &[DatasetItemRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO datasets (id, name, kind, images, classes, created_at) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(&dataset.id)
            .bind(&dataset.name)
            .bind(&dataset.kind)
            .bind(dataset.images as i64)
            .bind(dataset.classes as i64)
            .bind(&dataset.created_at)
            .execute(&mut *tx)
            .await?;
        for (position, item) in items.iter().enumerate() {
            sqlx::query(
                "INSERT INTO dataset_items (dataset, position, image_blob, transformed_blob, label) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&dataset.id)
            .bind(position as i64)
            .bind(&item.image_blob)
            .bind(&item.transformed_blob)
            .bind(item.label.map(i64::from))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn dataset(&self, id: &str) -> Result<Option<DatasetRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM datasets WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(dataset_from_row).transpose()
    }

    async fn datasets(&self) -> Result<Vec<DatasetRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM datasets ORDER BY created_at DESC, rowid DESC").fetch_all(&self.pool).await?;
        rows.iter().map(dataset_from_row).collect()
    }

    async fn dataset_items(&self, id: &str) -> Result<Vec<DatasetItemRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT image_blob, transformed_blob, label FROM dataset_items WHERE dataset = ? ORDER BY position",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DatasetItemRecord {
                    image_blob: row.try_get("image_blob")?,
                    transformed_blob: row.try_get("transformed_blob")?,
                    label: row.try_get::<Option<i64>, _>("label")?.map(|l| l as u32),
                })
            })
            .collect()
    }

    async fn delete_dataset(&self, id: &str) -> Result<bool, StoreError> {
        // The items go with it (ON DELETE CASCADE); their blobs with the next start-up's sweep.
        let result = sqlx::query("DELETE FROM datasets WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(result.rows_affected() > 0)
    }

    async fn create_evaluation(&self, job: &JobRecord, e: &EvaluationRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        bind_job(sqlx::query(INSERT_JOB), job).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO evaluations (id, model, job, dataset, baseline, versions, excluded_classes, state, result, error, \
             created_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&e.id)
        .bind(&e.model)
        .bind(&e.job)
        .bind(&e.dataset)
        .bind(i64::from(e.baseline))
        .bind(json_text(&e.versions))
        .bind(json_text(&e.excluded_classes))
        .bind(serde_name(e.state))
        .bind(e.results.as_ref().map(|r| r.to_string()))
        .bind(&e.error)
        .bind(&e.created_at)
        .bind(&e.finished_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn evaluation(&self, id: &str) -> Result<Option<EvaluationRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM evaluations WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(evaluation_from_row).transpose()
    }

    async fn evaluations(
        &self,
        model: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EvaluationRecord>, StoreError> {
        // rowid orders by creation; `before` is a page's last id.
        let rows = sqlx::query(
            "SELECT * FROM evaluations WHERE model = ? \
             AND rowid < COALESCE((SELECT rowid FROM evaluations WHERE id = ?), 9223372036854775807) \
             ORDER BY rowid DESC LIMIT ?",
        )
        .bind(model)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(evaluation_from_row).collect()
    }

    async fn base_weights(&self, model: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT weights_sha256 FROM model_bases WHERE model = ?")
            .bind(model)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("weights_sha256")).transpose()?)
    }

    async fn set_base_weights(&self, model: &str, sha256: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO model_bases (model, weights_sha256, recorded_at) VALUES (?, ?, ?) \
             ON CONFLICT (model) DO UPDATE SET weights_sha256 = excluded.weights_sha256, recorded_at = excluded.recorded_at",
        )
        .bind(model)
        .bind(sha256)
        .bind(now_rfc3339())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_audit(
        &self,
        action: &str,
        subject: &str,
        caller: &str,
        detail: Option<serde_json::Value>,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO audit (at, action, subject, caller, detail) VALUES (?, ?, ?, ?, ?)")
            .bind(now_rfc3339())
            .bind(action)
            .bind(subject)
            .bind(caller)
            .bind(detail.map(|d| d.to_string()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn audit_since(&self, since: &str, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, action, subject, caller, detail FROM audit WHERE at >= ? ORDER BY seq LIMIT ?",
        )
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let detail: Option<String> = row.try_get("detail")?;
                Ok(AuditEntry {
                    seq: row.try_get("seq")?,
                    at: row.try_get("at")?,
                    action: row.try_get("action")?,
                    subject: row.try_get("subject")?,
                    caller: row.try_get("caller")?,
                    detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
                })
            })
            .collect()
    }
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
