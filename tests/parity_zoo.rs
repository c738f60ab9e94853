//! Numerical parity of the native ResNet, VGG and SqueezeNet with torchvision, on randomly initialised
//! weights (BatchNorm statistics and affines and the biases randomised too, so that none is the identity)
//! exported by tools/export_torchvision.py; and the split of each forward pass at every editable layer.

mod common;

use common::{export_torchvision, load, reference_logits};
use editserve::models::{load_package, Activation, Classifier, EditBlock, ModelPackage};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;
const LINEAR_FORM_TOLERANCE: f64 = 1e-5;
const NUM_CLASSES: i64 = 1000;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The block's output recomputed from its linear form: the conv without bias (stride 1, the output the
/// size of the input, as in every block that has a linear form here), then scale, shift, skip, activation.
fn from_linear_form(model: &dyn Classifier, layer: &str, block: &EditBlock) -> Option<Tensor> {
    let form = model.linear_form(layer).unwrap()?;
    let padding = block.weight.size()[2] / 2;
    let conv = block.key.conv2d(&block.weight, None::<&Tensor>, [1, 1], [padding, padding], [1, 1], 1);
    let pre = conv * form.scale.view([1, -1, 1, 1]) + form.shift.view([1, -1, 1, 1]);
    let pre = match &block.skip {
        Some(skip) => pre + skip,
        None => pre,
    };
    Some(match form.activation {
        Activation::Identity => pre,
        Activation::Relu => pre.relu(),
        Activation::Relu6 => pre.clamp(0.0, 6.0),
    })
}

/// For every editable layer: the forward pass splits there exactly, the linear form (where there is one)
/// describes the block, and the parameters from the layer on are all reachable by name.
fn check_editable_layers(model: &dyn Classifier, count: usize, default_layer: &str) {
    tch::manual_seed(3);
    let input = Tensor::randn([1, 3, 112, 112], (Kind::Float, Device::Cpu));
    let _guard = tch::no_grad_guard();
    let logits = model.forward(&input);
    let layers = model.editable_layers();
    assert_eq!(layers.len(), count);
    assert_eq!(model.default_edit_layer(), default_layer);
    assert!(layers.iter().any(|l| l.name == default_layer));
    // The layers a default edit spreads over: from the default layer on, editable, in forward order.
    let spread = model.default_edit_layers();
    assert_eq!(spread.first().map(String::as_str), Some(default_layer));
    // From one exemplar: editable, in forward order, ending with the default spread.
    let one = model.one_exemplar_edit_layers();
    assert!(one.ends_with(&spread), "{one:?} ends with {spread:?}");
    for listed in [&spread, &one] {
        let positions: Vec<_> =
            listed.iter().map(|name| layers.iter().position(|l| &l.name == name).expect("an editable layer")).collect();
        assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "{listed:?} in forward order");
    }
    for layer in &layers {
        let name = layer.name.as_str();
        let block = model.edit_block(&input, name).unwrap();
        assert_eq!(block.weight.size(), layer.weight_shape, "{name}");
        assert_eq!(block.key.size()[1], layer.weight_shape[1], "{name}: key channels");
        assert_eq!(block.skip.is_some(), layer.has_skip, "{name}");
        let value = model.block_output(name, &block, &block.weight).unwrap();
        let resumed = model.forward_from(name, &value).unwrap();
        let diff = max_abs_diff(&resumed, &logits);
        assert!(diff <= TOLERANCE, "{name}: split differs by {diff}");
        if let Some(expected) = from_linear_form(model, name, &block) {
            // Relative: the BN folded into a scale and a shift rounds differently, and the deep ResNets'
            // random residual sums reach the thousands.
            let diff = max_abs_diff(&value, &expected) / (1.0 + value.abs().max().double_value(&[]));
            assert!(diff <= LINEAR_FORM_TOLERANCE, "{name}: linear form differs by {diff} (relative)");
        }
        let after = model.parameters_after(name).unwrap();
        assert_eq!(after[0], format!("{name}.weight"));
        // A conv that runs beside the edited one (the other expand of a fire module, the edited block's
        // downsample) is not reached by its change.
        let module = name.rsplit_once('.').map_or(name, |(module, _)| module);
        let beside = if name.ends_with(".expand1x1") { "expand3x3" } else { "downsample" };
        let beside = format!("{module}.{beside}.");
        assert!(after.iter().all(|p| !p.starts_with(&beside)), "{name} reaches {beside}: {after:?}");
        for parameter in &after {
            if let Err(error) = model.parameter(parameter) {
                panic!("{name}: parameters_after names {parameter}: {error}");
            }
        }
    }
    assert!(model.edit_block(&input, "features.99").is_err());
}

/// Logits equal torchvision's for a square batch of two and a non-square image, and every editable layer
/// splits the forward pass.
fn check_architecture(arch: &str, editable_layers: usize, default_layer: &str) {
    let dir = tempfile::tempdir().unwrap();
    let package_dir = export_torchvision(arch, dir.path());
    let model = load(&package_dir);
    assert_eq!(model.num_classes(), NUM_CLASSES);
    tch::manual_seed(7);
    // The odd, non-square size exercises padding at odd sizes, SqueezeNet's ceil-mode pools and VGG's adaptive
    // pool from 6x8 to 7x7.
    for shape in [[2, 3, 224, 224], [1, 3, 203, 261]] {
        let input = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let expected = reference_logits(&package_dir, &input, dir.path());
        let actual = tch::no_grad(|| model.forward(&input));
        assert_eq!(actual.size(), vec![shape[0], NUM_CLASSES]);
        let diff = max_abs_diff(&actual, &expected);
        println!("{arch} {shape:?}: max |logit difference| vs torchvision {diff:e}");
        assert!(diff <= TOLERANCE, "{arch} {shape:?}: max abs logit difference {diff}");
    }
    check_editable_layers(model.as_ref(), editable_layers, default_layer);
}

/// EfficientNet-Lite1 to Lite4 with random weights against efficientnet-lite-pytorch, at each variant's own
/// resolution: the reference pads its convs for that size only (Lite0 runs on real weights in tests/parity.rs).
#[test]
fn efficientnet_lite_variants_equal_the_reference() {
    // The default edit layer: the last block at stride 16, before the stride-32 stage; from one exemplar the
    // block after the first at stride 16 comes before it.
    let variants = [(1, 240, 21, 14, 8), (2, 260, 21, 14, 8), (3, 280, 24, 16, 8), (4, 300, 30, 20, 10)];
    for (variant, size, blocks, default, early) in variants {
        let arch = format!("efficientnet-lite{variant}");
        let dir = tempfile::tempdir().unwrap();
        let package_dir = export_torchvision(&arch, dir.path());
        let model = load(&package_dir);
        tch::manual_seed(7);
        let input = Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu));
        let expected = reference_logits(&package_dir, &input, dir.path());
        let diff = max_abs_diff(&tch::no_grad(|| model.forward(&input)), &expected);
        println!("{arch} [2, 3, {size}, {size}]: max |logit difference| vs efficientnet-lite-pytorch {diff:e}");
        assert!(diff <= TOLERANCE, "{arch}: max abs logit difference {diff}");
        check_editable_layers(model.as_ref(), blocks + 1, &format!("_blocks.{default}._project_conv"));
        // The gated rewrite's own gain from the default layer on; 1 at the blocks before it.
        let gain = |block: usize| model.gated_gain(&format!("_blocks.{block}._project_conv"));
        assert_eq!((gain(0), gain(default - 1), gain(default), gain(blocks - 1)), (Some(1.0), Some(1.0), None, None));
        assert_eq!(model.gated_gain("_conv_head"), None);
        let project = |block: usize| format!("_blocks.{block}._project_conv");
        assert_eq!(model.one_exemplar_edit_layers(), [project(early), project(default), project(default + 1)]);
    }
}

#[test]
fn resnet18_equals_torchvision() {
    check_architecture("resnet18", 8, "layer4.1.conv2");
}

#[test]
fn resnet34_equals_torchvision() {
    check_architecture("resnet34", 16, "layer4.2.conv2");
}

#[test]
fn resnet50_equals_torchvision() {
    check_architecture("resnet50", 16, "layer4.2.conv3");
}

#[test]
fn resnet101_equals_torchvision() {
    check_architecture("resnet101", 33, "layer4.2.conv3");
}

#[test]
fn vgg16_equals_torchvision() {
    check_architecture("vgg16", 13, "features.28");
}

#[test]
fn vgg16_bn_equals_torchvision() {
    check_architecture("vgg16_bn", 13, "features.40");
}

#[test]
fn squeezenet1_1_equals_torchvision() {
    check_architecture("squeezenet1_1", 25, "features.12.expand3x3");
}

#[test]
fn a_checkpoint_of_another_depth_names_the_first_missing_key() {
    let dir = tempfile::tempdir().unwrap();
    let package_dir = export_torchvision("resnet18", dir.path());
    let config_path = package_dir.join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap().replace("\"resnet18\"", "\"resnet34\"");
    std::fs::write(&config_path, config).unwrap();
    let error = load_package(&ModelPackage::open(&package_dir).unwrap(), Device::Cpu).err().expect("load must fail");
    assert!(error.to_string().contains("layer1.2.conv1.weight"), "{error}");
}
