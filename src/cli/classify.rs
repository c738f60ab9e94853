//! `editserve classify`: a model package's (or an edited one's) predictions for image files.

use super::*;

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

pub fn run_classify(args: ClassifyArgs) -> anyhow::Result<()> {
    let (package, mut model) = load(&args.model)?;
    if let Some(delta) = &args.delta {
        Delta::load(delta)?.apply(model.as_mut())?;
    }
    let _guard = tch::no_grad_guard();
    for path in &args.images {
        let input = package.config.preprocessing.apply(&read_image(path)?);
        let x = input_tensor(&input, 3).unsqueeze(0);
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
