//! Model packages: `config.json` (architecture, input size, preprocessing, labels) beside
//! `model.safetensors` (the checkpoint under its original state-dict names).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Device;

use super::efficientnet_lite::{variant_coefficients, EfficientNetLite};
use super::layers::Weights;
use super::resnet::{self, ResNet};
use super::squeezenet::{self, SqueezeNet};
use super::vgg::{self, Vgg};
use super::{Classifier, ModelError};
use crate::imaging::Preprocessing;

const CONFIG_FILE: &str = "config.json";
const WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// e.g. `efficientnet-lite0`, `resnet50`, `vgg16_bn`, `squeezenet1_1`.
    pub architecture: String,
    pub num_classes: i64,
    /// Height and width of the network input.
    pub input_size: [u32; 2],
    pub preprocessing: Preprocessing,
    pub labels: Vec<String>,
}

/// A validated package on disk; its weights are read by [`load_package`] on the device's worker.
#[derive(Debug, Clone)]
pub struct ModelPackage {
    pub name: String,
    pub dir: PathBuf,
    pub config: ModelConfig,
}

impl ModelPackage {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| ModelError::Io { path: config_path.display().to_string(), reason: e.to_string() })?;
        let config: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { path: config_path.display().to_string(), reason: e.to_string() })?;
        let invalid = |reason: String| ModelError::Config { path: config_path.display().to_string(), reason };
        if config.labels.len() as i64 != config.num_classes {
            return Err(invalid(format!("{} labels for {} classes", config.labels.len(), config.num_classes)));
        }
        config.preprocessing.validate().map_err(invalid)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| invalid("the package directory has no name".into()))?;
        Ok(Self { name, dir: dir.to_path_buf(), config })
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }
}

/// Reads the package's weights onto `device` and builds its architecture; fails naming the first
/// missing, mis-shaped or unexpected key.
pub fn load_package(package: &ModelPackage, device: Device) -> Result<Box<dyn Classifier>, ModelError> {
    let mut weights = Weights::read_safetensors(&package.weights_path(), device)?;
    let model = build(&package.config.architecture, &mut weights)?;
    weights.finish()?;
    if model.num_classes() != package.config.num_classes {
        return Err(ModelError::Config {
            path: package.dir.join(CONFIG_FILE).display().to_string(),
            reason: format!("config says {} classes, weights have {}", package.config.num_classes, model.num_classes()),
        });
    }
    Ok(model)
}

fn build(architecture: &str, weights: &mut Weights) -> Result<Box<dyn Classifier>, ModelError> {
    let unknown = || ModelError::UnknownArchitecture(architecture.to_string());
    if let Some(variant) = architecture.strip_prefix("efficientnet-lite") {
        let variant: u32 = variant.parse().map_err(|_| unknown())?;
        let (width, depth, _) = variant_coefficients(variant).ok_or_else(unknown)?;
        return Ok(Box::new(EfficientNetLite::load(weights, width, depth)?));
    }
    if let Some(layout) = resnet::layout(architecture) {
        return Ok(Box::new(ResNet::load(weights, layout)?));
    }
    if let Some(batch_norm) = vgg::with_batch_norm(architecture) {
        return Ok(Box::new(Vgg::load(weights, batch_norm)?));
    }
    if architecture == squeezenet::ARCHITECTURE {
        return Ok(Box::new(SqueezeNet::load(weights)?));
    }
    Err(unknown())
}
