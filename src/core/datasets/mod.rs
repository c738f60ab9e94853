//! Datasets: the images evaluations score versions on. A dataset is `labelled` (images with class labels),
//! `unlabelled` (images), or `pairs` (an original and its transformed copy, of the same size, labelled with
//! the original's class). It is uploaded, or read from a subdirectory of the operator's `--datasets-dir`.
//! Every image is decoded once to validate it (with the service's decode limits) and stored as it came in
//! the content-addressed blob store; the rows follow in one transaction, so a crash in between leaves only
//! unreferenced blobs, which the start-up sweep removes. Datasets belong to no model: labels are checked
//! against a model's classes when an evaluation uses them.

mod check;
mod directory;

use check::*;
pub use directory::*;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::caller;
use super::cpu_pool::CpuPool;
use super::directories::{blocking, file_inside, files, subdirectory};
use super::{CoreError, Resource};
use crate::imaging::{decode, DecodeLimits};
use crate::store::{now_rfc3339, serde_name, BlobStore, DatasetItemRecord, DatasetRecord, MetadataStore};
use utoipa::ToSchema;

/// Labels are class indices below this at upload; an evaluation checks them against its model's classes.
pub const LABEL_BOUND: u32 = 100_000;

const LONGEST_NAME: usize = 200;

/// Validation decodes an upload in at most this many tasks on the CPU pool, leaving room in its queue for
/// classification.
const VALIDATION_TASKS: usize = 4;

/// Blobs written at once: each write fsyncs, so a few in flight hide the disk's latency.
const BLOB_WRITES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    Labelled,
    Pairs,
    Unlabelled,
}

impl DatasetKind {
    fn parse(text: Option<&str>) -> Result<Self, CoreError> {
        match text {
            Some("labelled") => Ok(DatasetKind::Labelled),
            Some("pairs") => Ok(DatasetKind::Pairs),
            Some("unlabelled") => Ok(DatasetKind::Unlabelled),
            Some(other) => Err(invalid(format!("kind must be labelled, pairs or unlabelled, got '{other}'"))),
            None => Err(invalid("a dataset needs a 'kind': labelled, pairs or unlabelled")),
        }
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_name(self))
    }
}

/// A dataset as a request gives it, not yet checked: `images` (labelled, unlabelled) or `originals` and
/// `transformed` matched by order (pairs), and `labels`, which should be a JSON array of class indices in
/// the same order.
#[derive(Debug, Default)]
pub struct DatasetParts {
    pub kind: Option<String>,
    pub images: Vec<Bytes>,
    pub originals: Vec<Bytes>,
    pub transformed: Vec<Bytes>,
    pub labels: Option<Value>,
}

pub enum DatasetSource {
    Uploaded(DatasetParts),
    /// A subdirectory of the datasets directory, by name.
    Directory(String),
}

/// One image of a dataset: a pair's original with its transformed copy, or an image.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetItem {
    pub image: Bytes,
    pub transformed: Option<Bytes>,
    pub label: Option<u32>,
}

/// A stored dataset's images, in order.
#[derive(Debug, Clone)]
pub struct DatasetImages {
    pub kind: DatasetKind,
    pub items: Vec<DatasetItem>,
}

/// A stored dataset with its kind read.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub record: DatasetRecord,
}

pub struct Datasets {
    metadata: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    cpu: Arc<CpuPool>,
    limits: DecodeLimits,
    root: Option<PathBuf>,
    max_images: usize,
    max_bytes: usize,
}

fn invalid(message: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument(message.into())
}

fn kind_of(record: &DatasetRecord) -> Result<DatasetKind, CoreError> {
    serde_json::from_value(Value::String(record.kind.clone()))
        .map_err(|_| CoreError::Internal(format!("dataset {} has the unknown kind '{}'", record.id, record.kind)))
}

fn dataset(record: DatasetRecord) -> Result<Dataset, CoreError> {
    Ok(Dataset { kind: kind_of(&record)?, record })
}

/// The images of dataset `id`, read from the stores.
pub(super) async fn load_images(
    metadata: &dyn MetadataStore,
    blobs: &dyn BlobStore,
    id: &str,
) -> Result<DatasetImages, CoreError> {
    let record = metadata.dataset(id).await?.ok_or_else(|| CoreError::not_found(Resource::Dataset, id))?;
    let kind = kind_of(&record)?;
    let rows = metadata.dataset_items(id).await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        let transformed = match &row.transformed_blob {
            Some(blob) => Some(Bytes::from(blobs.get(blob).await?)),
            None => None,
        };
        items.push(DatasetItem {
            image: Bytes::from(blobs.get(&row.image_blob).await?),
            transformed,
            label: row.label,
        });
    }
    Ok(DatasetImages { kind, items })
}

impl Datasets {
    /// `root`: the datasets directory; `max_images`: items (images or pairs) per dataset; `max_bytes`: what
    /// a directory dataset may read (an upload's body has the same limit at the HTTP layer).
    pub fn new(
        metadata: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        cpu: Arc<CpuPool>,
        limits: DecodeLimits,
        root: Option<PathBuf>,
        max_images: usize,
        max_bytes: usize,
    ) -> Self {
        Self { metadata, blobs, cpu, limits, root, max_images, max_bytes }
    }

    /// Checks, validates (every image decoded), stores and records a dataset.
    pub async fn create(&self, name: Option<String>, source: DatasetSource) -> Result<Dataset, CoreError> {
        if name.as_ref().is_some_and(|n| n.chars().count() > LONGEST_NAME) {
            return Err(invalid(format!("name is longer than {LONGEST_NAME} characters")));
        }
        let parts = match source {
            DatasetSource::Uploaded(parts) => parts,
            DatasetSource::Directory(directory) => {
                let (root, max_images, max_bytes) = (self.root.clone(), self.max_images, self.max_bytes);
                blocking(move || read_directory(root.as_deref(), &directory, max_images, max_bytes)).await?
            }
        };
        let (kind, items) = check(parts, self.max_images)?;
        self.validate_pixels(&items).await?;
        let image_blobs = self.put_all(items.iter().map(|item| item.image.clone()).collect()).await?;
        let transformed_blobs =
            self.put_all(items.iter().filter_map(|item| item.transformed.clone()).collect()).await?;
        let mut transformed_blobs = transformed_blobs.into_iter();
        let rows: Vec<DatasetItemRecord> = items
            .iter()
            .zip(image_blobs)
            .map(|(item, image_blob)| DatasetItemRecord {
                image_blob,
                transformed_blob: item.transformed.as_ref().and_then(|_| transformed_blobs.next()),
                label: item.label,
            })
            .collect();
        let classes = items.iter().filter_map(|item| item.label).collect::<BTreeSet<u32>>().len();
        let record = DatasetRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name,
            kind: serde_name(kind),
            images: items.len() as u64,
            classes: classes as u64,
            created_at: now_rfc3339(),
        };
        // Blobs first, then the rows: a crash in between leaves unreferenced blobs, never a row without its image.
        self.metadata.create_dataset(&record, &rows).await?;
        let detail = json!({"kind": kind, "images": record.images, "name": record.name});
        self.metadata.record_audit("dataset.create", &record.id, &caller::current(), Some(detail)).await?;
        dataset(record)
    }

    /// Decodes every image (pixels included) on the CPU pool; the first failure in dataset order names its
    /// image, and a pair of two sizes is refused.
    async fn validate_pixels(&self, items: &[DatasetItem]) -> Result<(), CoreError> {
        let size = items.len().div_ceil(VALIDATION_TASKS).max(1);
        let limits = self.limits;
        let tasks = items.chunks(size).enumerate().map(|(i, chunk)| {
            let chunk = chunk.to_vec();
            self.cpu.run(move || validate_chunk(&chunk, i * size, limits))
        });
        for result in futures_util::future::join_all(tasks).await {
            result??;
        }
        Ok(())
    }

    /// Stores `images`, a few at once; their sha256s in order.
    async fn put_all(&self, images: Vec<Bytes>) -> Result<Vec<String>, CoreError> {
        let writes = images.into_iter().map(|bytes| {
            let blobs = Arc::clone(&self.blobs);
            async move { blobs.put(bytes.to_vec()).await }
        });
        Ok(futures_util::stream::iter(writes).buffered(BLOB_WRITES).try_collect().await?)
    }

    /// The images of dataset `id`, in order, with their labels.
    pub async fn load(&self, id: &str) -> Result<DatasetImages, CoreError> {
        load_images(self.metadata.as_ref(), self.blobs.as_ref(), id).await
    }

    pub async fn get(&self, id: &str) -> Result<Dataset, CoreError> {
        dataset(self.metadata.dataset(id).await?.ok_or_else(|| CoreError::not_found(Resource::Dataset, id))?)
    }

    /// Newest first.
    pub async fn list(&self) -> Result<Vec<Dataset>, CoreError> {
        self.metadata.datasets().await?.into_iter().map(dataset).collect()
    }

    /// Deletes a dataset; evaluations that used it keep their results.
    pub async fn delete(&self, id: &str) -> Result<(), CoreError> {
        if !self.metadata.delete_dataset(id).await? {
            return Err(CoreError::not_found(Resource::Dataset, id));
        }
        self.metadata.record_audit("dataset.delete", id, &caller::current(), None).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(kind: &str, images: usize, labels: Option<Value>) -> DatasetParts {
        let images = (0..images).map(|i| Bytes::from(vec![i as u8])).collect();
        DatasetParts { kind: Some(kind.into()), images, labels, ..DatasetParts::default() }
    }

    fn message(result: Result<(DatasetKind, Vec<DatasetItem>), CoreError>) -> String {
        match result {
            Err(CoreError::InvalidArgument(message)) => message,
            Err(other) => panic!("not a 422: {other:?}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn labels_are_one_class_index_per_image() {
        let (kind, items) = check(parts("labelled", 2, Some(json!([3, 99_999]))), 10).unwrap();
        assert_eq!(kind, DatasetKind::Labelled);
        assert_eq!(items.iter().map(|i| i.label).collect::<Vec<_>>(), [Some(3), Some(99_999)]);
        assert!(message(check(parts("labelled", 2, Some(json!([3]))), 10)).contains("1 labels for 2 images"));
        assert!(message(check(parts("labelled", 1, Some(json!([100_000]))), 10)).contains("labels[0]"));
        assert!(message(check(parts("labelled", 1, Some(json!([-1]))), 10)).contains("labels[0]"));
        assert!(message(check(parts("labelled", 1, Some(json!([1.5]))), 10)).contains("labels[0]"));
        assert!(message(check(parts("labelled", 1, Some(json!({"a": 1}))), 10)).contains("JSON array"));
        assert!(message(check(parts("labelled", 1, None), 10)).contains("needs 'labels'"));
        assert!(message(check(parts("unlabelled", 1, Some(json!([1]))), 10)).contains("takes no labels"));
    }

    #[test]
    fn kinds_counts_and_pairs_are_checked() {
        assert!(message(check(parts("photos", 1, None), 10)).contains("got 'photos'"));
        assert!(message(check(DatasetParts::default(), 10)).contains("needs a 'kind'"));
        assert!(message(check(parts("unlabelled", 0, None), 10)).contains("empty"));
        assert!(message(check(parts("unlabelled", 11, None), 10)).contains("over the limit of 10"));
        let image = Bytes::from_static(b"x");
        let pairs = DatasetParts {
            kind: Some("pairs".into()),
            originals: vec![image.clone(), image.clone()],
            transformed: vec![image.clone()],
            labels: Some(json!([1, 2])),
            ..DatasetParts::default()
        };
        assert!(message(check(pairs, 10)).contains("2 originals and 1 transformed"));
        let pairs = DatasetParts {
            kind: Some("pairs".into()),
            originals: vec![image.clone()],
            transformed: vec![image.clone()],
            labels: Some(json!([7])),
            ..DatasetParts::default()
        };
        let (_, items) = check(pairs, 10).unwrap();
        assert_eq!(items, [DatasetItem { image: image.clone(), transformed: Some(image.clone()), label: Some(7) }]);
        let mixed = DatasetParts { originals: vec![image], ..parts("labelled", 1, Some(json!([1]))) };
        assert!(message(check(mixed, 10)).contains("for pairs"));
    }
}
