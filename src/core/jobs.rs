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

use super::directories::{blocking, files, subdirectory};
use super::edit_worker::{EditWorker, ExemplarPngs, GuardPlan, Outcome, Work};
use super::datasets::load_images;
use super::evaluations::evaluation_work;
use super::exemplars::ANONYMOUS;
use super::registry::Registry;
use super::versions::{VersionRef, Versions};
use super::{Conflict, CoreError, Resource};
use crate::edit::guard::DEFAULT_MAX_CHANGED;
use crate::edit::{EditParams, Method, Progress, Solver};
use crate::store::{
    now_rfc3339, serde_name, BlobStore, EvaluationRecord, JobKind, JobRecord, JobState, MetadataStore, StatisticsRecord,
    VersionOutcome, VersionRecord, VersionState,
};

const MAX_EXEMPLARS: usize = 16;
const MAX_RANK: usize = 16;
/// Layers one edit may spread over.
const MAX_LAYERS: usize = 3;
const MAX_STEPS: usize = 100_000;
const MAX_DESCRIPTION: usize = 1000;
const MAX_STATISTICS_IMAGES: usize = 100_000;
/// How long cancelling a running job waits for it to stop.
const CANCEL_WAIT: Duration = Duration::from_secs(60);
pub const RESTART_FAILURE: &str = "the server stopped before the job finished";

/// A version as a JSON request names it: a number or an alias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VersionName {
    Number(u32),
    Alias(String),
}

impl VersionName {
    pub(crate) fn reference(&self) -> Result<VersionRef, CoreError> {
        match self {
            VersionName::Number(n) => Ok(VersionRef::Number(*n)),
            VersionName::Alias(text) => VersionRef::parse(text),
        }
    }
}

/// `POST /v1/models/{m}/versions`: everything but the exemplars has a default (a missing option is None).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    pub parent: Option<VersionName>,
    pub exemplars: Vec<String>,
    pub method: Option<Method>,
    pub solver: Option<Solver>,
    pub layer: Option<String>,
    /// Several layers in forward order, for a least-squares rewrite spread over them (instead of `layer`).
    pub layers: Option<Vec<String>>,
    pub rank: Option<usize>,
    pub steps: Option<usize>,
    pub lr: Option<f64>,
    pub seed: Option<i64>,
    pub statistics: Option<String>,
    pub guard: Option<GuardRequest>,
    pub description: Option<String>,
}

/// The breakage budget of an edit: by default the natural check photos (plus copies of the exemplars'
/// originals) and 2%.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardRequest {
    /// `default` (the natural check photos) or a dataset id.
    pub dataset: Option<String>,
    pub max_changed: Option<f64>,
}

/// The guard as a job runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GuardSettings {
    /// None: the natural check photos.
    dataset: Option<String>,
    max_changed: f64,
}

/// What a statistics job reads.
pub enum StatisticsImages {
    Uploaded(Vec<Bytes>),
    /// A subdirectory of the operator's statistics directory.
    Directory(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgressView {
    pub step: u64,
    pub total: u64,
    pub loss: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
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
            progress: ProgressView { step: r.step, total: r.total, loss: r.loss },
            version: r.version,
            statistics: r.statistics.clone(),
            error: r.error.clone(),
            created_at: r.created_at.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
        }
    }
}

/// Answer to an accepted edit.
#[derive(Debug, Serialize)]
pub struct EditAccepted {
    pub job: JobView,
    pub version: PendingVersion,
}

#[derive(Debug, Serialize)]
pub struct PendingVersion {
    pub number: u32,
    pub state: VersionState,
}

/// A job's state while this process runs it: watchers subscribe to `record`.
struct LiveJob {
    record: watch::Sender<JobRecord>,
    cancel: AtomicBool,
    /// Uploaded statistics images, held until the job runs.
    images: Mutex<Option<Vec<Bytes>>>,
}

impl LiveJob {
    /// Applies `update` if the job is still queued (atomically with respect to watchers); whether it was.
    fn leave_queue(&self, update: impl FnOnce(&mut JobRecord)) -> bool {
        self.record.send_if_modified(|r| {
            let queued = r.state == JobState::Queued;
            if queued {
                update(r);
            }
            queued
        })
    }
}

impl Progress for LiveJob {
    fn report(&self, step: usize, total: usize, loss: f64) {
        self.record.send_modify(|r| {
            r.step = step as u64;
            r.total = total as u64;
            r.loss = loss.is_finite().then_some(loss);
        });
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// What an edit job runs, as stored with it.
#[derive(Debug, Serialize, Deserialize)]
struct EditPlan {
    parent: u32,
    exemplars: Vec<String>,
    params: EditParams,
    statistics: Option<String>,
    /// None in plans queued before the guard existed.
    #[serde(default)]
    guard: Option<GuardSettings>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StatisticsPlan {
    layer: String,
    directory: Option<PathBuf>,
}

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
    serde_json::from_value(job.request.clone()).map_err(|e| CoreError::Internal(format!("job {}: unreadable plan: {e}", job.id)))
}

fn invalid(message: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument(message.into())
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
            let uploaded = job.kind == JobKind::Statistics && plan_of::<StatisticsPlan>(&job).is_ok_and(|p| p.directory.is_none());
            let permit = if uploaded { None } else { self.queue.try_reserve().ok() };
            let live = LiveJob { record: watch::Sender::new(job.clone()), cancel: AtomicBool::new(false), images: Mutex::new(None) };
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

    /// Validates an edit, records its pending version and queued job, and queues it. A repeated
    /// idempotency key with the same request answers the first job.
    pub async fn create_edit(&self, model: &str, request: EditRequest, key: Option<String>) -> Result<EditAccepted, CoreError> {
        let package = self.registry.package(model)?;
        let request_json = serde_json::to_value(&request).map_err(|e| CoreError::Internal(e.to_string()))?;
        let sha = request_sha256(model, &request_json);
        let _writes = self.versions.writes.lock().await;
        if let Some(key) = &key {
            if let Some(first) = self.metadata.job_by_idempotency_key(key).await? {
                if first.request_sha256 != sha {
                    return Err(CoreError::IdempotencyKeyReused);
                }
                let current = self.live(&first.id).map_or(first, |live| live.record.borrow().clone());
                let number = current.version.unwrap_or_default();
                let state = self.metadata.version(model, number).await?.map_or(VersionState::Failed, |v| v.state);
                return Ok(EditAccepted { job: JobView::from(&current), version: PendingVersion { number, state } });
            }
        }
        let plan = self.plan(model, &package.surface, &request).await?;
        let permit = self.queue.try_reserve().map_err(|_| CoreError::EditQueueFull(self.queue.max_capacity()))?;
        let now = now_rfc3339();
        let stored_plan = serde_json::to_value(&plan).map_err(|e| CoreError::Internal(e.to_string()))?;
        let job = queued_job(JobKind::Edit, model, stored_plan, sha, key, plan.params.steps, &now);
        let version = VersionRecord {
            model: model.to_string(),
            number: 0,
            parent: plan.parent,
            state: VersionState::Pending,
            layer: plan.params.layer.clone(),
            method: serde_name(plan.params.method),
            solver: serde_name(plan.params.solver),
            parameters: json!({"rank": plan.params.rank, "steps": plan.params.steps, "lr": plan.params.lr, "seed": plan.params.seed}),
            statistics: plan.statistics.clone(),
            description: request.description.clone(),
            exemplars: plan.exemplars.clone(),
            metrics: None,
            error: None,
            job: job.id.clone(),
            delta_blob: None,
            stored_bytes: 0,
            created_at: now,
            ready_at: None,
        };
        let number = self.metadata.create_edit(&job, &version).await?;
        let job = JobRecord { version: Some(number), ..job };
        self.metadata
            .record_audit("edit.create", &job.id, ANONYMOUS, Some(json!({"model": model, "version": number, "parent": plan.parent})))
            .await?;
        let view = JobView::from(&job);
        self.enqueue(job, None, permit);
        Ok(EditAccepted { job: view, version: PendingVersion { number, state: VersionState::Pending } })
    }

    fn enqueue(&self, job: JobRecord, images: Option<Vec<Bytes>>, permit: mpsc::Permit<'_, String>) {
        let id = job.id.clone();
        let live = LiveJob { record: watch::Sender::new(job), cancel: AtomicBool::new(false), images: Mutex::new(images) };
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), Arc::new(live));
        metrics::gauge!("editserve_edit_queue_depth").increment(1.0);
        permit.send(id);
    }

    /// The edit a request asks for, with every default filled in, or why it cannot run.
    async fn plan(&self, model: &str, surface: &super::scheduler::EditSurface, request: &EditRequest) -> Result<EditPlan, CoreError> {
        let parent = match &request.parent {
            Some(name) => name.reference()?,
            None => VersionRef::default_alias(),
        };
        let parent = self.versions.ready(model, &parent).await?;
        if request.exemplars.is_empty() || request.exemplars.len() > MAX_EXEMPLARS {
            return Err(invalid(format!("an edit takes 1 to {MAX_EXEMPLARS} exemplars, got {}", request.exemplars.len())));
        }
        for id in &request.exemplars {
            if self.metadata.exemplar(id).await?.is_none() {
                return Err(CoreError::not_found(Resource::Exemplar, id));
            }
        }
        let method = request.method.unwrap_or(Method::Rewrite);
        let solver = request.solver.unwrap_or(Solver::default_for(method));
        let layer_names = match (&request.layer, &request.layers) {
            (Some(_), Some(_)) => return Err(invalid("name 'layer' or 'layers', not both".to_string())),
            (None, Some(layers)) if layers.is_empty() || layers.len() > MAX_LAYERS => {
                return Err(invalid(format!("'layers' takes 1 to {MAX_LAYERS} layers, got {}", layers.len())))
            }
            (None, Some(layers)) if layers.len() > 1 && (method, solver) != (Method::Rewrite, Solver::LeastSquares) => {
                return Err(invalid("only the least_squares rewrite edits several layers".to_string()))
            }
            (None, Some(layers)) => layers.clone(),
            (Some(layer), None) => vec![layer.clone()],
            (None, None) => vec![surface.default_edit_layer.clone()],
        };
        let mut previous = None;
        for layer_name in &layer_names {
            let position = surface.editable_layers.iter().position(|l| l.name == *layer_name).ok_or_else(|| {
                invalid(format!("'{layer_name}' is not an editable layer of '{model}' (GET /v1/models/{model} lists them)"))
            })?;
            if previous.is_some_and(|p| p >= position) {
                return Err(invalid("the 'layers' of an edit must be distinct and in forward order".to_string()));
            }
            previous = Some(position);
            let layer = &surface.editable_layers[position];
            if solver != Solver::Adam {
                let name = serde_name(solver);
                if method != Method::Rewrite {
                    return Err(invalid(format!("the {name} solver solves a rewrite only; fine-tuning uses adam")));
                }
                if layer.weight_shape.get(2..) != Some(&[1, 1][..]) {
                    return Err(invalid(format!("the {name} solver needs a 1x1 conv; '{layer_name}' is {:?}", layer.weight_shape)));
                }
            }
        }
        let layer_name = layer_names[0].clone();
        let mut params = EditParams::new(method, solver, &layer_name);
        params.following_layers = layer_names[1..].to_vec();
        if let Some(rank) = request.rank {
            if !(1..=MAX_RANK).contains(&rank) {
                return Err(invalid(format!("rank must be between 1 and {MAX_RANK}, got {rank}")));
            }
            params.rank = rank;
        }
        if let Some(steps) = request.steps {
            if !(1..=MAX_STEPS).contains(&steps) {
                return Err(invalid(format!("steps must be between 1 and {MAX_STEPS}, got {steps}")));
            }
            params.steps = steps;
        }
        if let Some(lr) = request.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(invalid(format!("lr must be a positive number, got {lr}")));
            }
            params.lr = lr;
        }
        params.seed = request.seed.unwrap_or(params.seed);
        if let Some(id) = &request.statistics {
            let statistics = self.metadata.statistics(id).await?.ok_or_else(|| CoreError::not_found(Resource::Statistics, id))?;
            if statistics.model != model || statistics.layer != layer_name {
                return Err(invalid(format!(
                    "statistics '{id}' are of layer '{}' of model '{}', not of '{layer_name}' of '{model}'",
                    statistics.layer, statistics.model
                )));
            }
        }
        if request.description.as_ref().is_some_and(|d| d.chars().count() > MAX_DESCRIPTION) {
            return Err(invalid(format!("description is longer than {MAX_DESCRIPTION} characters")));
        }
        let guard = self.guard_settings(request.guard.as_ref()).await?;
        Ok(EditPlan { parent, exemplars: request.exemplars.clone(), params, statistics: request.statistics.clone(), guard: Some(guard) })
    }

    async fn guard_settings(&self, request: Option<&GuardRequest>) -> Result<GuardSettings, CoreError> {
        let max_changed = request.and_then(|g| g.max_changed).unwrap_or(DEFAULT_MAX_CHANGED);
        if !(0.0..=1.0).contains(&max_changed) {
            return Err(invalid(format!("guard.max_changed must be between 0 and 1, got {max_changed}")));
        }
        let dataset = match request.and_then(|g| g.dataset.as_deref()) {
            None | Some("default") => None,
            Some(id) => {
                self.metadata.dataset(id).await?.ok_or_else(|| CoreError::not_found(Resource::Dataset, id))?;
                Some(id.to_string())
            }
        };
        Ok(GuardSettings { dataset, max_changed })
    }

    /// Queues a statistics job on `layer` (the default edit layer when None).
    pub async fn create_statistics(&self, model: &str, layer: Option<String>, images: StatisticsImages) -> Result<JobView, CoreError> {
        let package = self.registry.package(model)?;
        let layer = layer.unwrap_or_else(|| package.surface.default_edit_layer.clone());
        if package.surface.layer(&layer).is_none() {
            return Err(invalid(format!("'{layer}' is not an editable layer of '{model}'")));
        }
        let (directory, uploaded, total) = match images {
            StatisticsImages::Uploaded(images) if images.is_empty() => return Err(invalid("give at least one 'image' part")),
            StatisticsImages::Uploaded(images) => {
                let total = images.len();
                (None, Some(images), total)
            }
            StatisticsImages::Directory(name) => {
                let root = self.statistics_dir.clone();
                let (directory, total) = blocking(move || {
                    let directory = statistics_directory(root.as_deref(), &name)?;
                    let total = files(&directory, MAX_STATISTICS_IMAGES)?.len();
                    Ok((directory, total))
                })
                .await?;
                (Some(directory), None, total)
            }
        };
        let plan = StatisticsPlan { layer, directory };
        let request = serde_json::to_value(&plan).map_err(|e| CoreError::Internal(e.to_string()))?;
        let permit = self.queue.try_reserve().map_err(|_| CoreError::EditQueueFull(self.queue.max_capacity()))?;
        let sha = request_sha256(model, &request);
        let job = queued_job(JobKind::Statistics, model, request, sha, None, total, &now_rfc3339());
        self.metadata.create_job(&job).await?;
        self.metadata.record_audit("statistics.create", &job.id, ANONYMOUS, Some(json!({"model": model, "layer": plan.layer}))).await?;
        let view = JobView::from(&job);
        self.enqueue(job, uploaded, permit);
        Ok(view)
    }

    /// Queues the evaluation job that runs `plan` (validated by `Evaluations`), recorded with its pending
    /// evaluation in one transaction; `total` is the dataset's images.
    pub(crate) async fn create_evaluation(
        &self,
        model: &str,
        plan: serde_json::Value,
        total: usize,
        evaluation: EvaluationRecord,
    ) -> Result<JobView, CoreError> {
        let permit = self.queue.try_reserve().map_err(|_| CoreError::EditQueueFull(self.queue.max_capacity()))?;
        let sha = request_sha256(model, &plan);
        let job = queued_job(JobKind::Evaluation, model, plan, sha, None, total, &evaluation.created_at);
        self.metadata.create_evaluation(&job, &EvaluationRecord { job: job.id.clone(), ..evaluation }).await?;
        let view = JobView::from(&job);
        self.enqueue(job, None, permit);
        Ok(view)
    }

    pub async fn get(&self, id: &str) -> Result<JobView, CoreError> {
        if let Some(live) = self.live(id) {
            return Ok(JobView::from(&*live.record.borrow()));
        }
        let record = self.metadata.job(id).await?.ok_or_else(|| CoreError::not_found(Resource::Job, id))?;
        Ok(JobView::from(&record))
    }

    /// The job's views from now until its final state: a receiver while it is live, else its final view.
    pub async fn watch(&self, id: &str) -> Result<Result<watch::Receiver<JobRecord>, JobView>, CoreError> {
        if let Some(live) = self.live(id) {
            return Ok(Ok(live.record.subscribe()));
        }
        Ok(Err(self.get(id).await?))
    }

    /// Cancels a queued or running job and answers its final view.
    pub async fn cancel(&self, id: &str) -> Result<JobView, CoreError> {
        let Some(live) = self.live(id) else {
            let view = self.get(id).await?;
            return Err(already_ended(id, view.state));
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
            Ok(Ok(record)) => Some(JobView::from(&*record)),
            _ => None,
        };
        let view = match stopped {
            Some(view) => view,
            None => self.get(id).await?,
        };
        self.metadata.record_audit("job.cancel", id, ANONYMOUS, Some(json!({"state": view.state}))).await?;
        Ok(view)
    }

    async fn run(&self, id: &str) {
        metrics::gauge!("editserve_edit_queue_depth").decrement(1.0);
        let Some(live) = self.live(id) else { return };
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let started = now_rfc3339();
        let begun = live.leave_queue(|r| (r.state, r.started_at) = (JobState::Running, Some(started.clone())));
        if !begun {
            return;
        }
        let record = live.record.borrow().clone();
        let clock = std::time::Instant::now();
        let outcome = match self.metadata.start_job(id, &started).await {
            Ok(()) => self.execute(&record, Arc::clone(&live)).await,
            Err(e) => Err(e.into()),
        };
        let kind = serde_name(record.kind);
        metrics::histogram!("editserve_job_seconds", "kind" => kind).record(clock.elapsed().as_secs_f64());
        self.finish(&live, record, outcome).await;
    }

    async fn execute(&self, job: &JobRecord, live: Arc<LiveJob>) -> Result<Outcome, CoreError> {
        let package = self.registry.package(&job.model)?;
        let work = match job.kind {
            JobKind::Edit => {
                let plan: EditPlan = plan_of(job)?;
                let mut exemplars = Vec::with_capacity(plan.exemplars.len());
                for id in &plan.exemplars {
                    let record = self.metadata.exemplar(id).await?.ok_or_else(|| CoreError::not_found(Resource::Exemplar, id))?;
                    exemplars.push(ExemplarPngs {
                        image: self.blobs.get(&record.image_blob).await?.into(),
                        mask: self.blobs.get(&record.mask_blob).await?.into(),
                        modified: self.blobs.get(&record.modified_blob).await?.into(),
                    });
                }
                let moment = match &plan.statistics {
                    Some(id) => {
                        let statistics = self.metadata.statistics(id).await?.ok_or_else(|| CoreError::not_found(Resource::Statistics, id))?;
                        Some(Bytes::from(self.blobs.get(&statistics.blob).await?))
                    }
                    None => None,
                };
                let lineage = self.versions.lineage(&job.model, plan.parent).await?;
                let guard = match plan.guard {
                    Some(GuardSettings { dataset: Some(id), max_changed }) => {
                        // A pairs dataset's originals are the check images: its transformed images are what an
                        // edit is meant to change.
                        let images = load_images(self.metadata.as_ref(), self.blobs.as_ref(), &id).await?;
                        Some(GuardPlan { max_changed, photos: Some(images.items.into_iter().map(|item| item.image).collect()) })
                    }
                    Some(GuardSettings { dataset: None, max_changed }) => Some(GuardPlan { max_changed, photos: None }),
                    None => None,
                };
                Work::Edit { lineage, exemplars, params: plan.params, moment, guard }
            }
            JobKind::Statistics => {
                let plan: StatisticsPlan = plan_of(job)?;
                let uploaded = live.images.lock().unwrap_or_else(|p| p.into_inner()).take();
                let images = match (uploaded, &plan.directory) {
                    (Some(images), _) => images,
                    (None, Some(directory)) => {
                        let mut images = Vec::new();
                        let listed = directory.clone();
                        for path in blocking(move || files(&listed, MAX_STATISTICS_IMAGES)).await? {
                            let bytes = tokio::fs::read(&path).await.map_err(|e| CoreError::Internal(format!("{}: {e}", path.display())))?;
                            images.push(Bytes::from(bytes));
                        }
                        images
                    }
                    (None, None) => return Err(CoreError::Internal("the job's images are gone".into())),
                };
                Work::Statistics { layer: plan.layer, images }
            }
            JobKind::Evaluation => Work::Evaluate(evaluation_work(job, &self.versions, self.metadata.as_ref(), self.blobs.as_ref()).await?),
        };
        self.worker.run(package, work, live).await
    }

    /// Stores the outcome, writes the final state (and the version's) in one transaction, and lets
    /// watchers see it.
    async fn finish(&self, live: &LiveJob, mut job: JobRecord, outcome: Result<Outcome, CoreError>) {
        let now = now_rfc3339();
        let progress = live.record.borrow().clone();
        (job.step, job.total, job.loss) = (progress.step, progress.total, progress.loss);
        job.finished_at = Some(now.clone());
        let mut ready = None;
        let mut statistics = None;
        let mut evaluation = None;
        let stored = match outcome {
            Ok(Outcome::Edit { delta, metrics }) => {
                let stored_bytes = delta.len() as u64;
                self.blobs.put(delta).await.map(|delta_blob| {
                    ready = Some(VersionOutcome::Ready { delta_blob, stored_bytes, metrics, ready_at: now.clone() });
                })
            }
            Ok(Outcome::Statistics { moment, images, positions }) => self.blobs.put(moment).await.map(|blob| {
                statistics = Some(StatisticsRecord {
                    id: job.id.clone(),
                    model: job.model.clone(),
                    layer: job.request["layer"].as_str().unwrap_or_default().to_string(),
                    blob,
                    images,
                    positions,
                    created_at: now.clone(),
                });
                job.statistics = Some(job.id.clone());
            }),
            Ok(Outcome::Evaluation(outcome)) => {
                evaluation = Some(outcome);
                Ok(())
            }
            Err(CoreError::Cancelled) if self.stopping.load(Ordering::SeqCst) => {
                (job.state, job.error) = (JobState::Failed, Some(RESTART_FAILURE.into()));
                Ok(())
            }
            Err(e) => {
                job.state = if matches!(e, CoreError::Cancelled) { JobState::Cancelled } else { JobState::Failed };
                job.error = Some(e.to_string());
                Ok(())
            }
        };
        if let Err(e) = stored {
            job.state = JobState::Failed;
            job.error = Some(format!("cannot store the result: {e}"));
            (ready, statistics) = (None, None);
        } else if job.error.is_none() {
            job.state = JobState::Succeeded;
        }
        let version = job.version.map(|_| ready.unwrap_or_else(|| VersionOutcome::Failed { error: job.error.clone().unwrap_or_default() }));
        if let Err(e) = self.metadata.finish_job(&job, version.as_ref(), statistics.as_ref(), evaluation.as_ref()).await {
            // The row stays unfinished and the next start marks it failed; the version never turns ready.
            tracing::error!(job = %job.id, error = %e, "cannot record the job's end");
            job.state = JobState::Failed;
            job.error = Some(format!("cannot record the job's end: {e}"));
        }
        tracing::info!(job = %job.id, kind = ?job.kind, state = ?job.state, error = ?job.error, "job finished");
        metrics::counter!("editserve_jobs_total", "kind" => serde_name(job.kind), "state" => serde_name(job.state)).increment(1);
        let id = job.id.clone();
        live.record.send_replace(job);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
}

fn already_ended(id: &str, state: JobState) -> CoreError {
    CoreError::Conflict(Conflict::JobFinished, format!("job {id} has already ended ({}); nothing to cancel", serde_name(state)))
}

/// A subdirectory of the configured statistics directory; never a path outside it.
fn statistics_directory(root: Option<&std::path::Path>, name: &str) -> Result<PathBuf, CoreError> {
    subdirectory(root, name, "statistics directory", "--statistics-dir")
}
