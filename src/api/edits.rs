//! An edit as `POST /v1/models/{name}/versions` takes it (its JSON, with the limits the OpenAPI document
//! states) and answers it; the request is read into core's `EditInput`, and its JSON is what a repeated
//! idempotency key must match.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::jobs::JobView;
use super::params::VersionName;
use crate::core::jobs::{EditInput, EditSettings, EditStarted, GuardInput};
use crate::core::CoreError;
use crate::edit::{Method, Solver};
use crate::store::VersionState;

/// `POST /v1/models/{m}/versions`: everything but the exemplars has a default (a missing option is None).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    /// The version to edit, a number or an alias; the `default` alias when absent.
    pub parent: Option<VersionName>,
    /// Exemplar ids (`POST /v1/exemplars`).
    #[schema(min_items = 1, max_items = 16)]
    pub exemplars: Vec<String>,
    /// `rewrite` when absent.
    pub method: Option<Method>,
    /// When absent: `gated_least_squares` for a `rewrite`, `adam` for fine-tuning. `closed_form`,
    /// `least_squares` and `gated_least_squares` only with `rewrite`, on a 1x1 conv. `least_squares`: keys of
    /// every masked position of the exemplars and of 24 transformed copies each, one covariance-weighted solve
    /// with the originals' keys held. `gated_least_squares`: that change, tripled (as solved at the layers
    /// where the architecture measured so: EfficientNet-Lite's blocks before the last stride-16 one), applied
    /// only at positions whose keys look like the new concept (a linear gate per layer fitted against the
    /// originals' keys and the statistics' keys); several exemplars in turn, each with its own changes and
    /// gates, solved on the model the earlier exemplars' changes edit, holding the other exemplars' originals.
    pub solver: Option<Solver>,
    /// An editable layer. When neither this nor `layers` is given: for `gated_least_squares` (the default) the
    /// model's `one_exemplar_edit_layers` from one exemplar without `statistics`, its `default_edit_layers`
    /// otherwise; for the other solvers its `default_edit_layer`.
    pub layer: Option<String>,
    /// Instead of `layer`: editable layers in forward order, each solved on the model the earlier ones changed
    /// (`least_squares` or `gated_least_squares` for more than one). Given statistics are of the first layer;
    /// the others use default statistics. The version's `layer` is the first.
    #[schema(min_items = 1, max_items = 3)]
    pub layers: Option<Vec<String>>,
    /// 1 when absent; for `least_squares` the whole change unless given.
    #[schema(minimum = 1, maximum = 16)]
    pub rank: Option<usize>,
    /// Optimisation steps; a default per method.
    #[schema(minimum = 1, maximum = 100000)]
    pub steps: Option<usize>,
    /// Learning rate, positive and finite; a default per method.
    pub lr: Option<f64>,
    /// 0 when absent.
    pub seed: Option<i64>,
    /// A statistics id from a statistics job of the same model and layer. When absent: the second moment of
    /// the parent version's keys over the server's natural statistics photos (the version's
    /// `metrics.statistics_source` says which).
    pub statistics: Option<String>,
    pub guard: Option<GuardRequest>,
    #[schema(max_length = 1000)]
    pub description: Option<String>,
}

/// The breakage budget. After solving, the version keeps the strongest fraction of the change (for
/// `least_squares` first heavier statistics weights, then scales 1 down to 0.03, else 0) under which at most
/// `max_changed` of the check photos (the dataset's images, or the server's natural check photos) and at most
/// `max_changed` of the transformed copies of the exemplars' originals change their top-1, against the parent.
/// The version's `metrics.guard` records the scale, the changes counted and `exemplar_fixed`, and for an edit of
/// an edited version `photos_changed_from_base`: the check photos whose top-1 the whole chain has changed. An
/// edit that cannot fix its exemplar within the budget still ends ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardRequest {
    /// `default` (the natural check photos) or a dataset id.
    pub dataset: Option<String>,
    /// 0.02 when absent; 1 turns the guard off.
    #[schema(minimum = 0, maximum = 1)]
    pub max_changed: Option<f64>,
}

impl EditRequest {
    /// The request as JSON, whose hash a repeated idempotency key must match: the same value the request has
    /// always been hashed as (the test below pins it), so fingerprints already stored keep matching.
    pub fn fingerprint(&self) -> Result<serde_json::Value, ApiError> {
        Ok(serde_json::to_value(self).map_err(|e| CoreError::Internal(e.to_string()))?)
    }

    /// What core checks and runs; only the parent's name can be refused here (422 `invalid_argument`).
    pub fn into_input(self) -> Result<EditInput, ApiError> {
        let parent = self.parent.as_ref().map(VersionName::reference).transpose()?;
        let settings = EditSettings {
            method: self.method,
            solver: self.solver,
            rank: self.rank,
            steps: self.steps,
            lr: self.lr,
            seed: self.seed,
        };
        let guard = self.guard.map(|g| GuardInput { dataset: g.dataset, max_changed: g.max_changed });
        Ok(EditInput {
            parent,
            exemplars: self.exemplars,
            layer: self.layer,
            layers: self.layers,
            settings,
            statistics: self.statistics,
            guard,
            description: self.description,
        })
    }
}

/// Answer to an accepted edit.
#[derive(Serialize, ToSchema)]
pub struct EditAccepted {
    job: JobView,
    version: PendingVersion,
}

#[derive(Serialize, ToSchema)]
pub struct PendingVersion {
    number: u32,
    state: VersionState,
}

impl From<&EditStarted> for EditAccepted {
    fn from(started: &EditStarted) -> Self {
        let version = PendingVersion { number: started.version, state: started.version_state };
        Self { job: JobView::from(&started.job), version }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::jobs::{MAX_DESCRIPTION, MAX_EXEMPLARS, MAX_LAYERS, MAX_RANK, MAX_STEPS};

    /// The OpenAPI document (written from `EditRequest`'s attributes) states the limits validation enforces.
    #[test]
    fn the_edit_request_schema_states_the_enforced_limits() {
        let schema = serde_json::to_value(<EditRequest as utoipa::PartialSchema>::schema()).unwrap();
        let field = |name: &str, key: &str| schema["properties"][name][key].as_f64();
        assert_eq!(field("exemplars", "maxItems"), Some(MAX_EXEMPLARS as f64));
        assert_eq!(field("layers", "maxItems"), Some(MAX_LAYERS as f64));
        assert_eq!(field("rank", "maximum"), Some(MAX_RANK as f64));
        assert_eq!(field("steps", "maximum"), Some(MAX_STEPS as f64));
        assert_eq!(field("description", "maxLength"), Some(MAX_DESCRIPTION as f64));
    }

    /// An edit's idempotency fingerprint hashes the request as it serialises (keys sorted, absent options
    /// null): stored fingerprints must keep matching a retried identical request, so that text must never
    /// change.
    #[test]
    fn an_edit_request_serialises_as_its_stored_fingerprints_expect() {
        let serialised = |text: &str| {
            let request: EditRequest = serde_json::from_str(text).unwrap();
            request.fingerprint().unwrap().to_string()
        };
        assert_eq!(
            serialised(r#"{"exemplars": ["e"]}"#),
            r#"{"description":null,"exemplars":["e"],"guard":null,"layer":null,"layers":null,"lr":null,"method":null,"parent":null,"rank":null,"seed":null,"solver":null,"statistics":null,"steps":null}"#
        );
        let full = r#"{"description": "d", "guard": {"max_changed": 0.25, "dataset": "default"}, "parent": "production",
            "exemplars": ["e1", "e2"], "method": "finetune_local", "solver": "adam", "layers": ["a", "b"], "rank": 2,
            "steps": 10, "lr": 0.5, "seed": -7, "statistics": "s"}"#;
        assert_eq!(
            serialised(full),
            r#"{"description":"d","exemplars":["e1","e2"],"guard":{"dataset":"default","max_changed":0.25},"layer":null,"layers":["a","b"],"lr":0.5,"method":"finetune_local","parent":"production","rank":2,"seed":-7,"solver":"adam","statistics":"s","steps":10}"#
        );
        assert!(serialised(r#"{"exemplars": [], "parent": 3}"#).contains(r#","parent":3,"#));
    }
}
