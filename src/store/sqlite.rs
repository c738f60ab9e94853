//! The SQLite metadata store: one file, WAL journal, migrations from `migrations/` applied at open.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::Row;

use super::{now_rfc3339, AuditEntry, ExemplarRecord, MetadataStore, StoreError, TextureRecord};

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

    async fn record_audit(&self, action: &str, subject: &str, caller: &str, detail: Option<serde_json::Value>) -> Result<(), StoreError> {
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
        let rows = sqlx::query("SELECT seq, at, action, subject, caller, detail FROM audit WHERE at >= ? ORDER BY seq LIMIT ?")
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
