//! The paper's baselines: fine-tune on the modified exemplars, labelled with their true class, by plain
//! SGD with the model in eval mode (BatchNorm frozen) and no mask. `finetune_local` trains the edited conv
//! only; `finetune_global` every conv and linear weight from it to the output.

use tch::{Kind, Tensor};

use super::{Delta, EditError, EditMetrics, EditParams, Exemplars, Method, Progress};
use crate::models::Classifier;

pub(super) fn run(
    model: &dyn Classifier,
    exemplars: &Exemplars,
    params: &EditParams,
    progress: &dyn Progress,
) -> Result<(Delta, EditMetrics), EditError> {
    let names = match params.method {
        Method::FinetuneGlobal => model.parameters_after(&params.layer)?,
        _ => vec![format!("{}.weight", params.layer)],
    };
    let labels = match &exemplars.labels {
        Some(labels) => labels.shallow_clone(),
        None => tch::no_grad(|| model.forward(&exemplars.original).argmax(-1, false)),
    };
    // Trained on a copy: the served model must not change while (or because) an edit runs.
    let trained = model.duplicate();
    let parameters: Vec<Tensor> =
        names.iter().map(|n| trained.parameter(n).map(|p| p.set_requires_grad(true))).collect::<Result<_, _>>()?;
    let loss_of = |m: &dyn Classifier| m.forward(&exemplars.modified).cross_entropy_for_logits(&labels);
    let loss_before = tch::no_grad(|| loss_of(trained.as_ref())).double_value(&[]);
    let report_every = (params.steps / 100).max(1);
    for step in 1..=params.steps {
        if progress.cancelled() {
            return Err(EditError::Cancelled);
        }
        let loss = loss_of(trained.as_ref());
        let refs: Vec<&Tensor> = parameters.iter().collect();
        let grads = Tensor::run_backward(&[&loss], &refs, false, false);
        tch::no_grad(|| {
            for (p, g) in parameters.iter().zip(&grads) {
                let _ = p.shallow_clone().f_sub_(&(g * params.lr));
            }
        });
        if step % report_every == 0 || step == params.steps {
            progress.report(step, params.steps, loss.double_value(&[]));
        }
    }
    let loss_after = tch::no_grad(|| loss_of(trained.as_ref())).double_value(&[]);
    let changes = names
        .iter()
        .zip(&parameters)
        .map(|(name, p)| Ok((name.clone(), (p.detach() - model.parameter(name)?).to_kind(Kind::Float))))
        .collect::<Result<Vec<_>, EditError>>()?;
    let metrics = EditMetrics {
        loss_before,
        loss_after,
        delta_norm: 0.0,
        steps: params.steps,
        seconds: 0.0,
        statistics: "identity",
        approximation: None,
        layers: Vec::new(),
        solves: Vec::new(),
        guard: None,
    };
    Ok((Delta::Dense { changes }, metrics))
}
