//! The batching thread of a device: it owns the models, takes jobs in order, forms batches once an executor
//! is free and materialises versions (see the parent module).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use lru::LruCache;
use tch::{Device, Kind, Tensor};

use super::executors::{Executors, Pass};
use super::{guarded, BatchingConfig, CoreError, EditSurface, Job, PendingClassify, Residency, Target, INCOMING_POLL};
use crate::edit::delta::materialise;
use crate::models::{load_package, Classifier, ModelPackage};

pub(super) struct Worker {
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

impl Worker {
    pub(super) fn new(
        device: Device,
        config: BatchingConfig,
        resident_versions: NonZeroUsize,
        residency: Residency,
        incoming: Arc<AtomicUsize>,
        executors: Executors,
    ) -> Self {
        Self {
            device,
            config,
            models: HashMap::new(),
            versions: LruCache::new(resident_versions),
            residency,
            incoming,
            executors,
        }
    }

    pub(super) fn run(mut self, jobs: Receiver<Job>) {
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
                        let versions: Vec<(String, u32)> = self
                            .versions
                            .iter()
                            .map(|(key, _)| key.clone())
                            .filter(|(model, _)| *model == name)
                            .collect();
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
                            || self.executors.available() > 1 =>
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
        let _ =
            guarded(|| model.forward(&Tensor::zeros([1, 3, i64::from(h), i64::from(w)], (Kind::Float, self.device))))?;
        let seconds = started.elapsed().as_secs_f64();
        metrics::gauge!("editserve_model_load_seconds", "model" => package.name.clone()).set(seconds);
        tracing::info!(model = %package.name, device = ?self.device, seconds, "model loaded and warmed up");
        let surface = EditSurface::of(model.as_ref());
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
                self.resident(&target)
                    .map(|model| model.share())
                    .ok_or_else(|| CoreError::ModelUnloaded(target.model.clone()))
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
