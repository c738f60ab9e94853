//! The rewrite: directions D from the whitened masked keys, then the weight change `dW = L D` that maps
//! the modified exemplars' keys to the original exemplars' block outputs, by Adam on the masked L1 loss
//! (the authors' solver) or in closed form.

use tch::{Device, Kind, Tensor};

use super::mask::{key_weights, loss_weights};
use super::{Delta, EditError, EditMetrics, EditParams, Exemplars, Progress, Solver};
use crate::models::{Activation, Classifier, EditBlock, ModelError};

const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
const ADAM_EPS: f64 = 1e-8;
/// As the authors: project the weight back onto the subspace every this many steps, and at the end.
const PROJECT_EVERY: usize = 10;
/// Progress reports per edit (each costs a device synchronisation).
const REPORTS: usize = 100;

/// `L` of `dW = L D`: the coefficients of every input-channel vector `dW[o, :, y, x]` along D's rows
/// (which are orthonormal). Shapes: dW C_out x C_in x kh x kw, D r x C_in, L C_out x r x kh x kw.
fn coefficients(dw: &Tensor, d: &Tensor) -> Tensor {
    dw.permute([0, 2, 3, 1]).matmul(&d.tr()).permute([0, 3, 1, 2])
}

/// `dW = L D`, tap by tap.
pub fn compose(l: &Tensor, d: &Tensor) -> Tensor {
    l.permute([0, 2, 3, 1]).matmul(d).permute([0, 3, 1, 2]).contiguous()
}

/// The projection of every input-channel vector of `dw` onto span(D).
pub fn project(dw: &Tensor, d: &Tensor) -> Tensor {
    compose(&coefficients(dw, d), d)
}

/// Rank-`rank` directions (rows orthonormal, r x C_in, float32) from the masked keys: the top right
/// singular vectors of the whitened, weighted keys, mapped back by the whitening (`D = (Z U)^T`), then
/// orthonormalised, each signed to agree with the weighted sum of the keys.
pub fn directions(
    keys: &Tensor,
    weights: &Tensor,
    whitening: Option<&Tensor>,
    rank: usize,
) -> Result<Tensor, EditError> {
    let channels = keys.size()[1];
    let flat = keys.permute([0, 2, 3, 1]).reshape([-1, channels]).to_kind(Kind::Double).to_device(Device::Cpu);
    let w = weights.reshape([-1]).to_kind(Kind::Double).to_device(Device::Cpu);
    let selected = w.gt(0.0).nonzero().squeeze_dim(1);
    let positions = selected.size()[0];
    if positions == 0 {
        return Err(EditError::Invalid("the concept mask covers no position at the edited layer".into()));
    }
    let keys = flat.index_select(0, &selected);
    let w = w.index_select(0, &selected).unsqueeze(1);
    let z = match whitening {
        Some(zm) => keys.matmul(&zm.to_kind(Kind::Double).to_device(Device::Cpu)),
        None => keys.shallow_clone(),
    } * &w;
    let available = positions.min(channels) as usize;
    if rank == 0 || rank > available {
        return Err(EditError::Invalid(format!(
            "rank must be between 1 and {available} (masked positions and channels at this layer), got {rank}"
        )));
    }
    // The top right singular vectors of z: eigenvectors of z^T z (ascending), last first.
    let (_, vectors) = z.tr().matmul(&z).linalg_eigh("L");
    let u = vectors.narrow(1, channels - rank as i64, rank as i64).flip([1]).tr();
    let d = match whitening {
        Some(zm) => u.matmul(&zm.to_kind(Kind::Double).to_device(Device::Cpu)),
        None => u,
    };
    let (q, _) = Tensor::linalg_qr(&d.tr(), "reduced");
    let d = q.tr();
    let summed = (&keys * &w).sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
    let signs = d.matmul(&summed).sign().clamp_min(0.0) * 2.0 - 1.0;
    Ok((d * signs.unsqueeze(1)).to_kind(Kind::Float).to_device(weights.device()))
}

/// The masked L1 loss between the block's output under `weight` and the target values, per exemplar.
struct Objective<'a> {
    model: &'a dyn Classifier,
    layer: &'a str,
    modified: EditBlock,
    target: Tensor,
    weights: Tensor,
    count: f64,
}

impl Objective<'_> {
    fn loss(&self, weight: &Tensor) -> Result<Tensor, EditError> {
        let output = self.model.block_output(self.layer, &self.modified, weight)?;
        Ok((&self.weights * output - &self.target).abs().mean(Kind::Float) / self.count)
    }
}

pub(super) fn run(
    model: &dyn Classifier,
    exemplars: &Exemplars,
    params: &EditParams,
    whitening: Option<&Tensor>,
    progress: &dyn Progress,
) -> Result<(Delta, EditMetrics), EditError> {
    let layer = params.layer.as_str();
    let (modified, values, w0) = tch::no_grad(|| -> Result<_, EditError> {
        let original = model.edit_block(&exemplars.original, layer)?;
        let values = model.block_output(layer, &original, &original.weight)?;
        let modified = model.edit_block(&exemplars.modified, layer)?;
        let w0 = modified.weight.detach().copy();
        Ok((modified, values, w0))
    })?;
    let key_size = modified.key.size();
    let value_size = values.size();
    let mask = exemplars.mask.to_device(values.device());
    let key_mask = key_weights(&mask, (key_size[2], key_size[3]));
    let d = directions(&modified.key, &key_mask, whitening, params.rank)?;
    let weights = loss_weights(&mask, (value_size[2], value_size[3]));
    let objective = Objective {
        model,
        layer,
        target: &weights * &values,
        weights,
        modified,
        count: exemplars.original.size()[0] as f64,
    };
    let loss_before = tch::no_grad(|| objective.loss(&w0))?.double_value(&[]);
    let (dw, steps, approximation) = match params.solver {
        Solver::Adam => (adam(&objective, &w0, &d, params, progress)?, params.steps, None),
        Solver::ClosedForm | Solver::LeastSquares | Solver::GatedLeastSquares => {
            let (dw, note) = closed_form(model, layer, &objective, &values, &w0, &d)?;
            progress.report(1, 1, 0.0);
            (dw, 0, Some(note))
        }
    };
    let l = coefficients(&dw, &d);
    let loss_after = tch::no_grad(|| objective.loss(&(&w0 + compose(&l, &d))))?.double_value(&[]);
    let metrics = EditMetrics {
        loss_before,
        loss_after,
        delta_norm: 0.0,
        steps,
        seconds: 0.0,
        statistics: if whitening.is_some() { "second_moment" } else { "identity" },
        approximation,
        layers: Vec::new(),
        solves: Vec::new(),
        guard: None,
    };
    Ok((Delta::LowRank { layer: layer.to_string(), l, d }, metrics))
}

fn adam(
    objective: &Objective,
    w0: &Tensor,
    d: &Tensor,
    params: &EditParams,
    progress: &dyn Progress,
) -> Result<Tensor, EditError> {
    let w = w0.copy().set_requires_grad(true);
    let mut first = w0.zeros_like();
    let mut second = w0.zeros_like();
    let report_every = (params.steps / REPORTS).max(1);
    for step in 1..=params.steps {
        if progress.cancelled() {
            return Err(EditError::Cancelled);
        }
        let loss = objective.loss(&w)?;
        let grad = Tensor::run_backward(&[&loss], &[&w], false, false).remove(0);
        tch::no_grad(|| {
            first = &first * ADAM_BETAS.0 + &grad * (1.0 - ADAM_BETAS.0);
            second = &second * ADAM_BETAS.1 + grad.square() * (1.0 - ADAM_BETAS.1);
            let first_hat = &first / (1.0 - ADAM_BETAS.0.powi(step as i32));
            let second_hat = &second / (1.0 - ADAM_BETAS.1.powi(step as i32));
            let mut w = w.shallow_clone();
            let _ = w.f_sub_(&(first_hat / (second_hat.sqrt() + ADAM_EPS) * params.lr));
            if step % PROJECT_EVERY == 0 || step == params.steps {
                let projected = w0 + project(&(&w - w0), d);
                w.copy_(&projected);
            }
        });
        if step % report_every == 0 || step == params.steps {
            progress.report(step, params.steps, loss.double_value(&[]));
        }
    }
    Ok(tch::no_grad(|| project(&(&w - w0), d)))
}

/// The block linearised around the edit, per key position p (rows, float64): the key `k_p`, the change of
/// the conv's output `r_p` that makes the block output equal the target value (the block is inverted
/// through its per-channel affine map; for ReLU and ReLU6 only where the target lies strictly inside the
/// linear range), and the weight `omega[p, o]` of each output: the squared loss weight, 0 where saturated.
pub(super) struct LinearTargets {
    pub keys: Tensor,
    pub residual: Tensor,
    pub omega: Tensor,
    pub note: String,
}

/// Each position's channel vector as a row (float64).
pub(super) fn per_position(t: &Tensor) -> Tensor {
    let channels = t.size()[1];
    t.permute([0, 2, 3, 1]).reshape([-1, channels]).to_kind(Kind::Double)
}

/// The linearised targets of a 1x1 conv with stride 1 whose block has a closed form; `block` holds the keys
/// (and skip input) the change must act on, `values` the block outputs they must give, `weights` the loss
/// weights at the value resolution.
pub(super) fn linear_targets(
    model: &dyn Classifier,
    layer: &str,
    block: &EditBlock,
    values: &Tensor,
    weights: &Tensor,
    w0: &Tensor,
) -> Result<LinearTargets, EditError> {
    let shape = w0.size();
    if shape[2] != 1 || shape[3] != 1 || block.key.size()[2..] != values.size()[2..] {
        return Err(EditError::Unsupported(format!(
            "closed-form solvers support 1x1 convs with stride 1; '{layer}' is {}x{}: use the adam solver",
            shape[2], shape[3]
        )));
    }
    let form = model.linear_form(layer)?.ok_or_else(|| {
        EditError::Unsupported(format!("the block of '{layer}' has no closed form: use the adam solver"))
    })?;
    let _guard = tch::no_grad_guard();
    let (c_out, c_in) = (shape[0], shape[1]);
    let k = per_position(&block.key);
    let v = per_position(values);
    let scale = form.scale.to_kind(Kind::Double).view([1, -1]);
    let shift = form.shift.to_kind(Kind::Double).view([1, -1]);
    let skip = match &block.skip {
        Some(s) => per_position(s),
        None => v.zeros_like(),
    };
    let pre_target = (&v - &shift - &skip) / &scale;
    // The conv's output before the change: its weight's, and what the gated changes of earlier edits at this
    // layer add (without them a change on top of a gated version would be solved for the wrong residual).
    let mut base = k.matmul(&w0.view([c_out, c_in]).to_kind(Kind::Double).tr());
    if let Some(gated) = gated_output(model, layer, &block.key)? {
        base += per_position(&gated);
    }
    let residual = pre_target - base;
    let m2 = per_position(weights).square();
    let (valid, note) = match form.activation {
        Activation::Identity => {
            (v.ones_like(), "exact for the masked squared error (the block is affine in W)".to_string())
        }
        Activation::Relu => (
            v.gt(0.0).to_kind(Kind::Double),
            "saturated outputs (0) were left out; the rest is solved for the masked squared error".into(),
        ),
        Activation::Relu6 => (
            (v.gt(0.0).logical_and(&v.lt(6.0))).to_kind(Kind::Double),
            "saturated outputs (0 or 6) were left out; the rest is solved for the masked squared error".into(),
        ),
    };
    Ok(LinearTargets { keys: k, residual, omega: valid * m2, note })
}

/// What the gated changes of earlier edits add to `layer`'s conv output at `key`; None where there are none or
/// the architecture takes none.
fn gated_output(model: &dyn Classifier, layer: &str, key: &Tensor) -> Result<Option<Tensor>, EditError> {
    // The conv is lent mutably only; a copy sharing every tensor lends it for reading.
    let mut shared = model.share();
    match shared.editable_conv_mut(layer) {
        Ok(conv) => Ok(conv.gated_output(key)),
        Err(ModelError::NoGatedChanges(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Least squares in the r-dimensional subspace: for each output channel o, the coefficients `L_o` that
/// minimise `sum_p omega[p, o] (L_o . (D k_p) - r_po)^2`.
fn closed_form(
    model: &dyn Classifier,
    layer: &str,
    objective: &Objective,
    values: &Tensor,
    w0: &Tensor,
    d: &Tensor,
) -> Result<(Tensor, String), EditError> {
    let targets = linear_targets(model, layer, &objective.modified, values, &objective.weights, w0)?;
    let _guard = tch::no_grad_guard();
    let c_out = w0.size()[0];
    let LinearTargets { keys: k, residual, omega, note } = targets;
    let c = k.matmul(&d.to_kind(Kind::Double).tr());
    let r = d.size()[0];
    // G[o] = sum_p omega[p, o] c_p c_p^T,  h[o] = sum_p omega[p, o] residual[p, o] c_p
    let outer = c.unsqueeze(2) * c.unsqueeze(1);
    let g = omega.tr().matmul(&outer.reshape([-1, r * r])).view([c_out, r, r]);
    let h = (&omega * &residual).tr().matmul(&c);
    let trace = g.diagonal(0, 1, 2).sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
    let ridge = (trace / r as f64 * 1e-6 + 1e-12).view([c_out, 1, 1]) * Tensor::eye(r, (Kind::Double, g.device()));
    let l = Tensor::linalg_solve(&(g + ridge), &h.unsqueeze(2), true).squeeze_dim(2);
    let dw = compose(&l.to_kind(Kind::Float).view([c_out, r, 1, 1]), d);
    Ok((dw, format!("{note}; adam minimises the masked L1 error instead")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_lie_in_the_span_for_every_tap() {
        let _rng = crate::edit::seeded(0);
        let d = directions(
            &Tensor::randn([2, 16, 5, 5], (Kind::Float, Device::Cpu)),
            &Tensor::ones([2, 1, 5, 5], (Kind::Float, Device::Cpu)),
            None,
            3,
        )
        .unwrap();
        assert_eq!(d.size(), vec![3, 16]);
        let gram = d.matmul(&d.tr());
        assert!((gram - Tensor::eye(3, (Kind::Float, Device::Cpu))).abs().max().double_value(&[]) < 1e-5);
        let dw = Tensor::randn([8, 16, 3, 3], (Kind::Float, Device::Cpu));
        let projected = project(&dw, &d);
        // Projecting twice changes nothing, and what is left out is orthogonal to D for every tap.
        assert!((project(&projected, &d) - &projected).abs().max().double_value(&[]) < 1e-5);
        let rest = (&dw - &projected).permute([0, 2, 3, 1]).matmul(&d.tr());
        assert!(rest.abs().max().double_value(&[]) < 1e-4);
        // Each tap's 8 x 16 matrix has rank at most 3.
        for tap in 0..9 {
            let m = projected.permute([2, 3, 0, 1]).reshape([9, 8, 16]).get(tap);
            let (_, s, _) = m.svd(true, false);
            assert!(s.get(3).double_value(&[]) < 1e-4 * s.get(0).double_value(&[]));
        }
    }

    #[test]
    fn rank_one_direction_is_along_the_whitened_key() {
        let key = Tensor::from_slice(&[1.0f32, 2.0, -1.0, 0.5]).view([1, 4, 1, 1]);
        let c =
            Tensor::from_slice(&[2.0f64, 0.3, 0.0, 0.1, 0.3, 1.0, 0.2, 0.0, 0.0, 0.2, 3.0, 0.4, 0.1, 0.0, 0.4, 1.5])
                .view([4, 4]);
        let z = super::super::statistics::whitening(&c);
        let d = directions(&key, &Tensor::ones([1, 1, 1, 1], (Kind::Float, Device::Cpu)), Some(&z), 1).unwrap();
        let expected = c.inverse().matmul(&key.view([4, 1]).to_kind(Kind::Double)).view([1, 4]);
        let expected = &expected / expected.norm();
        let cosine = d.to_kind(Kind::Double).matmul(&expected.tr()).double_value(&[0, 0]);
        assert!((cosine - 1.0).abs() < 1e-5, "cosine {cosine}");
    }
}
