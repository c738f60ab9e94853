//! Offline commands for work and debugging without a server: `edit` writes a delta, `classify` applies
//! one (or none) and prints predictions.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
use tch::{Device, Tensor};

use crate::edit::statistics::{cache_path, files_sha256, SecondMoment};
use crate::edit::{edit, Delta, EditParams, Exemplars, Method, Progress, Solver};
use crate::imaging::{binary_mask, decode, DecodeLimits};
use crate::models::{load_package, Classifier, ModelPackage};

const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 100_000_000 };
const STATISTICS_BATCH: usize = 16;

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
    /// adam or closed_form (rewrite only).
    #[arg(long, default_value = "adam", value_parser = parse_serde::<Solver>)]
    pub solver: Solver,
    #[arg(long, default_value_t = 1)]
    pub rank: usize,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Directory of images for the keys' second moment [default: identity statistics].
    #[arg(long)]
    pub statistics: Option<PathBuf>,
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

/// The second moment of the keys at `layer` over a directory of images, from the cache when present.
pub fn statistics_for(
    package: &ModelPackage,
    model: &dyn Classifier,
    layer: &str,
    images: &Path,
    cache_dir: &Path,
) -> anyhow::Result<SecondMoment> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(images)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let preprocessing = serde_json::to_string(&package.config.preprocessing)?;
    let weights = files_sha256(&[package.weights_path()])?;
    let path = cache_path(cache_dir, &weights, layer, &preprocessing, &files_sha256(&files)?);
    if path.exists() {
        return Ok(SecondMoment::load(&path)?);
    }
    let mut inputs = Vec::new();
    for file in &files {
        let input = package.config.preprocessing.apply(&read_image(file)?);
        inputs.push(Tensor::from_slice(&input.data).view([3, i64::from(input.height), i64::from(input.width)]));
    }
    if inputs.is_empty() {
        bail!("no images in {}", images.display());
    }
    let batches: Vec<Tensor> = inputs.chunks(STATISTICS_BATCH).map(|c| Tensor::stack(c, 0)).collect();
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
    let mut params = EditParams::new(args.method, args.solver, &layer);
    params.rank = args.rank;
    params.seed = args.seed;
    params.steps = args.steps.unwrap_or(params.steps);
    params.lr = args.lr.unwrap_or(params.lr);
    let whitening = match &args.statistics {
        Some(dir) => Some(statistics_for(&package, model.as_ref(), &layer, dir, &args.cache_dir)?.whitening()),
        None => None,
    };
    let result = edit(model.as_ref(), &exemplars, &params, whitening.as_ref(), &PrintProgress)?;
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
