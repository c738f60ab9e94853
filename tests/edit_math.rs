//! On a linear toy problem (the block is a bare 1x1 conv, so the rewrite is a linear regression) whose
//! optimum is exact, the closed form and a long Adam run must reach the same weights.

use editserve::edit::{edit, EditParams, Exemplars, Method, Silent, Solver};
use editserve::models::{Activation, Classifier, EditBlock, EditableLayer, LinearForm, ModelError, TensorCopy};
use tch::{Device, Kind, Tensor};

const C: i64 = 8;

/// Input = keys (N x C x H x W); block = 1x1 conv; logits = spatial mean of the block output.
struct LinearToy {
    weight: Tensor,
}

impl Classifier for LinearToy {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1).mean_dim(
            [2i64, 3].as_slice(),
            false,
            Kind::Float,
        )
    }
    fn num_classes(&self) -> i64 {
        C
    }
    fn editable_layers(&self) -> Vec<EditableLayer> {
        vec![EditableLayer { name: "conv".into(), weight_shape: self.weight.size(), has_skip: false }]
    }
    fn default_edit_layer(&self) -> &str {
        "conv"
    }
    fn edit_block(&self, x: &Tensor, _: &str) -> Result<EditBlock, ModelError> {
        Ok(EditBlock { key: x.shallow_clone(), skip: None, weight: self.weight.shallow_clone() })
    }
    fn block_output(&self, _: &str, block: &EditBlock, weight: &Tensor) -> Result<Tensor, ModelError> {
        Ok(block.key.conv2d(weight, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1))
    }
    fn forward_from(&self, _: &str, value: &Tensor) -> Result<Tensor, ModelError> {
        Ok(value.mean_dim([2i64, 3].as_slice(), false, Kind::Float))
    }
    fn linear_form(&self, _: &str) -> Result<Option<LinearForm>, ModelError> {
        let ones = Tensor::ones([C], (Kind::Float, Device::Cpu));
        Ok(Some(LinearForm { scale: ones.shallow_clone(), shift: ones.zeros_like(), activation: Activation::Identity }))
    }
    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        vec![("conv.weight".into(), &mut self.weight)]
    }
    fn clone_with(&self, copy: TensorCopy) -> Box<dyn Classifier> {
        Box::new(LinearToy { weight: copy(&self.weight) })
    }
}

#[test]
fn closed_form_and_long_adam_reach_the_same_optimum() {
    tch::manual_seed(5);
    let opts = (Kind::Float, Device::Cpu);
    let w0 = Tensor::randn([C, C], opts) + Tensor::eye(C, opts) * 3.0;
    let w_star = &w0 + Tensor::randn([C, C], opts) * 0.3;
    // Modified keys at 16 positions; original keys chosen so that the target values are exactly W* k.
    let modified = Tensor::randn([1, C, 4, 4], opts);
    let flat = modified.view([C, 16]);
    let original = w0.inverse().matmul(&w_star.matmul(&flat)).view([1, C, 4, 4]);
    let model = LinearToy { weight: w0.view([C, C, 1, 1]) };
    let exemplars = Exemplars { original, modified, mask: Tensor::ones([1, 1, 4, 4], opts), labels: None };

    let mut closed = EditParams::new(Method::Rewrite, Solver::ClosedForm, "conv");
    closed.rank = C as usize;
    let mut adam = EditParams::new(Method::Rewrite, Solver::Adam, "conv");
    adam.rank = C as usize;
    adam.steps = 6000;
    adam.lr = 1e-3;
    let weights = |params: &EditParams| {
        let result = edit(&model, &exemplars, params, &[], None, &Silent).unwrap();
        let dense = result.delta.dense();
        (&w0 + dense[0].1.view([C, C]), result.metrics.loss_after)
    };
    let (w_closed, loss_closed) = weights(&closed);
    let (w_adam, loss_adam) = weights(&adam);
    let scale = w_star.abs().max().double_value(&[]);
    let closed_error = (&w_closed - &w_star).abs().max().double_value(&[]) / scale;
    let adam_error = (&w_adam - &w_star).abs().max().double_value(&[]) / scale;
    println!("relative error to the optimum: closed form {closed_error:.2e} (loss {loss_closed:.2e}), adam {adam_error:.2e} (loss {loss_adam:.2e})");
    assert!(closed_error < 1e-4, "closed form is not at the optimum: {closed_error}");
    assert!(adam_error < 1e-2, "adam did not reach the optimum: {adam_error}");
    assert!((&w_closed - &w_adam).abs().max().double_value(&[]) / scale < 1e-2);
}

struct CancelAfter(std::cell::Cell<usize>);

impl editserve::edit::Progress for CancelAfter {
    fn report(&self, _: usize, _: usize, _: f64) {
        self.0.set(self.0.get().saturating_sub(1));
    }
    fn cancelled(&self) -> bool {
        self.0.get() == 0
    }
}

#[test]
fn an_edit_reports_progress_and_stops_when_cancelled() {
    let opts = (Kind::Float, Device::Cpu);
    let model = LinearToy { weight: Tensor::eye(C, opts).view([C, C, 1, 1]) };
    let exemplars = Exemplars {
        original: Tensor::randn([1, C, 4, 4], opts),
        modified: Tensor::randn([1, C, 4, 4], opts),
        mask: Tensor::ones([1, 1, 4, 4], opts),
        labels: None,
    };
    let mut params = EditParams::new(Method::Rewrite, Solver::Adam, "conv");
    params.steps = 10_000;
    let progress = CancelAfter(std::cell::Cell::new(3));
    let started = std::time::Instant::now();
    let outcome = edit(&model, &exemplars, &params, &[], None, &progress);
    assert!(matches!(outcome, Err(editserve::edit::EditError::Cancelled)));
    // Three reports at one per 100 steps: stopped after about 300 of the 10,000 steps.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(
        edit(&model, &exemplars, &EditParams::new(Method::Rewrite, Solver::Adam, "nope"), &[], None, &Silent).is_err()
    );
}
