//! Models: listing, loading and unloading at run time, and classification (raw image or multipart in,
//! predictions out).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::body::{read_body, Parts};
use super::error::ApiError;
use super::query::{parse_query, top_k};
use super::AppState;
use crate::core::registry::{ModelInfo, Prediction};
use crate::core::versions::VersionRef;
use crate::core::CoreError;

#[derive(Serialize)]
pub struct ModelList {
    models: Vec<ModelInfo>,
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList { models: state.registry.models() })
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelInfo>, ApiError> {
    Ok(Json(state.registry.model(&name)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    name: String,
    /// A package directory, relative to the models directory or absolute inside it.
    path: PathBuf,
}

pub async fn load_model(
    State(state): State<Arc<AppState>>,
    body: Result<Json<LoadRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ModelInfo>), ApiError> {
    let Json(request) = body.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let dir = package_dir(&state.config.models_dir, &request.path)?;
    let info = state.versions.load_model(&request.name, &dir).await?;
    let detail = serde_json::json!({"path": request.path, "architecture": info.architecture});
    state.versions.record_model_event("model.load", &info.name, Some(detail)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Packages load only from inside the models directory: a client must not make the server read
/// arbitrary paths.
fn package_dir(models_dir: &std::path::Path, path: &std::path::Path) -> Result<PathBuf, ApiError> {
    let root = models_dir
        .canonicalize()
        .map_err(|e| ApiError::Core(CoreError::Internal(format!("models directory {}: {e}", models_dir.display()))))?;
    let dir = root
        .join(path)
        .canonicalize()
        .map_err(|_| ApiError::InvalidRequest(format!("no model package at '{}'", path.display())))?;
    if !dir.starts_with(&root) {
        return Err(ApiError::InvalidRequest(format!(
            "'{}' is outside the models directory; packages load only from there",
            path.display()
        )));
    }
    Ok(dir)
}

pub async fn unload_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.registry.unload(&name).await?;
    state.jobs.forget_model(&name);
    state.versions.record_model_event("model.unload", &name, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
pub struct SingleResult {
    model: String,
    version: u32,
    predictions: Vec<Prediction>,
}

#[derive(Serialize)]
pub struct ImageResult {
    predictions: Vec<Prediction>,
}

#[derive(Serialize)]
pub struct MultiResult {
    model: String,
    version: u32,
    results: Vec<ImageResult>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum ClassifyResponse {
    Single(SingleResult),
    Multi(MultiResult),
}

/// `POST /v1/models/{name}/classify[?version=…&top_k=…]`: the `default` alias's version unless named.
pub async fn classify(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let query = parse_query(query.as_deref(), &["top_k", "version"]);
    let version = query.as_ref().ok().and_then(|q| q.get("version").cloned());
    classify_version(state, model, version, query, request).await
}

/// Classifies with a named version (or the default) and answers in the shape the body asked for.
pub async fn classify_version(
    state: Arc<AppState>,
    model: String,
    version: Option<String>,
    query: Result<HashMap<String, String>, ApiError>,
    request: Request,
) -> Result<Json<ClassifyResponse>, ApiError> {
    // The body is read (within the limit) before any other error is answered: a server that answers and
    // closes while the client is still sending makes the client see a reset instead of the error.
    let known = state.registry.ensure_loaded(&model);
    let images = read_images(&state, request).await;
    let top_k = top_k(&query?)?;
    known?;
    let version = version.map(|v| VersionRef::parse(&v)).transpose()?;
    let (images, multipart) = images?;
    let (number, mut predictions) = state.versions.classify(&model, version.as_ref(), images, top_k).await?;
    Ok(Json(if multipart {
        ClassifyResponse::Multi(MultiResult {
            model,
            version: number,
            results: predictions.into_iter().map(|predictions| ImageResult { predictions }).collect(),
        })
    } else {
        ClassifyResponse::Single(SingleResult {
            model,
            version: number,
            predictions: predictions.pop().unwrap_or_default(),
        })
    }))
}

/// The query's `key=value` pairs; a key outside `accepted` is an error, so a misspelt one is never ignored.
/// The images of a classify request and whether it was multipart (which answers with `results`).
pub async fn read_images(state: &AppState, request: Request) -> Result<(Vec<Bytes>, bool), ApiError> {
    let limit = state.config.max_body_bytes;
    let content_type = media_type(request.headers());
    if let Some(length) = content_length(request.headers()) {
        if length > limit as u64 {
            return Err(ApiError::PayloadTooLarge { limit });
        }
    }
    match content_type.as_deref() {
        Some("multipart/form-data") => Ok((read_multipart(state, request).await?, true)),
        Some(t) if t.starts_with("image/") || t == "application/octet-stream" => {
            let body = read_body(request.into_body(), limit).await?;
            if body.is_empty() {
                return Err(ApiError::InvalidRequest("the request body is empty: send the image bytes".into()));
            }
            Ok((vec![body], false))
        }
        other => {
            read_body(request.into_body(), limit).await?;
            Err(ApiError::UnsupportedMediaType(match other {
                Some(t) => format!(
                    "Content-Type '{t}' is not supported: send an image (image/*) or multipart/form-data with 'image' parts"
                ),
                None => "the Content-Type header is missing: send an image (image/*) or multipart/form-data".into(),
            }))
        }
    }
}

async fn read_multipart(state: &AppState, request: Request) -> Result<Vec<Bytes>, ApiError> {
    let mut parts = Parts::read(request, state.config.max_body_bytes).await?;
    let images = parts.take_all("image");
    parts.expect_no_more("only parts named 'image' are accepted")?;
    if images.is_empty() {
        return Err(ApiError::InvalidRequest("the multipart body has no part named 'image'".into()));
    }
    Ok(images)
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
