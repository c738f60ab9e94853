//! The `least_squares` solver: one closed-form solve over many keys instead of Adam along one direction.
//! Keys come from every masked position of the exemplars and of transformed copies of them (the concept in
//! other arrangements, made from the exemplars alone). The change `dW` minimises
//!
//!   sum_p m_p |dW k_p - r_p|^2                       the new concept's keys give the old concept's values
//!   + mu     sum_p m_p |dW o_p|^2                    the old concept's own keys keep their outputs
//!   + lambda tr(dW C dW^T)                           ordinary keys (statistics C) move as little as possible
//!
//! (MEMIT's covariance-weighted form, with the exemplars' original keys inside the solve), which is
//! `dW = (R^T M K) (K^T M K + mu O^T M O + lambda C)^-1`; then it is cut to rank r by SVD. lambda and mu are
//! relative to the trace of `K^T M K`, so they do not depend on the layer's scale.

use tch::{Kind, Tensor};

use super::augment::augmented;
use super::mask::loss_weights;
use super::rewrite::{linear_targets, per_position};
use super::statistics::SecondMoment;
use super::{Delta, EditError, EditMetrics, EditParams, Exemplars, Progress};
use crate::models::Classifier;

/// Transformed copies of each exemplar whose keys join the solve.
pub const COPIES: usize = 32;
/// Weight of the statistics penalty, relative to the new keys' trace over C's.
pub const LAMBDA: f64 = 1.0;
/// Weight of the old concept's keys, relative to the new keys'.
pub const MU: f64 = 1.0;
/// Ridge relative to the mean eigenvalue of the new keys' second moment.
const RIDGE: f64 = 1e-9;

fn both(a: &Exemplars, b: &Exemplars) -> Exemplars {
    Exemplars {
        original: Tensor::cat(&[&a.original, &b.original], 0),
        modified: Tensor::cat(&[&a.modified, &b.modified], 0),
        mask: Tensor::cat(&[&a.mask, &b.mask], 0),
        labels: None,
    }
}

/// The weighted solve of the module comment, in float64: `new`, `old` are P x C_in keys, `residual`
/// P x C_out, `weight` P x 1 (zero rows add nothing), `moment` C_in x C_in.
pub fn solve(
    new: &Tensor,
    residual: &Tensor,
    old: &Tensor,
    weight: &Tensor,
    moment: &Tensor,
    lambda: f64,
    mu: f64,
) -> Result<Tensor, EditError> {
    let a_new = (new * weight).tr().matmul(new);
    let a_old = (old * weight).tr().matmul(old);
    let scale = a_new.trace().double_value(&[]).max(f64::MIN_POSITIVE);
    let c_scale = moment.trace().double_value(&[]).max(f64::MIN_POSITIVE);
    let channels = new.size()[1];
    // Channels no key ever uses (dead after a ReLU) leave A singular; a tiny ridge gives them no change.
    let ridge = Tensor::eye(channels, (Kind::Double, new.device())) * (RIDGE * scale / channels as f64);
    let a = &a_new + a_old * mu + moment * (lambda * scale / c_scale) + ridge;
    let b = (residual * weight).tr().matmul(new);
    // dW A = B with A symmetric: A dW^T = B^T.
    Ok(Tensor::f_linalg_solve(&a, &b.tr(), true)?.tr())
}

/// The rank-r factors `(L, D)` of a C_out x C_in change: D's rows orthonormal (the top right singular
/// vectors), L = dW D^T.
pub fn truncate(dw: &Tensor, rank: usize) -> (Tensor, Tensor) {
    let (_, _, v) = dw.svd(true, true);
    let rank = (rank as i64).min(v.size()[1]);
    let d = v.narrow(1, 0, rank).tr().contiguous();
    (dw.matmul(&d.tr()), d)
}

pub(super) fn run(
    model: &dyn Classifier,
    exemplars: &Exemplars,
    params: &EditParams,
    statistics: Option<&SecondMoment>,
    progress: &dyn Progress,
) -> Result<(Delta, EditMetrics), EditError> {
    let layer = params.layer.as_str();
    let all = both(exemplars, &augmented(exemplars, COPIES));
    let _guard = tch::no_grad_guard();
    let original = model.edit_block(&all.original, layer)?;
    let values = model.block_output(layer, &original, &original.weight)?;
    let modified = model.edit_block(&all.modified, layer)?;
    let w0 = modified.weight.detach().copy();
    let value_size = values.size();
    let weights = loss_weights(&all.mask.to_device(values.device()), (value_size[2], value_size[3]));
    let targets = linear_targets(model, layer, &modified, &values, &weights, &w0)?;
    progress.report(1, 3, f64::NAN);
    let (c_out, c_in) = (w0.size()[0], w0.size()[1]);
    // Saturated outputs are few; one weight per position keeps the solve a single C_in x C_in system.
    let weight = targets.omega.mean_dim([1i64].as_slice(), true, Kind::Double);
    let residual = &targets.residual * targets.omega.gt(0.0).to_kind(Kind::Double);
    let old = per_position(&original.key);
    let moment = match statistics {
        Some(s) => s.moment.to_kind(Kind::Double).to_device(old.device()),
        None => Tensor::eye(c_in, (Kind::Double, old.device())),
    };
    let loss_of = |dw: &Tensor| ((targets.keys.matmul(&dw.tr()) - &residual).square() * &weight).sum(Kind::Double).double_value(&[]);
    let loss_before = loss_of(&Tensor::zeros([c_out, c_in], (Kind::Double, old.device())));
    let dw = solve(&targets.keys, &residual, &old, &weight, &moment, LAMBDA, MU)?;
    progress.report(2, 3, f64::NAN);
    let (l, d) = truncate(&dw, params.rank);
    let loss_after = loss_of(&l.matmul(&d));
    progress.report(3, 3, loss_after);
    let rank = d.size()[0];
    let metrics = EditMetrics {
        loss_before,
        loss_after,
        delta_norm: 0.0,
        steps: 0,
        seconds: 0.0,
        statistics: if statistics.is_some() { "second_moment" } else { "identity" },
        approximation: Some(format!(
            "{}; keys of {} positions ({} transformed copies per exemplar), lambda {LAMBDA}, mu {MU}, rank {rank}",
            targets.note,
            targets.keys.size()[0],
            COPIES
        )),
        guard: None,
    };
    let l = l.to_kind(Kind::Float).view([c_out, rank, 1, 1]);
    Ok((Delta::LowRank { layer: layer.to_string(), l, d: d.to_kind(Kind::Float) }, metrics))
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
        tch::manual_seed(5);
        let (p, c_in, c_out) = (40, 6, 4);
        let new = randn(&[p, c_in]);
        let old = randn(&[p, c_in]);
        let residual = randn(&[p, c_out]);
        let weight = Tensor::rand([p, 1], (Kind::Double, Device::Cpu));
        let a = randn(&[c_in, c_in]);
        let moment = a.matmul(&a.tr()) / c_in as f64 + Tensor::eye(c_in, (Kind::Double, Device::Cpu));
        let dw = solve(&new, &residual, &old, &weight, &moment, 0.3, 0.7).unwrap();
        // The gradient of the objective vanishes at the solution.
        let scale = (&new * &weight).tr().matmul(&new).trace().double_value(&[]) / moment.trace().double_value(&[]);
        let gradient = ((new.matmul(&dw.tr()) - &residual) * &weight).tr().matmul(&new)
            + (old.matmul(&dw.tr()) * &weight).tr().matmul(&old) * 0.7
            + dw.matmul(&moment) * (0.3 * scale);
        // (up to the ridge, 1e-9 of the keys' scale)
        assert!(gradient.abs().max().double_value(&[]) < 1e-6, "gradient {gradient}");
    }

    #[test]
    fn without_penalties_it_is_ordinary_least_squares() {
        // An exactly solvable system: residual = new dW*^T, no old keys, no penalty.
        tch::manual_seed(6);
        let new = randn(&[30, 5]);
        let truth = randn(&[3, 5]);
        let residual = new.matmul(&truth.tr());
        let zero = Tensor::zeros([30, 5], (Kind::Double, Device::Cpu));
        let weight = Tensor::ones([30, 1], (Kind::Double, Device::Cpu));
        let dw = solve(&new, &residual, &zero, &weight, &Tensor::eye(5, (Kind::Double, Device::Cpu)), 0.0, 0.0).unwrap();
        assert!((dw - truth).abs().max().double_value(&[]) < 1e-7);
    }

    #[test]
    fn old_keys_are_held_when_weighted_heavily() {
        tch::manual_seed(7);
        let new = randn(&[20, 8]);
        let old = randn(&[3, 8]);
        let residual = randn(&[20, 2]);
        let padded_old = Tensor::cat(&[old.shallow_clone(), Tensor::zeros([17, 8], (Kind::Double, Device::Cpu))], 0);
        let weight = Tensor::ones([20, 1], (Kind::Double, Device::Cpu));
        let dw = solve(&new, &residual, &padded_old, &weight, &Tensor::eye(8, (Kind::Double, Device::Cpu)), 1e-3, 1e8).unwrap();
        assert!(old.matmul(&dw.tr()).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn truncation_keeps_the_top_singular_directions() {
        tch::manual_seed(8);
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
