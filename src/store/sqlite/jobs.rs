//! SQLite queries of the `JobStore`: jobs (edit, statistics, evaluation) and what they write when they end.

use super::*;

#[async_trait]
impl JobStore for SqliteStore {
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
}
