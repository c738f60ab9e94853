//! Offline commands for work and debugging without a server: `edit` writes a delta, `classify` applies
//! one (or none) and prints predictions, `import` makes a model package of a torchvision checkpoint.

mod classify;
mod edit;
mod import;

pub use classify::*;
pub use edit::*;
pub use import::*;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
use tch::{Device, Tensor};

use crate::edit::statistics::{cache_path, files_sha256, SecondMoment, STATISTICS_BATCH};
use crate::edit::{edit, input_tensor, Budget, Delta, EditParams, Exemplars, Method, Progress, Solver};
use crate::imaging::{binary_mask, decode, DecodeLimits, Preprocessing};
use crate::models::{load_package, Classifier, ModelConfig, ModelPackage};

const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 100_000_000 };

fn parse_serde<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| e.to_string())
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_serde(s)
    }
}

impl FromStr for Solver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_serde(s)
    }
}

fn read_image(path: &Path) -> anyhow::Result<image::DynamicImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&bytes, LIMITS).with_context(|| format!("decoding {}", path.display()))
}

fn load(model: &Path) -> anyhow::Result<(ModelPackage, Box<dyn Classifier>)> {
    let package = ModelPackage::open(model)?;
    let loaded = load_package(&package, Device::Cpu)?;
    Ok((package, loaded))
}

struct PrintProgress;

impl Progress for PrintProgress {
    fn report(&self, step: usize, total: usize, loss: f64) {
        eprintln!("step {step}/{total} loss {loss:.6}");
    }
}

fn image_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(crate::core::directories::files(dir, usize::MAX)?)
}
