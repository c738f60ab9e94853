//! What callers give to make jobs (an edit as asked for, before `plan` checks it and fills in its defaults;
//! the images of a statistics job) and what starting an edit answers.

use super::*;

/// An edit as a caller asks for it. Every option is None when not given; `Jobs::plan` refuses what cannot
/// run and fills in the rest.
#[derive(Debug, Clone, Default)]
pub struct EditInput {
    /// The version to edit; the `default` alias when None.
    pub parent: Option<VersionRef>,
    /// Exemplar ids.
    pub exemplars: Vec<String>,
    /// One layer, or (`layers`) several in forward order: naming both is refused, neither means the model's
    /// default edit layer.
    pub layer: Option<String>,
    pub layers: Option<Vec<String>>,
    pub settings: EditSettings,
    /// The id of statistics of the first layer; the parent's keys over the natural photos when None.
    pub statistics: Option<String>,
    pub guard: Option<GuardInput>,
    pub description: Option<String>,
}

/// The settings of `EditParams` a caller chose; None keeps the method's default.
#[derive(Debug, Clone, Copy, Default)]
pub struct EditSettings {
    pub method: Option<Method>,
    pub solver: Option<Solver>,
    pub rank: Option<usize>,
    pub steps: Option<usize>,
    pub lr: Option<f64>,
    pub seed: Option<i64>,
}

/// The breakage budget as asked for: the check photos (`default` or None: the natural ones; else a dataset
/// id) and the share of them allowed to change their top-1 (`DEFAULT_MAX_CHANGED` when None).
#[derive(Debug, Clone, Default)]
pub struct GuardInput {
    pub dataset: Option<String>,
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
