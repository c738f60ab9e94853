//! Datasets over HTTP: multipart uploads (or a directory of the datasets directory), listing, reading and
//! deleting. Uploads have their own body limit, `--max-dataset-bytes`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::body::{EncodedImage, Parts, UploadRefusals};
use super::error::{ApiError, ErrorBody};
use super::exemplars::json_part;
use super::models::content_length;
use super::params::IdPath;
use super::AppState;
use crate::core::datasets::{Dataset, DatasetKind, DatasetParts, DatasetSource};

#[derive(Serialize, ToSchema)]
pub struct DatasetView {
    id: String,
    name: Option<String>,
    kind: DatasetKind,
    /// Images, or pairs.
    images: u64,
    labelled: bool,
    /// Distinct labels.
    classes: u64,
    created_at: String,
}

impl From<Dataset> for DatasetView {
    fn from(Dataset { kind, record }: Dataset) -> Self {
        Self {
            id: record.id,
            name: record.name,
            kind,
            images: record.images,
            labelled: kind != DatasetKind::Unlabelled,
            classes: record.classes,
            created_at: record.created_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct DatasetList {
    datasets: Vec<DatasetView>,
}

/// A dataset upload: `kind` and `image` parts (labelled or unlabelled) or `original` and `transformed` parts
/// matched by order (pairs), with `labels`; or only a `directory` (and `name`).
#[derive(ToSchema)]
pub struct DatasetForm {
    name: Option<String>,
    /// A subdirectory of `--datasets-dir` (with a manifest), instead of uploaded images.
    directory: Option<String>,
    /// `labelled`, `pairs` or `unlabelled`.
    kind: Option<String>,
    /// A JSON array of ImageNet class indices, one per image or pair, in order.
    #[schema(value_type = Option<Vec<u32>>)]
    labels: Option<Value>,
    #[schema(required = false)]
    image: Vec<EncodedImage>,
    #[schema(required = false)]
    original: Vec<EncodedImage>,
    #[schema(required = false)]
    transformed: Vec<EncodedImage>,
}

/// Stores a dataset (labelled images, unlabelled images, or pairs of an original and its transformed copy)
/// for evaluations and breakage guards.
#[utoipa::path(post, path = "/v1/datasets", tag = "datasets", security(("bearer" = ["edit"])),
    request_body(content = DatasetForm, content_type = "multipart/form-data"),
    responses((status = 201, body = DatasetView), UploadRefusals))]
pub async fn create_dataset(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<(StatusCode, Json<DatasetView>), ApiError> {
    let limit = state.config.max_dataset_bytes;
    if content_length(request.headers()).is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    // Two images per item (pairs), and name, directory, kind and labels.
    let most_parts = 2 * state.config.max_dataset_images + 4;
    let mut parts = Parts::read(request, limit, most_parts).await?;
    let form = DatasetForm {
        name: parts.take_text("name")?,
        directory: parts.take_text("directory")?,
        kind: parts.take_text("kind")?,
        labels: parts.take_one("labels")?.map(|bytes| json_part::<Value>("labels", &bytes)).transpose()?,
        image: parts.take_images("image"),
        original: parts.take_images("original"),
        transformed: parts.take_images("transformed"),
    };
    parts.expect_no_more("the parts are kind, name, labels, image, original, transformed and directory")?;
    let bytes = |images: Vec<EncodedImage>| images.into_iter().map(|EncodedImage(bytes)| bytes).collect();
    let upload = DatasetParts {
        kind: form.kind,
        labels: form.labels,
        images: bytes(form.image),
        originals: bytes(form.original),
        transformed: bytes(form.transformed),
    };
    let (name, directory) = (form.name, form.directory);
    let source = match directory {
        None => DatasetSource::Uploaded(upload),
        Some(directory) => {
            let uploaded = upload.kind.is_some() || upload.labels.is_some();
            if uploaded || !upload.images.is_empty() || !upload.originals.is_empty() || !upload.transformed.is_empty() {
                return Err(ApiError::InvalidRequest(
                    "a 'directory' dataset takes its kind, images and labels from the directory: give only 'name' beside it".into(),
                ));
            }
            DatasetSource::Directory(directory)
        }
    };
    Ok((StatusCode::CREATED, Json(state.datasets.create(name, source).await?.into())))
}

/// The stored datasets.
#[utoipa::path(get, path = "/v1/datasets", tag = "datasets", security(("bearer" = ["edit"])), responses((status = 200, body = DatasetList)))]
pub async fn list_datasets(State(state): State<Arc<AppState>>) -> Result<Json<DatasetList>, ApiError> {
    let datasets = state.datasets.list().await?.into_iter().map(DatasetView::from).collect();
    Ok(Json(DatasetList { datasets }))
}

/// One dataset's description.
#[utoipa::path(get, path = "/v1/datasets/{id}", tag = "datasets", security(("bearer" = ["edit"])), params(IdPath), responses(
    (status = 200, body = DatasetView),
    (status = 404, body = ErrorBody, description = "`dataset_not_found`"),
))]
pub async fn get_dataset(
    State(state): State<Arc<AppState>>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<Json<DatasetView>, ApiError> {
    Ok(Json(state.datasets.get(&id).await?.into()))
}

/// Deletes a dataset.
#[utoipa::path(delete, path = "/v1/datasets/{id}", tag = "datasets", security(("bearer" = ["edit"])), params(IdPath), responses(
    (status = 204, description = "Deleted"),
    (status = 404, body = ErrorBody, description = "`dataset_not_found`"),
))]
pub async fn delete_dataset(
    State(state): State<Arc<AppState>>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<StatusCode, ApiError> {
    state.datasets.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
