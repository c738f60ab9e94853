//! The requests jobs are made from and the views of jobs (serialised as they are).

use super::*;
use utoipa::ToSchema;

/// A version as a JSON request names it: a number or an alias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum VersionName {
    Number(u32),
    Alias(String),
}

impl VersionName {
    pub(crate) fn reference(&self) -> Result<VersionRef, CoreError> {
        match self {
            VersionName::Number(n) => Ok(VersionRef::Number(*n)),
            VersionName::Alias(text) => VersionRef::parse(text),
        }
    }
}

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
    /// `least_squares` for `rewrite`, `adam` for fine-tuning when absent. `closed_form` and `least_squares` only
    /// with `rewrite`, on a 1x1 conv. `least_squares`: keys of every masked position of the exemplars and of 24
    /// transformed copies each, one covariance-weighted solve with the originals' keys held.
    pub solver: Option<Solver>,
    /// An editable layer; the model's `default_edit_layer` when absent.
    pub layer: Option<String>,
    /// Instead of `layer`: editable layers in forward order, each solved on the model the earlier ones changed
    /// (`least_squares` only for more than one). Given statistics are of the first layer; the others use
    /// default statistics. The version's `layer` is the first.
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
/// `max_changed` of the transformed copies of the exemplars' originals change their top-1. The version's
/// `metrics.guard` records the scale, the changes counted and `exemplar_fixed`. An edit that cannot fix its
/// exemplar within the budget still ends ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardRequest {
    /// `default` (the natural check photos) or a dataset id.
    pub dataset: Option<String>,
    /// 0.02 when absent; 1 turns the guard off.
    #[schema(minimum = 0, maximum = 1)]
    pub max_changed: Option<f64>,
}

/// What a statistics job reads.
pub enum StatisticsImages {
    Uploaded(Vec<Bytes>),
    /// A subdirectory of the operator's statistics directory.
    Directory(String),
}

/// An accepted edit: its job (new, or the first job of a repeated idempotency key) and the version it makes.
#[derive(Debug, Clone)]
pub struct EditStarted {
    pub job: JobRecord,
    pub version: u32,
    /// Pending for a new edit; for a repeated key, the state the version has reached since.
    pub version_state: VersionState,
}
