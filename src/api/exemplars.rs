//! Exemplars, textures and the audit log over HTTP.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::body::Parts;
use super::error::ApiError;
use super::query::{limit_within, parse_query};
use super::AppState;
use crate::core::exemplars::{ExemplarImage, MaskInput, ModifiedInput, TextureCreated};
use crate::imaging::concept::{MaskShapes, Transform};
use crate::store::{normalize_rfc3339, ExemplarRecord};

const AUDIT_PAGE: u32 = 1000;

/// An exemplar as the API shows it: the store's blob names stay behind the image routes.
#[derive(Serialize)]
pub struct ExemplarView {
    id: String,
    width: u32,
    height: u32,
    mask_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    transform: Option<Value>,
    created_at: String,
}

impl From<ExemplarRecord> for ExemplarView {
    fn from(r: ExemplarRecord) -> Self {
        Self {
            id: r.id,
            width: r.width,
            height: r.height,
            mask_fraction: r.mask_fraction,
            transform: r.transform,
            created_at: r.created_at,
        }
    }
}

pub(super) fn json_part<T: serde::de::DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::InvalidRequest(format!("part '{name}' is not valid: {e}")))
}

/// `image` (required); `mask` (PNG) or `mask_json`; `modified` (image) or `transform` (JSON).
pub async fn create_exemplar(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<(StatusCode, Json<ExemplarView>), ApiError> {
    let mut parts = Parts::read(request, state.config.max_body_bytes).await?;
    let image = parts.take_one("image")?;
    let mask = parts.take_one("mask")?;
    let mask_json = parts.take_one("mask_json")?;
    let modified = parts.take_one("modified")?;
    let transform = parts.take_one("transform")?;
    parts.expect_no_more("the parts are image, mask or mask_json, modified or transform")?;
    let image = image.ok_or_else(|| ApiError::InvalidRequest("the part 'image' is required".into()))?;
    let mask = match (mask, mask_json) {
        (Some(png), None) => MaskInput::Png(png),
        (None, Some(shapes)) => MaskInput::Shapes(json_part::<MaskShapes>("mask_json", &shapes)?),
        (None, None) => return Err(ApiError::InvalidRequest("give the concept as 'mask' (PNG) or 'mask_json'".into())),
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest("give either 'mask' or 'mask_json', not both".into()))
        }
    };
    let modified = match (modified, transform) {
        (Some(bytes), None) => ModifiedInput::Image(bytes),
        (None, Some(t)) => ModifiedInput::Transform(json_part::<Transform>("transform", &t)?),
        (None, None) => {
            return Err(ApiError::InvalidRequest("give the modified copy as 'modified' (image) or 'transform'".into()))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest("give either 'modified' or 'transform', not both".into()))
        }
    };
    let record = state.exemplars.create(image, mask, modified).await?;
    Ok((StatusCode::CREATED, Json(record.into())))
}

pub async fn create_texture(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<(StatusCode, Json<TextureCreated>), ApiError> {
    let mut parts = Parts::read(request, state.config.max_body_bytes).await?;
    let image = parts.take_one("image")?;
    parts.expect_no_more("the only part is 'image'")?;
    let image = image.ok_or_else(|| ApiError::InvalidRequest("the part 'image' is required".into()))?;
    Ok((StatusCode::CREATED, Json(state.exemplars.create_texture(image).await?)))
}

pub async fn get_exemplar(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ExemplarView>, ApiError> {
    Ok(Json(state.exemplars.get(&id).await?.into()))
}

/// `which` is `image`, `mask` or `modified`; each answers a PNG.
pub async fn exemplar_image(
    State(state): State<Arc<AppState>>,
    Path((id, which)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let which = match which.as_str() {
        "image" => ExemplarImage::Image,
        "mask" => ExemplarImage::Mask,
        "modified" => ExemplarImage::Modified,
        _ => return Err(ApiError::RouteNotFound(format!("/v1/exemplars/{id}/{which}"))),
    };
    let png = state.exemplars.image(&id, which).await?;
    Ok(([(header::CONTENT_TYPE, "image/png")], Body::from(png)).into_response())
}

pub async fn delete_exemplar(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.exemplars.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn audit(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery) -> Result<Json<Value>, ApiError> {
    let query = parse_query(query.as_deref(), &["since", "limit"])?;
    let since = query.get("since").map_or("1970-01-01T00:00:00Z", String::as_str);
    let since = normalize_rfc3339(since)
        .ok_or_else(|| ApiError::InvalidRequest(format!("since must be an RFC 3339 time, got '{since}'")))?;
    let limit = limit_within(&query, AUDIT_PAGE, AUDIT_PAGE)?;
    let entries = state.exemplars.audit(&since, limit).await?;
    Ok(Json(json!({ "entries": entries })))
}
