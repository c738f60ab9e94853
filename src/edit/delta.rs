//! The change an edit makes: low-rank factors `(L, D)` of one conv's weight for a rewrite, dense
//! tensors for fine-tuning, or a change behind a gate (a gated rewrite). Stored as safetensors; applied by
//! adding to the base weights, or the gated change to its conv.

use std::path::Path;

use tch::{Kind, Tensor};

use super::tensor_io::{from_safetensors, to_safetensors};
use super::{compose, EditError};
use crate::models::layers::{Gate, GatedChange};
use crate::models::Classifier;

pub enum Delta {
    /// `dW[o, :, y, x] = L[o, :, y, x] @ D` for the conv `{layer}.weight`.
    LowRank { layer: String, l: Tensor, d: Tensor },
    /// `P += dP` for each named parameter.
    Dense { changes: Vec<(String, Tensor)> },
    /// A change to the conv `layer` where its input opens the gate.
    Gated { layer: String, change: GatedChange },
}

const LOW_RANK_L: &str = "lowrank.L:";
const LOW_RANK_D: &str = "lowrank.D:";
const DENSE: &str = "dense:";
const GATED_CHANGE: &str = "gated.change:";
const GATED_DIRECTION: &str = "gated.direction:";
/// `[closed, open]`, float64.
const GATED_BOUNDS: &str = "gated.bounds:";

impl Delta {
    /// The change as dense tensors by parameter name.
    pub fn dense(&self) -> Vec<(String, Tensor)> {
        match self {
            Delta::LowRank { layer, l, d } => vec![(format!("{layer}.weight"), compose(l, d))],
            Delta::Dense { changes } => changes.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            Delta::Gated { layer, change } => vec![(format!("{layer}.weight"), change.change.shallow_clone())],
        }
    }

    /// The same change times `scale` (what the breakage guard keeps of an edit).
    pub fn scaled(&self, scale: f64) -> Delta {
        match self {
            Delta::LowRank { layer, l, d } => {
                Delta::LowRank { layer: layer.clone(), l: l * scale, d: d.shallow_clone() }
            }
            Delta::Dense { changes } => {
                Delta::Dense { changes: changes.iter().map(|(n, t)| (n.clone(), t * scale)).collect() }
            }
            Delta::Gated { layer, change } => Delta::Gated { layer: layer.clone(), change: change.scaled(scale) },
        }
    }

    pub fn norm(&self) -> f64 {
        self.dense().iter().map(|(_, t)| t.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt()
    }

    /// Bytes of the stored factors or tensors.
    pub fn stored_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        match self {
            Delta::LowRank { l, d, .. } => bytes(l) + bytes(d),
            Delta::Dense { changes } => changes.iter().map(|(_, t)| bytes(t)).sum(),
            Delta::Gated { change, .. } => bytes(&change.change) + bytes(&change.gate.direction),
        }
    }

    /// The names of the parameters the change touches.
    pub fn parameter_names(&self) -> Vec<String> {
        match self {
            Delta::LowRank { layer, .. } | Delta::Gated { layer, .. } => vec![format!("{layer}.weight")],
            Delta::Dense { changes } => changes.iter().map(|(n, _)| n.clone()).collect(),
        }
    }

    /// Adds the change to `model`'s weights (a gated one to its conv).
    pub fn apply(&self, model: &mut dyn Classifier) -> Result<(), EditError> {
        if let Delta::Gated { layer, change } = self {
            let device = model.parameter(&format!("{layer}.weight"))?.device();
            model.editable_conv_mut(layer)?.add_gated(change.to_device(device))?;
            return Ok(());
        }
        for (name, change) in self.dense() {
            let base = model.parameter(&name)?;
            model.set_parameter(&name, &base + change.to_device(base.device()))?;
        }
        Ok(())
    }

    /// The change as a safetensors file's bytes (what the blob store keeps).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, EditError> {
        let named: Vec<(String, Tensor)> = match self {
            Delta::LowRank { layer, l, d } => {
                vec![
                    (format!("{LOW_RANK_L}{layer}"), l.shallow_clone()),
                    (format!("{LOW_RANK_D}{layer}"), d.shallow_clone()),
                ]
            }
            Delta::Dense { changes } => {
                changes.iter().map(|(n, t)| (format!("{DENSE}{n}"), t.shallow_clone())).collect()
            }
            Delta::Gated { layer, change } => vec![
                (format!("{GATED_CHANGE}{layer}"), change.change.shallow_clone()),
                (format!("{GATED_DIRECTION}{layer}"), change.gate.direction.shallow_clone()),
                (format!("{GATED_BOUNDS}{layer}"), Tensor::from_slice(&[change.gate.closed, change.gate.open])),
            ],
        };
        to_safetensors(&named)
    }

    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, EditError> {
        let invalid = |why: &str| EditError::Invalid(format!("not an editserve delta: {why}"));
        let mut tensors = from_safetensors(bytes)?;
        if tensors.iter().all(|(n, _)| n.starts_with(DENSE)) && !tensors.is_empty() {
            let changes = tensors.into_iter().map(|(n, t)| (n[DENSE.len()..].to_string(), t)).collect();
            return Ok(Delta::Dense { changes });
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        match tensors.as_slice() {
            [(d_name, d), (l_name, l)] if d_name.starts_with(LOW_RANK_D) && l_name.starts_with(LOW_RANK_L) => {
                let layer = l_name[LOW_RANK_L.len()..].to_string();
                if d_name[LOW_RANK_D.len()..] != layer {
                    return Err(invalid("its factors name different layers"));
                }
                Ok(Delta::LowRank { layer, l: l.shallow_clone(), d: d.shallow_clone() })
            }
            [(bounds_name, bounds), (change_name, change), (direction_name, direction)]
                if change_name.starts_with(GATED_CHANGE) =>
            {
                let layer = change_name[GATED_CHANGE.len()..].to_string();
                if bounds_name != &format!("{GATED_BOUNDS}{layer}")
                    || direction_name != &format!("{GATED_DIRECTION}{layer}")
                {
                    return Err(invalid("its gate names another layer"));
                }
                if bounds.size() != [2] {
                    return Err(invalid("a gate's bounds are two numbers"));
                }
                let gate = Gate {
                    direction: direction.shallow_clone(),
                    closed: bounds.double_value(&[0]),
                    open: bounds.double_value(&[1]),
                };
                Ok(Delta::Gated { layer, change: GatedChange { change: change.shallow_clone(), gate } })
            }
            _ => Err(invalid("unexpected tensor names")),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), EditError> {
        std::fs::write(path, self.to_safetensors()?).map_err(|e| EditError::Io(format!("{}: {e}", path.display())))
    }

    pub fn load(path: &Path) -> Result<Self, EditError> {
        let bytes = std::fs::read(path).map_err(|e| EditError::Io(format!("{}: {e}", path.display())))?;
        Self::from_safetensors(&bytes)
    }
}

/// A version of `base`: its changes (safetensors, oldest first) added in order to the parameters they touch,
/// every other tensor shared with `base`. Also returns the bytes of the tensors it holds beyond `base`.
/// The same lineage always gives the same weights bit for bit, on whichever thread it is materialised.
pub fn materialise(base: &dyn Classifier, lineage: &[bytes::Bytes]) -> Result<(Box<dyn Classifier>, u64), EditError> {
    let mut model = base.share();
    let mut changed = std::collections::BTreeSet::new();
    let mut resident = 0u64;
    for change in lineage {
        let delta = Delta::from_safetensors(change)?;
        delta.apply(model.as_mut())?;
        match delta {
            // A gated change leaves the weight shared with the base and holds its own tensors.
            Delta::Gated { .. } => resident += delta.stored_bytes() as u64,
            _ => changed.extend(delta.parameter_names()),
        }
    }
    for name in &changed {
        let tensor = model.parameter(name)?;
        resident += (tensor.numel() * tensor.kind().elt_size_in_bytes()) as u64;
    }
    Ok((model, resident))
}
