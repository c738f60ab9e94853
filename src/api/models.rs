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

use super::body::{read_body, EncodedImage, Parts};
use super::error::{ApiError, ErrorBody};
use super::params::ModelPath;
use super::query::{parse_query, top_k};
use super::versions::json_body;
use super::AppState;
use crate::core::registry::{device_name, ModelInfo, Prediction};
use crate::core::versions::VersionRef;
use crate::core::CoreError;
use crate::imaging::header_pixels;
use crate::models::EditableLayer;
use utoipa::{IntoResponses, ToSchema};

/// The refusals of every route that classifies images, stated once for the OpenAPI document.
#[derive(IntoResponses)]
#[expect(dead_code, reason = "only documents the answers; ApiError makes the real ones")]
pub enum ClassifyRefusals {
    #[response(status = 404, description = "`model_not_found`, `version_not_found`, `alias_not_found`")]
    NotFound(ErrorBody),
    #[response(status = 409, description = "`version_not_ready`")]
    NotReady(ErrorBody),
    #[response(status = 413, description = "`payload_too_large`")]
    TooLarge(ErrorBody),
    #[response(status = 415, description = "`unsupported_media_type`, `unsupported_image_format`")]
    Unsupported(ErrorBody),
    #[response(
        status = 422,
        description = "`invalid_request`, `invalid_argument`, `empty_image`, `invalid_image`, `image_too_large`"
    )]
    Invalid(ErrorBody),
    #[response(
        status = 503,
        description = "`overloaded`, `model_unloaded`, `shutting_down`; `Retry-After` says when to retry"
    )]
    Unavailable(ErrorBody),
}

/// Several images in one classification, each a part named `image`.
#[derive(ToSchema)]
pub struct ClassifyForm {
    #[schema(min_items = 1)]
    image: Vec<EncodedImage>,
}

// A loaded model as clients see it: its edit surface spelled out, its device named. The document calls it
// `ModelInfo`, as it always has.
#[derive(Serialize, ToSchema)]
#[schema(as = ModelInfo)]
pub struct ModelView {
    name: String,
    architecture: String,
    num_classes: i64,
    input_size: [u32; 2],
    device: String,
    editable_layers: Vec<LayerView>,
    /// The layer edits and statistics jobs take when the request names none (the gated rewrite aside: it
    /// spreads over `default_edit_layers`).
    default_edit_layer: String,
    /// The layers, from `default_edit_layer` on, a gated rewrite (the default edit) from several exemplars, or
    /// with stored `statistics`, spreads over when the request names none.
    default_edit_layers: Vec<String>,
    /// The layers a gated rewrite from one exemplar spreads over when the request names none (measured apart).
    one_exemplar_edit_layers: Vec<String>,
}

impl From<ModelInfo> for ModelView {
    fn from(info: ModelInfo) -> Self {
        Self {
            editable_layers: info.surface.editable_layers.iter().map(LayerView::from).collect(),
            default_edit_layer: info.surface.default_edit_layer().to_string(),
            default_edit_layers: info.surface.default_edit_layers().to_vec(),
            one_exemplar_edit_layers: info.surface.one_exemplar_edit_layers().to_vec(),
            device: device_name(info.device),
            name: info.name,
            architecture: info.architecture,
            num_classes: info.num_classes,
            input_size: info.input_size,
        }
    }
}

#[derive(Serialize, ToSchema)]
#[schema(as = LayerInfo)]
pub struct LayerView {
    name: String,
    weight_shape: Vec<i64>,
    has_skip: bool,
}

impl From<&EditableLayer> for LayerView {
    fn from(layer: &EditableLayer) -> Self {
        Self { name: layer.name.clone(), weight_shape: layer.weight_shape.clone(), has_skip: layer.has_skip }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    models: Vec<ModelView>,
}

/// The loaded models.
#[utoipa::path(get, path = "/v1/models", tag = "models", security(("bearer" = ["infer"])), responses((status = 200, body = ModelList)))]
pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList { models: state.registry.models().into_iter().map(ModelView::from).collect() })
}

/// One loaded model: architecture, classes, input, device and editable layers.
#[utoipa::path(get, path = "/v1/models/{name}", tag = "models", security(("bearer" = ["infer"])), params(ModelPath), responses(
    (status = 200, body = ModelView),
    (status = 404, body = ErrorBody, description = "`model_not_found`"),
))]
pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name }): Path<ModelPath>,
) -> Result<Json<ModelView>, ApiError> {
    Ok(Json(state.registry.model(&name)?.into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    name: String,
    /// A package directory, relative to the models directory or absolute inside it.
    #[schema(value_type = String)]
    path: PathBuf,
}

/// Loads a model package from the models directory at run time; it serves once loaded and warmed up.
#[utoipa::path(post, path = "/v1/models", tag = "models", security(("bearer" = ["admin"])), request_body = LoadRequest, responses(
    (status = 201, body = ModelView, description = "Loaded"),
    (status = 409, body = ErrorBody, description = "`model_exists`, `model_weights_changed` (the name's versions were \
        made from other weights)"),
    (status = 422, body = ErrorBody, description = "`invalid_request` (bad name or path, or a path outside the models \
        directory), `invalid_model_package`"),
))]
pub async fn load_model(
    State(state): State<Arc<AppState>>,
    body: Result<Json<LoadRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ModelView>), ApiError> {
    let request = json_body(body, state.config.max_body_bytes)?;
    let dir = package_dir(&state.config.models_dir, &request.path)?;
    let info = state.versions.load_model(&request.name, &dir).await?;
    let detail = serde_json::json!({"path": request.path, "architecture": info.architecture});
    state.versions.record_model_event("model.load", &info.name, Some(detail)).await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

/// Packages load only from inside the models directory: a client must not make the server read
/// arbitrary paths.
/// The answer is the same whether a path outside exists or not, and names only what the client sent.
fn package_dir(models_dir: &std::path::Path, path: &std::path::Path) -> Result<PathBuf, ApiError> {
    let refused = || {
        ApiError::InvalidRequest(format!(
            "no model package at '{}' in the models directory (a path relative to it)",
            path.display()
        ))
    };
    let root = models_dir.canonicalize().map_err(|e| {
        tracing::error!(directory = %models_dir.display(), error = %e, "the models directory cannot be read");
        ApiError::Core(CoreError::Internal("the models directory cannot be read".into()))
    })?;
    let dir = root.join(path).canonicalize().map_err(|_| refused())?;
    if !dir.starts_with(&root) {
        return Err(refused());
    }
    Ok(dir)
}

/// Unloads a model: its queued requests answer `model_unloaded`; its versions stay stored.
#[utoipa::path(delete, path = "/v1/models/{name}", tag = "models", security(("bearer" = ["admin"])), params(ModelPath), responses(
    (status = 204, description = "Unloaded"),
    (status = 404, body = ErrorBody, description = "`model_not_found`"),
))]
pub async fn unload_model(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name }): Path<ModelPath>,
) -> Result<StatusCode, ApiError> {
    state.registry.unload(&name).await?;
    state.jobs.forget_model(&name);
    state.versions.record_model_event("model.unload", &name, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct SingleResult {
    model: String,
    version: u32,
    predictions: Vec<Prediction>,
}

#[derive(Serialize, ToSchema)]
pub struct ImageResult {
    predictions: Vec<Prediction>,
}

#[derive(Serialize, ToSchema)]
pub struct MultiResult {
    model: String,
    version: u32,
    results: Vec<ImageResult>,
}

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum ClassifyResponse {
    Single(SingleResult),
    Multi(MultiResult),
}

/// Classifies one image (the body, `image/*`) or several (`multipart/form-data`, `image` parts, answered as
/// `results`) with the `default` alias's version unless `version` names another.
#[utoipa::path(post, path = "/v1/models/{name}/classify", tag = "classification", security(("bearer" = ["infer"])),
    params(ModelPath,
        ("version" = Option<String>, Query, description = "A version number or alias; `default` when absent"),
        ("top_k" = Option<u32>, Query, description = "Classes per image, best first")),
    request_body(content((EncodedImage = "image/*"), (ClassifyForm = "multipart/form-data"))),
    responses((status = 200, body = ClassifyResponse), ClassifyRefusals))]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name: model }): Path<ModelPath>,
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
    let (images, multipart) = match content_type.as_deref() {
        Some("multipart/form-data") => (read_multipart(state, request).await?, true),
        Some(t) if t.starts_with("image/") || t == "application/octet-stream" => {
            let body = read_body(request.into_body(), limit).await?;
            if body.is_empty() {
                return Err(ApiError::InvalidRequest("the request body is empty: send the image bytes".into()));
            }
            (vec![body], false)
        }
        other => {
            read_body(request.into_body(), limit).await?;
            return Err(ApiError::UnsupportedMediaType(match other {
                Some(t) => format!(
                    "Content-Type '{t}' is not supported: send an image (image/*) or multipart/form-data with 'image' parts"
                ),
                None => "the Content-Type header is missing: send an image (image/*) or multipart/form-data".into(),
            }));
        }
    };
    check_request_pixels(state, &images)?;
    Ok((images, multipart))
}

/// Refuses images whose headers claim more pixels together than one request may decode.
pub(super) fn check_request_pixels(state: &AppState, images: &[Bytes]) -> Result<(), ApiError> {
    let pixels: u64 = images.iter().filter_map(|image| header_pixels(image)).sum();
    let most = state.config.max_request_pixels;
    if pixels > most {
        return Err(ApiError::TooMany(format!(
            "the images hold {pixels} pixels together where one request may hold {most} (--max-request-pixels)"
        )));
    }
    Ok(())
}

async fn read_multipart(state: &AppState, request: Request) -> Result<Vec<Bytes>, ApiError> {
    let mut parts = Parts::read(request, state.config.max_body_bytes, state.config.max_images_per_request).await?;
    let form = ClassifyForm { image: parts.take_images("image") };
    parts.expect_no_more("only parts named 'image' are accepted")?;
    if form.image.is_empty() {
        return Err(ApiError::InvalidRequest("the multipart body has no part named 'image'".into()));
    }
    Ok(form.image.into_iter().map(|EncodedImage(bytes)| bytes).collect())
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
