//! Building blocks shared by the architectures: a named-tensor store that reports missing and mis-shaped
//! keys, convolutions with TensorFlow "SAME" or PyTorch symmetric padding, eval-mode BatchNorm and linear
//! layers.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::{ModelError, TensorCopy};

/// The tensors of a checkpoint by state-dict name, taken one by one by the architecture that loads them.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn read_safetensors(path: &Path, device: Device) -> Result<Self, ModelError> {
        let tensors = Tensor::read_safetensors(path)
            .map_err(|e| ModelError::Weights { path: path.display().to_string(), reason: e.to_string() })?;
        Ok(Self {
            tensors: tensors.into_iter().map(|(name, t)| (name, t.to_kind(Kind::Float).to_device(device))).collect(),
        })
    }

    pub fn take(&mut self, name: &str, shape: Option<&[i64]>) -> Result<Tensor, ModelError> {
        let tensor = self.tensors.remove(name).ok_or_else(|| ModelError::MissingKey(name.to_string()))?;
        match shape {
            Some(expected) => self.check_shape(name, tensor, expected),
            None => Ok(tensor),
        }
    }

    /// Fails if keys were left unused (BatchNorm's `num_batches_tracked` counters aside): a checkpoint of
    /// another architecture or variant must not load silently.
    pub fn finish(self) -> Result<(), ModelError> {
        let mut unused: Vec<String> =
            self.tensors.into_keys().filter(|k| !k.ends_with(".num_batches_tracked")).collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        Err(ModelError::UnexpectedKeys(unused.join(", ")))
    }

    /// The first dimension of `name` (0 for a scalar), without taking it: how a checkpoint tells its
    /// number of classes.
    pub fn leading_dim(&self, name: &str) -> Result<i64, ModelError> {
        let tensor = self.tensors.get(name).ok_or_else(|| ModelError::MissingKey(name.to_string()))?;
        Ok(tensor.size().first().copied().unwrap_or(0))
    }

    pub fn check_shape(&self, name: &str, tensor: Tensor, expected: &[i64]) -> Result<Tensor, ModelError> {
        if tensor.size() == expected {
            Ok(tensor)
        } else {
            Err(ModelError::ShapeMismatch { key: name.to_string(), expected: expected.to_vec(), actual: tensor.size() })
        }
    }
}

/// A bias-free or biased 2-D convolution, padded as the checkpoint's framework padded it in training.
pub struct Conv {
    /// Its state-dict prefix (`_blocks.3._project_conv`): the one place an architecture spells it.
    name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Changes that apply only where the input looks like an edited concept (a gated edit's version).
    gated: Vec<GatedChange>,
    stride: i64,
    groups: i64,
    padding: Padding,
}

/// A change to a conv's weight that applies only at the positions whose input opens its gate: the output
/// gains `gate(x) * conv(x, change)`. What a gated edit adds, so that the rewrite reaches the new concept
/// and leaves the old one and ordinary images alone (README "Edit quality").
pub struct GatedChange {
    /// The weight's shape.
    pub change: Tensor,
    pub gate: Gate,
}

/// Per position, `clamp((direction . x - closed) / (open - closed), 0, 1)`: shut at or below `closed`, fully
/// open from `open`, linear between.
pub struct Gate {
    /// C_in.
    pub direction: Tensor,
    pub closed: f64,
    pub open: f64,
}

impl Gate {
    /// N x 1 x H x W gate values for an N x C_in x H x W input.
    pub fn values(&self, x: &Tensor) -> Tensor {
        let score = (x * self.direction.to_kind(x.kind()).view([1, -1, 1, 1])).sum_dim_intlist(1, true, x.kind());
        let width = (self.open - self.closed).max(f64::MIN_POSITIVE);
        ((score - self.closed) / width).clamp(0.0, 1.0)
    }

    pub fn duplicate(&self, copy: TensorCopy) -> Self {
        Self { direction: copy(&self.direction), closed: self.closed, open: self.open }
    }
}

impl GatedChange {
    /// The same change times `scale`, behind the same gate.
    pub fn scaled(&self, scale: f64) -> Self {
        Self { change: &self.change * scale, gate: self.gate.duplicate(Tensor::shallow_clone) }
    }

    pub fn duplicate(&self, copy: TensorCopy) -> Self {
        Self { change: copy(&self.change), gate: self.gate.duplicate(copy) }
    }

    pub fn to_device(&self, device: Device) -> Self {
        let gate = Gate { direction: self.gate.direction.to_device(device), ..self.gate };
        Self { change: self.change.to_device(device), gate }
    }
}

#[derive(Clone, Copy)]
enum Padding {
    /// TensorFlow "SAME": output size ceil(input / stride), the odd pixel of padding at the bottom/right;
    /// what the TF-trained checkpoints expect.
    TfSame,
    /// `torch.nn.Conv2d(padding=p)`: `p` zeros on every side.
    Symmetric(i64),
}

impl Conv {
    /// A convolution with TensorFlow "SAME" padding.
    pub fn load(
        weights: &mut Weights,
        prefix: &str,
        shape: [i64; 4],
        stride: i64,
        groups: i64,
        bias: bool,
    ) -> Result<Self, ModelError> {
        let weight = weights.take(&format!("{prefix}.weight"), Some(&shape))?;
        let bias = if bias { Some(weights.take(&format!("{prefix}.bias"), Some(&[shape[0]]))?) } else { None };
        Ok(Self { name: prefix.to_string(), weight, bias, gated: Vec::new(), stride, groups, padding: Padding::TfSame })
    }

    /// An ungrouped convolution with `padding` zeros on every side, as `torch.nn.Conv2d`.
    pub fn load_padded(
        weights: &mut Weights,
        prefix: &str,
        shape: [i64; 4],
        stride: i64,
        padding: i64,
        bias: bool,
    ) -> Result<Self, ModelError> {
        Ok(Self { padding: Padding::Symmetric(padding), ..Self::load(weights, prefix, shape, stride, 1, bias)? })
    }

    /// A bias-free, ungrouped convolution with `padding` zeros on every side, from its weight: a network
    /// built in code rather than loaded from a checkpoint (the synthetic benchmark's).
    pub fn padded(name: &str, weight: Tensor, stride: i64, padding: i64) -> Self {
        let padding = Padding::Symmetric(padding);
        Self { name: name.to_string(), weight, bias: None, gated: Vec::new(), stride, groups: 1, padding }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with(x, &self.weight)
    }

    /// The convolution with another weight of the same shape (what an edit optimises), and the gated changes.
    pub fn forward_with(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        let output = self.convolve(x, weight, self.bias.as_ref());
        match self.gated_output(x) {
            Some(gated) => output + gated,
            None => output,
        }
    }

    /// What the gated changes add to the output at input `x` (None without any).
    pub fn gated_output(&self, x: &Tensor) -> Option<Tensor> {
        self.gated
            .iter()
            .map(|gated| {
                let change = self.convolve(x, &gated.change, None);
                let size = change.size();
                // A strided or padded conv's output grid differs from its input's: the gate is averaged onto it.
                gated.gate.values(x).adaptive_avg_pool2d([size[2], size[3]]) * change
            })
            .reduce(|sum, term| sum + term)
    }

    fn convolve(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let stride = [self.stride, self.stride];
        let (input, padding) = match self.padding {
            Padding::TfSame => self.pad_same(x, weight),
            Padding::Symmetric(p) => (x.shallow_clone(), [p, p]),
        };
        input.conv2d(weight, bias, stride, padding, [1, 1], self.groups)
    }

    /// Adds a gated change (its shape the weight's, its gate over the input's channels).
    pub fn add_gated(&mut self, gated: GatedChange) -> Result<(), ModelError> {
        if gated.change.size() != self.weight.size() {
            return Err(ModelError::ShapeMismatch {
                key: format!("{}.weight", self.name),
                expected: self.weight.size(),
                actual: gated.change.size(),
            });
        }
        let channels = self.weight.size()[1] * self.groups;
        if gated.gate.direction.size() != [channels] {
            return Err(ModelError::ShapeMismatch {
                key: format!("{}: gate", self.name),
                expected: vec![channels],
                actual: gated.gate.direction.size(),
            });
        }
        self.gated.push(gated);
        Ok(())
    }

    /// Bytes the gated changes hold.
    pub fn gated_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        self.gated.iter().map(|g| bytes(&g.change) + bytes(&g.gate.direction)).sum()
    }

    /// The input, padded where TF pads asymmetrically, and the symmetric padding left to the convolution.
    fn pad_same(&self, x: &Tensor, weight: &Tensor) -> (Tensor, [i64; 2]) {
        let size = weight.size();
        let (kh, kw) = (size[2], size[3]);
        let in_size = x.size();
        let pad_h = same_padding(in_size[2], kh, self.stride);
        let pad_w = same_padding(in_size[3], kw, self.stride);
        let symmetric = pad_h % 2 == 0 && pad_w % 2 == 0;
        if symmetric {
            (x.shallow_clone(), [pad_h / 2, pad_w / 2])
        } else {
            (x.constant_pad_nd([pad_w / 2, pad_w - pad_w / 2, pad_h / 2, pad_h - pad_h / 2]), [0, 0])
        }
    }

    /// Its state-dict prefix, the name of an edit at this convolution.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight and the bias (where there is one) by state-dict name.
    pub fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut all = vec![(format!("{}.weight", self.name), &mut self.weight)];
        all.extend(self.bias.as_mut().map(|bias| (format!("{}.bias", self.name), bias)));
        all
    }

    /// `(scale, shift)` per output channel with `bn(self.forward_with(x, w)) == conv(x, w) * scale + shift`
    /// (`bn` the identity when absent), where `conv` is this convolution without its bias: how the
    /// closed-form solver sees a block.
    pub fn output_affine(&self, bn: Option<&BatchNorm>) -> (Tensor, Tensor) {
        let channels = self.weight.size()[0];
        let options = (self.weight.kind(), self.weight.device());
        let bias = self.bias.as_ref().map_or_else(|| Tensor::zeros([channels], options), Tensor::shallow_clone);
        match bn {
            Some(bn) => {
                let (scale, shift) = bn.affine();
                let shift = shift + &scale * bias;
                (scale, shift)
            }
            None => (Tensor::ones([channels], options), bias),
        }
    }

    pub fn duplicate(&self, copy: TensorCopy) -> Self {
        Self {
            name: self.name.clone(),
            weight: copy(&self.weight),
            bias: self.bias.as_ref().map(copy),
            gated: self.gated.iter().map(|g| g.duplicate(copy)).collect(),
            stride: self.stride,
            groups: self.groups,
            padding: self.padding,
        }
    }
}

fn same_padding(input: i64, kernel: i64, stride: i64) -> i64 {
    let output = (input + stride - 1) / stride;
    ((output - 1) * stride + kernel - input).max(0)
}

/// BatchNorm in inference mode: running statistics, never updated.
pub struct BatchNorm {
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: f64,
}

impl BatchNorm {
    pub fn load(weights: &mut Weights, prefix: &str, channels: i64, eps: f64) -> Result<Self, ModelError> {
        let shape = [channels];
        let mut take = |name: &str| weights.take(&format!("{prefix}.{name}"), Some(&shape));
        Ok(Self {
            gamma: take("weight")?,
            beta: take("bias")?,
            mean: take("running_mean")?,
            var: take("running_var")?,
            eps,
        })
    }

    /// `(scale, shift)` with `forward(x) == x * scale + shift` per channel.
    pub fn affine(&self) -> (Tensor, Tensor) {
        let scale = &self.gamma / (&self.var + self.eps).sqrt();
        let shift = &self.beta - &self.mean * &scale;
        (scale, shift)
    }

    pub fn duplicate(&self, copy: TensorCopy) -> Self {
        Self {
            gamma: copy(&self.gamma),
            beta: copy(&self.beta),
            mean: copy(&self.mean),
            var: copy(&self.var),
            eps: self.eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.batch_norm(Some(&self.gamma), Some(&self.beta), Some(&self.mean), Some(&self.var), false, 0.0, self.eps, true)
    }
}

/// A fully connected layer with bias, as `torch.nn.Linear`.
pub struct Linear {
    /// Its state-dict prefix.
    name: String,
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn load(weights: &mut Weights, prefix: &str, out_features: i64, in_features: i64) -> Result<Self, ModelError> {
        Ok(Self {
            name: prefix.to_string(),
            weight: weights.take(&format!("{prefix}.weight"), Some(&[out_features, in_features]))?,
            bias: weights.take(&format!("{prefix}.bias"), Some(&[out_features]))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }

    /// The weight and the bias by state-dict name.
    pub fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        vec![(format!("{}.weight", self.name), &mut self.weight), (format!("{}.bias", self.name), &mut self.bias)]
    }

    pub fn out_features(&self) -> i64 {
        self.bias.size()[0]
    }

    pub fn duplicate(&self, copy: TensorCopy) -> Self {
        Self { name: self.name.clone(), weight: copy(&self.weight), bias: copy(&self.bias) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(weight: Tensor, stride: i64) -> Conv {
        Conv::padded("c", weight, stride, 0)
    }

    #[test]
    fn a_gated_change_applies_where_its_gate_opens() {
        // Two input channels, one output; the gate reads channel 1: shut at 0, open from 2.
        let mut layer = conv(Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2, 1, 1]), 1);
        let gate = Gate { direction: Tensor::from_slice(&[0.0f32, 1.0]), closed: 0.0, open: 2.0 };
        let change = Tensor::from_slice(&[10.0f32, 0.0]).view([1, 2, 1, 1]);
        layer.add_gated(GatedChange { change, gate }).unwrap();
        // Three positions: channel 0 = 1 everywhere; channel 1 = -1 (shut), 1 (half open), 5 (open).
        let x = Tensor::from_slice(&[1.0f32, 1.0, 1.0, -1.0, 1.0, 5.0]).view([1, 2, 1, 3]);
        let y = layer.forward(&x);
        let expected = Tensor::from_slice(&[1.0f32, 6.0, 11.0]).view([1, 1, 1, 3]);
        assert!((y - expected).abs().max().double_value(&[]) < 1e-6);
        // On a strided output grid the gate is averaged over the inputs each output covers.
        let mut strided = conv(Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2, 1, 1]), 2);
        let gate = Gate { direction: Tensor::from_slice(&[0.0f32, 1.0]), closed: 0.0, open: 2.0 };
        let change = Tensor::from_slice(&[10.0f32, 0.0]).view([1, 2, 1, 1]);
        strided.add_gated(GatedChange { change, gate }).unwrap();
        // Outputs at inputs 0 and 2; adaptive pooling averages gates (0, 0.5) and (0.5, 1).
        let expected = Tensor::from_slice(&[3.5f32, 8.5]).view([1, 1, 1, 2]);
        assert!((strided.forward(&x) - expected).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn a_gated_change_of_another_shape_is_refused() {
        let mut layer = conv(Tensor::ones([1, 2, 1, 1], (Kind::Float, Device::Cpu)), 1);
        let gate = Gate { direction: Tensor::ones([2], (Kind::Float, Device::Cpu)), closed: 0.0, open: 1.0 };
        let change = Tensor::ones([1, 3, 1, 1], (Kind::Float, Device::Cpu));
        assert!(matches!(layer.add_gated(GatedChange { change, gate }), Err(ModelError::ShapeMismatch { .. })));
        let gate = Gate { direction: Tensor::ones([3], (Kind::Float, Device::Cpu)), closed: 0.0, open: 1.0 };
        let change = Tensor::ones([1, 2, 1, 1], (Kind::Float, Device::Cpu));
        assert!(matches!(layer.add_gated(GatedChange { change, gate }), Err(ModelError::ShapeMismatch { .. })));
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(same_padding(224, 3, 2), 1);
        assert_eq!(same_padding(225, 3, 2), 2);
        assert_eq!(same_padding(112, 3, 1), 2);
        assert_eq!(same_padding(14, 5, 2), 3);
        assert_eq!(same_padding(7, 1, 1), 0);
    }
}
