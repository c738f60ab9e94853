//! The worker of one device. Its batching thread owns every model (and so every tensor) on that device,
//! takes jobs from a bounded channel, and batches classification requests dynamically: once an executor
//! is free it waits at most `max_batch_wait` for requests still being decoded, up to `max_batch_size`
//! images per model version. Each batch runs on one of `streams` executor threads (each with its own
//! libtorch thread team) on a storage-sharing handle of the model, so that on a CPU several passes run
//! side by side while the next batch forms. Versions other than the base are materialised on first use
//! from their lineage of changes, sharing every unedited tensor with the base, and kept while they are
//! among the most recently used.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use lru::LruCache;
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;

use super::CoreError;
use crate::edit::delta::materialise;
use crate::imaging::InputTensor;
use crate::models::{load_package, Classifier, EditableLayer, ModelPackage};

#[derive(Debug, Clone, Copy)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    pub max_batch_wait: Duration,
    pub queue_capacity: usize,
    /// Forward passes that may run at once (executor threads).
    pub streams: NonZeroUsize,
    /// libtorch intra-op threads of each executor; None keeps libtorch's default.
    pub threads_per_stream: Option<NonZeroUsize>,
}

/// How often a worker holding a partial batch checks for requests that are still being decoded.
const INCOMING_POLL: Duration = Duration::from_micros(500);

/// Softmax probabilities for each image of a request, in request order.
pub type Probabilities = Vec<Vec<f32>>;

/// What a classification runs on: version 0 is the model's base weights; any other version comes with the
/// changes of its lineage (safetensors, oldest first), from which the worker materialises it when it is
/// not resident.
#[derive(Clone)]
pub struct Target {
    pub model: String,
    pub version: u32,
    pub lineage: Lineage,
}

/// The changes from a model's base weights to a version, as safetensors, oldest first.
pub type Lineage = Arc<Vec<Bytes>>;

impl Target {
    pub fn base(model: &str) -> Self {
        Self { model: model.to_string(), version: 0, lineage: Arc::new(Vec::new()) }
    }

    fn key(&self) -> (String, u32) {
        (self.model.clone(), self.version)
    }
}

/// What a loaded model offers for editing.
#[derive(Debug, Clone)]
pub struct EditSurface {
    pub editable_layers: Vec<EditableLayer>,
    pub default_edit_layer: String,
}

impl EditSurface {
    pub fn layer(&self, name: &str) -> Option<&EditableLayer> {
        self.editable_layers.iter().find(|layer| layer.name == name)
    }
}

/// The bytes each resident version holds beyond its base, by (model, version); written by the worker.
pub type Residency = Arc<Mutex<HashMap<(String, u32), u64>>>;

enum Job {
    Load { package: ModelPackage, reply: oneshot::Sender<Result<EditSurface, CoreError>> },
    Unload { name: String, reply: oneshot::Sender<bool> },
    /// Drops a materialised version (it was deleted).
    Forget { model: String, version: u32 },
    Classify { target: Target, inputs: Vec<InputTensor>, reply: oneshot::Sender<Result<Probabilities, CoreError>> },
}

/// Handle to a device's worker thread. Dropping the last handle lets the worker finish its queue and exit.
pub struct DeviceWorker {
    device: Device,
    incoming: Arc<AtomicUsize>,
    residency: Residency,
    sender: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceWorker {
    /// `resident_versions`: how many materialised versions (beyond the bases) stay on the device.
    pub fn spawn(device: Device, config: BatchingConfig, resident_versions: NonZeroUsize) -> Result<Self, CoreError> {
        let (sender, receiver) = crossbeam_channel::bounded(config.queue_capacity);
        let incoming = Arc::new(AtomicUsize::new(0));
        let residency = Residency::default();
        let executors = Executors::spawn(device, &config)?;
        let worker = Worker {
            device,
            config,
            models: HashMap::new(),
            versions: LruCache::new(resident_versions),
            residency: Arc::clone(&residency),
            incoming: Arc::clone(&incoming),
            executors,
        };
        let thread = std::thread::Builder::new()
            .name(format!("editserve-{device:?}").to_lowercase())
            .spawn(move || worker.run(receiver))
            .map_err(|e| CoreError::Internal(format!("cannot start the device worker: {e}")))?;
        Ok(Self { device, incoming, residency, sender: Some(sender), thread: Some(thread) })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The bytes a version holds beyond its base while resident; None when it is not resident.
    pub fn resident_bytes(&self, model: &str, version: u32) -> Option<u64> {
        self.residency.lock().unwrap_or_else(|p| p.into_inner()).get(&(model.to_string(), version)).copied()
    }

    pub async fn load(&self, package: ModelPackage) -> Result<EditSurface, CoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Load { package, reply })?;
        answer.await.map_err(|_| CoreError::ShuttingDown)?
    }

    /// Tells the worker that a request is on its way (being decoded), so that a batch being formed
    /// waits for it; the announcement ends when the returned guard is dropped or submitted.
    pub fn announce(&self) -> Incoming {
        self.incoming.fetch_add(1, Ordering::SeqCst);
        Incoming(Arc::clone(&self.incoming))
    }

    /// Drops the model's tensors once the jobs queued before this one are done; whether it was loaded.
    pub async fn unload(&self, name: String) -> Result<bool, CoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Unload { name, reply })?;
        answer.await.map_err(|_| CoreError::ShuttingDown)
    }

    /// Frees a version's materialised tensors, if it is resident.
    pub fn forget(&self, model: &str, version: u32) -> Result<(), CoreError> {
        self.submit(Job::Forget { model: model.to_string(), version })
    }

    pub async fn classify(&self, target: Target, inputs: Vec<InputTensor>, incoming: Incoming) -> Result<Probabilities, CoreError> {
        let (reply, answer) = oneshot::channel();
        let submitted = self.submit(Job::Classify { target, inputs, reply });
        drop(incoming);
        submitted?;
        answer.await.map_err(|_| CoreError::ShuttingDown)?
    }

    fn submit(&self, job: Job) -> Result<(), CoreError> {
        let sender = self.sender.as_ref().ok_or(CoreError::ShuttingDown)?;
        match sender.try_send(job) {
            Ok(()) => {
                metrics::gauge!("editserve_queue_depth").increment(1.0);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(CoreError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(CoreError::ShuttingDown),
        }
    }
}

pub struct Incoming(Arc<AtomicUsize>);

impl Drop for Incoming {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    device: Device,
    config: BatchingConfig,
    /// Base weights by model name.
    models: HashMap<String, Box<dyn Classifier>>,
    /// Materialised versions by (model, version), least recently used first out.
    versions: LruCache<(String, u32), Box<dyn Classifier>>,
    residency: Residency,
    incoming: Arc<AtomicUsize>,
    executors: Executors,
}

struct PendingClassify {
    inputs: Vec<InputTensor>,
    reply: oneshot::Sender<Result<Probabilities, CoreError>>,
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        let _no_grad = tch::no_grad_guard();
        while let Ok(first) = jobs.recv() {
            metrics::gauge!("editserve_queue_depth").decrement(1.0);
            let mut batch: Vec<(Target, PendingClassify)> = Vec::new();
            let mut images = 0;
            let mut next = Some(first);
            let mut deadline = None;
            loop {
                match next.take() {
                    Some(Job::Load { package, reply }) => {
                        let _ = reply.send(self.load(package));
                    }
                    Some(Job::Unload { name, reply }) => {
                        // What was batched so far was accepted before the unload: answer it first.
                        self.run_batch(std::mem::take(&mut batch));
                        images = 0;
                        let _ = reply.send(self.models.remove(&name).is_some());
                        let versions: Vec<(String, u32)> =
                            self.versions.iter().map(|(key, _)| key.clone()).filter(|(model, _)| *model == name).collect();
                        for key in versions {
                            self.evict(&key);
                        }
                        tracing::info!(model = %name, "model unloaded");
                    }
                    Some(Job::Forget { model, version }) => self.evict(&(model, version)),
                    Some(Job::Classify { target, inputs, reply }) => {
                        images += inputs.len();
                        batch.push((target, PendingClassify { inputs, reply }));
                    }
                    None => {}
                }
                if batch.is_empty() || images >= self.config.max_batch_size {
                    break;
                }
                // While every executor is busy the queue fills, and the batch grows instead of waiting.
                if !self.executors.wait_until_free() {
                    break;
                }
                // Take what is queued; beyond that, wait only for requests already being decoded (a lone
                // request never waits), never past the deadline, and not while another executor is free:
                // those requests can run there instead of leaving it idle.
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.config.max_batch_wait);
                let received = match jobs.try_recv() {
                    Ok(job) => Ok(job),
                    Err(_)
                        if self.incoming.load(Ordering::SeqCst) == 0
                            || Instant::now() >= deadline
                            || self.executors.free > 1 =>
                    {
                        break
                    }
                    Err(_) => jobs.recv_timeout(INCOMING_POLL.min(deadline.saturating_duration_since(Instant::now()))),
                };
                match received {
                    Ok(job) => {
                        metrics::gauge!("editserve_queue_depth").decrement(1.0);
                        next = Some(job);
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            self.run_batch(batch);
        }
    }

    fn load(&mut self, package: ModelPackage) -> Result<EditSurface, CoreError> {
        if self.models.contains_key(&package.name) {
            return Err(CoreError::ModelExists(package.name));
        }
        let started = Instant::now();
        let model = guarded(|| load_package(&package, self.device))?.map_err(CoreError::from)?;
        // Warm-up: the first forward pass pays for kernel selection and allocator growth.
        let [h, w] = package.config.preprocessing.crop;
        let _ = guarded(|| model.forward(&Tensor::zeros([1, 3, i64::from(h), i64::from(w)], (Kind::Float, self.device))))?;
        let seconds = started.elapsed().as_secs_f64();
        metrics::gauge!("editserve_model_load_seconds", "model" => package.name.clone()).set(seconds);
        tracing::info!(model = %package.name, device = ?self.device, seconds, "model loaded and warmed up");
        let surface =
            EditSurface { editable_layers: model.editable_layers(), default_edit_layer: model.default_edit_layer().to_string() };
        self.models.insert(package.name, model);
        Ok(surface)
    }

    fn evict(&mut self, key: &(String, u32)) {
        self.versions.pop(key);
        self.record_residency(key, None);
    }

    /// Publishes what the LRU holds, for readers on other threads and for monitoring.
    fn record_residency(&self, key: &(String, u32), bytes: Option<u64>) {
        let mut residency = self.residency.lock().unwrap_or_else(|p| p.into_inner());
        match bytes {
            Some(bytes) => residency.insert(key.clone(), bytes),
            None => residency.remove(key),
        };
        metrics::gauge!("editserve_resident_versions").set(self.versions.len() as f64);
    }

    /// Makes `target` resident unless it is the base or already resident.
    fn ensure_resident(&mut self, target: &Target) -> Result<(), CoreError> {
        if target.version == 0 || self.versions.get(&target.key()).is_some() {
            return Ok(());
        }
        let base = self.models.get(&target.model).ok_or_else(|| CoreError::ModelUnloaded(target.model.clone()))?;
        let started = Instant::now();
        let (model, bytes) = guarded(|| materialise(base.as_ref(), &target.lineage))?
            .map_err(|e| CoreError::Internal(format!("cannot materialise version {}: {e}", target.version)))?;
        if let Some((evicted, _)) = self.versions.push(target.key(), model) {
            self.record_residency(&evicted, None);
        }
        self.record_residency(&target.key(), Some(bytes));
        metrics::counter!("editserve_version_materialisations_total").increment(1);
        tracing::info!(model = %target.model, version = target.version, bytes, seconds = started.elapsed().as_secs_f64(), "version materialised");
        Ok(())
    }

    fn resident(&self, target: &Target) -> Option<&dyn Classifier> {
        if target.version == 0 {
            self.models.get(&target.model).map(AsRef::as_ref)
        } else {
            self.versions.peek(&target.key()).map(AsRef::as_ref)
        }
    }

    /// Sends the collected requests to the executors, one forward pass per model version.
    fn run_batch(&mut self, batch: Vec<(Target, PendingClassify)>) {
        let mut by_version: Vec<(Target, Vec<PendingClassify>)> = Vec::new();
        for (target, pending) in batch {
            match by_version.iter_mut().find(|(t, _)| t.model == target.model && t.version == target.version) {
                Some((_, group)) => group.push(pending),
                None => by_version.push((target, vec![pending])),
            }
        }
        for (target, group) in by_version {
            let ready = self.ensure_resident(&target).and_then(|()| {
                self.resident(&target).map(|model| model.share()).ok_or_else(|| CoreError::ModelUnloaded(target.model.clone()))
            });
            match ready {
                Ok(model) => self.executors.run(Pass { model, group }),
                Err(e) => {
                    for pending in group {
                        let _ = pending.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// One forward pass: a storage-sharing handle of the version and the requests it answers.
struct Pass {
    model: Box<dyn Classifier>,
    group: Vec<PendingClassify>,
}

/// The executor threads and the count of those free, as the batching thread sees it.
struct Executors {
    /// None once dropping: the executors then finish their passes and stop.
    passes: Option<Sender<Pass>>,
    /// One message each time an executor finishes a pass (and once when it starts).
    freed: Receiver<()>,
    free: usize,
    threads: Vec<JoinHandle<()>>,
}

impl Executors {
    fn spawn(device: Device, config: &BatchingConfig) -> Result<Self, CoreError> {
        let streams = config.streams.get();
        let (passes, queued) = crossbeam_channel::bounded::<Pass>(streams);
        let (freed_sender, freed) = crossbeam_channel::bounded(streams);
        let mut threads = Vec::with_capacity(streams);
        for i in 0..streams {
            let (queued, freed_sender) = (queued.clone(), freed_sender.clone());
            let (intra_op, max_batch_size) = (config.threads_per_stream, config.max_batch_size);
            let thread = std::thread::Builder::new()
                .name(format!("editserve-{device:?}-pass-{i}").to_lowercase())
                .spawn(move || {
                    if let Some(intra_op) = intra_op {
                        tch::set_num_threads(i32::try_from(intra_op.get()).unwrap_or(i32::MAX));
                    }
                    let _no_grad = tch::no_grad_guard();
                    while freed_sender.send(()).is_ok() {
                        let Ok(pass) = queued.recv() else { break };
                        answer(pass, device, max_batch_size);
                    }
                })
                .map_err(|e| CoreError::Internal(format!("cannot start an executor thread: {e}")))?;
            threads.push(thread);
        }
        Ok(Self { passes: Some(passes), freed, free: 0, threads })
    }

    /// Blocks until an executor is free; false once they have all stopped.
    fn wait_until_free(&mut self) -> bool {
        while self.freed.try_recv().is_ok() {
            self.free += 1;
        }
        if self.free == 0 {
            match self.freed.recv() {
                Ok(()) => self.free += 1,
                Err(_) => return false,
            }
        }
        true
    }

    fn run(&mut self, pass: Pass) {
        if !self.wait_until_free() {
            return fail(pass.group, &CoreError::ShuttingDown);
        }
        self.free -= 1;
        let Some(passes) = &self.passes else {
            return fail(pass.group, &CoreError::ShuttingDown);
        };
        if let Err(unsent) = passes.send(pass) {
            fail(unsent.into_inner().group, &CoreError::ShuttingDown);
        }
    }
}

/// Waits for the executors to finish: a thread still running libtorch while the process exits races the
/// library's static destructors (glibc aborted with "corrupted double-linked list" at shutdown).
impl Drop for Executors {
    fn drop(&mut self) {
        self.passes.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn fail(group: Vec<PendingClassify>, error: &CoreError) {
    for pending in group {
        let _ = pending.reply.send(Err(error.clone()));
    }
}

/// Runs a pass on the executor's thread and answers each request with its own images' probabilities.
fn answer(pass: Pass, device: Device, max_batch_size: usize) {
    let Pass { model, group } = pass;
    let inputs: Vec<&InputTensor> = group.iter().flat_map(|p| p.inputs.iter()).collect();
    match guarded(|| forward(model.as_ref(), &inputs, device, max_batch_size)).and_then(|r| r) {
        Ok(probabilities) => {
            let mut probabilities = probabilities.into_iter();
            for pending in group {
                let mine: Probabilities = probabilities.by_ref().take(pending.inputs.len()).collect();
                let _ = pending.reply.send(Ok(mine));
            }
        }
        Err(e) => fail(group, &e),
    }
}

fn forward(model: &dyn Classifier, inputs: &[&InputTensor], device: Device, max_batch_size: usize) -> Result<Probabilities, CoreError> {
    let mut out = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(max_batch_size.max(1)) {
        let started = Instant::now();
        let (h, w) = (i64::from(chunk[0].height), i64::from(chunk[0].width));
        let mut flat = Vec::with_capacity(chunk.len() * chunk[0].data.len());
        for input in chunk {
            flat.extend_from_slice(&input.data);
        }
        let batch = Tensor::from_slice(&flat).view([chunk.len() as i64, 3, h, w]).to_device(device);
        let probs = model.forward(&batch).softmax(-1, Kind::Float).to_device(Device::Cpu);
        let classes = probs.size()[1] as usize;
        let values: Vec<f32> = probs
            .flatten(0, -1)
            .try_into()
            .map_err(|e: tch::TchError| CoreError::Internal(format!("cannot read the probabilities: {e}")))?;
        out.extend(values.chunks(classes).map(<[f32]>::to_vec));
        metrics::histogram!("editserve_inference_batch_size").record(chunk.len() as f64);
        metrics::histogram!("editserve_inference_seconds").record(started.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// libtorch reports errors by panicking through tch; one failed pass must not take the worker down.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, CoreError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown failure".into());
        CoreError::Internal(format!("tensor computation failed: {message}"))
    })
}
