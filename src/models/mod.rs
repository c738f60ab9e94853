//! Model architectures on tch, one per file, behind the [`Classifier`] trait, and model packages
//! (a directory with `config.json` and `model.safetensors`).

mod efficientnet_lite;
pub mod layers;
mod package;

use tch::Tensor;
use thiserror::Error;

pub use package::{load_package, ModelConfig, ModelPackage};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("invalid model config {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("cannot read weights {path}: {reason}")]
    Weights { path: String, reason: String },
    #[error("weights lack the key '{0}'")]
    MissingKey(String),
    #[error("weights have unexpected keys: {0}")]
    UnexpectedKeys(String),
    #[error("key '{key}' has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch { key: String, expected: Vec<i64>, actual: Vec<i64> },
    #[error("unknown architecture '{0}'")]
    UnknownArchitecture(String),
    #[error("unknown editable layer '{0}'")]
    UnknownLayer(String),
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
}

/// A layer an edit can rewrite: a conv named by its state-dict prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct EditableLayer {
    pub name: String,
    pub weight_shape: Vec<i64>,
    /// Whether the block adds a skip input after the conv; an edit must then absorb that path too.
    pub has_skip: bool,
}

/// What an edit needs of one image batch at one layer: the conv's input (the keys), the block's skip
/// input where it has one, and the conv weight the block uses now.
pub struct EditBlock {
    pub key: Tensor,
    pub skip: Option<Tensor>,
    pub weight: Tensor,
}

/// An image classifier that can be edited one conv at a time. `forward` must equal
/// `forward_from(l, block_output(l, edit_block(x, l), weight_of(l)))` for every editable layer `l`.
pub trait Classifier: Send {
    /// Logits for a preprocessed batch (N x 3 x H x W).
    fn forward(&self, x: &Tensor) -> Tensor;
    fn num_classes(&self) -> i64;
    fn editable_layers(&self) -> Vec<EditableLayer>;
    /// Runs the network up to the edited conv of `layer`.
    fn edit_block(&self, x: &Tensor, layer: &str) -> Result<EditBlock, ModelError>;
    /// The block that `layer` feeds, as a function of the conv weight (differentiable in it).
    fn block_output(&self, layer: &str, block: &EditBlock, weight: &Tensor) -> Result<Tensor, ModelError>;
    /// The logits from the output of `layer`'s block.
    fn forward_from(&self, layer: &str, value: &Tensor) -> Result<Tensor, ModelError>;
    fn set_layer_weight(&mut self, layer: &str, weight: Tensor) -> Result<(), ModelError>;
}
