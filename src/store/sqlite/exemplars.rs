//! SQLite queries of the `ExemplarStore`: exemplars and the textures their transforms paste.

use super::*;

#[async_trait]
impl ExemplarStore for SqliteStore {
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
}
