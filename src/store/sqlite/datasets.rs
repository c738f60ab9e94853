//! SQLite queries of the `DatasetStore`: datasets and the evaluations run on them.

use super::*;

#[async_trait]
impl DatasetStore for SqliteStore {
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
}
