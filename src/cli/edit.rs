//! `editserve edit`: one edit offline, from exemplar files to a delta file.

use super::*;
use crate::core::scheduler::EditSurface;

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
    /// Edited conv; repeated, the convs a least-squares rewrite spreads over, in forward order [default:
    /// the architecture's default edit layers for gated_least_squares, its default edit layer otherwise].
    #[arg(long)]
    pub layer: Vec<String>,
    /// rewrite, finetune_local or finetune_global.
    #[arg(long, default_value = "rewrite", value_parser = parse_serde::<Method>)]
    pub method: Method,
    /// adam, closed_form, least_squares or gated_least_squares (all but adam: rewrite only) [default:
    /// gated_least_squares for a rewrite, adam for fine-tuning].
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

/// The images of a directory, preprocessed as the package expects (N x 3 x H x W).
pub(super) fn read_inputs(package: &ModelPackage, dir: &Path) -> anyhow::Result<Tensor> {
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
    let solver = args.solver.unwrap_or(Solver::default_for(args.method));
    let layers = match args.layer.as_slice() {
        [] => EditSurface::of(model.as_ref()).default_layers(solver, triples.len(), false),
        given => given.to_vec(),
    };
    let layer = &layers[0];
    let mut params = EditParams::new(args.method, solver, layer);
    params.following_layers = layers[1..].to_vec();
    params.rank = args.rank.unwrap_or(params.rank);
    params.seed = args.seed;
    params.steps = args.steps.unwrap_or(params.steps);
    params.lr = args.lr.unwrap_or(params.lr);
    let statistics = match args.statistics.to_str() {
        Some("identity") => Vec::new(),
        _ => layers
            .iter()
            .map(|layer| statistics_for(&package, model.as_ref(), layer, &args.statistics, &args.cache_dir))
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    let photos = match args.check.to_str() {
        Some("none") => None,
        _ => Some(read_inputs(&package, &args.check)?),
    };
    let budget = photos.as_ref().map(|photos| Budget { photos, max_changed: args.max_changed });
    let statistics: Vec<&SecondMoment> = statistics.iter().collect();
    let result = edit(model.as_ref(), &exemplars, &params, &statistics, budget.as_ref(), &PrintProgress)?;
    result.delta.save(&args.out)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "layer": layer,
            "layers": layers,
            "params": params,
            "metrics": result.metrics,
            "stored_bytes": result.delta.stored_bytes(),
            "out": args.out,
        }))?
    );
    Ok(())
}
