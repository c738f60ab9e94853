//! The change an edit makes: low-rank factors `(L, D)` of one conv's weight for a rewrite, dense
//! tensors for fine-tuning, or changes behind gates (a gated rewrite, one per edited conv). Stored as
//! safetensors; applied by adding to the base weights, or each gated change to its conv.

use std::collections::BTreeMap;
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
    /// For each edited conv (by name), a change where its input opens the gate.
    Gated { changes: Vec<(String, GatedChange)> },
}

const LOW_RANK_L: &str = "lowrank.L:";
const LOW_RANK_D: &str = "lowrank.D:";
const DENSE: &str = "dense:";
const GATED_CHANGE: &str = "gated.change:";
const GATED_DIRECTION: &str = "gated.direction:";
/// `[closed, open]`, float64.
const GATED_BOUNDS: &str = "gated.bounds:";
/// Between a conv's name and the number of its second, third... gated change (no layer name holds it).
const GATED_REPEAT: char = '#';

impl Delta {
    /// The change as dense tensors by parameter name.
    pub fn dense(&self) -> Vec<(String, Tensor)> {
        match self {
            Delta::LowRank { layer, l, d } => vec![(format!("{layer}.weight"), compose(l, d))],
            Delta::Dense { changes } => changes.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            Delta::Gated { changes } => {
                changes.iter().map(|(layer, c)| (format!("{layer}.weight"), c.change.shallow_clone())).collect()
            }
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
            Delta::Gated { changes } => {
                Delta::Gated { changes: changes.iter().map(|(layer, c)| (layer.clone(), c.scaled(scale))).collect() }
            }
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
            Delta::Gated { changes } => changes.iter().map(|(_, c)| bytes(&c.change) + bytes(&c.gate.direction)).sum(),
        }
    }

    /// The names of the parameters the change touches.
    pub fn parameter_names(&self) -> Vec<String> {
        match self {
            Delta::LowRank { layer, .. } => vec![format!("{layer}.weight")],
            Delta::Dense { changes } => changes.iter().map(|(n, _)| n.clone()).collect(),
            Delta::Gated { changes } => changes.iter().map(|(layer, _)| format!("{layer}.weight")).collect(),
        }
    }

    /// Adds the change to `model`'s weights (a gated one to its conv).
    pub fn apply(&self, model: &mut dyn Classifier) -> Result<(), EditError> {
        if let Delta::Gated { changes } = self {
            for (layer, change) in changes {
                let device = model.parameter(&format!("{layer}.weight"))?.device();
                model.editable_conv_mut(layer)?.add_gated(change.to_device(device))?;
            }
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
            Delta::Gated { changes } => {
                // A conv's first change under its name, any further one (several exemplars, each in turn)
                // under `{layer}#{k}`: versions stored before several changes per conv read the same.
                let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
                changes
                    .iter()
                    .flat_map(|(layer, change)| {
                        let k = seen.entry(layer.as_str()).or_default();
                        let key = if *k == 0 { layer.clone() } else { format!("{layer}{GATED_REPEAT}{k}") };
                        *k += 1;
                        [
                            (format!("{GATED_CHANGE}{key}"), change.change.shallow_clone()),
                            (format!("{GATED_DIRECTION}{key}"), change.gate.direction.shallow_clone()),
                            (
                                format!("{GATED_BOUNDS}{key}"),
                                Tensor::from_slice(&[change.gate.closed, change.gate.open]),
                            ),
                        ]
                    })
                    .collect()
            }
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
        if tensors.iter().any(|(n, _)| n.starts_with(GATED_CHANGE)) {
            return gated_from(tensors);
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
            _ => Err(invalid("unexpected tensor names")),
        }
    }

    /// The changes of several solves (one per layer or per exemplar) as one: gated changes side by side, any
    /// other kind as dense tensors; a single change as it is.
    pub fn combined(mut deltas: Vec<Delta>) -> Delta {
        if deltas.len() == 1 {
            if let Some(delta) = deltas.pop() {
                return delta;
            }
        }
        if deltas.iter().all(|d| matches!(d, Delta::Gated { .. })) {
            let changes = deltas
                .into_iter()
                .flat_map(|d| match d {
                    Delta::Gated { changes } => changes,
                    _ => Vec::new(),
                })
                .collect();
            return Delta::Gated { changes };
        }
        Delta::Dense { changes: deltas.iter().flat_map(Delta::dense).collect() }
    }

    pub fn save(&self, path: &Path) -> Result<(), EditError> {
        std::fs::write(path, self.to_safetensors()?).map_err(|e| EditError::Io(format!("{}: {e}", path.display())))
    }

    pub fn load(path: &Path) -> Result<Self, EditError> {
        let bytes = std::fs::read(path).map_err(|e| EditError::Io(format!("{}: {e}", path.display())))?;
        Self::from_safetensors(&bytes)
    }
}

/// Gated changes from their tensors: a change, a gate direction and the gate's bounds for each change.
fn gated_from(tensors: Vec<(String, Tensor)>) -> Result<Delta, EditError> {
    let invalid = |why: String| EditError::Invalid(format!("not an editserve delta: {why}"));
    let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (name, tensor) in tensors {
        let (slot, layer) = [GATED_CHANGE, GATED_DIRECTION, GATED_BOUNDS]
            .iter()
            .enumerate()
            .find_map(|(slot, prefix)| name.strip_prefix(prefix).map(|layer| (slot, layer.to_string())))
            .ok_or_else(|| invalid(format!("unexpected tensor '{name}' beside gated changes")))?;
        parts.entry(layer).or_default()[slot] = Some(tensor);
    }
    let changes = parts
        .into_iter()
        .map(|(key, [change, direction, bounds])| {
            let layer = key.split(GATED_REPEAT).next().unwrap_or_default().to_string();
            let (Some(change), Some(direction), Some(bounds)) = (change, direction, bounds) else {
                return Err(invalid(format!("the gated change of '{layer}' lacks its change, direction or bounds")));
            };
            if bounds.size() != [2] {
                return Err(invalid("a gate's bounds are two numbers".into()));
            }
            let gate = Gate { direction, closed: bounds.double_value(&[0]), open: bounds.double_value(&[1]) };
            Ok((layer, GatedChange { change, gate }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Delta::Gated { changes })
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn gated(layer: &str, channels: i64, closed: f64) -> (String, GatedChange) {
        let options = (Kind::Float, Device::Cpu);
        let change = Tensor::randn([3, channels, 1, 1], options);
        let gate = Gate { direction: Tensor::randn([channels], options), closed, open: closed + 1.0 };
        (layer.to_string(), GatedChange { change, gate })
    }

    #[test]
    fn gated_changes_of_several_convs_survive_storage() {
        let _rng = crate::edit::seeded(12);
        let delta = Delta::Gated { changes: vec![gated("_blocks.9.conv", 4, -0.5), gated("_blocks.10.conv", 6, 2.0)] };
        let Delta::Gated { changes: read } = Delta::from_safetensors(&delta.to_safetensors().unwrap()).unwrap() else {
            panic!("a gated change read back as another kind");
        };
        let Delta::Gated { changes: written } = &delta else { unreachable!() };
        assert_eq!(read.len(), 2);
        for (layer, change) in written {
            let (_, back) = read.iter().find(|(l, _)| l == layer).expect("every conv's change is read back");
            assert!(back.change.equal(&change.change) && back.gate.direction.equal(&change.gate.direction));
            assert_eq!((back.gate.closed, back.gate.open), (change.gate.closed, change.gate.open));
        }
        assert_eq!(delta.parameter_names(), ["_blocks.9.conv.weight", "_blocks.10.conv.weight"]);
    }

    #[test]
    fn several_gated_changes_of_one_conv_survive_storage() {
        let _rng = crate::edit::seeded(13);
        let delta = Delta::Gated {
            changes: vec![
                gated("_blocks.10.conv", 4, -0.5),
                gated("_blocks.11.conv", 4, 1.0),
                gated("_blocks.10.conv", 4, 2.0),
            ],
        };
        let Delta::Gated { changes: read } = Delta::from_safetensors(&delta.to_safetensors().unwrap()).unwrap() else {
            panic!("gated changes read back as another kind");
        };
        let Delta::Gated { changes: written } = &delta else { unreachable!() };
        assert_eq!(read.len(), 3);
        for (layer, change) in written {
            let back = read.iter().find(|(l, back)| l == layer && back.gate.closed == change.gate.closed);
            let (_, back) = back.expect("each change is read back under its conv's name");
            assert!(back.change.equal(&change.change) && back.gate.direction.equal(&change.gate.direction));
        }
    }

    #[test]
    fn a_gated_change_without_its_gate_is_refused() {
        let (layer, change) = gated("conv", 4, 0.0);
        let named = vec![
            (format!("{GATED_CHANGE}{layer}"), change.change.shallow_clone()),
            (format!("{GATED_DIRECTION}{layer}"), change.gate.direction.shallow_clone()),
        ];
        let bytes = to_safetensors(&named).unwrap();
        assert!(matches!(Delta::from_safetensors(&bytes), Err(EditError::Invalid(why)) if why.contains("bounds")));
    }
}
