//! Evaluations: versions of a model scored against a baseline version on a dataset, as a job on the edit
//! queue (progress, events, cancellation and restart recovery as for edits). Everything is checked before
//! the job is queued; the edit worker materialises each version from its lineage and takes the top-1 class
//! of every image with each (`evaluate`, on the worker's thread); `score` turns those into the metrics, and
//! the result is stored in the transaction that finishes the job.
//!
//! The metrics follow the paper's: on pairs, "errors corrected" compares the version's errors on the
//! transformed images with the baseline's, and the classes of the edited exemplars can be left out, since an
//! edit is meant to generalise beyond them.

mod run;
mod score;

pub(crate) use run::{evaluate, evaluation_work, top1, EVALUATION_BATCH};
pub use score::*;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::caller;
use super::datasets::{load_images, DatasetImages, DatasetKind};
use super::edit_worker::input_batch;
use super::jobs::{plan_of, Jobs};
use super::registry::Registry;
use super::scheduler::Lineage;
use super::versions::{VersionRef, Versions};
use super::{CoreError, Resource};
use crate::edit::delta::materialise;
use crate::edit::{EditError, Progress};
use crate::imaging::{DecodeLimits, Preprocessing};
use crate::models::Classifier;
use crate::store::{
    now_rfc3339, BlobStore, EvaluationOutcome, EvaluationRecord, EvaluationState, JobRecord, MetadataStore,
};

/// Versions one evaluation compares with its baseline.
pub const MOST_VERSIONS: usize = 8;

/// An evaluation as a caller asks for it, before `Evaluations::create` checks it.
#[derive(Debug, Clone)]
pub struct EvaluationInput {
    /// A dataset id.
    pub dataset: String,
    /// 1 to `MOST_VERSIONS` versions, scored against the baseline.
    pub versions: Vec<VersionRef>,
    /// Version 0 when None.
    pub baseline: Option<VersionRef>,
    pub exclude: Exclusions,
}

/// What an evaluation leaves out of its scores.
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    pub classes: Vec<u32>,
    /// The classes of the exemplars the evaluated versions were edited from (the baseline's top-1 on them).
    pub exemplar_classes: bool,
}

/// What an evaluation job runs, as stored with it: versions by number (aliases move).
#[derive(Debug, Serialize, Deserialize)]
struct EvaluationPlan {
    evaluation: String,
    dataset: String,
    baseline: u32,
    versions: Vec<u32>,
    exclude_classes: Vec<u32>,
    exclude_exemplar_classes: bool,
}

/// A page of a model's evaluations, newest first.
#[derive(Debug)]
pub struct EvaluationPage {
    pub evaluations: Vec<EvaluationRecord>,
    /// The id to pass as `before` for the next page; None on the last.
    pub next_before: Option<String>,
}

/// What the edit worker needs for an evaluation.
pub struct EvaluationWork {
    pub baseline: (u32, Lineage),
    pub versions: Vec<(u32, Lineage)>,
    pub dataset: DatasetImages,
    /// Original images of the exemplars whose classes (the baseline's top-1 on them) are left out.
    pub exemplars: Vec<Bytes>,
    pub exclude_classes: Vec<u32>,
}

pub struct Evaluations {
    registry: Arc<Registry>,
    versions: Arc<Versions>,
    jobs: Arc<Jobs>,
    metadata: Arc<dyn MetadataStore>,
}

fn invalid(message: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument(message.into())
}

impl Evaluations {
    pub fn new(
        registry: Arc<Registry>,
        versions: Arc<Versions>,
        jobs: Arc<Jobs>,
        metadata: Arc<dyn MetadataStore>,
    ) -> Self {
        Self { registry, versions, jobs, metadata }
    }

    /// Checks the request (ready versions, an existing dataset whose labels are classes of the model) and
    /// queues the evaluation's job; answers the evaluation's id and the job.
    pub async fn create(&self, model: &str, request: EvaluationInput) -> Result<(String, JobRecord), CoreError> {
        let classes = self.registry.model(model)?.num_classes;
        if request.versions.is_empty() || request.versions.len() > MOST_VERSIONS {
            return Err(invalid(format!(
                "versions must name 1 to {MOST_VERSIONS} versions, got {}",
                request.versions.len()
            )));
        }
        let baseline = request.baseline.clone().unwrap_or(VersionRef::Number(0));
        let baseline = self.versions.ready(model, &baseline).await?;
        let mut versions = Vec::with_capacity(request.versions.len());
        for reference in &request.versions {
            versions.push(self.versions.ready(model, reference).await?);
        }
        let dataset = self
            .metadata
            .dataset(&request.dataset)
            .await?
            .ok_or_else(|| CoreError::not_found(Resource::Dataset, &request.dataset))?;
        let highest = self.metadata.dataset_items(&dataset.id).await?.iter().filter_map(|item| item.label).max();
        if let Some(label) = highest.filter(|&label| i64::from(label) >= classes) {
            return Err(invalid(format!(
                "dataset '{}' has the label {label}, but model '{model}' has {classes} classes (0 to {})",
                dataset.id,
                classes - 1
            )));
        }
        if let Some(class) = request.exclude.classes.iter().find(|&&class| i64::from(class) >= classes) {
            return Err(invalid(format!(
                "exclude_classes names class {class}, but model '{model}' has {classes} classes"
            )));
        }
        let exclude_classes: Vec<u32> =
            request.exclude.classes.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
        let id = uuid::Uuid::new_v4().to_string();
        let plan = EvaluationPlan {
            evaluation: id.clone(),
            dataset: dataset.id.clone(),
            baseline,
            versions: versions.clone(),
            exclude_classes: exclude_classes.clone(),
            exclude_exemplar_classes: request.exclude.exemplar_classes,
        };
        let record = EvaluationRecord {
            id: id.clone(),
            model: model.to_string(),
            dataset: dataset.id.clone(),
            baseline,
            versions: versions.clone(),
            state: EvaluationState::Pending,
            job: String::new(),
            excluded_classes: exclude_classes,
            results: None,
            error: None,
            created_at: now_rfc3339(),
            finished_at: None,
        };
        let plan = serde_json::to_value(&plan).map_err(|e| CoreError::Internal(e.to_string()))?;
        let job = self.jobs.create_evaluation(model, plan, dataset.images as usize, record).await?;
        let detail =
            json!({"model": model, "dataset": dataset.id, "baseline": baseline, "versions": versions, "job": job.id});
        self.metadata.record_audit("evaluation.create", &id, &caller::current(), Some(detail)).await?;
        Ok((id, job))
    }

    pub async fn get(&self, id: &str) -> Result<EvaluationRecord, CoreError> {
        self.metadata.evaluation(id).await?.ok_or_else(|| CoreError::not_found(Resource::Evaluation, id))
    }

    /// The model's evaluations, newest first, after the evaluation `before` (a previous page's `next_before`).
    pub async fn list(&self, model: &str, before: Option<&str>, limit: u32) -> Result<EvaluationPage, CoreError> {
        self.registry.ensure_loaded(model)?;
        if let Some(before) = before {
            let known = self.metadata.evaluation(before).await?.is_some_and(|e| e.model == model);
            if !known {
                return Err(invalid(format!(
                    "before must be the id of an evaluation of '{model}' (a page's next_before), got '{before}'"
                )));
            }
        }
        let evaluations = self.metadata.evaluations(model, before, limit).await?;
        let next_before = evaluations.last().filter(|_| evaluations.len() == limit as usize).map(|e| e.id.clone());
        Ok(EvaluationPage { evaluations, next_before })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(version: u32, images: &[u32], transformed: Option<&[u32]>) -> (u32, Predictions) {
        (version, Predictions { images: images.to_vec(), transformed: transformed.map(<[u32]>::to_vec) })
    }

    #[test]
    fn pairs_score_errors_corrected_on_the_transformed_images() {
        let labels = [1, 1, 2, 3];
        let runs = [
            // Baseline: all originals right; transformed wrong on 3 of 4.
            run(0, &[1, 1, 2, 3], Some(&[9, 9, 2, 8])),
            // The edit: fixes two transformed images, breaks one original.
            run(4, &[1, 1, 5, 3], Some(&[1, 1, 2, 8])),
        ];
        let scores = score(Some(&labels), &BTreeSet::new(), &runs).unwrap();
        let (base, edit) = (&scores[0], &scores[1]);
        assert!(base.baseline && !edit.baseline);
        assert_eq!((base.images, base.accuracy, base.transformed_accuracy), (4, Some(1.0), Some(0.25)));
        assert_eq!((base.errors_corrected, base.changed, base.transformed_changed), (Some(0.0), Some(0.0), Some(0.0)));
        assert_eq!((edit.accuracy, edit.transformed_accuracy), (Some(0.75), Some(0.75)));
        // Errors on the transformed images: 3 before, 1 after.
        assert_eq!(edit.errors_corrected, Some(100.0 * ((3.0 - 1.0) / 3.0)));
        assert_eq!((edit.changed, edit.transformed_changed), (Some(0.25), Some(0.5)));
        assert_eq!(edit.per_class[&1], ClassScore { images: 2, correct: 2, transformed_correct: Some(2) });
        assert_eq!(edit.per_class[&2], ClassScore { images: 1, correct: 0, transformed_correct: Some(1) });
        assert_eq!(edit.confusions, [Confusion { label: 3, predicted: 8, count: 1 }]);
        assert_eq!(base.confusions[0], Confusion { label: 1, predicted: 9, count: 2 });
    }

    #[test]
    fn excluded_labels_leave_the_scores_and_errors_corrected_is_floored_at_minus_100() {
        let labels = [1, 2, 2, 7];
        let runs = [run(0, &[1, 0, 2, 7], None), run(2, &[0, 0, 0, 0], None)];
        let scores = score(Some(&labels), &[7].into(), &runs).unwrap();
        let edit = &scores[1];
        assert_eq!(edit.images, 3);
        assert_eq!(scores[0].accuracy, Some(2.0 / 3.0));
        assert_eq!(edit.accuracy, Some(0.0));
        // 1 error before, 3 after: -200% floored to -100%.
        assert_eq!(edit.errors_corrected, Some(-100.0));
        assert_eq!(edit.changed, Some(2.0 / 3.0));
        assert!(!edit.per_class.contains_key(&7));
        assert_eq!(edit.confusions[0], Confusion { label: 2, predicted: 0, count: 2 });
        assert_eq!((edit.transformed_accuracy, edit.transformed_changed), (None, None));
    }

    #[test]
    fn unlabelled_datasets_score_changes_only_and_exclude_by_the_baselines_class() {
        let runs = [run(0, &[4, 5, 6], None), run(1, &[4, 9, 9], None)];
        let scores = score(None, &[6].into(), &runs).unwrap();
        let edit = &scores[1];
        assert_eq!((edit.images, edit.changed), (2, Some(0.5)));
        assert_eq!((edit.accuracy, edit.errors_corrected), (None, None));
        assert!(edit.per_class.is_empty() && edit.confusions.is_empty());
        // Everything excluded: no share to report.
        assert_eq!(score(None, &[4, 5, 6].into(), &runs).unwrap()[1].changed, None);
        // No baseline error: nothing to correct.
        let perfect = [run(0, &[1], None), run(1, &[2], None)];
        assert_eq!(score(Some(&[1]), &BTreeSet::new(), &perfect).unwrap()[1].errors_corrected, None);
        assert!(score(Some(&[1, 2]), &BTreeSet::new(), &perfect).is_err());
    }
}
