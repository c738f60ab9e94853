//! `editserve import`: a torchvision checkpoint (torch.save's pickle, or safetensors) and a labels file
//! become a model package whose logits equal torchvision's; a checkpoint that does not fit the architecture
//! or the labels fails naming the key, and leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{python, reference_logits, root};
use editserve::models::{load_package, ModelPackage};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;
const NUM_CLASSES: usize = 10;

/// A random resnet18 with `NUM_CLASSES` classes (BatchNorm and biases randomised as for the parity tests),
/// saved the ways training code saves checkpoints: `resnet18.pth` a training checkpoint whose state dict
/// sits under 'state_dict' with DataParallel's 'module.' prefix, `resnet18.safetensors` the plain state
/// dict.
fn write_checkpoints(dir: &Path) {
    let script = format!(
        r#"
import sys
sys.path.insert(0, {tools:?})
import torch, torchvision
from safetensors.torch import save_file
from export_torchvision import randomise
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes={NUM_CLASSES})
randomise(model, torch.Generator().manual_seed(0))
state = model.state_dict()
torch.save({{"epoch": 3, "state_dict": {{"module." + k: v for k, v in state.items()}}}}, {pth:?})
save_file({{k: v.contiguous() for k, v in state.items()}}, {safetensors:?})
"#,
        tools = root().join("tools").to_str().unwrap(),
        pth = dir.join("resnet18.pth").to_str().unwrap(),
        safetensors = dir.join("resnet18.safetensors").to_str().unwrap(),
    );
    let output = Command::new(python()).args(["-c", &script]).output().unwrap();
    assert!(output.status.success(), "writing checkpoints: {}", String::from_utf8_lossy(&output.stderr));
}

fn write_labels(dir: &Path, count: usize) -> PathBuf {
    let path = dir.join(format!("labels-{count}.txt"));
    let text: String = (0..count).map(|i| format!("class {i}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn import(arch: &str, weights: &Path, labels: &Path, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_editserve"))
        .args(["import", "--torchvision", arch, "--weights"])
        .arg(weights)
        .arg("--labels")
        .arg(labels)
        .arg("--out")
        .arg(out)
        .env("EDITSERVE_PYTHON", python())
        .env("EDITSERVE_LOG", "warn")
        .output()
        .unwrap()
}

fn assert_fails_naming(output: &Output, key: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the import should have failed");
    assert!(stderr.contains(&format!("'{key}'")), "the error does not name '{key}': {stderr}");
}

/// The entries of `dir`, to show that a failed import left nothing.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn max_abs_diff_from_torchvision(package_dir: &Path, scratch: &Path) -> f64 {
    let package = ModelPackage::open(package_dir).unwrap();
    assert_eq!(package.config.num_classes, NUM_CLASSES as i64);
    assert_eq!(package.config.labels[3], "class 3");
    let model = load_package(&package, Device::Cpu).unwrap();
    tch::manual_seed(1);
    let input = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let logits = tch::no_grad(|| model.forward(&input));
    let expected = reference_logits(package_dir, &input, scratch);
    (logits - expected).abs().max().double_value(&[])
}

#[test]
fn imports_pickled_and_safetensors_checkpoints_with_torchvision_logits() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoints(dir.path());
    let labels = write_labels(dir.path(), NUM_CLASSES);
    for weights in ["resnet18.pth", "resnet18.safetensors"] {
        let out = dir.path().join("models").join(weights.replace('.', "-"));
        let output = import("resnet18", &dir.path().join(weights), &labels, &out);
        assert!(output.status.success(), "{weights}: {}", String::from_utf8_lossy(&output.stderr));
        let diff = max_abs_diff_from_torchvision(&out, dir.path());
        println!("{weights}: max |logits - torchvision| = {diff:.2e}");
        assert!(diff < TOLERANCE, "{weights}: logits differ from torchvision by {diff}");
    }
}

#[test]
fn a_checkpoint_that_does_not_fit_fails_naming_the_key_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoints(dir.path());
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let labels = write_labels(dir.path(), NUM_CLASSES);
    let pth = dir.path().join("resnet18.pth");

    // resnet34 has three blocks in layer1 where resnet18 has two.
    assert_fails_naming(&import("resnet34", &pth, &labels, &models.join("wrong-arch")), "layer1.2.conv1.weight");
    let output = import("resnet18", &pth, &write_labels(dir.path(), NUM_CLASSES - 1), &models.join("wrong-labels"));
    assert_fails_naming(&output, "fc.weight");
    assert!(entries(&models).is_empty(), "a failed import left {:?}", entries(&models));

    // An existing directory is never written into, even an empty one.
    let existing = models.join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("notes.txt"), "mine").unwrap();
    let output = import("resnet18", &pth, &labels, &existing);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
    assert_eq!(entries(&existing), ["notes.txt"]);

    // A file that is no checkpoint fails with the reader's message, not a panic.
    let garbage = dir.path().join("garbage.pth");
    std::fs::write(&garbage, "not a checkpoint").unwrap();
    let output = import("resnet18", &garbage, &labels, &models.join("garbage"));
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("converting"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(entries(&models), ["existing"]);
}
