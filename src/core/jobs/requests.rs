//! The requests jobs are made from and the views of jobs (serialised as they are).

use super::*;

/// A version as a JSON request names it: a number or an alias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    pub parent: Option<VersionName>,
    pub exemplars: Vec<String>,
    pub method: Option<Method>,
    pub solver: Option<Solver>,
    pub layer: Option<String>,
    /// Several layers in forward order, for a least-squares rewrite spread over them (instead of `layer`).
    pub layers: Option<Vec<String>>,
    pub rank: Option<usize>,
    pub steps: Option<usize>,
    pub lr: Option<f64>,
    pub seed: Option<i64>,
    pub statistics: Option<String>,
    pub guard: Option<GuardRequest>,
    pub description: Option<String>,
}

/// The breakage budget of an edit: by default the natural check photos (plus copies of the exemplars'
/// originals) and 2%.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardRequest {
    /// `default` (the natural check photos) or a dataset id.
    pub dataset: Option<String>,
    pub max_changed: Option<f64>,
}

/// What a statistics job reads.
pub enum StatisticsImages {
    Uploaded(Vec<Bytes>),
    /// A subdirectory of the operator's statistics directory.
    Directory(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgressView {
    pub step: u64,
    pub total: u64,
    pub loss: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    pub kind: JobKind,
    pub model: String,
    pub state: JobState,
    pub progress: ProgressView,
    pub version: Option<u32>,
    pub statistics: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl From<&JobRecord> for JobView {
    fn from(r: &JobRecord) -> Self {
        Self {
            id: r.id.clone(),
            kind: r.kind,
            model: r.model.clone(),
            state: r.state,
            progress: ProgressView { step: r.step, total: r.total, loss: r.loss },
            version: r.version,
            statistics: r.statistics.clone(),
            error: r.error.clone(),
            created_at: r.created_at.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
        }
    }
}

/// Answer to an accepted edit.
#[derive(Debug, Serialize)]
pub struct EditAccepted {
    pub job: JobView,
    pub version: PendingVersion,
}

#[derive(Debug, Serialize)]
pub struct PendingVersion {
    pub number: u32,
    pub state: VersionState,
}
