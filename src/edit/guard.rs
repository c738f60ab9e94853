//! The breakage budget: after an edit is solved, keep the strongest fraction of its change under which
//! few images of a check set change their top-1. The check set is natural photos plus copies of the
//! exemplars' ORIGINAL images in other arrangements: measured on the concept-shift benchmark, clean images
//! of the old concept are what an edit breaks first, while photos rarely flip. Only the copies the parent
//! classifies like their exemplar count (as the benchmark keeps only originals classified right). The
//! images are run up to the edited layer once; each scale tried only runs the rest of the network.

use serde::Serialize;
use tch::{Kind, Tensor};

use super::augment::augmented;
use super::{edit_blocks, Delta, EditError, Exemplars, Progress};
use crate::models::{Classifier, EditBlock};
use utoipa::ToSchema;

/// The share of check images whose top-1 may change, unless the request says otherwise.
pub const DEFAULT_MAX_CHANGED: f64 = 0.02;
/// Scales of the change tried, strongest first; below the last one the edit is dropped (scale 0).
const SCALES: [f64; 10] = [1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05, 0.03];
/// Transformed copies of each exemplar's original in the check set, and at most this many in all.
const ORIGINAL_COPIES: usize = 32;
const MAX_ORIGINAL_COPIES: usize = 96;
/// The binary search's trials over the most candidates a part has (the solved change, 4 weaker solutions and
/// 9 scales: 14).
const MOST_TRIALS: usize = 4;

/// What an edit's progress counts for its guard: running the check images up to the layer, then the trials
/// of each of its `parts`.
pub fn steps(parts: usize) -> usize {
    1 + parts * MOST_TRIALS
}

/// A change the guard may keep: the solved one, a weaker solution, or one of those scaled down.
pub struct Candidate {
    pub delta: Delta,
    pub scale: f64,
    /// The statistics weight of a least-squares solution.
    pub lambda: Option<f64>,
}

impl Candidate {
    pub fn solved(delta: Delta, lambda: Option<f64>) -> Self {
        Self { delta, scale: 1.0, lambda }
    }
}

/// What the guard tries, strongest first: the solved change, the weaker solutions, then the weakest one
/// scaled by each of `SCALES` below 1.
pub fn candidates(solved: Candidate, weaker: Vec<Candidate>) -> Vec<Candidate> {
    let mut all = vec![solved];
    all.extend(weaker);
    let weakest = all.last().map(|c| (c.delta.scaled(1.0), c.lambda));
    if let Some((delta, lambda)) = weakest {
        all.extend(SCALES[1..].iter().map(|&scale| Candidate { delta: delta.scaled(scale), scale, lambda }));
    }
    all
}

/// What the guard found, recorded in the version's metrics.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GuardReport {
    /// The fraction of the (weakest solved) change the version keeps (0 when none fits the budget); for an
    /// edit of several parts, the mean of `scales`.
    pub scale: f64,
    /// Each part's fraction, for an edit of several parts (one per exemplar taken in turn).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scales: Vec<f64>,
    /// The statistics weight of the least-squares solution kept (heavier than the solver's when the guard
    /// fell back on a weaker solution).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f64>,
    /// Candidates the guard ran on the check images.
    pub trials: usize,
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
        Ok(Self { blocks: edit_blocks(parent, images, layer)? })
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

/// Keeps the strongest of each part's `candidates` (strongest first; their parameters lie at or after `layer`)
/// under which the top-1 changes on `photos` (preprocessed, N x 3 x H x W) and on transformed copies of the
/// exemplars' originals each stay within `max_changed` of their count; none of a part (scale 0) when none
/// does. Parts are chosen in order, each on top of the earlier parts' choices: measured with three exemplars
/// taken in turn, one scale over all of them gave up the parts that broke nothing along with the one that did
/// (README "Three exemplars in turn").
pub fn guard(
    parent: &dyn Classifier,
    parts: Vec<Vec<Candidate>>,
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
    let total = steps(parts.len());
    progress.report(1, total, f64::NAN);
    let (photo_count, original_count) = (photos.size()[0] as usize, originals.size()[0] as usize);
    // Each part on its own budget, as the constraint a user states is two: few photos change AND the old
    // concept's clean images stay right (one budget over both let the photos' slack hide broken originals:
    // measured, README "Edit quality").
    let allowed = |count: usize| (max_changed * count as f64 + 1e-9).floor() as usize;
    let within = |photos_changed: usize, originals_changed: usize| {
        photos_changed <= allowed(photo_count) && originals_changed <= allowed(original_count)
    };
    let fixed = |model: &dyn Classifier| -> Result<usize, EditError> {
        Ok(n - differences(&modified_prefix.top1(model, layer)?, &wanted))
    };
    let applied = |base: &dyn Classifier, delta: &Delta| -> Result<Box<dyn Classifier>, EditError> {
        let mut model = base.share();
        delta.apply(model.as_mut())?;
        Ok(model)
    };
    let mut strongest = parent.share();
    for delta in parts.iter().filter_map(|candidates| candidates.first().map(|c| &c.delta)) {
        strongest = applied(strongest.as_ref(), delta)?;
    }
    let exemplar_fixed_unscaled = !parts.is_empty() && fixed(strongest.as_ref())? == n;
    // A budget that allows every change keeps each part's strongest candidate, measured once.
    let everything = allowed(photo_count) >= photo_count && allowed(original_count) >= original_count;
    let mut trials = 0;
    let mut chosen = parent.share();
    let mut kept = Vec::with_capacity(parts.len());
    let mut kept_measure = (0, 0);
    for (index, mut candidates) in parts.into_iter().enumerate() {
        // Top-1 changes grow with the candidates' strength: a binary search for the strongest within the
        // budget takes at most `MOST_TRIALS`. `candidates.len()` stands for none of the part.
        let mut measured: Vec<Option<(usize, usize)>> = vec![None; candidates.len()];
        let searched = if everything { candidates.len().min(1) } else { candidates.len() };
        let mut part_trials = 0;
        let low = first_within(searched, |middle| {
            if progress.cancelled() {
                return Err(EditError::Cancelled);
            }
            let model = applied(chosen.as_ref(), &candidates[middle].delta)?;
            let photos_changed = differences(&photo_prefix.top1(model.as_ref(), layer)?, &before.0);
            let originals_changed = differences(&original_prefix.top1(model.as_ref(), layer)?, &before.1);
            part_trials += 1;
            progress.report(1 + index * MOST_TRIALS + part_trials, total, f64::NAN);
            measured[middle] = Some((photos_changed, originals_changed));
            Ok(within(photos_changed, originals_changed))
        })?;
        trials += part_trials;
        let part = match measured.get(low).copied().flatten() {
            Some(measure) => {
                kept_measure = measure;
                candidates.swap_remove(low)
            }
            None => {
                let none = candidates.pop().ok_or_else(|| EditError::Invalid("nothing to guard".into()))?;
                Candidate { delta: none.delta.scaled(0.0), scale: 0.0, lambda: None }
            }
        };
        chosen = applied(chosen.as_ref(), &part.delta)?;
        kept.push(part);
    }
    progress.report(total, total, f64::NAN);
    let scales: Vec<f64> = kept.iter().map(|part| part.scale).collect();
    let scale = scales.iter().sum::<f64>() / scales.len().max(1) as f64;
    let lambda = if scale > 0.0 { kept.first().and_then(|part| part.lambda) } else { None };
    let exemplars_fixed = fixed(chosen.as_ref())?;
    let report = GuardReport {
        scale,
        scales: if scales.len() > 1 { scales } else { Vec::new() },
        lambda,
        trials,
        max_changed,
        photos: photo_count,
        photos_changed: kept_measure.0,
        originals: original_count,
        originals_changed: kept_measure.1,
        exemplar_fixed: exemplars_fixed == n,
        exemplars_fixed,
        exemplar_fixed_unscaled,
    };
    Ok((Delta::combined(kept.into_iter().map(|part| part.delta).collect()), report))
}

/// The first of `count` candidates for which `within` holds (`count` when none), by binary search: the
/// candidates are ordered strongest first, so that breakage only falls with the index. `within` is called
/// once per trial, at most `MOST_TRIALS` times for the candidates an edit has.
fn first_within(count: usize, mut within: impl FnMut(usize) -> Result<bool, EditError>) -> Result<usize, EditError> {
    let (mut low, mut high) = (0, count);
    while low < high {
        let middle = (low + high) / 2;
        if within(middle)? {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    Ok(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_finds_the_strongest_within_in_the_trials_progress_counts() {
        let most_candidates = 1 + super::super::least_squares::WEAKER.len() + SCALES.len() - 1;
        for candidates in 1..=most_candidates {
            // The strongest candidate within the budget may be any of them, or none.
            for strongest in 0..=candidates {
                let mut trials = 0;
                let found = first_within(candidates, |i| {
                    trials += 1;
                    Ok(i >= strongest)
                })
                .unwrap();
                assert_eq!(found, strongest);
                assert!(trials <= MOST_TRIALS, "{trials} trials over {candidates} candidates");
            }
        }
    }
}
