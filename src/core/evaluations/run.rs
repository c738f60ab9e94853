//! An evaluation job's work on the edit worker: the dataset through each version, in batches.

use super::*;

/// Images per forward pass.
pub(crate) const EVALUATION_BATCH: usize = 16;

/// Reads what the evaluation job `job` runs on: the dataset's images, the versions' lineages and, when its
/// exemplars' classes are left out, the exemplars' original images (those of every edit in each evaluated
/// version's lineage).
pub(crate) async fn evaluation_work(
    job: &JobRecord,
    versions: &Versions,
    metadata: &dyn MetadataStore,
    blobs: &dyn BlobStore,
) -> Result<EvaluationWork, CoreError> {
    let plan: EvaluationPlan = plan_of(job)?;
    let dataset = load_images(metadata, blobs, &plan.dataset).await?;
    let baseline = (plan.baseline, versions.lineage(&job.model, plan.baseline).await?);
    let mut lineages = Vec::with_capacity(plan.versions.len());
    for &number in &plan.versions {
        lineages.push((number, versions.lineage(&job.model, number).await?));
    }
    let mut exemplars = Vec::new();
    if plan.exclude_exemplar_classes {
        let mut ids = BTreeSet::new();
        for &number in &plan.versions {
            let mut current = number;
            // A version's parents cannot be deleted while it exists, so the walk reaches version 0.
            while current != 0 {
                let missing = || CoreError::NotFound {
                    kind: Resource::Version,
                    message: format!("version {current} of '{}' does not exist", job.model),
                };
                let record = metadata.version(&job.model, current).await?.ok_or_else(missing)?;
                ids.extend(record.exemplars);
                current = record.parent;
            }
        }
        for id in &ids {
            let exemplar = metadata.exemplar(id).await?.ok_or_else(|| CoreError::not_found(Resource::Exemplar, id))?;
            exemplars.push(Bytes::from(blobs.get(&exemplar.image_blob).await?));
        }
    }
    Ok(EvaluationWork { baseline, versions: lineages, dataset, exemplars, exclude_classes: plan.exclude_classes })
}

/// The top-1 class of each image of `batch`, as the classify routes rank them (softmax, lowest index first
/// among equals).
pub(crate) fn top1(model: &dyn Classifier, batch: &Tensor) -> Result<Vec<u32>, EditError> {
    let classes = model.forward(batch).softmax(-1, Kind::Float).argmax(-1, false).to_device(Device::Cpu);
    let classes: Vec<i64> = classes.try_into()?;
    Ok(classes.into_iter().map(|c| c as u32).collect())
}

/// Runs an evaluation on the edit worker's thread: every version on every image, in batches, stopping
/// between batches when cancelled; then the scores.
pub(crate) fn evaluate(
    base: &dyn Classifier,
    preprocessing: &Preprocessing,
    device: Device,
    limits: DecodeLimits,
    work: &EvaluationWork,
    progress: &dyn Progress,
) -> Result<EvaluationOutcome, EditError> {
    let _no_grad = tch::no_grad_guard();
    let mut models = Vec::with_capacity(1 + work.versions.len());
    for (number, lineage) in std::iter::once(&work.baseline).chain(&work.versions) {
        models.push((*number, materialise(base, lineage)?.0));
    }
    let baseline = models[0].1.as_ref();
    let mut excluded: BTreeSet<u32> = work.exclude_classes.iter().copied().collect();
    for chunk in work.exemplars.chunks(EVALUATION_BATCH) {
        let batch = input_batch(chunk, 0, preprocessing, limits)
            .map_err(|e| EditError::Io(format!("a stored exemplar: {e}")))?;
        excluded.extend(top1(baseline, &batch.to_device(device))?);
    }
    let items = &work.dataset.items;
    let pairs = work.dataset.kind == DatasetKind::Pairs;
    let mut predictions: Vec<Predictions> = models
        .iter()
        .map(|_| Predictions {
            images: Vec::with_capacity(items.len()),
            transformed: pairs.then(|| Vec::with_capacity(items.len())),
        })
        .collect();
    for (i, chunk) in items.chunks(EVALUATION_BATCH).enumerate() {
        if progress.cancelled() {
            return Err(EditError::Cancelled);
        }
        let first = i * EVALUATION_BATCH;
        let images: Vec<Bytes> = chunk.iter().map(|item| item.image.clone()).collect();
        let originals = input_batch(&images, first, preprocessing, limits)?.to_device(device);
        let transformed = if pairs {
            let images: Vec<Bytes> = chunk.iter().filter_map(|item| item.transformed.clone()).collect();
            Some(input_batch(&images, first, preprocessing, limits)?.to_device(device))
        } else {
            None
        };
        for ((_, model), out) in models.iter().zip(&mut predictions) {
            out.images.extend(top1(model.as_ref(), &originals)?);
            if let (Some(batch), Some(out)) = (&transformed, &mut out.transformed) {
                out.extend(top1(model.as_ref(), batch)?);
            }
        }
        progress.report(first + chunk.len(), items.len(), f64::NAN);
    }
    let labels: Option<Vec<u32>> = items.iter().map(|item| item.label).collect();
    let runs: Vec<(u32, Predictions)> = models.iter().map(|(number, _)| *number).zip(predictions).collect();
    let scores = score(labels.as_deref(), &excluded, &runs).map_err(EditError::Io)?;
    let results = serde_json::to_value(scores).map_err(|e| EditError::Io(e.to_string()))?;
    Ok(EvaluationOutcome { excluded_classes: excluded.into_iter().collect(), results })
}
