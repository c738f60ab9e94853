//! The worker thread of one device. It owns every model (and so every tensor) on that device, takes jobs
//! from a bounded channel, and batches classification requests dynamically: it waits at most
//! `max_batch_wait` after the first request for others, up to `max_batch_size` images per model.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;

use super::CoreError;
use crate::imaging::InputTensor;
use crate::models::{load_package, Classifier, ModelPackage};

#[derive(Debug, Clone, Copy)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    pub max_batch_wait: Duration,
    pub queue_capacity: usize,
}

/// How often a worker holding a partial batch checks for requests that are still being decoded.
const INCOMING_POLL: Duration = Duration::from_micros(500);

/// Softmax probabilities for each image of a request, in request order.
pub type Probabilities = Vec<Vec<f32>>;

enum Job {
    Load { package: ModelPackage, reply: oneshot::Sender<Result<(), CoreError>> },
    Unload { name: String, reply: oneshot::Sender<bool> },
    Classify { model: String, inputs: Vec<InputTensor>, reply: oneshot::Sender<Result<Probabilities, CoreError>> },
}

/// Handle to a device's worker thread. Dropping the last handle lets the worker finish its queue and exit.
pub struct DeviceWorker {
    device: Device,
    incoming: Arc<AtomicUsize>,
    sender: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceWorker {
    pub fn spawn(device: Device, config: BatchingConfig) -> Result<Self, CoreError> {
        let (sender, receiver) = crossbeam_channel::bounded(config.queue_capacity);
        let incoming = Arc::new(AtomicUsize::new(0));
        let worker = Worker { device, config, models: HashMap::new(), incoming: Arc::clone(&incoming) };
        let thread = std::thread::Builder::new()
            .name(format!("editserve-{device:?}").to_lowercase())
            .spawn(move || worker.run(receiver))
            .map_err(|e| CoreError::Internal(format!("cannot start the device worker: {e}")))?;
        Ok(Self { device, incoming, sender: Some(sender), thread: Some(thread) })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub async fn load(&self, package: ModelPackage) -> Result<(), CoreError> {
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

    pub async fn classify(&self, model: String, inputs: Vec<InputTensor>, incoming: Incoming) -> Result<Probabilities, CoreError> {
        let (reply, answer) = oneshot::channel();
        let submitted = self.submit(Job::Classify { model, inputs, reply });
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
    models: HashMap<String, Box<dyn Classifier>>,
    incoming: Arc<AtomicUsize>,
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
            let mut batch: Vec<(String, PendingClassify)> = Vec::new();
            let mut images = 0;
            let mut next = Some(first);
            let deadline = Instant::now() + self.config.max_batch_wait;
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
                        tracing::info!(model = %name, "model unloaded");
                    }
                    Some(Job::Classify { model, inputs, reply }) => {
                        images += inputs.len();
                        batch.push((model, PendingClassify { inputs, reply }));
                    }
                    None => {}
                }
                if batch.is_empty() || images >= self.config.max_batch_size {
                    break;
                }
                // Take what is queued; beyond that, wait only for requests already being decoded (a lone
                // request never waits), and never past the deadline.
                let received = match jobs.try_recv() {
                    Ok(job) => Ok(job),
                    Err(_) if self.incoming.load(Ordering::SeqCst) == 0 || Instant::now() >= deadline => break,
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

    fn load(&mut self, package: ModelPackage) -> Result<(), CoreError> {
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
        self.models.insert(package.name, model);
        Ok(())
    }

    /// Runs the collected requests, one forward pass per model (split at `max_batch_size` images).
    fn run_batch(&self, batch: Vec<(String, PendingClassify)>) {
        let mut by_model: Vec<(String, Vec<PendingClassify>)> = Vec::new();
        for (model, pending) in batch {
            match by_model.iter_mut().find(|(m, _)| *m == model) {
                Some((_, group)) => group.push(pending),
                None => by_model.push((model, vec![pending])),
            }
        }
        for (name, group) in by_model {
            let Some(model) = self.models.get(&name) else {
                for pending in group {
                    let _ = pending.reply.send(Err(CoreError::ModelUnloaded(name.clone())));
                }
                continue;
            };
            let inputs: Vec<&InputTensor> = group.iter().flat_map(|p| p.inputs.iter()).collect();
            let mut probabilities = match guarded(|| self.forward(model.as_ref(), &inputs)).and_then(|r| r) {
                Ok(p) => p.into_iter(),
                Err(e) => {
                    for pending in group {
                        let _ = pending.reply.send(Err(e.clone()));
                    }
                    continue;
                }
            };
            for pending in group {
                let mine: Probabilities = probabilities.by_ref().take(pending.inputs.len()).collect();
                let _ = pending.reply.send(Ok(mine));
            }
        }
    }

    fn forward(&self, model: &dyn Classifier, inputs: &[&InputTensor]) -> Result<Probabilities, CoreError> {
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.config.max_batch_size.max(1)) {
            let started = Instant::now();
            let (h, w) = (i64::from(chunk[0].height), i64::from(chunk[0].width));
            let mut flat = Vec::with_capacity(chunk.len() * chunk[0].data.len());
            for input in chunk {
                flat.extend_from_slice(&input.data);
            }
            let batch = Tensor::from_slice(&flat).view([chunk.len() as i64, 3, h, w]).to_device(self.device);
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
