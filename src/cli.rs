//! Offline commands for work and debugging without a server: `edit` writes a delta, `classify` applies
//! one (or none) and prints predictions, `import` makes a model package of a torchvision checkpoint.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
use tch::{Device, Tensor};

use crate::edit::statistics::{cache_path, files_sha256, SecondMoment, STATISTICS_BATCH};
use crate::edit::{edit, input_tensor, Budget, Delta, EditParams, Exemplars, Method, Progress, Solver};
use crate::imaging::{binary_mask, decode, DecodeLimits, Preprocessing};
use crate::models::{load_package, Classifier, ModelConfig, ModelPackage};

const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 100_000_000 };

#[derive(Debug, clap::Args)]
pub struct EditArgs {
    /// Model package directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Original exemplar image; repeat for several exemplars (with as many --modified and --mask).
    #[arg(long, required = true)]
    pub image: Vec<PathBuf>,
    #[arg(long, required = true)]
    pub modified: Vec<PathBuf>,
    /// Concept mask: grey over 127, or alpha over 0 where the PNG has alpha.
    #[arg(long, required = true)]
    pub mask: Vec<PathBuf>,
    /// Edited conv [default: the architecture's default edit layer].
    #[arg(long)]
    pub layer: Option<String>,
    /// rewrite, finetune_local or finetune_global.
    #[arg(long, default_value = "rewrite", value_parser = parse_serde::<Method>)]
    pub method: Method,
    /// adam, closed_form or least_squares (the last two: rewrite only) [default: least_squares for a rewrite,
    /// adam for fine-tuning].
    #[arg(long, value_parser = parse_serde::<Solver>)]
    pub solver: Option<Solver>,
    /// [default: 1; least_squares: the whole change]
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Directory of images for the keys' second moment (`--statistics identity` for C = identity, which
    /// breaks clean photos: README, "Choosing the edit settings").
    #[arg(long, default_value = "data/natural/statistics")]
    pub statistics: PathBuf,
    /// Check images of the breakage guard (with copies of the exemplars' originals); `none` for no guard.
    #[arg(long, default_value = "data/natural/check")]
    pub check: PathBuf,
    /// The share of check images whose top-1 the edit may change.
    #[arg(long, default_value_t = crate::edit::guard::DEFAULT_MAX_CHANGED)]
    pub max_changed: f64,
    /// Where second moments are cached.
    #[arg(long, default_value = "data/statistics-cache")]
    pub cache_dir: PathBuf,
    /// Output delta (safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A delta written by `editserve edit`, added to the weights first.
    #[arg(long)]
    pub delta: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    pub top_k: i64,
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

fn parse_serde<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| e.to_string())
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_serde(s)
    }
}

impl FromStr for Solver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_serde(s)
    }
}

fn read_image(path: &Path) -> anyhow::Result<image::DynamicImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&bytes, LIMITS).with_context(|| format!("decoding {}", path.display()))
}

fn load(model: &Path) -> anyhow::Result<(ModelPackage, Box<dyn Classifier>)> {
    let package = ModelPackage::open(model)?;
    let loaded = load_package(&package, Device::Cpu)?;
    Ok((package, loaded))
}

struct PrintProgress;

impl Progress for PrintProgress {
    fn report(&self, step: usize, total: usize, loss: f64) {
        eprintln!("step {step}/{total} loss {loss:.6}");
    }
}

fn image_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(crate::core::directories::files(dir, usize::MAX)?)
}

/// The images of a directory, preprocessed as the package expects (N x 3 x H x W).
fn read_inputs(package: &ModelPackage, dir: &Path) -> anyhow::Result<Tensor> {
    let inputs = image_files(dir)?
        .iter()
        .map(|file| Ok(input_tensor(&package.config.preprocessing.apply(&read_image(file)?), 3)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&inputs, 0))
}

/// The second moment of the keys at `layer` over a directory of images, from the cache when present.
pub fn statistics_for(
    package: &ModelPackage,
    model: &dyn Classifier,
    layer: &str,
    images: &Path,
    cache_dir: &Path,
) -> anyhow::Result<SecondMoment> {
    let files = image_files(images)?;
    let preprocessing = serde_json::to_string(&package.config.preprocessing)?;
    let weights = files_sha256(&[package.weights_path()])?;
    let path = cache_path(cache_dir, &weights, layer, &preprocessing, &files_sha256(&files)?);
    if path.exists() {
        return Ok(SecondMoment::load(&path)?);
    }
    let inputs = read_inputs(package, images)?;
    let batches: Vec<Tensor> = inputs.split(STATISTICS_BATCH as i64, 0);
    let moment = SecondMoment::accumulate(model, layer, batches)?;
    std::fs::create_dir_all(cache_dir)?;
    moment.save(&path)?;
    Ok(moment)
}

pub fn run_edit(args: EditArgs) -> anyhow::Result<()> {
    if args.image.len() != args.modified.len() || args.image.len() != args.mask.len() {
        bail!("give as many --modified and --mask as --image");
    }
    let (package, model) = load(&args.model)?;
    let mut triples = Vec::new();
    for ((image, modified), mask) in args.image.iter().zip(&args.modified).zip(&args.mask) {
        triples.push((read_image(image)?, read_image(modified)?, binary_mask(&read_image(mask)?)));
    }
    let exemplars = Exemplars::from_images(&package.config.preprocessing, &triples, Device::Cpu)?;
    let layer = args.layer.clone().unwrap_or_else(|| model.default_edit_layer().to_string());
    let mut params = EditParams::new(args.method, args.solver.unwrap_or(Solver::default_for(args.method)), &layer);
    params.rank = args.rank.unwrap_or(params.rank);
    params.seed = args.seed;
    params.steps = args.steps.unwrap_or(params.steps);
    params.lr = args.lr.unwrap_or(params.lr);
    let statistics = match args.statistics.to_str() {
        Some("identity") => None,
        _ => Some(statistics_for(&package, model.as_ref(), &layer, &args.statistics, &args.cache_dir)?),
    };
    let photos = match args.check.to_str() {
        Some("none") => None,
        _ => Some(read_inputs(&package, &args.check)?),
    };
    let budget = photos.as_ref().map(|photos| Budget { photos, max_changed: args.max_changed });
    let statistics: Vec<&SecondMoment> = statistics.iter().collect();
    let result = edit(model.as_ref(), &exemplars, &params, &statistics, budget.as_ref(), &PrintProgress)?;
    result.delta.save(&args.out)?;
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({
        "layer": layer,
        "params": params,
        "metrics": result.metrics,
        "stored_bytes": result.delta.stored_bytes(),
        "out": args.out,
    }))?);
    Ok(())
}

pub fn run_classify(args: ClassifyArgs) -> anyhow::Result<()> {
    let (package, mut model) = load(&args.model)?;
    if let Some(delta) = &args.delta {
        Delta::load(delta)?.apply(model.as_mut())?;
    }
    let _guard = tch::no_grad_guard();
    for path in &args.images {
        let input = package.config.preprocessing.apply(&read_image(path)?);
        let x = Tensor::from_slice(&input.data).view([1, 3, i64::from(input.height), i64::from(input.width)]);
        let probabilities = model.forward(&x).softmax(-1, tch::Kind::Float).squeeze_dim(0);
        let (values, indices) = probabilities.topk(args.top_k.clamp(1, model.num_classes()), -1, true, true);
        let predictions: Vec<serde_json::Value> = (0..values.size()[0])
            .map(|i| {
                let index = indices.int64_value(&[i]);
                serde_json::json!({
                    "index": index,
                    "label": package.config.labels.get(index as usize),
                    "probability": values.double_value(&[i]),
                })
            })
            .collect();
        println!("{}", serde_json::json!({"image": path, "predictions": predictions}));
    }
    Ok(())
}

/// The torchvision architectures `import` takes, each with its classifier's weight, whose leading
/// dimension is the checkpoint's number of classes.
const IMPORT_ARCHITECTURES: [(&str, &str); 7] = [
    ("resnet18", "fc.weight"),
    ("resnet34", "fc.weight"),
    ("resnet50", "fc.weight"),
    ("resnet101", "fc.weight"),
    ("vgg16", "classifier.6.weight"),
    ("vgg16_bn", "classifier.6.weight"),
    ("squeezenet1_1", "classifier.1.weight"),
];
/// Fed to the Python on standard input, so that the binary needs no checkout beside it.
const IMPORT_SCRIPT: &str = include_str!("../tools/import_checkpoint.py");
const DEFAULT_PYTHON: &str = ".venv/bin/python";
/// safetensors' own bound on the JSON header; a larger length means the file is no safetensors.
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;
/// The file `ModelPackage::open` reads the configuration from.
const PACKAGE_CONFIG_FILE: &str = "config.json";

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

fn parse_crop(s: &str) -> Result<[u32; 2], String> {
    let size = |v: &str| v.trim().parse::<u32>().map_err(|e| format!("'{v}': {e}"));
    match s.split_once(',') {
        Some((height, width)) => Ok([size(height)?, size(width)?]),
        None => size(s).map(|side| [side, side]),
    }
}

/// A directory that is removed when dropped unless kept: an import that fails leaves nothing behind, and it
/// holds only what the import wrote.
struct StagingDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn read_labels(path: &Path) -> anyhow::Result<Vec<String>> {
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
fn safetensors_shape(path: &Path, key: &str) -> anyhow::Result<Option<Vec<i64>>> {
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
fn convert_checkpoint(checkpoint: &Path, out: &Path) -> anyhow::Result<()> {
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
fn imagenet_preprocessing(resize_shorter: u32, crop: [u32; 2]) -> anyhow::Result<Preprocessing> {
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
    println!("{}", serde_json::json!({"out": args.out, "architecture": args.architecture, "num_classes": config.num_classes}));
    Ok(())
}
