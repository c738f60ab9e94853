//! The editing method of shared/design/editing-method.md: rewrite one conv so that the keys of a modified
//! concept produce the values the original concept had (Adam as the authors did, or a closed form), and
//! the fine-tuning baselines the paper compares against. No HTTP here, no threads: a caller runs an edit
//! where tensor work belongs and watches it through [`Progress`].

mod augment;
pub mod delta;
mod finetune;
pub mod gate;
pub mod guard;
pub mod least_squares;
pub mod mask;
mod rewrite;
pub mod statistics;
pub mod tensor_io;

use std::time::Instant;

use image::{DynamicImage, GenericImageView, GrayImage};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use thiserror::Error;

pub use delta::Delta;
use guard::Guard;
pub use guard::GuardReport;
pub use rewrite::{compose, directions, project};

use crate::imaging::{InputTensor, Preprocessing};
use crate::models::{Classifier, EditBlock, EditableLayer, ModelError};
use statistics::SecondMoment;
use utoipa::ToSchema;

#[derive(Debug, Error)]
pub enum EditError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("the edit was cancelled")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Io(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Rewrite,
    FinetuneLocal,
    FinetuneGlobal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Solver {
    Adam,
    ClosedForm,
    /// Many keys, one covariance-weighted closed-form solve (see `least_squares`).
    LeastSquares,
    /// The least-squares change applied only where the input looks like the new concept (see `gate`).
    GatedLeastSquares,
}

impl Solver {
    fn is_least_squares(self) -> bool {
        matches!(self, Solver::LeastSquares | Solver::GatedLeastSquares)
    }

    /// What solves `method` unless the request says otherwise: the gated least squares for a rewrite
    /// (measured best on the concept-shift benchmark, README "Edit quality"), Adam for fine-tuning (its only
    /// solver).
    pub fn default_for(method: Method) -> Self {
        match method {
            Method::Rewrite => Solver::GatedLeastSquares,
            Method::FinetuneLocal | Method::FinetuneGlobal => Solver::Adam,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EditParams {
    pub method: Method,
    pub solver: Solver,
    /// The edited conv (its state-dict prefix); the first of several for a multi-layer least-squares edit.
    pub layer: String,
    /// Further convs after `layer`, in forward order, each solved on the model the earlier solves changed
    /// (least_squares only): what one layer leaves of the target, the next one takes up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub following_layers: Vec<String>,
    /// Dimension of the subspace the change lives in (rewrite only; `least_squares::FULL_RANK`: the whole
    /// change, least_squares' default).
    pub rank: usize,
    pub steps: usize,
    pub lr: f64,
    pub seed: i64,
}

impl EditParams {
    /// The defaults for a method, at `layer`; see README for how they were chosen.
    pub fn new(method: Method, solver: Solver, layer: &str) -> Self {
        let (steps, lr) = match (method, solver) {
            (Method::Rewrite, Solver::Adam) => (1000, 1e-3),
            (Method::Rewrite, Solver::ClosedForm | Solver::LeastSquares | Solver::GatedLeastSquares) => (0, 0.0),
            (Method::FinetuneLocal | Method::FinetuneGlobal, _) => (50, 1e-2),
        };
        let rank = if solver.is_least_squares() { least_squares::FULL_RANK } else { 1 };
        Self { method, solver, layer: layer.to_string(), following_layers: Vec::new(), rank, steps, lr, seed: 0 }
    }

    /// Every edited layer, in forward order.
    pub fn layers(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.layer.as_str()).chain(self.following_layers.iter().map(String::as_str))
    }

    /// Where each of `layers()` sits among `editable` (a model's editable layers, in forward order), once
    /// they are known to be editable, distinct and in forward order, and several only for the least-squares
    /// rewrite: the one check of a request before its job is queued and of `edit` itself.
    pub fn layer_positions(&self, editable: &[EditableLayer]) -> Result<Vec<usize>, EditError> {
        let positions = self
            .layers()
            .map(|layer| {
                editable.iter().position(|l| l.name == layer).ok_or_else(|| {
                    EditError::Invalid(format!(
                        "'{layer}' is not an editable layer of this model (its editable_layers list them)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if positions.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(EditError::Invalid("the layers of an edit must be distinct and in forward order".into()));
        }
        if positions.len() > 1 && !(self.method == Method::Rewrite && self.solver.is_least_squares()) {
            return Err(EditError::Invalid("only the least-squares rewrites edit several layers".into()));
        }
        Ok(positions)
    }
}

/// Images per forward pass up to an edited layer on the CPU. There the time per image grows with the batch once
/// a batch's activations outgrow the last-level cache (an early EfficientNet-Lite0 block holds ~5 MB per image
/// at 224 pixels; the 2-core VM has 32 MB of L3): the default edit's solve over `_blocks.10`, `.11` took
/// 12-16 s with three exemplars' 75 images in one batch and 7 s in batches of 4 (`cargo bench --bench
/// edit_speed`). An accelerator keeps the guard's batches of 32 from before.
const FORWARD_CHUNK_CPU: i64 = 4;
const FORWARD_CHUNK_ACCELERATOR: i64 = 32;

/// `model.edit_block` of each few `images` in turn (`FORWARD_CHUNK_CPU` on the CPU).
pub(crate) fn edit_blocks(model: &dyn Classifier, images: &Tensor, layer: &str) -> Result<Vec<EditBlock>, EditError> {
    let chunk = if images.device() == Device::Cpu { FORWARD_CHUNK_CPU } else { FORWARD_CHUNK_ACCELERATOR };
    Ok(images.split(chunk, 0).iter().map(|chunk| model.edit_block(chunk, layer)).collect::<Result<_, _>>()?)
}

/// `model.edit_block` of all `images`, computed a few at a time (`edit_blocks`).
pub(crate) fn edit_block(model: &dyn Classifier, images: &Tensor, layer: &str) -> Result<EditBlock, EditError> {
    let blocks = edit_blocks(model, images, layer)?;
    let joined = |part: fn(&EditBlock) -> Option<&Tensor>| -> Option<Tensor> {
        let parts: Option<Vec<&Tensor>> = blocks.iter().map(part).collect();
        parts.filter(|p| !p.is_empty()).map(|p| Tensor::cat(&p, 0))
    };
    let key = joined(|b| Some(&b.key)).ok_or_else(|| EditError::Invalid(format!("no images to run up to {layer}")))?;
    let skip = joined(|b| b.skip.as_ref());
    Ok(EditBlock { key, skip, weight: blocks[0].weight.shallow_clone() })
}

/// N exemplars, preprocessed: originals and modified copies (N x 3 x H x W), concept masks (N x 1 x H x W,
/// values in [0, 1], at the input resolution or any other), and optionally the true classes (N, for the
/// fine-tuning baselines; the model's predictions on the originals otherwise).
pub struct Exemplars {
    pub original: Tensor,
    pub modified: Tensor,
    pub mask: Tensor,
    pub labels: Option<Tensor>,
}

impl Exemplars {
    /// Preprocesses `(original, modified, mask)` triples as the model expects; each triple must agree in size.
    pub fn from_images(
        preprocessing: &Preprocessing,
        triples: &[(DynamicImage, DynamicImage, GrayImage)],
        device: Device,
    ) -> Result<Self, EditError> {
        let mut original = Vec::new();
        let mut modified = Vec::new();
        let mut mask = Vec::new();
        for (i, (o, m, k)) in triples.iter().enumerate() {
            if o.dimensions() != m.dimensions() || o.dimensions() != k.dimensions() {
                return Err(EditError::Invalid(format!(
                    "exemplar {i}: image {:?}, modified {:?} and mask {:?} must have the same size",
                    o.dimensions(),
                    m.dimensions(),
                    k.dimensions()
                )));
            }
            original.push(input_tensor(&preprocessing.apply(o), 3));
            modified.push(input_tensor(&preprocessing.apply(m), 3));
            mask.push(input_tensor(&preprocessing.apply_to_mask(k), 1));
        }
        Ok(Self {
            original: Tensor::stack(&original, 0).to_device(device),
            modified: Tensor::stack(&modified, 0).to_device(device),
            mask: Tensor::stack(&mask, 0).to_device(device),
            labels: None,
        })
    }

    pub fn count(&self) -> usize {
        self.original.size()[0] as usize
    }

    /// The same exemplars with `f` applied to each of their tensors.
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Exemplars {
        Exemplars {
            original: f(&self.original),
            modified: f(&self.modified),
            mask: f(&self.mask),
            labels: self.labels.as_ref().map(&f),
        }
    }

    /// The `i`-th exemplar alone.
    pub fn one(&self, i: usize) -> Exemplars {
        self.map(|t| t.narrow(0, i as i64, 1))
    }

    /// Every exemplar but the `i`-th.
    pub fn except(&self, i: usize) -> Exemplars {
        let kept = Tensor::from_slice(&(0..self.count() as i64).filter(|&j| j != i as i64).collect::<Vec<_>>())
            .to_device(self.original.device());
        self.map(|t| t.index_select(0, &kept))
    }

    pub fn shallow_clone(&self) -> Exemplars {
        self.map(Tensor::shallow_clone)
    }

    fn validate(&self) -> Result<i64, EditError> {
        let n = self.original.size()[0];
        if n == 0 {
            return Err(EditError::Invalid("an edit needs at least one exemplar".into()));
        }
        if self.modified.size() != self.original.size() {
            return Err(EditError::Invalid("original and modified images differ in shape".into()));
        }
        let mask = self.mask.size();
        if mask.len() != 4 || mask[0] != n || mask[1] != 1 {
            return Err(EditError::Invalid(format!("masks must be N x 1 x H x W, got {mask:?}")));
        }
        if self.mask.sum(Kind::Float).double_value(&[]) <= 0.0 {
            return Err(EditError::Invalid("the concept mask is empty".into()));
        }
        Ok(n)
    }
}

/// A preprocessed image as a C x H x W tensor.
pub fn input_tensor(input: &InputTensor, channels: i64) -> Tensor {
    Tensor::from_slice(&input.data).view([channels, i64::from(input.height), i64::from(input.width)])
}

/// libtorch's random generator is global, and an edit seeds it and draws its transformed copies from it. An
/// edit holds this for its whole run, so that nothing else in the process seeds or draws in between (another
/// edit: a worker per device, several servers in one test binary) and the same request always gives the same
/// version.
fn generator() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The generator, held and seeded: for a unit test that depends on what it draws (it must not call `edit`,
/// which takes the same lock).
#[cfg(test)]
pub(crate) fn seeded(seed: i64) -> std::sync::MutexGuard<'static, ()> {
    let guard = generator();
    tch::manual_seed(seed);
    guard
}

/// Reports an edit's progress and asks whether to stop.
pub trait Progress {
    fn report(&self, step: usize, total: usize, loss: f64);
    fn cancelled(&self) -> bool {
        false
    }
}

/// Progress for callers that do not watch.
pub struct Silent;

impl Progress for Silent {
    fn report(&self, _: usize, _: usize, _: f64) {}
}

/// One stage of an edit's progress: its `step` of `total` is `before + step` of `before + total + after` for
/// the watcher, so that the watcher's count spans every stage.
struct Stage<'a> {
    whole: &'a dyn Progress,
    before: usize,
    after: usize,
    /// The stage's own total, as last reported.
    total: std::cell::Cell<usize>,
}

impl<'a> Stage<'a> {
    fn new(whole: &'a dyn Progress, before: usize, after: usize) -> Self {
        Self { whole, before, after, total: std::cell::Cell::new(0) }
    }

    /// The watcher's steps up to the end of this stage.
    fn end(&self) -> usize {
        self.before + self.total.get()
    }
}

impl Progress for Stage<'_> {
    fn report(&self, step: usize, total: usize, loss: f64) {
        self.total.set(total);
        self.whole.report(self.before + step, self.before + total + self.after, loss);
    }
    fn cancelled(&self) -> bool {
        self.whole.cancelled()
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EditMetrics {
    pub loss_before: f64,
    pub loss_after: f64,
    pub delta_norm: f64,
    pub steps: usize,
    pub seconds: f64,
    /// "identity" or "second_moment".
    pub statistics: &'static str,
    /// Where the solver approximates the stated problem, in words.
    pub approximation: Option<String>,
    /// The layers the change rewrites.
    pub layers: Vec<String>,
    /// The least-squares solvers' solves, in the order they ran: per layer (and per exemplar taken in turn)
    /// the keys used, the change's rank, the weights and, gated, the gate and gain.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub solves: Vec<least_squares::SolveReport>,
    /// The breakage guard's choice of scale and what it measured, when the edit had a budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardReport>,
}

/// The breakage budget of an edit: at most `max_changed` of the check images (`photos`, preprocessed,
/// plus copies of the exemplars' originals made by the guard) may change their top-1.
pub struct Budget<'a> {
    pub photos: &'a Tensor,
    pub max_changed: f64,
}

pub struct EditResult {
    pub delta: Delta,
    pub metrics: EditMetrics,
}

/// A change an edit solves and keeps or scales as one (all of it, or one exemplar's taken in turn), with the
/// weaker solutions the guard may fall back on before it scales the weakest down.
pub struct Part {
    pub delta: Delta,
    /// The statistics weight of a least-squares solution, and the weaker solutions' with theirs.
    pub lambda: Option<f64>,
    pub weaker: Vec<(f64, Delta)>,
}

impl Part {
    fn whole(delta: Delta) -> Self {
        Self { delta, lambda: None, weaker: Vec::new() }
    }
}

/// What becomes of each part of an edit once solved, in order: kept whole, or what the breakage guard
/// keeps of it on top of the earlier parts as kept.
pub trait Keep {
    /// The progress steps `keep` counts for the part at `index`.
    fn steps(&self, index: usize) -> usize;
    fn keep(&mut self, part: Part, progress: &dyn Progress) -> Result<Delta, EditError>;
}

/// Every part whole: an edit without a budget.
struct Whole;

impl Keep for Whole {
    fn steps(&self, _: usize) -> usize {
        0
    }
    fn keep(&mut self, part: Part, _: &dyn Progress) -> Result<Delta, EditError> {
        Ok(part.delta)
    }
}

/// Runs one edit on `model` (which is not changed), and scales each of its parts to the budget when there is
/// one. `statistics` holds the keys' second moment at each of `params.layers()`; empty means C = identity.
pub fn edit(
    model: &dyn Classifier,
    exemplars: &Exemplars,
    params: &EditParams,
    statistics: &[&SecondMoment],
    budget: Option<&Budget>,
    progress: &dyn Progress,
) -> Result<EditResult, EditError> {
    exemplars.validate()?;
    let layer_count = params.layer_positions(&model.editable_layers())?.len();
    if !statistics.is_empty() && statistics.len() != layer_count {
        return Err(EditError::Invalid(format!("{} statistics for {layer_count} layers", statistics.len())));
    }
    let _generator = generator();
    tch::manual_seed(params.seed);
    let started = Instant::now();
    let (delta, mut metrics) = match budget {
        Some(budget) => {
            let photos = budget.photos.to_device(exemplars.original.device());
            let mut guard = Guard::new(model, &params.layer, &photos, exemplars, budget.max_changed);
            let (delta, mut metrics) = solve(model, exemplars, params, statistics, &mut guard, progress)?;
            metrics.guard = Some(guard.report()?);
            (delta, metrics)
        }
        None => solve(model, exemplars, params, statistics, &mut Whole, progress)?,
    };
    metrics.seconds = started.elapsed().as_secs_f64();
    metrics.delta_norm = delta.norm();
    metrics.layers = params.layers().map(String::from).collect();
    Ok(EditResult { delta, metrics })
}

/// The edit's change, each part solved and then kept by `keep` before the next is solved.
fn solve(
    model: &dyn Classifier,
    exemplars: &Exemplars,
    params: &EditParams,
    statistics: &[&SecondMoment],
    keep: &mut dyn Keep,
    progress: &dyn Progress,
) -> Result<(Delta, EditMetrics), EditError> {
    let first_statistics = statistics.first().copied();
    let solving = Stage::new(progress, 0, keep.steps(0));
    let (part, metrics) = match (params.method, params.solver) {
        // Several layers, or several exemplars of the gated rewrite (each in turn).
        (Method::Rewrite, Solver::LeastSquares | Solver::GatedLeastSquares)
            if params.layers().count() > 1 || least_squares::in_turn(params, exemplars) =>
        {
            return least_squares::run_layers(model, exemplars, params, statistics, keep, progress);
        }
        (Method::Rewrite, Solver::LeastSquares | Solver::GatedLeastSquares) => {
            let solved = least_squares::run(model, exemplars, params, first_statistics, true, None, &solving)?;
            (Part { delta: solved.delta, lambda: Some(least_squares::LAMBDA), weaker: solved.weaker }, solved.metrics)
        }
        (Method::Rewrite, _) => {
            let whitening = first_statistics.map(SecondMoment::whitening);
            let (delta, metrics) = rewrite::run(model, exemplars, params, whitening.as_ref(), &solving)?;
            (Part::whole(delta), metrics)
        }
        (Method::FinetuneLocal | Method::FinetuneGlobal, _) => {
            let (delta, metrics) = finetune::run(model, exemplars, params, &solving)?;
            (Part::whole(delta), metrics)
        }
    };
    Ok((keep.keep(part, &Stage::new(progress, solving.end(), 0))?, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{load_package, ModelPackage};

    #[test]
    fn keys_run_a_few_images_at_a_time_are_those_of_one_batch() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0");
        let model = load_package(&ModelPackage::open(&dir).unwrap(), Device::Cpu).unwrap();
        let _rng = seeded(3);
        // 7 images: the last chunk is short. Layers with a skip and without.
        let images = Tensor::randn([7, 3, 224, 224], (Kind::Float, Device::Cpu));
        let _guard = tch::no_grad_guard();
        let layers = model.editable_layers();
        let with_skip = layers.iter().find(|l| l.has_skip).unwrap();
        let without_skip = layers.iter().find(|l| !l.has_skip && l.name.starts_with("_blocks.")).unwrap();
        for (layer, has_skip) in [with_skip, without_skip].map(|l| (l.name.as_str(), l.has_skip)) {
            let whole = model.edit_block(&images, layer).unwrap();
            let chunked = edit_block(model.as_ref(), &images, layer).unwrap();
            assert_eq!(chunked.key.size(), whole.key.size(), "{layer}");
            assert!(chunked.key.allclose(&whole.key, 1e-4, 1e-4, false), "{layer}: the keys differ");
            match (&chunked.skip, &whole.skip) {
                (Some(a), Some(b)) => {
                    assert!(has_skip && a.allclose(b, 1e-4, 1e-4, false), "{layer}: the skips differ")
                }
                (None, None) => assert!(!has_skip, "{layer}: no skip"),
                _ => panic!("{layer}: the skip is lost or made up"),
            }
        }
    }
}
