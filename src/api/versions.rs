//! Versions: listing, reading, deleting, creating by an edit job, and classifying with one or several (A/B).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::body::EncodedImage;
use super::edits::{EditAccepted, EditRequest};
use super::error::{ApiError, ErrorBody};
use super::models::{classify_version, read_images, ClassifyForm, ClassifyRefusals, ClassifyResponse};
use super::params::{ModelPath, VersionPath};
use super::query::{page_limit, parse_number, parse_query, top_k};
use super::AppState;
use crate::core::registry::Prediction;
use crate::core::versions::{VersionDetails, VersionRef};
use crate::store::VersionState;
use utoipa::ToSchema;

/// A version as clients see it. Version 0 is the base weights and has no edit.
#[derive(Serialize, ToSchema)]
pub struct VersionView {
    model: String,
    number: u32,
    parent: Option<u32>,
    state: VersionState,
    layer: Option<String>,
    method: Option<String>,
    solver: Option<String>,
    parameters: Option<serde_json::Value>,
    statistics: Option<String>,
    exemplars: Vec<String>,
    description: Option<String>,
    /// What the edit measured: losses before and after, the change's norm, steps, seconds, the statistics
    /// (`statistics`, `statistics_source`), `layers`, `approximation`; for the least-squares solvers `solves`
    /// (per layer, and per exemplar taken in turn: the keys used, the change's rank, lambda and mu, the error
    /// before and after, and for `gated_least_squares` the gate's bounds and the gain); with a budget `guard`
    /// (the scale it kept and what changed under it).
    metrics: Option<serde_json::Value>,
    error: Option<String>,
    job: Option<String>,
    created_at: Option<String>,
    ready_at: Option<String>,
    /// Bytes of the stored change.
    stored_bytes: u64,
    resident: bool,
    /// Bytes the version holds on the device beyond the base (its edited layers) while resident.
    resident_bytes: u64,
    aliases: Vec<String>,
}

impl From<VersionDetails> for VersionView {
    fn from(version: VersionDetails) -> Self {
        let (resident, resident_bytes) = (version.resident_bytes.is_some(), version.resident_bytes.unwrap_or(0));
        let (state, aliases) = (version.state(), version.aliases);
        match version.record {
            None => VersionView {
                model: version.model,
                number: version.number,
                parent: None,
                state,
                layer: None,
                method: None,
                solver: None,
                parameters: None,
                statistics: None,
                exemplars: Vec::new(),
                description: None,
                metrics: None,
                error: None,
                job: None,
                created_at: None,
                ready_at: None,
                stored_bytes: 0,
                resident,
                resident_bytes,
                aliases,
            },
            Some(r) => VersionView {
                model: r.model,
                number: r.number,
                parent: Some(r.parent),
                state,
                layer: Some(r.layer),
                method: Some(r.method),
                solver: Some(r.solver),
                parameters: Some(r.parameters),
                statistics: r.statistics,
                exemplars: r.exemplars,
                description: r.description,
                metrics: r.metrics,
                error: r.error,
                job: Some(r.job),
                created_at: Some(r.created_at),
                ready_at: r.ready_at,
                stored_bytes: r.stored_bytes,
                resident,
                resident_bytes,
                aliases,
            },
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct VersionPage {
    versions: Vec<VersionView>,
    next_before: Option<u32>,
}

pub(super) const MOST_COMPARED: usize = 8;
pub(super) const LONGEST_IDEMPOTENCY_KEY: usize = 255;

pub(super) fn version_ref(text: &str) -> Result<VersionRef, ApiError> {
    Ok(VersionRef::parse(text)?)
}

/// A JSON body, or the refusal: 413 when it is over the body limit, else 422 with the parser's reason.
pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>, limit: usize) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
        _ => ApiError::InvalidRequest(e.body_text()),
    })
}

pub(super) fn accepted(location: String, body: impl Serialize) -> Response {
    (StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(body)).into_response()
}

/// A model's versions, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/models/{name}/versions", tag = "versions", security(("bearer" = ["infer"])),
    params(ModelPath,
        ("limit" = Option<u32>, Query, description = "Versions per page", minimum = 1, maximum = 200),
        ("before" = Option<u32>, Query, description = "Only versions numbered below this (the previous page's `next_before`)")),
    responses(
        (status = 200, body = VersionPage),
        (status = 404, body = ErrorBody, description = "`model_not_found`"),
        (status = 422, body = ErrorBody, description = "`invalid_request`"),
    ))]
pub async fn list_versions(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name: model }): Path<ModelPath>,
    RawQuery(query): RawQuery,
) -> Result<Json<VersionPage>, ApiError> {
    let query = parse_query(query.as_deref(), &["limit", "before"])?;
    let page = state.versions.list(&model, parse_number(&query, "before")?, page_limit(&query)?).await?;
    let versions = page.versions.into_iter().map(VersionView::from).collect();
    Ok(Json(VersionPage { versions, next_before: page.next_before }))
}

/// One version: its lineage, edit settings, metrics and state.
#[utoipa::path(get, path = "/v1/models/{name}/versions/{version}", tag = "versions", security(("bearer" = ["infer"])), params(VersionPath), responses(
    (status = 200, body = VersionView),
    (status = 404, body = ErrorBody, description = "`model_not_found`, `version_not_found`, `alias_not_found`"),
    (status = 422, body = ErrorBody, description = "`invalid_argument`"),
))]
pub async fn get_version(
    State(state): State<Arc<AppState>>,
    Path(VersionPath { name: model, version }): Path<VersionPath>,
) -> Result<Json<VersionView>, ApiError> {
    Ok(Json(state.versions.get(&model, &version_ref(&version)?).await?.into()))
}

/// Deletes a version that no alias, child version or running job uses; version 0 stays.
#[utoipa::path(delete, path = "/v1/models/{name}/versions/{version}", tag = "versions", security(("bearer" = ["admin"])), params(VersionPath), responses(
    (status = 204, description = "Deleted"),
    (status = 404, body = ErrorBody, description = "`model_not_found`, `version_not_found`, `alias_not_found`"),
    (status = 409, body = ErrorBody, description = "`version_in_use`"),
    (status = 422, body = ErrorBody, description = "`invalid_argument`"),
))]
pub async fn delete_version(
    State(state): State<Arc<AppState>>,
    Path(VersionPath { name: model, version }): Path<VersionPath>,
) -> Result<StatusCode, ApiError> {
    state.versions.delete(&model, &version_ref(&version)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts an edit job from exemplars: 202 with the job and the pending version, `Location` the job. The same
/// `Idempotency-Key` with the same request answers the first job again.
#[utoipa::path(post, path = "/v1/models/{name}/versions", tag = "versions", security(("bearer" = ["edit"])),
    params(ModelPath, ("Idempotency-Key" = Option<String>, Header, description = "Makes a retried request safe",
        min_length = 1, max_length = 255, pattern = "^[!-~]+$")),
    request_body = EditRequest,
    responses(
        (status = 202, body = EditAccepted, headers(("Location" = String, description = "The job"))),
        (status = 404, body = ErrorBody, description = "`model_not_found`, `exemplar_not_found`, `version_not_found`, \
            `alias_not_found`, `statistics_not_found`, `dataset_not_found`"),
        (status = 409, body = ErrorBody, description = "`version_not_ready`"),
        (status = 422, body = ErrorBody, description = "`invalid_request`, `invalid_argument`, `idempotency_key_reused`"),
        (status = 503, body = ErrorBody, description = "`edit_queue_full`, `shutting_down`"),
    ))]
pub async fn create_version(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name: model }): Path<ModelPath>,
    headers: HeaderMap,
    body: Result<Json<EditRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    state.registry.ensure_loaded(&model)?;
    let request = json_body(body, state.config.max_body_bytes)?;
    let fingerprint = request.fingerprint()?;
    let started = state.jobs.create_edit(&model, request.into_input()?, &fingerprint, key).await?;
    Ok(accepted(format!("/v1/jobs/{}", started.job.id), EditAccepted::from(&started)))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= LONGEST_IDEMPOTENCY_KEY && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_string())).ok_or_else(|| {
        ApiError::InvalidRequest(format!(
            "Idempotency-Key must be 1 to {LONGEST_IDEMPOTENCY_KEY} visible ASCII characters"
        ))
    })
}

/// Classifies with the named version, as `POST /v1/models/{name}/classify?version=…` does.
#[utoipa::path(post, path = "/v1/models/{name}/versions/{version}/classify", tag = "classification", security(("bearer" = ["infer"])),
    operation_id = "classify_version",
    params(VersionPath, ("top_k" = Option<u32>, Query, description = "Classes per image, best first")),
    request_body(content((EncodedImage = "image/*"), (ClassifyForm = "multipart/form-data"))),
    responses((status = 200, body = ClassifyResponse), ClassifyRefusals))]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    Path(VersionPath { name: model, version }): Path<VersionPath>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let query = parse_query(query.as_deref(), &["top_k"]);
    classify_version(state, model, Some(version), query, request).await
}

#[derive(Serialize, ToSchema)]
pub struct VersionResult {
    version: u32,
    predictions: Vec<Prediction>,
}

#[derive(Serialize, ToSchema)]
pub struct Comparison {
    model: String,
    results: Vec<VersionResult>,
    /// Whether every version's top-1 class is the same.
    agree: bool,
}

/// One image through several versions (A/B): each version's predictions and whether their top-1 agree.
#[utoipa::path(post, path = "/v1/models/{name}/compare", tag = "classification", security(("bearer" = ["infer"])),
    params(ModelPath,
        ("versions" = String, Query, description = "Comma-separated version numbers or aliases, e.g. `0,3,production`"),
        ("top_k" = Option<u32>, Query, description = "Classes per version, best first")),
    request_body(content((EncodedImage = "image/*"), (ClassifyForm = "multipart/form-data"))),
    responses((status = 200, body = Comparison), ClassifyRefusals))]
pub async fn compare(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name: model }): Path<ModelPath>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Json<Comparison>, ApiError> {
    let known = state.registry.ensure_loaded(&model);
    let images = read_images(&state, request).await;
    let query = parse_query(query.as_deref(), &["versions", "top_k"])?;
    let top_k = top_k(&query)?;
    known?;
    let names = query.get("versions").map(String::as_str).unwrap_or_default();
    let references = names.split(',').filter(|n| !n.is_empty()).map(version_ref).collect::<Result<Vec<_>, _>>()?;
    if references.is_empty() || references.len() > MOST_COMPARED {
        return Err(ApiError::InvalidRequest(format!(
            "versions must name 1 to {MOST_COMPARED} versions, comma-separated (e.g. ?versions=0,3,production)"
        )));
    }
    let (mut images, _) = images?;
    if images.len() != 1 {
        return Err(ApiError::InvalidRequest(format!("compare takes exactly one image, got {}", images.len())));
    }
    let image = images.remove(0);
    let results = state.versions.compare(&model, &references, image, top_k).await?;
    let top1: Vec<Option<usize>> = results.iter().map(|(_, p)| p.first().map(|p| p.index)).collect();
    let agree = top1.windows(2).all(|w| w[0] == w[1]);
    let results = results.into_iter().map(|(version, predictions)| VersionResult { version, predictions }).collect();
    Ok(Json(Comparison { model, results, agree }))
}
