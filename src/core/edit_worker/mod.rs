//! The edit worker of one device: a thread apart from the inference worker, so that classification keeps
//! serving while an edit optimises. It runs at the lowest scheduling priority, as the decoders do, so that
//! on a CPU device it takes the cores inference leaves. It keeps its own copy of each model's base weights,
//! materialises the parent version from its lineage, and runs one edit, statistics computation or evaluation
//! at a time.

mod natural;

pub use natural::*;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};
use tokio::sync::oneshot;

use super::cpu_pool::lower_priority;
use super::directories::files;
use super::evaluations::{evaluate, top1, EvaluationWork, EVALUATION_BATCH};
use super::registry::LoadedPackage;
use super::scheduler::{EditActivity, Lineage};
use super::CoreError;
use crate::edit::delta::{materialise, Delta};
use crate::edit::statistics::{cache_path, files_sha256, SecondMoment, STATISTICS_BATCH};
use crate::edit::{edit, input_tensor, Budget, EditError, EditParams, Exemplars, Progress};
use crate::imaging::{binary_mask, decode, DecodeLimits, Preprocessing};
use crate::models::{load_package, Classifier};
use crate::store::EvaluationOutcome;

/// One exemplar as stored: the image, its concept mask and the modified copy, each a PNG.
pub struct ExemplarPngs {
    pub image: Bytes,
    pub mask: Bytes,
    pub modified: Bytes,
}

pub enum Work {
    /// An edit of the version whose changes are `lineage`; `moment` is a stored second moment (the default
    /// statistics of the parent when None).
    Edit {
        lineage: Lineage,
        exemplars: Vec<ExemplarPngs>,
        params: EditParams,
        moment: Option<Bytes>,
        guard: Option<GuardPlan>,
    },
    /// The second moment of the keys at `layer` of the base weights over `images`.
    Statistics { layer: String, images: Vec<Bytes> },
    /// Versions scored against a baseline on a dataset.
    Evaluate(EvaluationWork),
}

/// The breakage budget of an edit job.
pub struct GuardPlan {
    pub max_changed: f64,
    /// The check images (encoded); the natural check photos when None.
    pub photos: Option<Vec<Bytes>>,
}

pub enum Outcome {
    Edit { delta: Vec<u8>, metrics: serde_json::Value },
    Statistics { moment: Vec<u8>, images: u64, positions: u64 },
    Evaluation(EvaluationOutcome),
}

/// Progress that the edit thread reports and the job's watchers read.
pub type SharedProgress = Arc<dyn Progress + Send + Sync>;

struct Task {
    package: LoadedPackage,
    work: Work,
    progress: SharedProgress,
    reply: oneshot::Sender<Result<Outcome, EditError>>,
}

enum Message {
    Run(Box<Task>),
    /// Drops the copy of an unloaded model's weights.
    Forget(String),
}

pub struct EditWorker {
    sender: Mutex<Option<Sender<Message>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EditWorker {
    /// `intra_op_threads`: libtorch threads for this thread's operations (see `ServeConfig::edit_threads`).
    /// `activity` counts the jobs running (see [`EditActivity`]).
    pub fn spawn(
        device: Device,
        limits: DecodeLimits,
        intra_op_threads: NonZeroUsize,
        natural: NaturalPhotos,
        activity: EditActivity,
    ) -> Result<Self, CoreError> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        let intra_op_threads = intra_op_threads.get().min(i32::MAX as usize);
        let thread = std::thread::Builder::new()
            .name(format!("editserve-edit-{device:?}").to_lowercase())
            .spawn(move || {
                Thread {
                    device,
                    limits,
                    intra_op_threads,
                    natural,
                    activity,
                    bases: HashMap::new(),
                    check_photos: HashMap::new(),
                    base_check_answers: HashMap::new(),
                    moments: HashMap::new(),
                }
                .run(receiver)
            })
            .map_err(|e| CoreError::Internal(format!("cannot start the edit worker: {e}")))?;
        Ok(Self { sender: Mutex::new(Some(sender)), thread: Mutex::new(Some(thread)) })
    }

    fn sender(&self) -> Option<Sender<Message>> {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Lets the thread finish its task and waits for it to exit: libtorch must not be computing on it while
    /// the process tears libtorch down.
    pub fn stop(&self) {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }

    pub async fn run(
        &self,
        package: LoadedPackage,
        work: Work,
        progress: SharedProgress,
    ) -> Result<Outcome, CoreError> {
        let (reply, answer) = oneshot::channel();
        let sender = self.sender().ok_or(CoreError::ShuttingDown)?;
        sender
            .send(Message::Run(Box::new(Task { package, work, progress, reply })))
            .map_err(|_| CoreError::ShuttingDown)?;
        match answer.await {
            Ok(result) => result.map_err(CoreError::from),
            Err(_) => Err(CoreError::Internal("the edit worker stopped during the job".into())),
        }
    }

    pub fn forget(&self, model: &str) {
        if let Some(sender) = self.sender() {
            let _ = sender.send(Message::Forget(model.to_string()));
        }
    }
}

struct Thread {
    device: Device,
    limits: DecodeLimits,
    intra_op_threads: usize,
    natural: NaturalPhotos,
    activity: EditActivity,
    /// Base weights by model name, with the load generation they are of.
    bases: HashMap<String, (u64, Box<dyn Classifier>)>,
    /// The natural check photos preprocessed for each model, with the load generation they are for.
    check_photos: HashMap<String, (u64, Tensor)>,
    /// The base's top-1 on those photos, with the load generation it is of: what an edit of an edited
    /// version compares its own answers with (`photos_changed_from_base`).
    base_check_answers: HashMap<String, (u64, Vec<u32>)>,
    /// Default statistics by model, load generation and key of layer and lineage: finding them on disk
    /// hashes the weights and the photos, which an edit need not do again.
    moments: HashMap<(String, u64, String), SecondMoment>,
}

impl Thread {
    fn run(mut self, messages: Receiver<Message>) {
        lower_priority();
        tch::set_num_threads(self.intra_op_threads as i32);
        while let Ok(message) = messages.recv() {
            let Task { package, work, progress, reply } = match message {
                Message::Run(task) => *task,
                Message::Forget(model) => {
                    self.bases.remove(&model);
                    self.check_photos.remove(&model);
                    self.base_check_answers.remove(&model);
                    self.moments.retain(|(name, _, _), _| *name != model);
                    continue;
                }
            };
            // libtorch reports errors by panicking through tch; one failed job must not stop the worker.
            self.activity.fetch_add(1, Ordering::SeqCst);
            let result = catch_unwind(AssertUnwindSafe(|| self.execute(&package, work, progress.as_ref())))
                .unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                    Err(EditError::Io(format!("tensor computation failed: {}", message.unwrap_or_default())))
                });
            self.activity.fetch_sub(1, Ordering::SeqCst);
            let _ = reply.send(result);
        }
    }

    fn base(&mut self, package: &LoadedPackage) -> Result<&dyn Classifier, EditError> {
        let name = &package.package.name;
        let stale = self.bases.get(name).is_none_or(|(generation, _)| *generation != package.generation);
        if stale {
            let model = load_package(&package.package, self.device)?;
            self.bases.insert(name.clone(), (package.generation, model));
        }
        let (_, model) = &self.bases[name];
        Ok(model.as_ref())
    }

    fn execute(&mut self, package: &LoadedPackage, work: Work, progress: &dyn Progress) -> Result<Outcome, EditError> {
        let (device, limits) = (self.device, self.limits);
        let preprocessing = package.package.config.preprocessing.clone();
        match work {
            Work::Edit { lineage, exemplars, params, moment, guard } => {
                let mut triples = Vec::with_capacity(exemplars.len());
                for exemplar in &exemplars {
                    let read = |bytes: &Bytes| {
                        decode(bytes, limits).map_err(|e| EditError::Io(format!("stored exemplar: {e}")))
                    };
                    triples.push((
                        read(&exemplar.image)?,
                        read(&exemplar.modified)?,
                        binary_mask(&read(&exemplar.mask)?),
                    ));
                }
                let exemplars = Exemplars::from_images(&preprocessing, &triples, device)?;
                let (parent, _) = materialise(self.base(package)?, &lineage)?;
                // Stored statistics are of the first layer; every other layer gets the default ones.
                let mut moments = Vec::new();
                let mut sources = Vec::new();
                for (i, layer) in params.layers().enumerate() {
                    match (i, &moment) {
                        (0, Some(bytes)) => {
                            moments.push(SecondMoment::from_safetensors(bytes)?);
                            sources.push("stored".to_string());
                        }
                        _ => {
                            let default = self.default_statistics(package, parent.as_ref(), &lineage, layer)?;
                            sources.push(format!("default: {} natural photos", default.images));
                            moments.push(default.moment);
                        }
                    }
                }
                sources.dedup();
                let source = sources.join(", then ");
                let photos = match &guard {
                    Some(GuardPlan { photos: Some(images), .. }) => {
                        Some(input_batch(images, 0, &preprocessing, limits)?.to_device(device))
                    }
                    Some(GuardPlan { photos: None, .. }) => Some(self.check_photos(package)?),
                    None => None,
                };
                let budget = guard
                    .as_ref()
                    .zip(photos.as_ref())
                    .map(|(plan, photos)| Budget { photos, max_changed: plan.max_changed });
                let moments: Vec<&SecondMoment> = moments.iter().collect();
                let mut result = edit(parent.as_ref(), &exemplars, &params, &moments, budget.as_ref(), progress)?;
                if let (false, Some(budget), Some(report)) = (lineage.is_empty(), &budget, &mut result.metrics.guard) {
                    let mut edited = parent.share();
                    result.delta.apply(edited.as_mut())?;
                    let base = match &guard {
                        Some(GuardPlan { photos: None, .. }) => self.base_check_answers(package)?,
                        _ => answers(self.base(package)?, budget.photos)?,
                    };
                    let now = answers(edited.as_ref(), budget.photos)?;
                    report.photos_changed_from_base = Some(base.iter().zip(&now).filter(|(a, b)| a != b).count());
                }
                let mut metrics = serde_json::to_value(&result.metrics).map_err(|e| EditError::Io(e.to_string()))?;
                metrics["statistics_source"] = source.into();
                Ok(Outcome::Edit { delta: result.delta.to_safetensors()?, metrics })
            }
            Work::Statistics { layer, images } => {
                let total = images.len();
                // Batches are decoded as the accumulation asks for them, so memory stays at one batch.
                let mut failure = None;
                let batches = images.chunks(STATISTICS_BATCH).enumerate().map_while(|(i, chunk)| {
                    if progress.cancelled() {
                        failure = Some(EditError::Cancelled);
                        return None;
                    }
                    match input_batch(chunk, i * STATISTICS_BATCH, &preprocessing, limits) {
                        Ok(batch) => {
                            progress.report(i * STATISTICS_BATCH + chunk.len(), total, f64::NAN);
                            Some(batch.to_device(device))
                        }
                        Err(e) => {
                            failure = Some(e);
                            None
                        }
                    }
                });
                let moment = SecondMoment::accumulate(self.base(package)?, &layer, batches);
                if let Some(failure) = failure {
                    return Err(failure);
                }
                let moment = moment?;
                let positions = moment.count as u64;
                Ok(Outcome::Statistics { moment: moment.to_safetensors()?, images: total as u64, positions })
            }
            Work::Evaluate(work) => {
                Ok(Outcome::Evaluation(evaluate(self.base(package)?, &preprocessing, device, limits, &work, progress)?))
            }
        }
    }
}

/// The model's top-1 class of each of `photos`, a batch at a time.
fn answers(model: &dyn Classifier, photos: &Tensor) -> Result<Vec<u32>, EditError> {
    let _no_grad = tch::no_grad_guard();
    let mut classes = Vec::new();
    for batch in photos.split(EVALUATION_BATCH as i64, 0) {
        classes.extend(top1(model, &batch)?);
    }
    Ok(classes)
}
