//! Jobs over HTTP: starting a statistics job, reading and cancelling any job, and following its progress as
//! Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use super::body::{EncodedImage, Parts, UploadRefusals};
use super::error::{ApiError, ErrorBody};
use super::params::{IdPath, ModelPath};
use super::versions::accepted;
use super::AppState;
use crate::core::jobs::{StatisticsImages, MAX_STATISTICS_IMAGES};
use crate::store::{seconds_between, JobKind, JobRecord, JobState};

/// Watchers of a fast edit see at most this many progress events a second.
const EVENT_INTERVAL: Duration = Duration::from_millis(100);

/// The images of a statistics job: uploaded, or a directory of the operator's statistics directory.
#[derive(ToSchema)]
pub struct StatisticsForm {
    #[schema(required = false)]
    image: Vec<EncodedImage>,
    /// A subdirectory of `--statistics-dir`, instead of `image` parts.
    directory: Option<String>,
    /// The layer whose inputs are measured; the model's default edit layer when absent.
    layer: Option<String>,
}

/// How far a job is: an edit's steps span its solve and its breakage guard, so that `step / total` is the
/// share of the work done.
#[derive(Serialize, ToSchema)]
pub struct ProgressView {
    pub step: u64,
    pub total: u64,
    pub loss: Option<f64>,
    /// Seconds since the job started, until it finished.
    pub elapsed_seconds: Option<f64>,
    /// While it runs: the seconds left at the pace so far (elapsed times steps left over steps done).
    pub remaining_seconds: Option<f64>,
}

impl ProgressView {
    fn of(r: &JobRecord) -> Self {
        let elapsed = r.started_at.as_deref().and_then(|start| seconds_between(start, r.finished_at.as_deref()));
        let remaining = match (r.state, elapsed) {
            (JobState::Running, Some(elapsed)) if r.step > 0 => {
                Some(elapsed * r.total.saturating_sub(r.step) as f64 / r.step as f64)
            }
            _ => None,
        };
        Self { step: r.step, total: r.total, loss: r.loss, elapsed_seconds: elapsed, remaining_seconds: remaining }
    }
}

// The store's record as clients see it: without the plan the job runs and its idempotency fingerprint.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub kind: JobKind,
    pub model: String,
    pub state: JobState,
    pub progress: ProgressView,
    pub version: Option<u32>,
    pub statistics: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl From<&JobRecord> for JobView {
    fn from(r: &JobRecord) -> Self {
        Self {
            id: r.id.clone(),
            kind: r.kind,
            model: r.model.clone(),
            state: r.state,
            progress: ProgressView::of(r),
            version: r.version,
            statistics: r.statistics.clone(),
            error: r.error.clone(),
            created_at: r.created_at.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct JobAccepted {
    job: JobView,
}

/// Starts a statistics job: the second moment of a layer's inputs over your images (or a directory of the
/// operator's statistics directory), for edits to name as `statistics`.
#[utoipa::path(post, path = "/v1/models/{name}/statistics", tag = "versions", security(("bearer" = ["edit"])), params(ModelPath),
    request_body(content = StatisticsForm, content_type = "multipart/form-data"),
    responses(
        (status = 202, body = JobAccepted, headers(("Location" = String, description = "The job"))),
        (status = 404, body = ErrorBody, description = "`model_not_found`"),
        UploadRefusals,
        (status = 503, body = ErrorBody, description = "`edit_queue_full`, `shutting_down`"),
    ))]
pub async fn create_statistics(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name: model }): Path<ModelPath>,
    request: Request,
) -> Result<Response, ApiError> {
    let mut parts = Parts::read(request, state.config.max_body_bytes, MAX_STATISTICS_IMAGES + 2).await?;
    state.registry.ensure_loaded(&model)?;
    let form = StatisticsForm {
        image: parts.take_images("image"),
        directory: parts.take_text("directory")?,
        layer: parts.take_text("layer")?,
    };
    parts.expect_no_more("the parts are 'image' (repeated) or 'directory', and 'layer'")?;
    let images = match (form.image.is_empty(), form.directory) {
        (false, None) => StatisticsImages::Uploaded(form.image.into_iter().map(|EncodedImage(bytes)| bytes).collect()),
        (true, Some(directory)) => StatisticsImages::Directory(directory),
        (true, None) => return Err(ApiError::InvalidRequest("give 'image' parts or a 'directory'".into())),
        (false, Some(_)) => {
            return Err(ApiError::InvalidRequest("give 'image' parts or a 'directory', not both".into()))
        }
    };
    let job = state.jobs.create_statistics(&model, form.layer, images).await?;
    Ok(accepted(format!("/v1/jobs/{}", job.id), JobAccepted { job: JobView::from(&job) }))
}

/// An edit, statistics or evaluation job: state, progress and outcome.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", security(("bearer" = ["infer"])), params(IdPath), responses(
    (status = 200, body = JobView),
    (status = 404, body = ErrorBody, description = "`job_not_found`"),
))]
pub async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(JobView::from(&state.jobs.get(&id).await?)))
}

/// Cancels a queued or running job; its pending version is marked failed.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs", security(("bearer" = ["edit"])), params(IdPath), responses(
    (status = 200, body = JobView),
    (status = 404, body = ErrorBody, description = "`job_not_found`"),
    (status = 409, body = ErrorBody, description = "`job_finished`"),
))]
pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(JobView::from(&state.jobs.cancel(&id).await?)))
}

fn event(record: &JobView) -> Event {
    let name = if record.state.is_final() { "final" } else { "progress" };
    Event::default().event(name).json_data(record).unwrap_or_else(|_| Event::default().event(name))
}

/// Server-Sent Events: the job's state now (`progress`), then on each change (at most ten a second), until a
/// `final` event; each event's data is the job as `GET /v1/jobs/{id}` shows it.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", security(("bearer" = ["infer"])), params(IdPath), responses(
    (status = 200, content_type = "text/event-stream", body = JobView,
        description = "Events `progress` and `final`, each with the job as JSON data"),
    (status = 404, body = ErrorBody, description = "`job_not_found`"),
))]
pub async fn job_events(
    State(state): State<Arc<AppState>>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    enum Watch {
        Live(watch::Receiver<JobRecord>, bool),
        Done,
    }
    let start = match state.jobs.watch(&id).await? {
        Ok(receiver) => Watch::Live(receiver, true),
        Err(finished) => {
            let stream = stream::iter([Ok(event(&JobView::from(&finished)))]);
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
