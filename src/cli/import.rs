//! `editserve import`: a torchvision checkpoint into a model package, checked against the architecture.

use super::*;

/// The torchvision architectures `import` takes, each with its classifier's weight, whose leading
/// dimension is the checkpoint's number of classes.
pub(super) const IMPORT_ARCHITECTURES: [(&str, &str); 7] = [
    ("resnet18", "fc.weight"),
    ("resnet34", "fc.weight"),
    ("resnet50", "fc.weight"),
    ("resnet101", "fc.weight"),
    ("vgg16", "classifier.6.weight"),
    ("vgg16_bn", "classifier.6.weight"),
    ("squeezenet1_1", "classifier.1.weight"),
];
/// Fed to the Python on standard input, so that the binary needs no checkout beside it.
pub(super) const IMPORT_SCRIPT: &str = include_str!("../../tools/import_checkpoint.py");
pub(super) const DEFAULT_PYTHON: &str = ".venv/bin/python";
/// safetensors' own bound on the JSON header; a larger length means the file is no safetensors.
pub(super) const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;
/// The file `ModelPackage::open` reads the configuration from.
pub(super) const PACKAGE_CONFIG_FILE: &str = "config.json";

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The checkpoint's torchvision architecture.
    #[arg(long = "torchvision", value_name = "ARCH", value_parser = clap::builder::PossibleValuesParser::new(IMPORT_ARCHITECTURES.map(|(name, _)| name)))]
    pub architecture: String,
    /// The state dict: `.safetensors` (copied), or torch.save's pickle (`.pth`, `.pt`), converted by the Python
    /// in EDITSERVE_PYTHON [default: .venv/bin/python].
    #[arg(long)]
    pub weights: PathBuf,
    /// Class names, one per line; their count is the number of classes.
    #[arg(long)]
    pub labels: PathBuf,
    /// The package directory to create; it must not exist yet.
    #[arg(long)]
    pub out: PathBuf,
    /// Shorter side after resizing (torchvision's ImageNet evaluation resizes to 256).
    #[arg(long, default_value_t = 256)]
    pub resize_shorter: u32,
    /// Centre crop, `SIZE` or `HEIGHT,WIDTH`; also the network's input size.
    #[arg(long, default_value = "224", value_parser = parse_crop)]
    pub crop: [u32; 2],
}

pub(super) fn parse_crop(s: &str) -> Result<[u32; 2], String> {
    let size = |v: &str| v.trim().parse::<u32>().map_err(|e| format!("'{v}': {e}"));
    match s.split_once(',') {
        Some((height, width)) => Ok([size(height)?, size(width)?]),
        None => size(s).map(|side| [side, side]),
    }
}

/// A directory that is removed when dropped unless kept: an import that fails leaves nothing behind, and it
/// holds only what the import wrote.
pub(super) struct StagingDir {
    pub(super) path: PathBuf,
    pub(super) keep: bool,
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub(super) fn read_labels(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading labels {}", path.display()))?;
    let labels: Vec<String> = text.lines().map(|line| line.trim().to_string()).collect();
    // A blank line would shift every later label onto the wrong class.
    if let Some(blank) = labels.iter().position(String::is_empty) {
        bail!("{}: line {} is blank; give one label per line", path.display(), blank + 1);
    }
    if labels.is_empty() {
        bail!("{} has no labels", path.display());
    }
    Ok(labels)
}

/// The shape of `key` from a safetensors file's header, without reading the tensors; None if it is absent.
pub(super) fn safetensors_shape(path: &Path, key: &str) -> anyhow::Result<Option<Vec<i64>>> {
    use std::io::Read;
    const NOT_SAFETENSORS: &str = "not in safetensors format";
    let mut file = std::fs::File::open(path)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).context(NOT_SAFETENSORS)?;
    let length = u64::from_le_bytes(length);
    if length > MAX_SAFETENSORS_HEADER {
        bail!(NOT_SAFETENSORS);
    }
    let mut header = Vec::new();
    file.take(length).read_to_end(&mut header).context(NOT_SAFETENSORS)?;
    let header: serde_json::Value = serde_json::from_slice(&header).context(NOT_SAFETENSORS)?;
    Ok(header.get(key).and_then(|entry| serde_json::from_value(entry["shape"].clone()).ok()))
}

/// Converts a torch.save checkpoint to safetensors with tools/import_checkpoint.py.
pub(super) fn convert_checkpoint(checkpoint: &Path, out: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let python = std::env::var_os("EDITSERVE_PYTHON").map_or_else(|| PathBuf::from(DEFAULT_PYTHON), PathBuf::from);
    let mut child = Command::new(&python)
        .arg("-")
        .arg("--checkpoint")
        .arg(checkpoint)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("running {} (set EDITSERVE_PYTHON to a Python with torch and safetensors)", python.display())
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(IMPORT_SCRIPT.as_bytes()).context("passing the conversion script to Python")?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = stderr.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or("no message");
        bail!("converting {} failed: {message}", checkpoint.display());
    }
    Ok(())
}

/// The preprocessing of torchvision's ImageNet evaluation, at the given resize and crop.
pub(super) fn imagenet_preprocessing(resize_shorter: u32, crop: [u32; 2]) -> anyhow::Result<Preprocessing> {
    let preprocessing: Preprocessing = serde_json::from_value(serde_json::json!({
        "resize_shorter": resize_shorter,
        "crop": crop,
        "interpolation": "bilinear",
        "channel_order": "rgb",
        "pixel_scale": 255.0,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }))?;
    preprocessing.validate().map_err(anyhow::Error::msg)?;
    Ok(preprocessing)
}

/// Writes a model package from a torchvision checkpoint and checks that it loads; on any failure, removes
/// what it wrote and nothing else.
pub fn run_import(args: ImportArgs) -> anyhow::Result<()> {
    let classifier_key = IMPORT_ARCHITECTURES
        .iter()
        .find(|(name, _)| *name == args.architecture)
        .map(|(_, key)| *key)
        .with_context(|| format!("unknown architecture '{}'", args.architecture))?;
    let preprocessing = imagenet_preprocessing(args.resize_shorter, args.crop)?;
    let labels = read_labels(&args.labels)?;
    if !args.weights.is_file() {
        bail!("{} is not a file", args.weights.display());
    }
    if args.out.symlink_metadata().is_ok() {
        bail!("{} already exists; give a new directory", args.out.display());
    }
    let name = args.out.file_name().with_context(|| format!("{} names no directory", args.out.display()))?;
    let parent = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging_path = parent.join(format!(".{}.import-{}", name.to_string_lossy(), std::process::id()));
    std::fs::create_dir(&staging_path).with_context(|| format!("creating {}", staging_path.display()))?;
    let mut staging = StagingDir { path: staging_path, keep: false };

    let config = ModelConfig {
        architecture: args.architecture.clone(),
        num_classes: labels.len() as i64,
        input_size: args.crop,
        preprocessing,
        labels,
    };
    std::fs::write(staging.path.join(PACKAGE_CONFIG_FILE), serde_json::to_string_pretty(&config)?)?;
    let package = ModelPackage::open(&staging.path)?;
    let weights = package.weights_path();
    let is_safetensors = args.weights.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors {
        std::fs::copy(&args.weights, &weights).with_context(|| format!("copying {}", args.weights.display()))?;
    } else {
        convert_checkpoint(&args.weights, &weights)?;
    }
    // Checked before loading, which would only say that the counts differ, not where.
    let classifier_shape =
        safetensors_shape(&weights, classifier_key).with_context(|| format!("reading {}", args.weights.display()))?;
    if let Some(classes) = classifier_shape.and_then(|shape| shape.first().copied()) {
        if classes != config.num_classes {
            bail!(
                "{} has {} labels, but the checkpoint's classifier '{classifier_key}' has {classes} outputs",
                args.labels.display(),
                config.num_classes
            );
        }
    }
    load_package(&package, Device::Cpu)
        .with_context(|| format!("{} does not hold a {} checkpoint", args.weights.display(), args.architecture))?;

    std::fs::rename(&staging.path, &args.out).with_context(|| format!("creating {}", args.out.display()))?;
    staging.keep = true;
    println!(
        "{}",
        serde_json::json!({"out": args.out, "architecture": args.architecture, "num_classes": config.num_classes})
    );
    Ok(())
}
