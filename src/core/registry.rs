//! The models this server holds: their packages (labels, preprocessing) and the device worker that owns
//! their tensors. Classification decodes and preprocesses off the async runtime, then queues on the worker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde::Serialize;
use tch::Device;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::cpu_pool::CpuPool;
use super::scheduler::{DeviceWorker, EditSurface, Probabilities, Target};
use super::CoreError;
use crate::imaging::{decode, DecodeLimits, InputTensor, Preprocessing};
use crate::models::ModelPackage;
use utoipa::ToSchema;

/// A loaded model: what it is, where it runs, and what an edit can change.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub num_classes: i64,
    /// Height and width.
    pub input_size: [u32; 2],
    pub device: Device,
    pub surface: EditSurface,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct Prediction {
    pub index: usize,
    pub label: String,
    pub probability: f32,
}

struct ModelEntry {
    info: ModelInfo,
    package: ModelPackage,
    /// Tells two loads under one name apart, so that a copy kept for editing is never of older weights.
    generation: u64,
    labels: Vec<String>,
    preprocessing: Preprocessing,
}

/// What a classification runs on: encoded images (decoded and preprocessed as the model's package says),
/// or tensors a client preprocessed itself (3 x H x W at the model's input size).
pub enum ModelInput {
    Encoded(Vec<Bytes>),
    Preprocessed(Vec<InputTensor>),
}

impl ModelInput {
    fn len(&self) -> usize {
        match self {
            ModelInput::Encoded(images) => images.len(),
            ModelInput::Preprocessed(tensors) => tensors.len(),
        }
    }
}

/// A loaded model's package as an edit needs it.
#[derive(Debug, Clone)]
pub struct LoadedPackage {
    pub package: ModelPackage,
    pub generation: u64,
    pub surface: EditSurface,
}

pub struct Registry {
    worker: DeviceWorker,
    cpu_pool: Arc<CpuPool>,
    models: RwLock<HashMap<String, Arc<ModelEntry>>>,
    generations: std::sync::atomic::AtomicU64,
    /// Whether the models given at start-up are loaded.
    ready: tokio::sync::watch::Sender<bool>,
    limits: DecodeLimits,
    /// One permit per image held decoded (inputs on their way through the worker), so that memory is
    /// bounded however many requests arrive: a request waits for room before decoding.
    room: Arc<Semaphore>,
    room_size: usize,
}

/// Every subdirectory of `dir` that holds a `config.json`, sorted by name.
pub fn discover_packages(dir: &Path) -> Result<Vec<PathBuf>, CoreError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| CoreError::InvalidArgument(format!("cannot read models directory {}: {e}", dir.display())))?;
    let mut found: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("config.json").is_file()).collect();
    found.sort();
    Ok(found)
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

impl Registry {
    /// The limits every decoded image is held to.
    pub fn decode_limits(&self) -> DecodeLimits {
        self.limits
    }

    /// `images_in_flight`: the most images held decoded at once over every classification.
    pub fn new(worker: DeviceWorker, cpu_pool: Arc<CpuPool>, limits: DecodeLimits, images_in_flight: usize) -> Self {
        Self {
            worker,
            cpu_pool,
            room: Arc::new(Semaphore::new(images_in_flight)),
            room_size: images_in_flight,
            models: RwLock::new(HashMap::new()),
            generations: std::sync::atomic::AtomicU64::new(0),
            ready: tokio::sync::watch::Sender::new(false),
            limits,
        }
    }

    /// Marks the registry ready once start-up has loaded every package.
    pub fn mark_ready(&self) {
        self.ready.send_replace(true);
    }

    /// Whether a model may be loaded under `name`: a valid name no loaded model has.
    pub fn check_new_name(&self, name: &str) -> Result<(), CoreError> {
        // A letter or digit first: names appear in paths and URLs, where "." and ".." mean something else.
        let valid = name.len() <= 64
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(CoreError::InvalidArgument(format!(
                "model names are a letter or digit, then up to 63 letters, digits, '-', '_' or '.', got '{name}'"
            )));
        }
        if self.read_models().contains_key(name) {
            return Err(CoreError::ModelExists(name.to_string()));
        }
        Ok(())
    }

    /// Loads and warms up `package` under its `name` (a model can be loaded twice under two names).
    pub async fn load(&self, package: ModelPackage) -> Result<ModelInfo, CoreError> {
        self.load_package(package).await.map_err(|e| match e {
            CoreError::Model(error) => CoreError::InvalidPackage(error.to_string()),
            other => other,
        })
    }

    async fn load_package(&self, package: ModelPackage) -> Result<ModelInfo, CoreError> {
        let config = package.config.clone();
        let name = package.name.clone();
        let surface = self.worker.load(package.clone()).await?;
        let info = ModelInfo {
            name: name.clone(),
            architecture: config.architecture,
            num_classes: config.num_classes,
            input_size: config.input_size,
            device: self.worker.device(),
            surface,
        };
        let entry = ModelEntry {
            info: info.clone(),
            package,
            generation: self.generations.fetch_add(1, Ordering::SeqCst),
            labels: config.labels,
            preprocessing: config.preprocessing,
        };
        self.write_models().insert(name, Arc::new(entry));
        Ok(info)
    }

    /// Unloads a model: new requests answer 404 at once; requests already queued are answered first;
    /// requests still being decoded answer 503. The model's tensors are freed.
    pub async fn unload(&self, name: &str) -> Result<(), CoreError> {
        self.write_models().remove(name).ok_or_else(|| CoreError::UnknownModel(name.to_string()))?;
        self.worker.unload(name.to_string()).await?;
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Returns once the models given at start-up are loaded.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        let mut infos: Vec<ModelInfo> = self.read_models().values().map(|e| e.info.clone()).collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    pub fn model(&self, name: &str) -> Result<ModelInfo, CoreError> {
        Ok(self.entry(name)?.info.clone())
    }

    /// Fails with `UnknownModel` unless `name` is loaded (without copying its description).
    pub fn ensure_loaded(&self, name: &str) -> Result<(), CoreError> {
        self.entry(name).map(|_| ())
    }

    /// The package of a loaded model, for edits.
    pub fn package(&self, name: &str) -> Result<LoadedPackage, CoreError> {
        let entry = self.entry(name)?;
        Ok(LoadedPackage {
            package: entry.package.clone(),
            generation: entry.generation,
            surface: entry.info.surface.clone(),
        })
    }

    pub fn worker(&self) -> &DeviceWorker {
        &self.worker
    }

    /// Top-k predictions of `target` for each image, in order. `top_k` must lie in 1..=num_classes.
    pub async fn classify(
        &self,
        target: Target,
        images: Vec<Bytes>,
        top_k: usize,
    ) -> Result<Vec<Vec<Prediction>>, CoreError> {
        Ok(self.classify_each(&[target], images, top_k).await?.pop().unwrap_or_default())
    }

    /// Top-k predictions of every target for each image: `result[target][image]`. The images are decoded
    /// and preprocessed once.
    pub async fn classify_each(
        &self,
        targets: &[Target],
        images: Vec<Bytes>,
        top_k: usize,
    ) -> Result<Vec<Vec<Vec<Prediction>>>, CoreError> {
        let model = targets.first().map(|t| t.model.clone()).unwrap_or_default();
        let entry = self.entry(&model)?;
        check_top_k(top_k, entry.info.num_classes)?;
        // Each target gets its own copy of the inputs.
        let _room = self.room(images.len() * targets.len()).await?;
        let incoming: Vec<_> = targets.iter().map(|_| self.worker.announce()).collect();
        let inputs = self.inputs(Arc::clone(&entry), ModelInput::Encoded(images)).await?;
        // One copy of the inputs per target beyond the first; a single classification copies nothing.
        let copies = std::iter::repeat_n(inputs, targets.len());
        let runs = targets
            .iter()
            .zip(incoming)
            .zip(copies)
            .map(|((target, incoming), inputs)| self.worker.classify(target.clone(), inputs, incoming));
        let mut results = Vec::with_capacity(targets.len());
        for probabilities in futures_util::future::join_all(runs).await {
            results.push(probabilities?.iter().map(|p| top_predictions(p, top_k, &entry.labels)).collect());
        }
        Ok(results)
    }

    /// Every class's probability for each input under `target`, in order.
    pub async fn probabilities(&self, target: Target, input: ModelInput) -> Result<Probabilities, CoreError> {
        let entry = self.entry(&target.model)?;
        let _room = self.room(input.len()).await?;
        let incoming = self.worker.announce();
        let inputs = self.inputs(entry, input).await?;
        self.worker.classify(target, inputs, incoming).await
    }

    /// Waits until `images` more can be held decoded.
    async fn room(&self, images: usize) -> Result<OwnedSemaphorePermit, CoreError> {
        let permits = u32::try_from(images).ok().filter(|&n| n as usize <= self.room_size);
        let permits = permits.ok_or_else(|| {
            CoreError::InvalidArgument(format!(
                "{images} images at once is more than the server holds decoded (--max-images-in-flight)"
            ))
        })?;
        Arc::clone(&self.room).acquire_many_owned(permits).await.map_err(|_| CoreError::ShuttingDown)
    }

    /// The `top_k` most probable classes of each input's probabilities (as `probabilities` gives them).
    pub fn rank(
        &self,
        model: &str,
        probabilities: &Probabilities,
        top_k: usize,
    ) -> Result<Vec<Vec<Prediction>>, CoreError> {
        let entry = self.entry(model)?;
        check_top_k(top_k, entry.info.num_classes)?;
        Ok(probabilities.iter().map(|p| top_predictions(p, top_k, &entry.labels)).collect())
    }

    /// The network's inputs: encoded images decoded and preprocessed off the runtime, or tensors already
    /// preprocessed, checked against the model's input size.
    async fn inputs(&self, entry: Arc<ModelEntry>, input: ModelInput) -> Result<Vec<InputTensor>, CoreError> {
        if input.len() == 0 {
            return Err(CoreError::InvalidArgument("no image given".into()));
        }
        let images = match input {
            ModelInput::Encoded(images) => images,
            ModelInput::Preprocessed(tensors) => {
                let [height, width] = entry.info.input_size;
                let expected = 3 * height as usize * width as usize;
                if let Some(i) =
                    tensors.iter().position(|t| [t.height, t.width] != [height, width] || t.data.len() != expected)
                {
                    return Err(CoreError::InvalidArgument(format!(
                        "input {i} is not a 3 x {height} x {width} tensor, the size model '{}' takes",
                        entry.info.name
                    )));
                }
                return Ok(tensors);
            }
        };
        let limits = self.limits;
        self.cpu_pool
            .run(move || {
                images
                    .iter()
                    .enumerate()
                    .map(|(i, bytes)| {
                        let image = decode(bytes, limits).map_err(|e| CoreError::image(i, &e))?;
                        Ok(entry.preprocessing.apply(&image))
                    })
                    .collect()
            })
            .await?
    }

    fn entry(&self, name: &str) -> Result<Arc<ModelEntry>, CoreError> {
        self.read_models().get(name).cloned().ok_or_else(|| CoreError::UnknownModel(name.to_string()))
    }

    fn read_models(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<ModelEntry>>> {
        self.models.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_models(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<ModelEntry>>> {
        self.models.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn check_top_k(top_k: usize, num_classes: i64) -> Result<(), CoreError> {
    let classes = num_classes as usize;
    if top_k == 0 || top_k > classes {
        return Err(CoreError::InvalidArgument(format!("top_k must be between 1 and {classes}, got {top_k}")));
    }
    Ok(())
}

fn top_predictions(probabilities: &[f32], k: usize, labels: &[String]) -> Vec<Prediction> {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    // Descending probability; ties keep the lower class index first, so results are deterministic.
    order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|index| Prediction {
            index,
            label: labels.get(index).cloned().unwrap_or_default(),
            probability: probabilities[index],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::top_predictions;

    #[test]
    fn top_predictions_are_sorted_and_labelled() {
        let labels: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let top = top_predictions(&[0.1, 0.4, 0.1, 0.4], 3, &labels);
        let indices: Vec<usize> = top.iter().map(|p| p.index).collect();
        assert_eq!(indices, vec![1, 3, 0]);
        assert_eq!(top[0].label, "b");
    }
}
