//! ResNet-18/34 (basic blocks) and ResNet-50/101 (bottlenecks) as torchvision builds them: BatchNorm eps
//! 1e-5, the bottleneck's stride in its 3x3 conv ("v1.5"), a strided 1x1 conv and BN on the shortcut where
//! the block changes shape. Parameter names are torchvision's state-dict keys (`layer3.1.conv2.weight`, ...).

use tch::Tensor;

use super::layers::{BatchNorm, Conv, Linear, Weights};
use super::{Activation, Classifier, EditBlock, EditableLayer, LinearForm, ModelError, TensorCopy};

const BN_EPS: f64 = 1e-5;
const STEM_CHANNELS: i64 = 64;
/// The width of each stage's blocks before expansion (torchvision's `planes`).
const STAGE_PLANES: [i64; 4] = [64, 128, 256, 512];

#[derive(Clone, Copy)]
enum BlockKind {
    /// Two 3x3 convs (ResNet-18/34).
    Basic,
    /// 1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50/101).
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The block kind and the number of blocks of each of the four stages.
#[derive(Clone, Copy)]
pub struct Layout {
    block: BlockKind,
    depths: [usize; 4],
}

/// The layout of a torchvision architecture name (`resnet50`), if it is a ResNet this crate implements.
pub fn layout(architecture: &str) -> Option<Layout> {
    let (block, depths) = match architecture {
        "resnet18" => (BlockKind::Basic, [2, 2, 2, 2]),
        "resnet34" => (BlockKind::Basic, [3, 4, 6, 3]),
        "resnet50" => (BlockKind::Bottleneck, [3, 4, 6, 3]),
        "resnet101" => (BlockKind::Bottleneck, [3, 4, 23, 3]),
        _ => return None,
    };
    Some(Layout { block, depths })
}

fn conv_bn(
    weights: &mut Weights,
    prefix: &str,
    number: usize,
    shape: [i64; 4],
    stride: i64,
) -> Result<(Conv, BatchNorm), ModelError> {
    let padding = shape[2] / 2;
    Ok((
        Conv::load_padded(weights, &format!("{prefix}.conv{number}"), shape, stride, padding, false)?,
        BatchNorm::load(weights, &format!("{prefix}.bn{number}"), shape[0], BN_EPS)?,
    ))
}

/// `relu(bn_last(conv_last(h)) + shortcut(x))` where `h` is `x` through the other convs, each followed by
/// BN and ReLU. The last conv (`conv2` of a basic block, `conv3` of a bottleneck) is the editable one.
struct ResidualBlock {
    /// `conv1`/`bn1`, `conv2`/`bn2`, ... in order; never empty.
    convs: Vec<(Conv, BatchNorm)>,
    /// `downsample.0`/`downsample.1`, where the block changes the resolution or the channels.
    downsample: Option<(Conv, BatchNorm)>,
}

impl ResidualBlock {
    fn load(
        weights: &mut Weights,
        prefix: String,
        kind: BlockKind,
        in_channels: i64,
        planes: i64,
        stride: i64,
    ) -> Result<Self, ModelError> {
        let out_channels = planes * kind.expansion();
        let convs = match kind {
            BlockKind::Basic => vec![
                conv_bn(weights, &prefix, 1, [planes, in_channels, 3, 3], stride)?,
                conv_bn(weights, &prefix, 2, [planes, planes, 3, 3], 1)?,
            ],
            BlockKind::Bottleneck => vec![
                conv_bn(weights, &prefix, 1, [planes, in_channels, 1, 1], 1)?,
                conv_bn(weights, &prefix, 2, [planes, planes, 3, 3], stride)?,
                conv_bn(weights, &prefix, 3, [out_channels, planes, 1, 1], 1)?,
            ],
        };
        let downsample = if stride != 1 || in_channels != out_channels {
            let shape = [out_channels, in_channels, 1, 1];
            Some((
                Conv::load_padded(weights, &format!("{prefix}.downsample.0"), shape, stride, 0, false)?,
                BatchNorm::load(weights, &format!("{prefix}.downsample.1"), out_channels, BN_EPS)?,
            ))
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn edited(&self) -> &(Conv, BatchNorm) {
        &self.convs[self.convs.len() - 1]
    }

    fn edited_layer(&self) -> String {
        self.edited().0.name().to_string()
    }

    /// The input of the editable conv: the key of an edit.
    fn edited_input(&self, x: &Tensor) -> Tensor {
        let inner = &self.convs[..self.convs.len() - 1];
        inner.iter().fold(x.shallow_clone(), |h, (conv, bn)| bn.forward(&conv.forward(&h)).relu())
    }

    /// What the block adds to its last BN's output: the input, or its downsampled projection.
    fn shortcut(&self, x: &Tensor) -> Tensor {
        match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)),
            None => x.shallow_clone(),
        }
    }

    fn finish(&self, edited_input: &Tensor, weight: &Tensor, shortcut: &Tensor) -> Tensor {
        let (conv, bn) = self.edited();
        (bn.forward(&conv.forward_with(edited_input, weight)) + shortcut).relu()
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.finish(&self.edited_input(x), &self.edited().0.weight, &self.shortcut(x))
    }

    /// The conv weights in forward order, the downsample (beside the main path) first.
    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let side = self.downsample.iter_mut().flat_map(|(conv, _)| conv.parameters_mut());
        side.chain(self.convs.iter_mut().flat_map(|(conv, _)| conv.parameters_mut())).collect()
    }

    fn duplicate(&self, copy: TensorCopy) -> Self {
        let pair = |(conv, bn): &(Conv, BatchNorm)| (conv.duplicate(copy), bn.duplicate(copy));
        Self { convs: self.convs.iter().map(pair).collect(), downsample: self.downsample.as_ref().map(pair) }
    }
}

pub struct ResNet {
    stem: Conv,
    stem_bn: BatchNorm,
    /// Every stage's blocks, in order.
    blocks: Vec<ResidualBlock>,
    fc: Linear,
    default_layer: String,
}

impl ResNet {
    pub fn load(weights: &mut Weights, layout: Layout) -> Result<Self, ModelError> {
        let stem = Conv::load_padded(weights, "conv1", [STEM_CHANNELS, 3, 7, 7], 2, 3, false)?;
        let stem_bn = BatchNorm::load(weights, "bn1", STEM_CHANNELS, BN_EPS)?;
        let mut blocks = Vec::new();
        let mut channels = STEM_CHANNELS;
        for (stage, (&depth, &planes)) in layout.depths.iter().zip(&STAGE_PLANES).enumerate() {
            for index in 0..depth {
                // Every stage but the first halves the resolution in its first block.
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let prefix = format!("layer{}.{index}", stage + 1);
                blocks.push(ResidualBlock::load(weights, prefix, layout.block, channels, planes, stride)?);
                channels = planes * layout.block.expansion();
            }
        }
        let num_classes = weights.leading_dim("fc.weight")?;
        let fc = Linear::load(weights, "fc", num_classes, channels)?;
        // The design's choice, the last block of the last stage: the deepest block with a spatial map. No
        // trained torchvision weights were at hand to measure a better one, as was done for EfficientNet.
        let default_layer = blocks.last().map(ResidualBlock::edited_layer).unwrap_or_default();
        Ok(Self { stem, stem_bn, blocks, fc, default_layer })
    }

    fn stem(&self, x: &Tensor) -> Tensor {
        self.stem_bn.forward(&self.stem.forward(x)).relu().max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
    }

    fn classify_features(&self, features: &Tensor) -> Tensor {
        self.fc.forward(&features.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
    }

    /// The index of the block whose editable conv is `layer`.
    fn block_index(&self, layer: &str) -> Result<usize, ModelError> {
        self.blocks
            .iter()
            .position(|b| b.edited_layer() == layer)
            .ok_or_else(|| ModelError::UnknownLayer(layer.to_string()))
    }
}

impl Classifier for ResNet {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.classify_features(&self.blocks.iter().fold(self.stem(x), |h, b| b.forward(&h)))
    }

    fn num_classes(&self) -> i64 {
        self.fc.out_features()
    }

    fn editable_layers(&self) -> Vec<EditableLayer> {
        self.blocks
            .iter()
            .map(|b| EditableLayer { name: b.edited_layer(), weight_shape: b.edited().0.weight.size(), has_skip: true })
            .collect()
    }

    fn default_edit_layer(&self) -> &str {
        &self.default_layer
    }

    fn edit_block(&self, x: &Tensor, layer: &str) -> Result<EditBlock, ModelError> {
        let index = self.block_index(layer)?;
        let input = self.blocks[..index].iter().fold(self.stem(x), |h, b| b.forward(&h));
        let block = &self.blocks[index];
        Ok(EditBlock {
            key: block.edited_input(&input),
            // The shortcut's output rather than the block input: the downsample is not edited, and the
            // closed-form solver adds the skip where the conv's output lives.
            skip: Some(block.shortcut(&input)),
            weight: block.edited().0.weight.shallow_clone(),
        })
    }

    fn block_output(&self, layer: &str, block: &EditBlock, weight: &Tensor) -> Result<Tensor, ModelError> {
        let index = self.block_index(layer)?;
        let shortcut = block.skip.as_ref().ok_or_else(|| ModelError::MissingSkip(layer.to_string()))?;
        Ok(self.blocks[index].finish(&block.key, weight, shortcut))
    }

    fn forward_from(&self, layer: &str, value: &Tensor) -> Result<Tensor, ModelError> {
        let index = self.block_index(layer)?;
        let features = self.blocks[index + 1..].iter().fold(value.shallow_clone(), |h, b| b.forward(&h));
        Ok(self.classify_features(&features))
    }

    fn linear_form(&self, layer: &str) -> Result<Option<LinearForm>, ModelError> {
        let (conv, bn) = self.blocks[self.block_index(layer)?].edited();
        let (scale, shift) = conv.output_affine(Some(bn));
        Ok(Some(LinearForm { scale, shift, activation: Activation::Relu }))
    }

    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut all = self.stem.parameters_mut();
        all.extend(self.blocks.iter_mut().flat_map(ResidualBlock::parameters_mut));
        all.extend(self.fc.parameters_mut());
        all
    }

    fn editable_conv_mut(&mut self, layer: &str) -> Result<&mut Conv, ModelError> {
        let index = self.block_index(layer)?;
        let convs = &mut self.blocks[index].convs;
        let last = convs.len() - 1;
        Ok(&mut convs[last].0)
    }

    fn clone_with(&self, copy: TensorCopy) -> Box<dyn Classifier> {
        Box::new(Self {
            stem: self.stem.duplicate(copy),
            stem_bn: self.stem_bn.duplicate(copy),
            blocks: self.blocks.iter().map(|block| block.duplicate(copy)).collect(),
            fc: self.fc.duplicate(copy),
            default_layer: self.default_layer.clone(),
        })
    }
}
