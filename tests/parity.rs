//! Numerical parity of the native tch EfficientNet-Lite0 with the upstream PyTorch implementation
//! (efficientnet-lite-pytorch) on the same weights and the same input tensors.

mod common;

use common::{model_dir, reference_logits, write_lite0_without};
use editserve::models::{load_package, ModelPackage};
use tch::{Device, Kind, Tensor};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn logits_equal_the_pytorch_reference() {
    let package = ModelPackage::open(&model_dir()).unwrap();
    let model = load_package(&package, Device::Cpu).unwrap();
    tch::manual_seed(7);
    // A batch of two: random normal inputs, like preprocessed images with values in about [-1, 1] and beyond.
    let input = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let dir = tempfile::tempdir().unwrap();
    let expected = reference_logits(&model_dir(), &input, dir.path());
    let actual = tch::no_grad(|| model.forward(&input));
    assert_eq!(actual.size(), vec![2, 1000]);
    let diff = max_abs_diff(&actual, &expected);
    println!("max |logit difference| vs PyTorch: {diff:e}");
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
}

#[test]
fn every_editable_layer_splits_the_forward_pass_exactly() {
    let package = ModelPackage::open(&model_dir()).unwrap();
    let model = load_package(&package, Device::Cpu).unwrap();
    tch::manual_seed(3);
    let input = Tensor::randn([1, 3, 224, 224], (Kind::Float, Device::Cpu));
    let _guard = tch::no_grad_guard();
    let logits = model.forward(&input);
    let layers = model.editable_layers();
    assert_eq!(layers.len(), 17, "16 MBConv project convs and the head conv");
    assert_eq!(layers.last().unwrap().name, "_conv_head");
    assert_eq!(layers.iter().filter(|l| l.has_skip).count(), 9);
    for layer in &layers {
        let block = model.edit_block(&input, &layer.name).unwrap();
        assert_eq!(block.weight.size(), layer.weight_shape, "{}", layer.name);
        assert_eq!(block.key.size()[1], layer.weight_shape[1], "{}: key channels", layer.name);
        assert_eq!(block.skip.is_some(), layer.has_skip, "{}", layer.name);
        let value = model.block_output(&layer.name, &block, &block.weight).unwrap();
        let resumed = model.forward_from(&layer.name, &value).unwrap();
        assert!(max_abs_diff(&resumed, &logits) <= 1e-5, "{}", layer.name);
    }
    assert!(model.edit_block(&input, "_blocks.99._project_conv").is_err());
}

#[test]
fn a_package_with_a_missing_key_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let package_dir = dir.path().join("broken");
    write_lite0_without(&package_dir, "_blocks.4._bn1.running_var");
    let package = ModelPackage::open(&package_dir).unwrap();
    let error = load_package(&package, Device::Cpu).err().expect("load must fail").to_string();
    assert!(error.contains("_blocks.4._bn1.running_var"), "{error}");
}
