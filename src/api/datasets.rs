//! Datasets over HTTP: multipart uploads (or a directory of the datasets directory), listing, reading and
//! deleting. Uploads have their own body limit, `--max-dataset-bytes`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::Value;

use super::body::Parts;
use super::error::ApiError;
use super::exemplars::json_part;
use super::models::content_length;
use super::AppState;
use crate::core::datasets::{DatasetList, DatasetParts, DatasetSource, DatasetView};

/// `POST /v1/datasets`: `kind`, `name`, `labels` (a JSON array) and `image` parts, or `original` and
/// `transformed` parts for pairs; or `directory` (and `name`).
pub async fn create_dataset(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<(StatusCode, Json<DatasetView>), ApiError> {
    let limit = state.config.max_dataset_bytes;
    if content_length(request.headers()).is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut parts = Parts::read(request, limit).await?;
    let name = parts.take_text("name")?;
    let directory = parts.take_text("directory")?;
    let upload = DatasetParts {
        kind: parts.take_text("kind")?,
        labels: parts.take_one("labels")?.map(|bytes| json_part::<Value>("labels", &bytes)).transpose()?,
        images: parts.take_all("image"),
        originals: parts.take_all("original"),
        transformed: parts.take_all("transformed"),
    };
    parts.expect_no_more("the parts are kind, name, labels, image, original, transformed and directory")?;
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
    Ok((StatusCode::CREATED, Json(state.datasets.create(name, source).await?)))
}

pub async fn list_datasets(State(state): State<Arc<AppState>>) -> Result<Json<DatasetList>, ApiError> {
    Ok(Json(state.datasets.list().await?))
}

pub async fn get_dataset(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<DatasetView>, ApiError> {
    Ok(Json(state.datasets.get(&id).await?))
}

pub async fn delete_dataset(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.datasets.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
