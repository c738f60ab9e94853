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
    stride: i64,
    groups: i64,
    padding: Padding,
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
        Ok(Self { name: prefix.to_string(), weight, bias, stride, groups, padding: Padding::TfSame })
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

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with(x, &self.weight)
    }

    /// The convolution with another weight of the same shape: what an edit optimises.
    pub fn forward_with(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        let stride = [self.stride, self.stride];
        let (input, padding) = match self.padding {
            Padding::TfSame => self.pad_same(x, weight),
            Padding::Symmetric(p) => (x.shallow_clone(), [p, p]),
        };
        input.conv2d(weight, self.bias.as_ref(), stride, padding, [1, 1], self.groups)
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
    use super::same_padding;

    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(same_padding(224, 3, 2), 1);
        assert_eq!(same_padding(225, 3, 2), 2);
        assert_eq!(same_padding(112, 3, 1), 2);
        assert_eq!(same_padding(14, 5, 2), 3);
        assert_eq!(same_padding(7, 1, 1), 0);
    }
}
