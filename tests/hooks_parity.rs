//! The keys and values of an edit, at every editable layer, equal what PyTorch forward hooks capture on the
//! reference implementation (efficientnet-lite-pytorch, torchvision): the key is the edited conv's input,
//! the value the output of the block that conv feeds (tools/reference.py `hooks` says which module that is
//! for each architecture). The forward-pass parity tests cannot see a block boundary drawn in the wrong
//! place, because a wrong `edit_block` and `forward_from` can still compose to the right logits.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{export_torchvision, load, model_dir, reference_on};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

/// The max abs difference, relative to the reference's largest magnitude where that exceeds 1: values at
/// about 1 are compared absolutely, while the random residual sums of the deep ResNets reach the thousands,
/// where float32 sums taken in another order differ by more than 1e-4 in absolute terms.
fn scaled_diff(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size());
    let scale = expected.abs().max().double_value(&[]).max(1.0);
    (actual - expected).abs().max().double_value(&[]) / scale
}

/// "key:NAME" and "value:NAME" for every layer, captured by hooks in one reference forward pass on `input`.
fn reference_keys_and_values(
    package_dir: &Path,
    layers: &[String],
    input: &Tensor,
    scratch: &Path,
) -> HashMap<String, Tensor> {
    let extra: Vec<&str> = layers.iter().flat_map(|layer| ["--layer", layer.as_str()]).collect();
    reference_on("hooks", package_dir, input, scratch, &extra).into_iter().collect()
}

/// Compares the key and the value of every editable layer of the package's model with the reference's on
/// a batch of two random 224x224 inputs.
fn check_keys_and_values(name: &str, package_dir: &Path, scratch: &Path) {
    let model = load(package_dir);
    // The layer list comes from the native model, so that both sides name the same layers by construction.
    let layers: Vec<String> = model.editable_layers().into_iter().map(|l| l.name).collect();
    tch::manual_seed(5);
    let input = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let mut expected = reference_keys_and_values(package_dir, &layers, &input, scratch);
    let _guard = tch::no_grad_guard();
    let (mut worst_key, mut worst_value) = (0.0f64, 0.0f64);
    for layer in &layers {
        let mut take =
            |kind: &str| expected.remove(&format!("{kind}:{layer}")).unwrap_or_else(|| panic!("no {kind} for {layer}"));
        let block = model.edit_block(&input, layer).unwrap();
        let key_diff = scaled_diff(&block.key, &take("key"));
        let value = model.block_output(layer, &block, &block.weight).unwrap();
        let value_diff = scaled_diff(&value, &take("value"));
        assert!(key_diff <= TOLERANCE, "{name} {layer}: key differs by {key_diff:e}");
        assert!(value_diff <= TOLERANCE, "{name} {layer}: value differs by {value_diff:e}");
        worst_key = worst_key.max(key_diff);
        worst_value = worst_value.max(value_diff);
    }
    println!(
        "{name}: {} editable layers, max key difference {worst_key:e}, max value difference {worst_value:e}",
        layers.len()
    );
}

fn check_torchvision(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let package_dir = export_torchvision(arch, dir.path());
    check_keys_and_values(arch, &package_dir, dir.path());
}

#[test]
fn efficientnet_lite0_keys_and_values_equal_the_hooks() {
    let dir = tempfile::tempdir().unwrap();
    check_keys_and_values("efficientnet-lite0", &model_dir(), dir.path());
}

#[test]
fn resnet18_keys_and_values_equal_the_hooks() {
    check_torchvision("resnet18");
}

#[test]
fn resnet34_keys_and_values_equal_the_hooks() {
    check_torchvision("resnet34");
}

#[test]
fn resnet50_keys_and_values_equal_the_hooks() {
    check_torchvision("resnet50");
}

#[test]
fn resnet101_keys_and_values_equal_the_hooks() {
    check_torchvision("resnet101");
}

#[test]
fn vgg16_keys_and_values_equal_the_hooks() {
    check_torchvision("vgg16");
}

#[test]
fn vgg16_bn_keys_and_values_equal_the_hooks() {
    check_torchvision("vgg16_bn");
}

#[test]
fn squeezenet1_1_keys_and_values_equal_the_hooks() {
    check_torchvision("squeezenet1_1");
}
