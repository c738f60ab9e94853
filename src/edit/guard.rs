//! The breakage budget: after an edit is solved, keep the strongest fraction of its change under which
//! few images of a check set change their top-1. The check set is natural photos plus copies of the
//! exemplars' ORIGINAL images in other arrangements: measured on the concept-shift benchmark, clean images
//! of the old concept are what an edit breaks first, while photos rarely flip. Only the copies the parent
//! classifies like their exemplar count (as the benchmark keeps only originals classified right). The
//! images are run up to the edited layer once; each scale tried only runs the rest of the network.

use serde::Serialize;
use tch::{Kind, Tensor};

use super::augment::augmented;
use super::{Delta, EditError, Exemplars, Progress};
use crate::models::{Classifier, EditBlock};

/// The share of check images whose top-1 may change, unless the request says otherwise.
pub const DEFAULT_MAX_CHANGED: f64 = 0.02;
/// Scales of the change tried, strongest first; below the last one the edit is dropped (scale 0).
const SCALES: [f64; 10] = [1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05, 0.03];
/// Transformed copies of each exemplar's original in the check set, and at most this many in all.
const ORIGINAL_COPIES: usize = 32;
const MAX_ORIGINAL_COPIES: usize = 96;
/// Images per forward pass.
const CHUNK: i64 = 32;

/// What the guard found, recorded in the version's metrics.
#[derive(Debug, Clone, Serialize)]
pub struct GuardReport {
    /// The fraction of the solved change the version keeps (0 when none fits the budget).
    pub scale: f64,
    pub max_changed: f64,
    /// Check photos, and how many changed their top-1 at the chosen scale.
    pub photos: usize,
    pub photos_changed: usize,
    /// Transformed copies of the exemplars' originals that the parent classifies as their exemplar, and how
    /// many changed their top-1.
    pub originals: usize,
    pub originals_changed: usize,
    /// Whether every modified exemplar is now classified as the parent classified its original.
    pub exemplar_fixed: bool,
    pub exemplars_fixed: usize,
    /// Whether the unscaled change fixed every exemplar (so a scale below 1 is the budget's doing).
    pub exemplar_fixed_unscaled: bool,
}

/// Images run up to `layer` by the parent, in chunks.
struct Prefix {
    blocks: Vec<EditBlock>,
}

impl Prefix {
    fn new(parent: &dyn Classifier, layer: &str, images: &Tensor) -> Result<Self, EditError> {
        let _guard = tch::no_grad_guard();
        if images.size()[0] == 0 {
            return Ok(Self { blocks: Vec::new() });
        }
        let blocks = images.split(CHUNK, 0).iter().map(|chunk| parent.edit_block(chunk, layer)).collect::<Result<_, _>>()?;
        Ok(Self { blocks })
    }

    /// The top-1 of each image under `model` (the parent, or the parent with a change at or after `layer`).
    fn top1(&self, model: &dyn Classifier, layer: &str) -> Result<Tensor, EditError> {
        let _guard = tch::no_grad_guard();
        let weight = model.parameter(&format!("{layer}.weight"))?;
        let mut classes = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let value = model.block_output(layer, block, &weight)?;
            classes.push(model.forward_from(layer, &value)?.argmax(-1, false));
        }
        if classes.is_empty() {
            return Ok(Tensor::zeros([0], (Kind::Int64, weight.device())));
        }
        Ok(Tensor::cat(&classes, 0))
    }
}

fn differences(a: &Tensor, b: &Tensor) -> usize {
    if a.numel() == 0 {
        return 0;
    }
    a.ne_tensor(b).sum(Kind::Int64).int64_value(&[]) as usize
}

/// Scales `delta` (whose parameters lie at or after `layer`) down to the strongest of `SCALES` whose top-1
/// changes on `photos` (preprocessed, N x 3 x H x W) and on transformed copies of the exemplars' originals
/// stay within `max_changed` of the check images, together; scale 0 (no change) when none does.
pub fn guard(
    parent: &dyn Classifier,
    delta: &Delta,
    layer: &str,
    photos: &Tensor,
    exemplars: &Exemplars,
    max_changed: f64,
    progress: &dyn Progress,
) -> Result<(Delta, GuardReport), EditError> {
    let n = exemplars.original.size()[0] as usize;
    let copies = ORIGINAL_COPIES.min(MAX_ORIGINAL_COPIES / n.max(1)).max(1);
    let wanted = Prefix::new(parent, layer, &exemplars.original)?.top1(parent, layer)?;
    // Copies the parent reads as it reads their exemplar: the old concept's images that are classified
    // right. A crop that lost the object is ambiguous and flips at any change; it says nothing of breakage.
    let copies_of = augmented(exemplars, copies).original;
    let read_as = tch::no_grad(|| parent.forward(&copies_of).argmax(-1, false));
    let expected = wanted.repeat_interleave_self_int(copies as i64, 0, None);
    let consistent = read_as.eq_tensor(&expected).nonzero().squeeze_dim(1);
    let originals = copies_of.index_select(0, &consistent);
    let photo_prefix = Prefix::new(parent, layer, photos)?;
    let original_prefix = Prefix::new(parent, layer, &originals)?;
    let modified_prefix = Prefix::new(parent, layer, &exemplars.modified)?;
    let before = (photo_prefix.top1(parent, layer)?, original_prefix.top1(parent, layer)?);
    let (photo_count, original_count) = (photos.size()[0] as usize, originals.size()[0] as usize);
    let allowed = (max_changed * (photo_count + original_count) as f64 + 1e-9).floor() as usize;
    let fixed = |model: &dyn Classifier| -> Result<usize, EditError> {
        Ok(n - differences(&modified_prefix.top1(model, layer)?, &wanted))
    };
    let with_scale = |scale: f64| -> Result<(Delta, Box<dyn Classifier>), EditError> {
        let scaled = delta.scaled(scale);
        let mut model = parent.share();
        scaled.apply(model.as_mut())?;
        Ok((scaled, model))
    };
    let exemplar_fixed_unscaled = fixed(with_scale(1.0)?.1.as_ref())? == n;
    // Top-1 changes grow with the scale: a binary search for the strongest scale within the budget takes
    // 4 trials of the 10 scales. `SCALES.len()` stands for scale 0, the parent itself.
    let mut tried: Vec<Option<(Delta, GuardReport)>> = (0..=SCALES.len()).map(|_| None).collect();
    let (mut low, mut high) = (0, SCALES.len());
    let mut trials = 0;
    while low < high {
        if progress.cancelled() {
            return Err(EditError::Cancelled);
        }
        let middle = (low + high) / 2;
        let (scaled, model) = with_scale(SCALES[middle])?;
        let photos_changed = differences(&photo_prefix.top1(model.as_ref(), layer)?, &before.0);
        let originals_changed = differences(&original_prefix.top1(model.as_ref(), layer)?, &before.1);
        let exemplars_fixed = fixed(model.as_ref())?;
        trials += 1;
        progress.report(trials, 4, (photos_changed + originals_changed) as f64);
        let within = photos_changed + originals_changed <= allowed;
        let report = GuardReport {
            scale: SCALES[middle],
            max_changed,
            photos: photo_count,
            photos_changed,
            originals: original_count,
            originals_changed,
            exemplar_fixed: exemplars_fixed == n,
            exemplars_fixed,
            exemplar_fixed_unscaled,
        };
        tried[middle] = Some((scaled, report));
        if within {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    if let Some(Some(found)) = tried.get_mut(low).map(Option::take) {
        return Ok(found);
    }
    let exemplars_fixed = fixed(parent)?;
    let report = GuardReport {
        scale: 0.0,
        max_changed,
        photos: photo_count,
        photos_changed: 0,
        originals: original_count,
        originals_changed: 0,
        exemplar_fixed: exemplars_fixed == n,
        exemplars_fixed,
        exemplar_fixed_unscaled,
    };
    Ok((delta.scaled(0.0), report))
}
