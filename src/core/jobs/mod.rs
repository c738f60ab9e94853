//! Edit and statistics jobs: validated and recorded at once, run one at a time from a bounded queue on the
//! device's edit worker (apart from inference), watched live, cancellable, and finished atomically: a
//! version becomes ready in the same transaction that records its stored change, never before.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::caller;
use super::datasets::load_images;
use super::directories::{blocking, files, subdirectory};
use super::edit_worker::{EditWorker, ExemplarPngs, GuardPlan, Outcome, Work};
use super::evaluations::evaluation_work;
use super::registry::Registry;
use super::versions::{VersionRef, Versions};
use super::{Conflict, CoreError, Resource};
use crate::edit::guard::DEFAULT_MAX_CHANGED;
use crate::edit::{EditParams, Method, Progress, Solver};
use crate::imaging::check_header;
use crate::store::{
    now_rfc3339, serde_name, BlobStore, EvaluationRecord, JobKind, JobRecord, JobState, MetadataStore,
    StatisticsRecord, VersionOutcome, VersionRecord, VersionState,
};

mod create;
mod plan;
mod requests;
mod runner;

use plan::{statistics_directory, EditPlan, GuardSettings, StatisticsPlan};
pub use requests::*;
use runner::LiveJob;

// The limits of an edit, public for the API's test that its document states them.
pub const MAX_EXEMPLARS: usize = 16;

pub const MAX_RANK: usize = 16;

/// Layers one edit may spread over.
pub const MAX_LAYERS: usize = 3;

pub const MAX_STEPS: usize = 100_000;

pub const MAX_DESCRIPTION: usize = 1000;

/// Images one statistics job reads (uploaded or listed).
pub const MAX_STATISTICS_IMAGES: usize = 100_000;

/// How long cancelling a running job waits for it to stop.
const CANCEL_WAIT: Duration = Duration::from_secs(60);

pub const RESTART_FAILURE: &str = "the server stopped before the job finished";

pub struct Jobs {
    registry: Arc<Registry>,
    versions: Arc<Versions>,
    metadata: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    worker: Arc<EditWorker>,
    queue: mpsc::Sender<String>,
    live: Mutex<HashMap<String, Arc<LiveJob>>>,
    statistics_dir: Option<PathBuf>,
    /// Set when the server stops: no job starts any more, and the running one is stopped and failed.
    stopping: AtomicBool,
}

fn request_sha256(model: &str, request: &serde_json::Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(model.as_bytes());
    hasher.update([0]);
    hasher.update(request.to_string().as_bytes());
    format!("{:x}", hasher.finalize())
}

/// A new job, queued, with no progress yet.
fn queued_job(
    kind: JobKind,
    model: &str,
    request: serde_json::Value,
    request_sha256: String,
    idempotency_key: Option<String>,
    total: usize,
    created_at: &str,
) -> JobRecord {
    JobRecord {
        id: uuid::Uuid::new_v4().to_string(),
        kind,
        model: model.to_string(),
        state: JobState::Queued,
        version: None,
        statistics: None,
        request,
        idempotency_key,
        request_sha256,
        step: 0,
        total: total as u64,
        loss: None,
        error: None,
        created_at: created_at.to_string(),
        started_at: None,
        finished_at: None,
    }
}

/// The plan a job was queued with.
pub(super) fn plan_of<T: serde::de::DeserializeOwned>(job: &JobRecord) -> Result<T, CoreError> {
    serde_json::from_value(job.request.clone())
        .map_err(|e| CoreError::Internal(format!("job {}: unreadable plan: {e}", job.id)))
}

fn invalid(message: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument(message.into())
}

fn already_ended(id: &str, state: JobState) -> CoreError {
    CoreError::Conflict(
        Conflict::JobFinished,
        format!("job {id} has already ended ({}); nothing to cancel", serde_name(state)),
    )
}

impl Jobs {
    /// Fails the jobs a stopped server was running, queues again the ones it had queued, then starts
    /// taking jobs.
    pub async fn start(
        registry: Arc<Registry>,
        versions: Arc<Versions>,
        metadata: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        worker: EditWorker,
        capacity: usize,
        statistics_dir: Option<PathBuf>,
    ) -> Result<Arc<Self>, CoreError> {
        let failed = metadata.fail_running_jobs(RESTART_FAILURE).await?;
        if failed > 0 {
            tracing::warn!(jobs = failed, "jobs running when the previous run stopped are marked failed");
        }
        let (queue, mut receiver) = mpsc::channel::<String>(capacity.max(1));
        let jobs = Arc::new(Self {
            registry,
            versions,
            metadata,
            blobs,
            worker: Arc::new(worker),
            queue,
            live: Mutex::new(HashMap::new()),
            statistics_dir,
            stopping: AtomicBool::new(false),
        });
        jobs.requeue().await?;
        let runner = Arc::downgrade(&jobs);
        let registry = Arc::clone(&jobs.registry);
        tokio::spawn(async move {
            // Jobs queued again at start-up need their models.
            registry.wait_ready().await;
            while let Some(id) = receiver.recv().await {
                let Some(jobs) = runner.upgrade() else { break };
                jobs.run(&id).await;
            }
        });
        Ok(jobs)
    }

    /// Queues again what the previous run had queued; what cannot run again fails.
    async fn requeue(&self) -> Result<(), CoreError> {
        for job in self.metadata.queued_jobs().await? {
            // Uploaded statistics images lived in the stopped server's memory.
            let uploaded =
                job.kind == JobKind::Statistics && plan_of::<StatisticsPlan>(&job).is_ok_and(|p| p.directory.is_none());
            let permit = if uploaded { None } else { self.queue.try_reserve().ok() };
            let live = LiveJob {
                record: watch::Sender::new(job.clone()),
                cancel: AtomicBool::new(false),
                images: Mutex::new(None),
            };
            match permit {
                Some(permit) => {
                    tracing::info!(job = %job.id, "queued again after the restart");
                    self.enqueue(job, None, permit);
                }
                None => {
                    let why = if uploaded {
                        "the uploaded images were lost when the server stopped; submit the job again"
                    } else {
                        "the edit queue is shorter than before the restart; submit the job again"
                    };
                    self.finish(&live, job, Err(CoreError::Internal(why.into()))).await;
                }
            }
        }
        Ok(())
    }

    /// For a stopping server: queued jobs stay queued (the next start runs them); the running one is stopped,
    /// recorded as failed as after a crash, and the edit thread exits.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let live: Vec<Arc<LiveJob>> = self.live.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for job in live.iter().filter(|job| job.record.borrow().state == JobState::Running) {
            job.cancel.store(true, Ordering::SeqCst);
            let mut watcher = job.record.subscribe();
            let _ = tokio::time::timeout(CANCEL_WAIT, watcher.wait_for(|r| r.state.is_final())).await;
        }
        let worker = Arc::clone(&self.worker);
        let _ = tokio::task::spawn_blocking(move || worker.stop()).await;
    }

    /// Frees what the edit worker keeps of an unloaded model.
    pub fn forget_model(&self, model: &str) {
        self.worker.forget(model);
    }

    fn live(&self, id: &str) -> Option<Arc<LiveJob>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// The job now: live progress while it is queued or running, else as stored.
    pub async fn get(&self, id: &str) -> Result<JobRecord, CoreError> {
        if let Some(live) = self.live(id) {
            return Ok(live.record.borrow().clone());
        }
        self.metadata.job(id).await?.ok_or_else(|| CoreError::not_found(Resource::Job, id))
    }

    /// The job from now until its final state: a receiver while it is live, else its final record.
    pub async fn watch(&self, id: &str) -> Result<Result<watch::Receiver<JobRecord>, JobRecord>, CoreError> {
        if let Some(live) = self.live(id) {
            return Ok(Ok(live.record.subscribe()));
        }
        Ok(Err(self.get(id).await?))
    }

    /// Cancels a queued or running job and answers it in its final state.
    pub async fn cancel(&self, id: &str) -> Result<JobRecord, CoreError> {
        let Some(live) = self.live(id) else {
            let job = self.get(id).await?;
            return Err(already_ended(id, job.state));
        };
        live.cancel.store(true, Ordering::SeqCst);
        let mut watcher = live.record.subscribe();
        // A queued job ends here; the runner skips it. A running one stops at its next step.
        let was_queued = live.leave_queue(|r| r.state = JobState::Cancelled);
        if was_queued {
            let record = live.record.borrow().clone();
            self.finish(&live, record, Err(CoreError::Cancelled)).await;
        } else {
            let state = live.record.borrow().state;
            if state.is_final() {
                return Err(already_ended(id, state));
            }
        }
        let stopped = match tokio::time::timeout(CANCEL_WAIT, watcher.wait_for(|r| r.state.is_final())).await {
            Ok(Ok(record)) => Some((*record).clone()),
            _ => None,
        };
        let job = match stopped {
            Some(job) => job,
            None => self.get(id).await?,
        };
        self.metadata.record_audit("job.cancel", id, &caller::current(), Some(json!({"state": job.state}))).await?;
        Ok(job)
    }
}
