//! Evaluation jobs over HTTP: starting one (202 with its job), listing a model's, and reading one with its
//! results.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::Json;

use super::error::{ApiError, ErrorBody};
use super::jobs::JobView;
use super::params::{IdPath, ModelPath, VersionName};
use super::query::{page_limit, parse_query};
use super::versions::{accepted, json_body};
use super::AppState;
use crate::core::evaluations::{EvaluationInput, Exclusions, VersionScore};
use crate::core::CoreError;
use crate::store::{EvaluationRecord, EvaluationState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/models/{m}/evaluations`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluationRequest {
    dataset: String,
    #[schema(min_items = 1, max_items = 8)]
    versions: Vec<VersionName>,
    /// Version 0 when None.
    baseline: Option<VersionName>,
    #[serde(default)]
    exclude_classes: Vec<u32>,
    #[serde(default)]
    exclude_exemplar_classes: bool,
}

impl EvaluationRequest {
    /// What core checks and runs; only a version's name can be refused here (422 `invalid_argument`).
    fn into_input(self) -> Result<EvaluationInput, ApiError> {
        Ok(EvaluationInput {
            dataset: self.dataset,
            versions: self.versions.iter().map(VersionName::reference).collect::<Result<_, _>>()?,
            baseline: self.baseline.as_ref().map(VersionName::reference).transpose()?,
            exclude: Exclusions { classes: self.exclude_classes, exemplar_classes: self.exclude_exemplar_classes },
        })
    }
}

/// An evaluation of versions of a model on a dataset, run by its job.
#[derive(Serialize, ToSchema)]
pub struct EvaluationView {
    id: String,
    model: String,
    dataset: String,
    baseline: u32,
    versions: Vec<u32>,
    state: EvaluationState,
    job: String,
    /// The classes left out of the scores (asked for, and the exemplars' when asked).
    excluded_classes: Vec<u32>,
    /// Each version's scores, the baseline first, once the job has succeeded.
    results: Option<Vec<VersionScore>>,
    error: Option<String>,
    created_at: String,
    finished_at: Option<String>,
}

impl TryFrom<EvaluationRecord> for EvaluationView {
    type Error = ApiError;

    fn try_from(record: EvaluationRecord) -> Result<Self, ApiError> {
        let results =
            record.results.map(serde_json::from_value).transpose().map_err(|e| {
                CoreError::Internal(format!("evaluation {}: stored results unreadable: {e}", record.id))
            })?;
        Ok(Self {
            id: record.id,
            model: record.model,
            dataset: record.dataset,
            baseline: record.baseline,
            versions: record.versions,
            state: record.state,
            job: record.job,
            excluded_classes: record.excluded_classes,
            results,
            error: record.error,
            created_at: record.created_at,
            finished_at: record.finished_at,
        })
    }
}

#[derive(Serialize, ToSchema)]
pub struct EvaluationAccepted {
    job: JobView,
    evaluation: String,
}

#[derive(Serialize, ToSchema)]
pub struct EvaluationPage {
    evaluations: Vec<EvaluationView>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<String>,
}

/// Starts an evaluation job: versions against a baseline on a dataset (accuracy, top-1 changes, per-class
/// scores); 202 with the job and the evaluation's id, `Location` the job.
#[utoipa::path(post, path = "/v1/models/{name}/evaluations", tag = "evaluations", security(("bearer" = ["edit"])), params(ModelPath),
    request_body = EvaluationRequest,
    responses(
        (status = 202, body = EvaluationAccepted, headers(("Location" = String, description = "The job"))),
        (status = 404, body = ErrorBody, description = "`model_not_found`, `dataset_not_found`, `version_not_found`, \
            `alias_not_found`"),
        (status = 409, body = ErrorBody, description = "`version_not_ready`"),
        (status = 422, body = ErrorBody, description = "`invalid_request`, `invalid_argument`"),
        (status = 503, body = ErrorBody, description = "`edit_queue_full`, `shutting_down`"),
    ))]
pub async fn create_evaluation(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name: model }): Path<ModelPath>,
    body: Result<Json<EvaluationRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    state.registry.ensure_loaded(&model)?;
    let request = json_body(body, state.config.max_body_bytes)?;
    let (evaluation, job) = state.evaluations.create(&model, request.into_input()?).await?;
    Ok(accepted(format!("/v1/jobs/{}", job.id), EvaluationAccepted { job: JobView::from(&job), evaluation }))
}

/// A model's evaluations, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/models/{name}/evaluations", tag = "evaluations", security(("bearer" = ["edit"])),
    params(ModelPath,
        ("limit" = Option<u32>, Query, description = "Evaluations per page", minimum = 1, maximum = 200),
        ("before" = Option<String>, Query, description = "The previous page's `next_before`")),
    responses(
        (status = 200, body = EvaluationPage),
        (status = 404, body = ErrorBody, description = "`model_not_found`"),
        (status = 422, body = ErrorBody, description = "`invalid_request`"),
    ))]
pub async fn list_evaluations(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name: model }): Path<ModelPath>,
    RawQuery(query): RawQuery,
) -> Result<Json<EvaluationPage>, ApiError> {
    let query = parse_query(query.as_deref(), &["limit", "before"])?;
    let page = state.evaluations.list(&model, query.get("before").map(String::as_str), page_limit(&query)?).await?;
    let evaluations = page.evaluations.into_iter().map(EvaluationView::try_from).collect::<Result<_, _>>()?;
    Ok(Json(EvaluationPage { evaluations, next_before: page.next_before }))
}

/// One evaluation with its results once its job has finished.
#[utoipa::path(get, path = "/v1/evaluations/{id}", tag = "evaluations", security(("bearer" = ["edit"])), params(IdPath), responses(
    (status = 200, body = EvaluationView),
    (status = 404, body = ErrorBody, description = "`evaluation_not_found`"),
))]
pub async fn get_evaluation(
    State(state): State<Arc<AppState>>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<Json<EvaluationView>, ApiError> {
    Ok(Json(state.evaluations.get(&id).await?.try_into()?))
}
