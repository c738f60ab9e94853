//! The `least_squares` solver: one closed-form solve over many keys instead of Adam along one direction.
//! Keys come from every masked position of the exemplars and of transformed copies of them (the concept in
//! other arrangements, made from the exemplars alone). The change `dW` minimises
//!
//!   sum_p m_p |dW k_p - r_p|^2                       the new concept's keys give the old concept's values
//!   + mu     sum_p m_p |dW o_p|^2                    the old concept's own keys keep their outputs
//!   + lambda tr(dW C dW^T)                           ordinary keys (statistics C) move as little as possible
//!
//! (MEMIT's covariance-weighted form, with the exemplars' original keys inside the solve), which is
//! `dW = (R^T M K) (K^T M K + mu O^T M O + lambda C)^-1`, full rank unless a rank is asked for (then cut by
//! SVD). mu and lambda are relative to the trace of `K^T M K` over the trace of their own matrix, so they do
//! not depend on the layer's scale. The old keys in the solve are what makes this work: without them the
//! change moves the old concept with the new one (README, "Edit quality").

use serde::Serialize;
use tch::{Kind, Tensor};
use utoipa::ToSchema;

use super::augment::augmented;
use super::mask::{key_weights, loss_weights};
use super::rewrite::{linear_targets, per_position};
use super::statistics::SecondMoment;
use super::{
    edit_block, gate, Delta, EditError, EditMetrics, EditParams, Exemplars, Keep, Part, Progress, Solver, Stage,
};
use crate::models::layers::GatedChange;
use crate::models::Classifier;

/// Transformed copies of each exemplar whose keys join the solve.
pub const COPIES: usize = 24;
/// Weight of the statistics penalty, relative to the new keys' trace over C's. Measured on the
/// concept-shift benchmark (README): 0.1 fits the exemplar's own texture and corrects less than nothing,
/// 10 keeps 87-93% of clean originals, 30 to 100 keep 96-98%.
pub const LAMBDA: f64 = 30.0;
/// Weight of the old concept's keys, relative to the new keys' trace over theirs (1, 3 and 10 measured).
pub const MU: f64 = 10.0;
/// The heavier statistics weights (times `LAMBDA`) the guard tries before it scales the change down: a
/// heavier weight keeps the change off ordinary keys, where scaling shrinks it everywhere alike (measured:
/// scaling by 0.5 lost nearly all corrections, README "Edit quality").
pub(super) const WEAKER: [f64; 4] = [3.0, 10.0, 30.0, 100.0];
/// `rank` of a change kept whole: least_squares' default.
pub const FULL_RANK: usize = 0;
/// Progress steps of one layer's solve: the keys, the solve, the guard's weaker solutions.
const SOLVE_STEPS: usize = 3;
/// Ridge relative to the mean eigenvalue of the whole system.
const RIDGE: f64 = 1e-6;

fn both(a: &Exemplars, b: &Exemplars) -> Exemplars {
    Exemplars {
        original: Tensor::cat(&[&a.original, &b.original], 0),
        modified: Tensor::cat(&[&a.modified, &b.modified], 0),
        mask: Tensor::cat(&[&a.mask, &b.mask], 0),
        labels: None,
    }
}

/// The weighted problem of the module comment for one set of keys, solved for any lambda: `new`, `old` are
/// P x C_in keys, `residual` P x C_out, `weight` P x 1 (zero rows add nothing), `moment` C_in x C_in, all
/// float64.
pub struct System {
    /// `K^T M K + mu O^T M O`, and the statistics scaled to the trace of `K^T M K`.
    keys: Tensor,
    moment: Tensor,
    /// `R^T M K`.
    target: Tensor,
}

impl System {
    pub fn new(
        new: &Tensor,
        residual: &Tensor,
        weight: &Tensor,
        old: &Tensor,
        old_weight: &Tensor,
        moment: &Tensor,
        mu: f64,
    ) -> Self {
        let trace = |t: &Tensor| t.trace().double_value(&[]).max(f64::MIN_POSITIVE);
        let a_new = (new * weight).tr().matmul(new);
        let a_old = (old * old_weight).tr().matmul(old);
        let scale = trace(&a_new);
        Self {
            keys: &a_new + &a_old * (mu * scale / trace(&a_old)),
            moment: moment * (scale / trace(moment)),
            target: (residual * weight).tr().matmul(new),
        }
    }

    /// `dW` (C_out x C_in) for the statistics' weight `lambda`.
    pub fn solve(&self, lambda: f64) -> Result<Tensor, EditError> {
        let a = &self.keys + &self.moment * lambda;
        let channels = a.size()[0];
        // Channels no key ever uses (dead after a ReLU) leave A singular; a tiny ridge gives them no change.
        let ridge =
            Tensor::eye(channels, (Kind::Double, a.device())) * (RIDGE * a.trace().double_value(&[]) / channels as f64);
        // dW A = B with A symmetric: A dW^T = B^T.
        Ok(Tensor::f_linalg_solve(&(a + ridge), &self.target.tr(), true)?.tr())
    }
}

/// The rank-r factors `(L, D)` of a C_out x C_in change: D's rows orthonormal (the top right singular
/// vectors), L = dW D^T.
pub fn truncate(dw: &Tensor, rank: usize) -> (Tensor, Tensor) {
    let (_, _, v) = dw.svd(true, true);
    let rank = rank.min(v.size()[1] as usize) as i64;
    let d = v.narrow(1, 0, rank).tr().contiguous();
    (dw.matmul(&d.tr()), d)
}

/// The change at `LAMBDA`, and (when asked for) the weaker changes of heavier statistics weights for the
/// breakage guard to fall back on, weakest last.
pub(super) struct Solved {
    pub delta: Delta,
    pub metrics: EditMetrics,
    pub weaker: Vec<(f64, Delta)>,
}

/// What one solve used and reached: a layer's change for the exemplars, or, when they are taken in turn, for
/// one of them. A version's `metrics.solves` lists them in the order they were solved.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SolveReport {
    pub layer: String,
    /// The exemplar (its place in the request) this change is for, when several are taken in turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exemplar: Option<usize>,
    /// Positions whose keys the solve maps to the old concept's values: the masked positions of the exemplars
    /// and of their transformed copies.
    pub keys: usize,
    /// Positions whose outputs the solve holds (weighted by `mu`): the same positions of the exemplars'
    /// originals and of their copies, and, when the exemplars are taken in turn, the other exemplars'.
    pub held_keys: usize,
    /// Transformed copies made of each exemplar.
    pub copies_per_exemplar: usize,
    /// The change's rank.
    pub rank: usize,
    /// The statistics penalty's weight, relative to the new keys' trace over C's.
    pub lambda: f64,
    /// The held keys' weight, relative to the new keys' trace over theirs.
    pub mu: f64,
    /// The weighted mean squared error of the values at the new concept's positions, in the conv's output
    /// units, before and after the change (as solved, before any gain or guard scale).
    pub loss_before: f64,
    pub loss_after: f64,
    /// Where the change applies, for `gated_least_squares`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateReport>,
}

/// A gated change's gate (`gate::fit`) and gain.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GateReport {
    /// The score at or below which the gate is shut: the `closed_quantile` of the keys to leave alone.
    pub closed: f64,
    pub closed_quantile: f64,
    /// The score from which the gate is fully open: the median of the new concept's.
    pub open: f64,
    /// Whether the keys to leave alone include a sample of the statistics' keys (statistics computed before
    /// the sample was kept have none).
    pub statistics_sample: bool,
    /// How many times the solved change the version applies behind the gate.
    pub gain: f64,
}

/// Solves `params.layer`; `with_weaker`: also the weaker changes, which only a one-layer edit's guard tries;
/// `also_hold`: exemplars whose originals, and transformed copies of them, the change holds as it holds its own
/// exemplars' (the other exemplars of an edit that takes them in turn).
pub(super) fn run(
    model: &dyn Classifier,
    exemplars: &Exemplars,
    params: &EditParams,
    statistics: Option<&SecondMoment>,
    with_weaker: bool,
    also_hold: Option<&Exemplars>,
    progress: &dyn Progress,
) -> Result<Solved, EditError> {
    let layer = params.layer.as_str();
    let all = both(exemplars, &augmented(exemplars, COPIES));
    let _guard = tch::no_grad_guard();
    let original = edit_block(model, &all.original, layer)?;
    let values = model.block_output(layer, &original, &original.weight)?;
    let modified = edit_block(model, &all.modified, layer)?;
    let w0 = modified.weight.detach().copy();
    let value_size = values.size();
    let weights = loss_weights(&all.mask.to_device(values.device()), (value_size[2], value_size[3]));
    let targets = linear_targets(model, layer, &modified, &values, &weights, &w0)?;
    progress.report(1, SOLVE_STEPS, f64::NAN);
    let (c_out, c_in) = (w0.size()[0], w0.size()[1]);
    // Saturated outputs are few; one weight per position keeps the solve a single C_in x C_in system.
    let weight = targets.omega.mean_dim([1i64].as_slice(), true, Kind::Double);
    let residual = &targets.residual * targets.omega.gt(0.0).to_kind(Kind::Double);
    let old = per_position(&original.key);
    let moment = match statistics {
        Some(s) => s.moment.to_kind(Kind::Double).to_device(old.device()),
        None => Tensor::eye(c_in, (Kind::Double, old.device())),
    };
    // The weighted mean squared error per position, in the conv's output units.
    let total_weight = weight.sum(Kind::Double).double_value(&[]).max(f64::MIN_POSITIVE);
    let loss_of = |dw: &Tensor| {
        ((targets.keys.matmul(&dw.tr()) - &residual).square() * &weight).sum(Kind::Double).double_value(&[])
            / total_weight
    };
    let loss_before = loss_of(&Tensor::zeros([c_out, c_in], (Kind::Double, old.device())));
    // The other exemplars' originals (an edit that takes them in turn) are held as this one's are.
    let (held, held_weight) = match also_hold {
        Some(others) => {
            let others = both(others, &augmented(others, COPIES));
            let keys = per_position(&edit_block(model, &others.original, layer)?.key);
            let mask = others.mask.to_device(values.device());
            let others_weight = per_position(&loss_weights(&mask, (value_size[2], value_size[3]))).square();
            (Tensor::cat(&[&old, &keys], 0), Tensor::cat(&[&weight, &others_weight], 0))
        }
        None => (old.shallow_clone(), weight.shallow_clone()),
    };
    let system = System::new(&targets.keys, &residual, &weight, &held, &held_weight, &moment, MU);
    let rank = if params.rank == FULL_RANK { usize::MAX } else { params.rank };
    let (l, d) = truncate(&system.solve(LAMBDA)?, rank);
    progress.report(2, SOLVE_STEPS, f64::NAN);
    let loss_after = loss_of(&l.matmul(&d));
    let gate = match params.solver {
        Solver::GatedLeastSquares => {
            let key_size = modified.key.size();
            let mask = per_position(&key_weights(&all.mask.to_device(old.device()), (key_size[2], key_size[3])));
            let sample = statistics.and_then(|s| s.sample.as_ref());
            Some(gate::fit(&targets.keys, &old, &mask, sample)?)
        }
        _ => None,
    };
    let gain = gain_at(model, layer);
    let as_delta = |(l, d): (Tensor, Tensor)| match &gate {
        Some(gate) => Delta::Gated {
            changes: vec![(
                layer.to_string(),
                GatedChange {
                    change: (l.matmul(&d) * gain).to_kind(Kind::Float).view([c_out, c_in, 1, 1]),
                    gate: gate.duplicate(Tensor::shallow_clone),
                },
            )],
        },
        None => {
            let r = d.size()[0];
            Delta::LowRank {
                layer: layer.to_string(),
                l: l.to_kind(Kind::Float).view([c_out, r, 1, 1]),
                d: d.to_kind(Kind::Float),
            }
        }
    };
    let weaker = WEAKER
        .iter()
        .filter(|_| with_weaker)
        .map(|factor| Ok((LAMBDA * factor, as_delta(truncate(&system.solve(LAMBDA * factor)?, rank)))))
        .collect::<Result<Vec<_>, EditError>>()?;
    progress.report(SOLVE_STEPS, SOLVE_STEPS, loss_after);
    let count = |weights: &Tensor| weights.gt(0.0).sum(Kind::Int64).int64_value(&[]) as usize;
    let report = SolveReport {
        layer: layer.to_string(),
        exemplar: None,
        keys: count(&weight),
        held_keys: count(&held_weight),
        copies_per_exemplar: COPIES,
        rank: d.size()[0] as usize,
        lambda: LAMBDA,
        mu: MU,
        loss_before,
        loss_after,
        gate: gate.as_ref().map(|g| GateReport {
            closed: g.closed,
            closed_quantile: gate::CLOSED_QUANTILE,
            open: g.open,
            statistics_sample: statistics.is_some_and(|s| s.sample.is_some()),
            gain,
        }),
    };
    let metrics = EditMetrics {
        loss_before,
        loss_after,
        delta_norm: 0.0,
        steps: 0,
        seconds: 0.0,
        statistics: if statistics.is_some() { "second_moment" } else { "identity" },
        approximation: Some(format!("{layer}: {}", targets.note)),
        layers: Vec::new(),
        solves: vec![report],
        guard: None,
    };
    Ok(Solved { delta: as_delta((l, d)), metrics, weaker })
}

/// How much of its solved change a gated rewrite applies at `layer`: the architecture's measured gain there,
/// else `gate::GAIN`.
fn gain_at(model: &dyn Classifier, layer: &str) -> f64 {
    model.gated_gain(layer).unwrap_or(gate::GAIN)
}

/// Whether `run_layers` takes the exemplars in turn: several of them, for the gated rewrite.
pub(super) fn in_turn(params: &EditParams, exemplars: &Exemplars) -> bool {
    params.solver == Solver::GatedLeastSquares && exemplars.count() > 1
}

/// One solve per layer of `params.layers()`, each on the model the earlier solves changed, so that a later
/// layer takes up what the earlier ones left of the target (measured: two adjacent layers correct more
/// within the same breakage budget than either alone, README "Edit quality"). One change over all the
/// layers (dense, or a gated change per layer, each solved after the earlier ones at their solved strength
/// and each applied at its gain, `gain_at`); `statistics` are per layer, as for [`super::edit`]. The change
/// comes in parts, one per exemplar taken in turn (else one), each kept by `keep` before the next is solved.
///
/// The gated rewrite takes several exemplars in turn: each one's layers are solved on the model the earlier
/// exemplars' changes edit as the version will (as the guard kept them), with gates of its own, holding the
/// other exemplars' originals as its own, so that each exemplar's look of the new concept gets its gates and a
/// later exemplar takes up what the earlier ones left. Measured with three exemplars against one solve and one gate over all
/// of them (README "Three exemplars in turn"): 14.8 against 6.9% of the errors corrected on road->snow, 40.9
/// against 33.8% on grass->sand, within the breakage constraint, each part kept by the guard before the next
/// is solved (30.2% on grass->sand under one guard scale over the whole); without the held originals the guard
/// vetoed the change where it flipped another exemplar's original. The statistics stay the parent's.
pub(super) fn run_layers(
    model: &dyn Classifier,
    exemplars: &Exemplars,
    params: &EditParams,
    statistics: &[&SecondMoment],
    keep: &mut dyn Keep,
    progress: &dyn Progress,
) -> Result<(Delta, EditMetrics), EditError> {
    let in_turn = in_turn(params, exemplars);
    let groups = if in_turn {
        (0..exemplars.count()).map(|i| exemplars.one(i)).collect()
    } else {
        vec![exemplars.shallow_clone()]
    };
    // The parent with the parts as kept so far: what the next exemplar is solved on.
    let mut kept_model = model.share();
    let mut parts = Vec::new();
    let mut combined: Option<EditMetrics> = None;
    let layer_count = params.layers().count();
    // Each part's steps (its solves, then keeping it) after the earlier parts', so that progress only moves forward.
    let part_steps: Vec<usize> = (0..groups.len()).map(|g| layer_count * SOLVE_STEPS + keep.steps(g)).collect();
    let total: usize = part_steps.iter().sum();
    for (g, group) in groups.iter().enumerate() {
        let others = in_turn.then(|| exemplars.except(g));
        let start: usize = part_steps[..g].iter().sum();
        let mut edited = kept_model.share();
        let mut changes = Vec::new();
        for (i, layer) in params.layers().enumerate() {
            let at = EditParams { layer: layer.to_string(), following_layers: Vec::new(), ..params.clone() };
            let before = start + i * SOLVE_STEPS;
            let stage = Stage::new(progress, before, total - before - SOLVE_STEPS);
            let solved = run(edited.as_ref(), group, &at, statistics.get(i).copied(), false, others.as_ref(), &stage)?;
            // The next layer is solved on this one's change at its solved strength.
            let gated = matches!(solved.delta, Delta::Gated { .. });
            solved
                .delta
                .scaled(if gated { 1.0 / gain_at(edited.as_ref(), layer) } else { 1.0 })
                .apply(edited.as_mut())?;
            changes.push(solved.delta);
            let mut metrics = solved.metrics;
            if in_turn {
                metrics.solves.iter_mut().for_each(|s| s.exemplar = Some(g));
            }
            // Each layer's error is in its own units: the first solve's stands for the edit, all are in `solves`.
            combined = Some(match combined {
                None => metrics,
                Some(mut earlier) => {
                    earlier.solves.append(&mut metrics.solves);
                    // Each layer's note once, however many exemplars were solved there.
                    let note = metrics.approximation.unwrap_or_default();
                    let notes = earlier.approximation.get_or_insert_with(String::new);
                    if !notes.contains(note.as_str()) {
                        notes.push_str("; ");
                        notes.push_str(&note);
                    }
                    earlier
                }
            });
        }
        let before = start + layer_count * SOLVE_STEPS;
        let keeping = Stage::new(progress, before, total - before - keep.steps(g));
        let part = Part { delta: Delta::combined(changes), lambda: Some(LAMBDA), weaker: Vec::new() };
        let kept = keep.keep(part, &keeping)?;
        kept.apply(kept_model.as_mut())?;
        parts.push(kept);
    }
    let metrics = combined.ok_or_else(|| EditError::Invalid("an edit needs a layer".into()))?;
    Ok((Delta::combined(without_dropped(parts)), metrics))
}

/// The parts that change anything: one the guard dropped (scale 0) would still cost its gated convs at every
/// inference once stored. When the guard dropped them all, the first stands for the edit (a version that
/// changes nothing, as the guard decided, with the layers it was made at).
fn without_dropped(parts: Vec<Delta>) -> Vec<Delta> {
    let (kept, dropped): (Vec<Delta>, Vec<Delta>) = parts.into_iter().partition(|part| part.norm() > 0.0);
    if kept.is_empty() {
        dropped.into_iter().take(1).collect()
    } else {
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Double, Device::Cpu))
    }

    #[test]
    fn solves_the_weighted_problem() {
        let _rng = crate::edit::seeded(5);
        let (p, c_in, c_out) = (40, 6, 4);
        let new = randn(&[p, c_in]);
        let old = randn(&[p, c_in]);
        let residual = randn(&[p, c_out]);
        let weight = Tensor::rand([p, 1], (Kind::Double, Device::Cpu));
        let a = randn(&[c_in, c_in]);
        let moment = a.matmul(&a.tr()) / c_in as f64 + Tensor::eye(c_in, (Kind::Double, Device::Cpu));
        let dw = System::new(&new, &residual, &weight, &old, &weight, &moment, 0.7).solve(0.3).unwrap();
        // The gradient of the objective vanishes at the solution (up to the ridge, 1e-6 of the system).
        let a_new = (&new * &weight).tr().matmul(&new);
        let a_old = (&old * &weight).tr().matmul(&old);
        let to_new = |t: &Tensor| a_new.trace().double_value(&[]) / t.trace().double_value(&[]);
        let target = (&residual * &weight).tr().matmul(&new);
        let gradient = dw.matmul(&a_new) - &target
            + dw.matmul(&a_old) * (0.7 * to_new(&a_old))
            + dw.matmul(&moment) * (0.3 * to_new(&moment));
        let size = target.abs().max().double_value(&[]);
        assert!(gradient.abs().max().double_value(&[]) < 1e-4 * size, "gradient {gradient}");
    }

    #[test]
    fn without_penalties_it_is_ordinary_least_squares() {
        // An exactly solvable system: residual = new dW*^T, no old keys, no penalty.
        let _rng = crate::edit::seeded(6);
        let new = randn(&[30, 5]);
        let truth = randn(&[3, 5]);
        let residual = new.matmul(&truth.tr());
        let zero = Tensor::zeros([30, 5], (Kind::Double, Device::Cpu));
        let weight = Tensor::ones([30, 1], (Kind::Double, Device::Cpu));
        let dw =
            System::new(&new, &residual, &weight, &zero, &weight, &Tensor::eye(5, (Kind::Double, Device::Cpu)), 0.0)
                .solve(0.0)
                .unwrap();
        assert!((dw - &truth).abs().max().double_value(&[]) < 1e-4 * truth.abs().max().double_value(&[]));
    }

    #[test]
    fn old_keys_are_held_when_weighted_heavily() {
        // Old keys of their own number and weights (another exemplar's originals beside this one's).
        let _rng = crate::edit::seeded(7);
        let new = randn(&[20, 8]);
        let old = randn(&[3, 8]);
        let residual = randn(&[20, 2]);
        let weight = Tensor::ones([20, 1], (Kind::Double, Device::Cpu));
        let old_weight = Tensor::rand([3, 1], (Kind::Double, Device::Cpu)) + 0.5;
        let identity = Tensor::eye(8, (Kind::Double, Device::Cpu));
        let dw = System::new(&new, &residual, &weight, &old, &old_weight, &identity, 1e8).solve(1e-3).unwrap();
        assert!(old.matmul(&dw.tr()).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn parts_the_guard_dropped_are_not_stored() {
        let _rng = crate::edit::seeded(9);
        let part = |layer: &str| {
            let gate = crate::models::layers::Gate {
                direction: Tensor::randn([4], (Kind::Float, Device::Cpu)),
                closed: 0.0,
                open: 1.0,
            };
            let change = Tensor::randn([2, 4, 1, 1], (Kind::Float, Device::Cpu));
            Delta::Gated { changes: vec![(layer.to_string(), GatedChange { change, gate })] }
        };
        let names = |parts: &[Delta]| parts.iter().flat_map(Delta::parameter_names).collect::<Vec<_>>();
        let (first, second, third) = (part("a"), part("b"), part("c"));
        let kept = without_dropped(vec![first.scaled(1.0), second.scaled(0.0), third.scaled(0.5)]);
        assert_eq!(names(&kept), ["a.weight", "c.weight"]);
        // All dropped: the first stays, changing nothing.
        let kept = without_dropped(vec![first.scaled(0.0), third.scaled(0.0)]);
        assert_eq!(names(&kept), ["a.weight"]);
        assert_eq!(kept[0].norm(), 0.0);
    }

    #[test]
    fn truncation_keeps_the_top_singular_directions() {
        let _rng = crate::edit::seeded(8);
        let u = Tensor::linalg_qr(&randn(&[6, 6]), "reduced").0;
        let v = Tensor::linalg_qr(&randn(&[9, 6]), "reduced").0;
        let s = Tensor::from_slice(&[5.0f64, 3.0, 1.0, 0.5, 0.1, 0.01]);
        let dw = (&u * s.unsqueeze(0)).matmul(&v.tr());
        let (l, d) = truncate(&dw, 2);
        assert_eq!((l.size(), d.size()), (vec![6, 2], vec![2, 9]));
        assert!((d.matmul(&d.tr()) - Tensor::eye(2, (Kind::Double, Device::Cpu))).abs().max().double_value(&[]) < 1e-9);
        let best = (u.narrow(1, 0, 2) * s.narrow(0, 0, 2).unsqueeze(0)).matmul(&v.narrow(1, 0, 2).tr());
        assert!((l.matmul(&d) - best).abs().max().double_value(&[]) < 1e-9);
    }
}
