//! Exemplars: an image, the mask of its concept, and a modified copy (uploaded, or made by the server
//! with a transform), validated, stored as PNG blobs, and recorded in the metadata store and audit log.
//! Textures for the texture transform live here too.

use std::io::Cursor;
use std::sync::Arc;

use bytes::Bytes;
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};

use super::caller;
use super::cpu_pool::CpuPool;
use super::{Conflict, CoreError, Resource};
use crate::imaging::concept::{MaskShapes, Transform};
use crate::imaging::{binary_mask, decode, DecodeLimits};
use crate::store::{now_rfc3339, AuditEntry, BlobStore, ExemplarRecord, MetadataStore, StoreError, TextureRecord};

pub enum MaskInput {
    Png(Bytes),
    Shapes(MaskShapes),
}

pub enum ModifiedInput {
    Image(Bytes),
    Transform(Transform),
}

#[derive(Debug, Clone, Copy)]
pub enum ExemplarImage {
    Image,
    Mask,
    Modified,
}

pub struct Exemplars {
    metadata: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    cpu: Arc<CpuPool>,
    limits: DecodeLimits,
}

/// The validated pixels of a new exemplar, ready to be stored.
struct Prepared {
    image: Vec<u8>,
    mask: Vec<u8>,
    modified: Vec<u8>,
    width: u32,
    height: u32,
    mask_fraction: f64,
}

fn png(image: DynamicImage) -> Result<Vec<u8>, CoreError> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .map_err(|e| CoreError::Internal(format!("cannot encode a PNG: {e}")))?;
    Ok(out)
}

fn decode_part(part: &str, bytes: &[u8], limits: DecodeLimits) -> Result<DynamicImage, CoreError> {
    decode(bytes, limits).map_err(|e| CoreError::InvalidArgument(format!("{part}: {e}")))
}

fn same_size(part: &str, got: (u32, u32), image: (u32, u32)) -> Result<(), CoreError> {
    if got == image {
        return Ok(());
    }
    Err(CoreError::InvalidArgument(format!(
        "{part} is {}x{} but the image is {}x{}: they must be the same size",
        got.0, got.1, image.0, image.1
    )))
}

impl Exemplars {
    pub fn new(
        metadata: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        cpu: Arc<CpuPool>,
        limits: DecodeLimits,
    ) -> Self {
        Self { metadata, blobs, cpu, limits }
    }

    pub async fn create_texture(&self, image: Bytes) -> Result<TextureRecord, CoreError> {
        let limits = self.limits;
        let (encoded, width, height) = self
            .cpu
            .run(move || {
                let decoded = decode_part("texture", &image, limits)?;
                let (w, h) = (decoded.width(), decoded.height());
                Ok::<_, CoreError>((png(DynamicImage::ImageRgb8(decoded.to_rgb8()))?, w, h))
            })
            .await??;
        let record = TextureRecord {
            id: uuid::Uuid::new_v4().to_string(),
            image_blob: self.blobs.put(encoded).await?,
            width,
            height,
            created_at: now_rfc3339(),
        };
        self.metadata.insert_texture(&record).await?;
        self.metadata.record_audit("texture.create", &record.id, &caller::current(), None).await?;
        Ok(record)
    }

    pub async fn create(
        &self,
        image: Bytes,
        mask: MaskInput,
        modified: ModifiedInput,
    ) -> Result<ExemplarRecord, CoreError> {
        let transform = match &modified {
            ModifiedInput::Transform(t) => {
                t.validate().map_err(CoreError::InvalidArgument)?;
                Some(t.clone())
            }
            ModifiedInput::Image(_) => None,
        };
        let texture = match &transform {
            Some(Transform::Texture { texture, .. }) => Some(self.texture_pixels(texture).await?),
            _ => None,
        };
        let limits = self.limits;
        let prepared = self.cpu.run(move || prepare(&image, mask, modified, texture, limits)).await??;
        let record = ExemplarRecord {
            id: uuid::Uuid::new_v4().to_string(),
            image_blob: self.blobs.put(prepared.image).await?,
            mask_blob: self.blobs.put(prepared.mask).await?,
            modified_blob: self.blobs.put(prepared.modified).await?,
            width: prepared.width,
            height: prepared.height,
            mask_fraction: prepared.mask_fraction,
            transform: transform.map(|t| serde_json::to_value(t).unwrap_or_default()),
            created_at: now_rfc3339(),
        };
        // Blobs first, then the row: a crash in between leaves an unreferenced blob, never a row
        // pointing at a missing one.
        self.metadata.insert_exemplar(&record).await?;
        self.metadata.record_audit("exemplar.create", &record.id, &caller::current(), None).await?;
        Ok(record)
    }

    async fn texture_pixels(&self, id: &str) -> Result<RgbImage, CoreError> {
        let record = self.metadata.texture(id).await?.ok_or_else(|| CoreError::not_found(Resource::Texture, id))?;
        let bytes = self.blobs.get(&record.image_blob).await?;
        let limits = self.limits;
        self.cpu
            .run(move || decode(&bytes, limits).map(|i| i.to_rgb8()).map_err(|e| CoreError::Internal(e.to_string())))
            .await?
    }

    pub async fn get(&self, id: &str) -> Result<ExemplarRecord, CoreError> {
        self.metadata.exemplar(id).await?.ok_or_else(|| CoreError::not_found(Resource::Exemplar, id))
    }

    /// One of the exemplar's images, as PNG.
    pub async fn image(&self, id: &str, which: ExemplarImage) -> Result<Vec<u8>, CoreError> {
        let record = self.get(id).await?;
        let blob = match which {
            ExemplarImage::Image => &record.image_blob,
            ExemplarImage::Mask => &record.mask_blob,
            ExemplarImage::Modified => &record.modified_blob,
        };
        Ok(self.blobs.get(blob).await?)
    }

    pub async fn delete(&self, id: &str) -> Result<(), CoreError> {
        let in_use = || {
            CoreError::Conflict(
                Conflict::ExemplarInUse,
                format!("exemplar '{id}' is listed by a version; delete the versions made from it first"),
            )
        };
        if self.metadata.exemplar_in_use(id).await? {
            return Err(in_use());
        }
        // An edit that names the exemplar between the check and the delete makes the delete fail here.
        let deleted = match self.metadata.delete_exemplar(id).await {
            Err(StoreError::Referenced(_)) => return Err(in_use()),
            other => other?,
        };
        if !deleted {
            return Err(CoreError::not_found(Resource::Exemplar, id));
        }
        self.metadata.record_audit("exemplar.delete", id, &caller::current(), None).await?;
        Ok(())
    }

    pub async fn audit(&self, since: &str, limit: u32) -> Result<Vec<AuditEntry>, CoreError> {
        Ok(self.metadata.audit_since(since, limit).await?)
    }
}

fn prepare(
    image: &[u8],
    mask: MaskInput,
    modified: ModifiedInput,
    texture: Option<RgbImage>,
    limits: DecodeLimits,
) -> Result<Prepared, CoreError> {
    let image = decode_part("image", image, limits)?.to_rgb8();
    let size = image.dimensions();
    let mask: GrayImage = match mask {
        MaskInput::Png(bytes) => {
            let decoded = decode_part("mask", &bytes, limits)?;
            same_size("the mask", (decoded.width(), decoded.height()), size)?;
            binary_mask(&decoded)
        }
        MaskInput::Shapes(shapes) => shapes.rasterize(size.0, size.1).map_err(CoreError::InvalidArgument)?,
    };
    let covered = mask.pixels().filter(|p| p.0[0] > 0).count();
    if covered == 0 {
        return Err(CoreError::InvalidArgument("the mask is empty: it must cover part of the image".into()));
    }
    let modified = match modified {
        ModifiedInput::Image(bytes) => {
            let decoded = decode_part("modified", &bytes, limits)?;
            same_size("the modified image", (decoded.width(), decoded.height()), size)?;
            decoded.to_rgb8()
        }
        ModifiedInput::Transform(transform) => transform.apply(&image, &mask, texture.as_ref()),
    };
    Ok(Prepared {
        mask_fraction: covered as f64 / (f64::from(size.0) * f64::from(size.1)),
        width: size.0,
        height: size.1,
        image: png(DynamicImage::ImageRgb8(image))?,
        mask: png(DynamicImage::ImageLuma8(mask))?,
        modified: png(DynamicImage::ImageRgb8(modified))?,
    })
}
