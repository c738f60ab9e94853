//! Versions, aliases, edit and statistics jobs, comparison, and job progress (JSON and Server-Sent Events).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::body::Parts;
use super::error::ApiError;
use super::models::{classify_version, read_images, ClassifyResponse};
use super::query::{page_limit, parse_number, parse_query, top_k};
use super::AppState;
use crate::core::jobs::{EditRequest, JobView, StatisticsImages, VersionName};
use crate::core::registry::Prediction;
use crate::core::versions::{VersionPage, VersionRef, VersionView};
use crate::store::JobRecord;

const MOST_COMPARED: usize = 8;
const LONGEST_IDEMPOTENCY_KEY: usize = 255;
/// Watchers of a fast edit see at most this many progress events a second.
const EVENT_INTERVAL: Duration = Duration::from_millis(100);

fn version_ref(text: &str) -> Result<VersionRef, ApiError> {
    Ok(VersionRef::parse(text)?)
}

pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(|e| ApiError::InvalidRequest(e.body_text()))
}

pub(super) fn accepted(location: String, body: impl Serialize) -> Response {
    (StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(body)).into_response()
}

pub async fn list_versions(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<VersionPage>, ApiError> {
    let query = parse_query(query.as_deref(), &["limit", "before"])?;
    Ok(Json(state.versions.list(&model, parse_number(&query, "before")?, page_limit(&query)?).await?))
}

pub async fn get_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<VersionView>, ApiError> {
    Ok(Json(state.versions.get(&model, &version_ref(&version)?).await?))
}

pub async fn delete_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.versions.delete(&model, &version_ref(&version)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/models/{name}/versions`: an edit job; 202 with the job and the pending version.
pub async fn create_version(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Json<EditRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    state.registry.ensure_loaded(&model)?;
    let request = json_body(body)?;
    let created = state.jobs.create_edit(&model, request, key).await?;
    Ok(accepted(format!("/v1/jobs/{}", created.job.id), created))
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

pub async fn classify(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let query = parse_query(query.as_deref(), &["top_k"]);
    classify_version(state, model, Some(version), query, request).await
}

#[derive(Serialize)]
pub struct VersionResult {
    version: u32,
    predictions: Vec<Prediction>,
}

#[derive(Serialize)]
pub struct Comparison {
    model: String,
    results: Vec<VersionResult>,
    /// Whether every version's top-1 class is the same.
    agree: bool,
}

/// `POST /v1/models/{name}/compare?versions=0,3,production`: one image through several versions.
pub async fn compare(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
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

#[derive(Serialize)]
pub struct AliasList {
    aliases: BTreeMap<String, u32>,
}

pub async fn list_aliases(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<AliasList>, ApiError> {
    Ok(Json(AliasList { aliases: state.versions.aliases(&model).await? }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasTarget {
    version: VersionName,
}

#[derive(Serialize)]
pub struct AliasSet {
    alias: String,
    version: u32,
}

pub async fn put_alias(
    State(state): State<Arc<AppState>>,
    Path((model, alias)): Path<(String, String)>,
    body: Result<Json<AliasTarget>, JsonRejection>,
) -> Result<Json<AliasSet>, ApiError> {
    state.registry.ensure_loaded(&model)?;
    let target = match json_body(body)?.version {
        VersionName::Number(n) => VersionRef::Number(n),
        VersionName::Alias(name) => version_ref(&name)?,
    };
    let version = state.versions.set_alias(&model, &alias, &target).await?;
    Ok(Json(AliasSet { alias, version }))
}

pub async fn delete_alias(
    State(state): State<Arc<AppState>>,
    Path((model, alias)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.versions.delete_alias(&model, &alias).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
pub struct JobAccepted {
    job: JobView,
}

/// `POST /v1/models/{name}/statistics`, multipart: `image` parts or a `directory`, and an optional `layer`.
pub async fn create_statistics(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let mut parts = Parts::read(request, state.config.max_body_bytes).await?;
    state.registry.ensure_loaded(&model)?;
    let images = parts.take_all("image");
    let directory = parts.take_text("directory")?;
    let layer = parts.take_text("layer")?;
    parts.expect_no_more("the parts are 'image' (repeated) or 'directory', and 'layer'")?;
    let images = match (images.is_empty(), directory) {
        (false, None) => StatisticsImages::Uploaded(images),
        (true, Some(directory)) => StatisticsImages::Directory(directory),
        (true, None) => return Err(ApiError::InvalidRequest("give 'image' parts or a 'directory'".into())),
        (false, Some(_)) => {
            return Err(ApiError::InvalidRequest("give 'image' parts or a 'directory', not both".into()))
        }
    };
    let job = state.jobs.create_statistics(&model, layer, images).await?;
    Ok(accepted(format!("/v1/jobs/{}", job.id), JobAccepted { job }))
}

pub async fn get_job(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<JobView>, ApiError> {
    Ok(Json(state.jobs.get(&id).await?))
}

pub async fn cancel_job(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<JobView>, ApiError> {
    Ok(Json(state.jobs.cancel(&id).await?))
}

fn event(record: &JobView) -> Event {
    let name = if record.state.is_final() { "final" } else { "progress" };
    Event::default().event(name).json_data(record).unwrap_or_else(|_| Event::default().event(name))
}

/// `GET /v1/jobs/{id}/events`: the job's state now, then on each change (at most every
/// `EVENT_INTERVAL`), until a final state.
pub async fn job_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    enum Watch {
        Live(watch::Receiver<JobRecord>, bool),
        Done,
    }
    let start = match state.jobs.watch(&id).await? {
        Ok(receiver) => Watch::Live(receiver, true),
        Err(finished) => {
            let stream = stream::iter([Ok(event(&finished))]);
            return Ok(Sse::new(futures_util::StreamExt::boxed(stream)).keep_alive(KeepAlive::default()));
        }
    };
    let stream = stream::unfold(start, |watch| async move {
        let Watch::Live(mut receiver, first) = watch else { return None };
        if !first {
            tokio::time::sleep(EVENT_INTERVAL).await;
            // A closed channel means the job ended; its last value is the final state.
            let _ = receiver.changed().await;
        }
        let view = JobView::from(&*receiver.borrow_and_update());
        let next = if view.state.is_final() { Watch::Done } else { Watch::Live(receiver, false) };
        Some((Ok(event(&view)), next))
    });
    let mut stopping = state.stopping.clone();
    let stream = futures_util::StreamExt::take_until(stream, async move {
        let _ = stopping.wait_for(|stopping| *stopping).await;
    });
    Ok(Sse::new(futures_util::StreamExt::boxed(stream)).keep_alive(KeepAlive::default()))
}
