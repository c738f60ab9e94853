//! Wall time per edit on the CPU for each method and solver at EfficientNet-Lite0's default layer, and of the
//! default edit (the gated least-squares rewrite over the default layers), with 1 and 3 exemplars, without the
//! breakage guard; and a sweep of every editable layer with the real-model check (is the modified exemplar
//! classified like the original again, how many of the 20 clean photos keep their top-1).
//! Run: `cargo bench --bench edit_speed`. BENCH_ADAM_STEPS (default "1000,10000,20000") sets the runs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{foolbox_photos, model_dir, preprocess_batch, root, striped_exemplar, LIMITS};
use editserve::cli::statistics_for;
use editserve::edit::{edit, EditParams, Exemplars, Method, Silent, Solver};
use editserve::imaging::decode;
use editserve::models::{load_package, Classifier, ModelPackage};
use tch::{Device, Tensor};

fn top1(model: &dyn Classifier, x: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(tch::no_grad(|| model.forward(x).argmax(-1, false))).unwrap()
}

fn main() {
    editserve::alloc::tune_from_env();
    let package = ModelPackage::open(&model_dir()).unwrap();
    let model = load_package(&package, Device::Cpu).unwrap();
    let cache = root().join("data/statistics-cache");
    let statistics_images = root().join("data/foolbox/statistics");
    let moment_at = |layer: &str| statistics_for(&package, model.as_ref(), layer, &statistics_images, &cache).unwrap();
    let steps: Vec<usize> = std::env::var("BENCH_ADAM_STEPS")
        .unwrap_or_else(|_| "1000,10000,20000".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();

    let layer = model.default_edit_layer().to_string();
    let moment = moment_at(&layer);
    let default_layers = model.default_edit_layers();
    let default_moments: Vec<_> = default_layers.iter().map(|l| moment_at(l)).collect();
    for exemplars_count in [1, 3] {
        let triples: Vec<_> = (0..exemplars_count).map(striped_exemplar).collect();
        let exemplars = Exemplars::from_images(&package.config.preprocessing, &triples, Device::Cpu).unwrap();
        let mut runs: Vec<EditParams> = steps
            .iter()
            .map(|&s| {
                let mut p = EditParams::new(Method::Rewrite, Solver::Adam, &layer);
                p.steps = s;
                p
            })
            .collect();
        runs.push(EditParams::new(Method::Rewrite, Solver::ClosedForm, &layer));
        runs.push(EditParams::new(Method::FinetuneLocal, Solver::Adam, &layer));
        runs.push(EditParams::new(Method::FinetuneGlobal, Solver::Adam, &layer));
        let mut default_edit = EditParams::new(Method::Rewrite, Solver::GatedLeastSquares, &default_layers[0]);
        default_edit.following_layers = default_layers[1..].to_vec();
        runs.push(default_edit);
        for params in runs {
            let statistics: Vec<_> =
                if params.following_layers.is_empty() { vec![&moment] } else { default_moments.iter().collect() };
            let started = Instant::now();
            let result = edit(model.as_ref(), &exemplars, &params, &statistics, None, &Silent).unwrap();
            let seconds = started.elapsed().as_secs_f64();
            let rate =
                if params.steps > 0 { format!("{:7.0} steps/s", params.steps as f64 / seconds) } else { String::new() };
            let name = match params.method {
                Method::Rewrite if !params.following_layers.is_empty() => {
                    format!("{:?} over {}", params.solver, params.layers().collect::<Vec<_>>().join(", "))
                }
                Method::Rewrite => format!("rewrite/{:?}", params.solver),
                other => format!("{other:?}"),
            };
            println!(
                "{exemplars_count} exemplar(s) {name:<22} {:>6} steps: {seconds:8.3} s {rate}  ({} bytes stored)",
                params.steps,
                result.delta.stored_bytes()
            );
        }
    }

    println!("\nlayer sweep (1 exemplar, statistics from the 40 CIFAR photos):");
    let (original, modified, mask) = striped_exemplar(0);
    let exemplar_batch = preprocess_batch(&package, &[original.clone(), modified.clone()]);
    let before = top1(model.as_ref(), &exemplar_batch);
    let clean: Vec<_> =
        foolbox_photos().iter().map(|(p, _)| decode(&std::fs::read(p).unwrap(), LIMITS).unwrap()).collect();
    let clean = preprocess_batch(&package, &clean);
    let clean_before = top1(model.as_ref(), &clean);
    let exemplars =
        Exemplars::from_images(&package.config.preprocessing, &[(original, modified, mask)], Device::Cpu).unwrap();
    for layer in model.editable_layers() {
        let moment = moment_at(&layer.name);
        let mut line = format!("{:<26}", layer.name);
        for solver in [Solver::Adam, Solver::ClosedForm] {
            let params = EditParams::new(Method::Rewrite, solver, &layer.name);
            let result = edit(model.as_ref(), &exemplars, &params, &[&moment], None, &Silent).unwrap();
            let mut edited = model.duplicate();
            result.delta.apply(edited.as_mut()).unwrap();
            let after = top1(edited.as_ref(), &exemplar_batch);
            let unchanged = top1(edited.as_ref(), &clean).iter().zip(&clean_before).filter(|(a, b)| a == b).count();
            let fixed = if after[1] == before[0] { "fixed" } else { "not fixed" };
            line += &format!(" | {solver:?}: {fixed:<9} clean {unchanged:>2}/20");
        }
        println!("{line}");
    }
}
