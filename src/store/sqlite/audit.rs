//! SQLite queries of the `AuditStore`: the audit log, and the blobs rows refer to (for the start-up sweep).

use super::*;

#[async_trait]
impl AuditStore for SqliteStore {
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
}
