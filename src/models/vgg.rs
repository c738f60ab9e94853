//! VGG-16 without and with BatchNorm as torchvision builds them (`vgg16`, `vgg16_bn`): 3x3 convs with bias
//! and padding 1, each followed by [BN and] ReLU, a 2x2 max-pool after each of the five stages, an adaptive
//! average pool to 7x7 and three linear layers (their dropout is the identity in eval mode). Parameter names
//! are torchvision's state-dict keys (`features.28.weight`, `classifier.6.bias`, ...).

use tch::Tensor;

use super::layers::{BatchNorm, Conv, Linear, Weights};
use super::{Activation, Classifier, EditBlock, EditableLayer, LinearForm, ModelError, TensorCopy};

/// The conv widths of each stage (torchvision's configuration "D").
const STAGES: [&[i64]; 5] = [&[64, 64], &[128, 128], &[256, 256, 256], &[512, 512, 512], &[512, 512, 512]];
const BN_EPS: f64 = 1e-5;
/// The side of the adaptive average pool before the classifier.
const POOLED_SIDE: i64 = 7;
const HIDDEN_FEATURES: i64 = 4096;
/// The linear layers' positions in `classifier` (ReLU and dropout take the others).
const CLASSIFIER_INDICES: [usize; 3] = [0, 3, 6];

/// Whether a torchvision architecture name is VGG-16 with BatchNorm, if it is one this crate implements.
pub fn with_batch_norm(architecture: &str) -> Option<bool> {
    match architecture {
        "vgg16" => Some(false),
        "vgg16_bn" => Some(true),
        _ => None,
    }
}

/// A conv of `features` with what follows it up to the next conv: [BN,] ReLU [, the stage's max-pool].
struct FeatureConv {
    conv: Conv,
    bn: Option<BatchNorm>,
    /// Whether the stage's max-pool follows: the last conv of each stage.
    pooled: bool,
}

impl FeatureConv {
    fn name(&self) -> String {
        self.conv.name().to_string()
    }

    /// The block's output with another conv weight; the conv keeps its bias.
    fn forward_with(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        let h = self.conv.forward_with(x, weight);
        let h = match &self.bn {
            Some(bn) => bn.forward(&h),
            None => h,
        }
        .relu();
        if self.pooled {
            h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
        } else {
            h
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with(x, &self.conv.weight)
    }

    fn duplicate(&self, copy: TensorCopy) -> Self {
        Self { conv: self.conv.duplicate(copy), bn: self.bn.as_ref().map(|bn| bn.duplicate(copy)), pooled: self.pooled }
    }
}

pub struct Vgg {
    features: Vec<FeatureConv>,
    /// `classifier.0`, `classifier.3`, `classifier.6`.
    classifier: [Linear; 3],
    default_layer: String,
}

impl Vgg {
    pub fn load(weights: &mut Weights, batch_norm: bool) -> Result<Self, ModelError> {
        let mut features = Vec::new();
        let (mut index, mut channels) = (0, 3);
        for stage in STAGES {
            for (position, &width) in stage.iter().enumerate() {
                let shape = [width, channels, 3, 3];
                let conv = Conv::load_padded(weights, &format!("features.{index}"), shape, 1, 1, true)?;
                let bn = if batch_norm {
                    Some(BatchNorm::load(weights, &format!("features.{}", index + 1), width, BN_EPS)?)
                } else {
                    None
                };
                let pooled = position == stage.len() - 1;
                features.push(FeatureConv { conv, bn, pooled });
                // The conv, its BN, its ReLU and the max-pool each take a position in `features`.
                index += 2 + usize::from(batch_norm) + usize::from(pooled);
                channels = width;
            }
        }
        let flattened = channels * POOLED_SIDE * POOLED_SIDE;
        let [first, second, last] = CLASSIFIER_INDICES.map(|i| format!("classifier.{i}"));
        let num_classes = weights.leading_dim(&format!("{last}.weight"))?;
        let classifier = [
            Linear::load(weights, &first, HIDDEN_FEATURES, flattened)?,
            Linear::load(weights, &second, HIDDEN_FEATURES, HIDDEN_FEATURES)?,
            Linear::load(weights, &last, num_classes, HIDDEN_FEATURES)?,
        ];
        // conv5_3, the layer the authors edit by default (their "layer 12", counting from 0).
        let default_layer = features.last().map(FeatureConv::name).unwrap_or_default();
        Ok(Self { features, classifier, default_layer })
    }

    fn classify_features(&self, features: &Tensor) -> Tensor {
        let [first, second, last] = &self.classifier;
        let h = features.adaptive_avg_pool2d([POOLED_SIDE, POOLED_SIDE]).flatten(1, -1);
        last.forward(&second.forward(&first.forward(&h).relu()).relu())
    }

    fn feature_position(&self, layer: &str) -> Result<usize, ModelError> {
        self.features.iter().position(|f| f.name() == layer).ok_or_else(|| ModelError::UnknownLayer(layer.to_string()))
    }
}

impl Classifier for Vgg {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.classify_features(&self.features.iter().fold(x.shallow_clone(), |h, f| f.forward(&h)))
    }

    fn num_classes(&self) -> i64 {
        self.classifier[2].out_features()
    }

    fn editable_layers(&self) -> Vec<EditableLayer> {
        self.features
            .iter()
            .map(|f| EditableLayer { name: f.name(), weight_shape: f.conv.weight.size(), has_skip: false })
            .collect()
    }

    fn default_edit_layer(&self) -> &str {
        &self.default_layer
    }

    fn edit_block(&self, x: &Tensor, layer: &str) -> Result<EditBlock, ModelError> {
        let position = self.feature_position(layer)?;
        let key = self.features[..position].iter().fold(x.shallow_clone(), |h, f| f.forward(&h));
        Ok(EditBlock { key, skip: None, weight: self.features[position].conv.weight.shallow_clone() })
    }

    fn block_output(&self, layer: &str, block: &EditBlock, weight: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.features[self.feature_position(layer)?].forward_with(&block.key, weight))
    }

    fn forward_from(&self, layer: &str, value: &Tensor) -> Result<Tensor, ModelError> {
        let position = self.feature_position(layer)?;
        let features = self.features[position + 1..].iter().fold(value.shallow_clone(), |h, f| f.forward(&h));
        Ok(self.classify_features(&features))
    }

    /// Closed form only where no max-pool follows: a pool is not a per-channel map.
    fn linear_form(&self, layer: &str) -> Result<Option<LinearForm>, ModelError> {
        let feature = &self.features[self.feature_position(layer)?];
        if feature.pooled {
            return Ok(None);
        }
        let (scale, shift) = feature.conv.output_affine(feature.bn.as_ref());
        Ok(Some(LinearForm { scale, shift, activation: Activation::Relu }))
    }

    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let features = self.features.iter_mut().flat_map(|f| f.conv.parameters_mut());
        features.chain(self.classifier.iter_mut().flat_map(Linear::parameters_mut)).collect()
    }

    fn editable_conv_mut(&mut self, layer: &str) -> Result<&mut Conv, ModelError> {
        let position = self.feature_position(layer)?;
        Ok(&mut self.features[position].conv)
    }

    fn clone_with(&self, copy: TensorCopy) -> Box<dyn Classifier> {
        Box::new(Self {
            features: self.features.iter().map(|feature| feature.duplicate(copy)).collect(),
            classifier: self.classifier.each_ref().map(|linear| linear.duplicate(copy)),
            default_layer: self.default_layer.clone(),
        })
    }
}
