//! SQLite queries of the `VersionStore`: versions, aliases and the weights a model name's versions are made on.

use super::*;

#[async_trait]
impl VersionStore for SqliteStore {
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
}
