//! Model architectures on tch, one per file, behind the [`Classifier`] trait, and model packages
//! (a directory with `config.json` and `model.safetensors`).

mod efficientnet_lite;
pub mod layers;
mod package;
mod resnet;
mod squeezenet;
mod vgg;

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
    #[error("the block of '{0}' adds a skip input, and the edit block has none")]
    MissingSkip(String),
    #[error("'{0}' takes no gated change in this architecture")]
    NoGatedChanges(String),
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
}

/// A layer an edit can rewrite: a conv named by its state-dict prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct EditableLayer {
    /// The conv's state-dict prefix; its weight is `{name}.weight`.
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

/// The map from a conv's output to its block's output when it is affine per channel, followed by an
/// optional activation: `activation(scale * conv + shift + skip)`. The closed-form solver needs it.
pub struct LinearForm {
    pub scale: Tensor,
    pub shift: Tensor,
    pub activation: Activation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Relu6,
}

/// An image classifier that can be edited one conv at a time. `forward` must equal
/// `forward_from(l, block_output(l, edit_block(x, l), weight_of(l)))` for every editable layer `l`.
pub trait Classifier: Send {
    /// Logits for a preprocessed batch (N x 3 x H x W).
    fn forward(&self, x: &Tensor) -> Tensor;
    fn num_classes(&self) -> i64;
    fn editable_layers(&self) -> Vec<EditableLayer>;
    /// The layer an edit rewrites unless told otherwise (chosen by measurement; see README).
    fn default_edit_layer(&self) -> &str;
    /// The layers, in forward order from `default_edit_layer`, that a gated rewrite (the default edit) spreads
    /// over unless told otherwise; that layer alone where none was measured better.
    fn default_edit_layers(&self) -> Vec<String> {
        vec![self.default_edit_layer().to_string()]
    }
    /// The layers, in forward order, that a gated rewrite from one exemplar spreads over unless told otherwise:
    /// `default_edit_layers` where nothing else was measured better.
    fn one_exemplar_edit_layers(&self) -> Vec<String> {
        self.default_edit_layers()
    }
    /// How much of a gated rewrite's solved change the version applies at `layer`, where the architecture
    /// measured a gain other than the gated rewrite's own (None: that one).
    fn gated_gain(&self, _layer: &str) -> Option<f64> {
        None
    }
    /// Runs the network up to the edited conv of `layer`.
    fn edit_block(&self, x: &Tensor, layer: &str) -> Result<EditBlock, ModelError>;
    /// The block that `layer` feeds, as a function of the conv weight (differentiable in it).
    fn block_output(&self, layer: &str, block: &EditBlock, weight: &Tensor) -> Result<Tensor, ModelError>;
    /// The logits from the output of `layer`'s block.
    fn forward_from(&self, layer: &str, value: &Tensor) -> Result<Tensor, ModelError>;
    /// The block of `layer` in closed form, where it has one (a conv, eval BatchNorm, skip, activation).
    fn linear_form(&self, layer: &str) -> Result<Option<LinearForm>, ModelError>;
    /// The trainable tensors (conv and linear weights and biases; BatchNorm stays frozen) by state-dict name,
    /// in forward order, a block's side branch (a downsample) before the path it runs beside: the one list of
    /// them an architecture writes, from the names its layers were loaded under.
    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)>;
    /// The editable conv `layer`, where a gated change is added (see [`layers::GatedChange`]); an
    /// architecture not built from [`layers::Conv`] takes none.
    fn editable_conv_mut(&mut self, layer: &str) -> Result<&mut layers::Conv, ModelError> {
        Err(ModelError::NoGatedChanges(layer.to_string()))
    }
    /// A trainable tensor by state-dict name (sharing its storage).
    fn parameter(&self, name: &str) -> Result<Tensor, ModelError> {
        // The list is written once, for mutable access; a copy sharing every tensor lends it for reading.
        let mut shared = self.share();
        let found = shared.parameters_mut().into_iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
        found.ok_or_else(|| ModelError::MissingKey(name.to_string()))
    }
    fn set_parameter(&mut self, name: &str, value: Tensor) -> Result<(), ModelError> {
        let slot = self.parameters_mut().into_iter().find(|(n, _)| n == name).map(|(_, t)| t);
        replace_checked(slot.ok_or_else(|| ModelError::MissingKey(name.to_string()))?, name, value)
    }
    /// The names of the trainable tensors from `layer`'s conv to the output, in forward order: what a change
    /// at `layer` can reach (fine-tuning's set; what a lineage must leave alone to share statistics).
    fn parameters_after(&self, layer: &str) -> Result<Vec<String>, ModelError> {
        parameters_from(self, layer)
    }
    /// A model of the same architecture whose every tensor is `copy` of this one's.
    fn clone_with(&self, copy: TensorCopy) -> Box<dyn Classifier>;
    /// A deep copy whose tensors share nothing with this model.
    fn duplicate(&self) -> Box<dyn Classifier> {
        self.clone_with(Tensor::copy)
    }
    /// A copy that shares every tensor's storage with this model. `set_parameter` replaces a tensor
    /// rather than writing into it, so changing a parameter of the copy leaves this model as it is: a
    /// version holds only its edited layers beyond the base.
    fn share(&self) -> Box<dyn Classifier> {
        self.clone_with(Tensor::shallow_clone)
    }
}

/// The trainable tensors' names from the editable `layer`'s weight onward, in `parameters_mut`'s order.
pub fn parameters_from<C: Classifier + ?Sized>(model: &C, layer: &str) -> Result<Vec<String>, ModelError> {
    let unknown = || ModelError::UnknownLayer(layer.to_string());
    if !model.editable_layers().iter().any(|l| l.name == layer) {
        return Err(unknown());
    }
    let names: Vec<String> = model.share().parameters_mut().into_iter().map(|(name, _)| name).collect();
    let start = names.iter().position(|name| *name == format!("{layer}.weight")).ok_or_else(unknown)?;
    Ok(names[start..].to_vec())
}

/// How [`Classifier::clone_with`] copies each tensor.
pub type TensorCopy = fn(&Tensor) -> Tensor;

/// Replaces `slot` by `value` if the shapes agree.
pub fn replace_checked(slot: &mut Tensor, name: &str, value: Tensor) -> Result<(), ModelError> {
    if value.size() != slot.size() {
        return Err(ModelError::ShapeMismatch { key: name.to_string(), expected: slot.size(), actual: value.size() });
    }
    *slot = value;
    Ok(())
}
