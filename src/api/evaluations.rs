//! Evaluation jobs over HTTP: starting one (202 with its job), listing a model's, and reading one with its
//! results.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::Json;

use super::error::ApiError;
use super::query::{page_limit, parse_query};
use super::versions::{accepted, json_body};
use super::AppState;
use crate::core::evaluations::{EvaluationPage, EvaluationRequest};
use crate::store::EvaluationRecord;

/// `POST /v1/models/{name}/evaluations`: 202 with the job and the evaluation's id, `Location` the job.
pub async fn create_evaluation(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    body: Result<Json<EvaluationRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    state.registry.ensure_loaded(&model)?;
    let request = json_body(body)?;
    let created = state.evaluations.create(&model, request).await?;
    Ok(accepted(format!("/v1/jobs/{}", created.job.id), created))
}

/// `GET /v1/models/{name}/evaluations?limit=50&before=<id>`: newest first.
pub async fn list_evaluations(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<EvaluationPage>, ApiError> {
    let query = parse_query(query.as_deref(), &["limit", "before"])?;
    Ok(Json(state.evaluations.list(&model, query.get("before").map(String::as_str), page_limit(&query)?).await?))
}

pub async fn get_evaluation(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<EvaluationRecord>, ApiError> {
    Ok(Json(state.evaluations.get(&id).await?))
}
