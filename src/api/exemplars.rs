//! Exemplars, textures and the audit log over HTTP.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use super::body::{EncodedImage, Parts, UploadRefusals};
use super::error::{ApiError, ErrorBody};
use super::params::{ExemplarImagePath, IdPath};
use super::query::{limit_within, parse_query};
use super::AppState;
use crate::core::exemplars::{ExemplarImage, MaskInput, ModifiedInput};
use crate::imaging::concept::{MaskShapes, Transform};
use crate::store::{normalize_rfc3339, AuditEntry, ExemplarRecord};
use utoipa::ToSchema;

/// The parts of `ExemplarForm`.
const EXEMPLAR_PARTS: usize = 5;
pub(super) const AUDIT_PAGE: u32 = 1000;

#[derive(Serialize, ToSchema)]
pub struct AuditLog {
    entries: Vec<AuditEntry>,
}

/// An exemplar as the API shows it: the store's blob names stay behind the image routes.
#[derive(Serialize, ToSchema)]
pub struct ExemplarView {
    id: String,
    width: u32,
    height: u32,
    mask_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Transform>)]
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

/// The parts of an exemplar: the image, its concept mask, and the modified copy or a transform that makes it.
#[derive(ToSchema)]
pub struct ExemplarForm {
    #[schema(value_type = String, format = Binary)]
    image: Option<Bytes>,
    /// A PNG as large as the image; non-zero pixels are the concept.
    #[schema(value_type = Option<String>, format = Binary)]
    mask: Option<Bytes>,
    /// The concept as shapes instead of `mask`.
    #[schema(value_type = Option<MaskShapes>)]
    mask_json: Option<Bytes>,
    /// The image with the concept changed (the same size).
    #[schema(value_type = Option<String>, format = Binary)]
    modified: Option<Bytes>,
    /// How the server makes the modified copy instead of `modified`.
    #[schema(value_type = Option<Transform>)]
    transform: Option<Bytes>,
}

/// Uploads an exemplar: `image`, the concept as `mask` (PNG) or `mask_json`, and `modified` (an image) or
/// `transform` (JSON).
#[utoipa::path(post, path = "/v1/exemplars", tag = "exemplars", security(("bearer" = ["edit"])),
    request_body(content = ExemplarForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, body = ExemplarView),
        (status = 404, body = ErrorBody, description = "`texture_not_found` (a transform names an unknown texture)"),
        UploadRefusals,
    ))]
pub async fn create_exemplar(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<(StatusCode, Json<ExemplarView>), ApiError> {
    let mut parts = Parts::read(request, state.config.max_body_bytes, EXEMPLAR_PARTS).await?;
    let form = ExemplarForm {
        image: parts.take_one("image")?,
        mask: parts.take_one("mask")?,
        mask_json: parts.take_one("mask_json")?,
        modified: parts.take_one("modified")?,
        transform: parts.take_one("transform")?,
    };
    parts.expect_no_more("the parts are image, mask or mask_json, modified or transform")?;
    let image = form.image.ok_or_else(|| ApiError::InvalidRequest("the part 'image' is required".into()))?;
    let mask = match (form.mask, form.mask_json) {
        (Some(png), None) => MaskInput::Png(png),
        (None, Some(shapes)) => MaskInput::Shapes(json_part::<MaskShapes>("mask_json", &shapes)?),
        (None, None) => return Err(ApiError::InvalidRequest("give the concept as 'mask' (PNG) or 'mask_json'".into())),
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest("give either 'mask' or 'mask_json', not both".into()))
        }
    };
    let modified = match (form.modified, form.transform) {
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

#[derive(Serialize, ToSchema)]
pub struct TextureCreated {
    id: String,
}

/// A texture image (part `image`) that `transform`s of kind `texture` can paste into a concept mask.
#[derive(ToSchema)]
pub struct TextureForm {
    #[schema(required = true)]
    image: Option<EncodedImage>,
}

/// Uploads a texture for `transform`s to paste.
#[utoipa::path(post, path = "/v1/textures", tag = "exemplars", security(("bearer" = ["edit"])),
    request_body(content = TextureForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, body = TextureCreated),
        UploadRefusals,
    ))]
pub async fn create_texture(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<(StatusCode, Json<TextureCreated>), ApiError> {
    let mut parts = Parts::read(request, state.config.max_body_bytes, 1).await?;
    let form = TextureForm { image: parts.take_one("image")?.map(EncodedImage) };
    parts.expect_no_more("the only part is 'image'")?;
    let EncodedImage(image) =
        form.image.ok_or_else(|| ApiError::InvalidRequest("the part 'image' is required".into()))?;
    let texture = state.exemplars.create_texture(image).await?;
    Ok((StatusCode::CREATED, Json(TextureCreated { id: texture.id })))
}

/// One exemplar's metadata.
#[utoipa::path(get, path = "/v1/exemplars/{id}", tag = "exemplars", security(("bearer" = ["edit"])), params(IdPath), responses(
    (status = 200, body = ExemplarView),
    (status = 404, body = ErrorBody, description = "`exemplar_not_found`"),
))]
pub async fn get_exemplar(
    State(state): State<Arc<AppState>>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<Json<ExemplarView>, ApiError> {
    Ok(Json(state.exemplars.get(&id).await?.into()))
}

/// One of an exemplar's images, as PNG: `image`, `mask` or `modified`.
#[utoipa::path(get, path = "/v1/exemplars/{id}/{which}", tag = "exemplars", security(("bearer" = ["edit"])), params(ExemplarImagePath), responses(
    (status = 200, body = EncodedImage, content_type = "image/png"),
    (status = 404, body = ErrorBody, description = "`exemplar_not_found`, `not_found` (another `which`)"),
))]
pub async fn exemplar_image(
    State(state): State<Arc<AppState>>,
    Path(ExemplarImagePath { id, which }): Path<ExemplarImagePath>,
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

/// Deletes an exemplar that no version was made from.
#[utoipa::path(delete, path = "/v1/exemplars/{id}", tag = "exemplars", security(("bearer" = ["admin"])), params(IdPath), responses(
    (status = 204, description = "Deleted"),
    (status = 404, body = ErrorBody, description = "`exemplar_not_found`"),
    (status = 409, body = ErrorBody, description = "`exemplar_in_use`"),
))]
pub async fn delete_exemplar(
    State(state): State<Arc<AppState>>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<StatusCode, ApiError> {
    state.exemplars.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The audit log of changes (exemplars, versions, aliases, models), oldest first.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", security(("bearer" = ["admin"])),
    params(
        ("since" = Option<String>, Query, format = DateTime, description = "RFC 3339 time; entries at or after it"),
        ("limit" = Option<u32>, Query, description = "Entries per page", minimum = 1, maximum = 1000)),
    responses(
        (status = 200, body = AuditLog),
        (status = 422, body = ErrorBody, description = "`invalid_request`"),
    ))]
pub async fn audit(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery) -> Result<Json<AuditLog>, ApiError> {
    let query = parse_query(query.as_deref(), &["since", "limit"])?;
    let since = query.get("since").map_or("1970-01-01T00:00:00Z", String::as_str);
    let since = normalize_rfc3339(since)
        .ok_or_else(|| ApiError::InvalidRequest(format!("since must be an RFC 3339 time, got '{since}'")))?;
    let limit = limit_within(&query, AUDIT_PAGE, AUDIT_PAGE)?;
    let entries = state.exemplars.audit(&since, limit).await?;
    Ok(Json(AuditLog { entries }))
}
