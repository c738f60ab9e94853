//! Creating jobs: an edit, statistics or evaluation job recorded with its pending result in one transaction,
//! then queued.

use super::*;

impl Jobs {
    /// Validates an edit, records its pending version and queued job, and queues it. A repeated
    /// idempotency key with the same request (`request`: the edit as the caller sent it, whose hash is stored
    /// with the job) answers the first job.
    pub async fn create_edit(
        &self,
        model: &str,
        edit: EditInput,
        request: &serde_json::Value,
        key: Option<String>,
    ) -> Result<EditStarted, CoreError> {
        let package = self.registry.package(model)?;
        let sha = request_sha256(model, request);
        let _writes = self.versions.writes.lock().await;
        if let Some(key) = &key {
            if let Some(first) = self.metadata.job_by_idempotency_key(key).await? {
                if first.request_sha256 != sha {
                    return Err(CoreError::IdempotencyKeyReused);
                }
                let current = self.live(&first.id).map_or(first, |live| live.record.borrow().clone());
                let number = current.version.unwrap_or_default();
                let version_state =
                    self.metadata.version(model, number).await?.map_or(VersionState::Failed, |v| v.state);
                return Ok(EditStarted { job: current, version: number, version_state });
            }
        }
        let plan = self.plan(model, &package.surface, &edit).await?;
        let permit = self.queue.try_reserve().map_err(|_| CoreError::EditQueueFull(self.queue.max_capacity()))?;
        let now = now_rfc3339();
        let stored_plan = serde_json::to_value(&plan).map_err(|e| CoreError::Internal(e.to_string()))?;
        let job = queued_job(JobKind::Edit, model, stored_plan, sha, key, plan.params.steps, &now);
        let version = VersionRecord {
            model: model.to_string(),
            number: 0,
            parent: plan.parent,
            state: VersionState::Pending,
            layer: plan.params.layer.clone(),
            method: serde_name(plan.params.method),
            solver: serde_name(plan.params.solver),
            parameters: json!({"rank": plan.params.rank, "steps": plan.params.steps, "lr": plan.params.lr, "seed": plan.params.seed}),
            statistics: plan.statistics.clone(),
            description: edit.description.clone(),
            exemplars: plan.exemplars.clone(),
            metrics: None,
            error: None,
            job: job.id.clone(),
            delta_blob: None,
            stored_bytes: 0,
            created_at: now,
            ready_at: None,
        };
        let number = self.metadata.create_edit(&job, &version).await?;
        let job = JobRecord { version: Some(number), ..job };
        self.metadata
            .record_audit(
                "edit.create",
                &job.id,
                &caller::current(),
                Some(json!({"model": model, "version": number, "parent": plan.parent})),
            )
            .await?;
        self.enqueue(job.clone(), None, permit);
        Ok(EditStarted { job, version: number, version_state: VersionState::Pending })
    }

    pub(super) fn enqueue(&self, job: JobRecord, images: Option<Vec<Bytes>>, permit: mpsc::Permit<'_, String>) {
        let id = job.id.clone();
        let live =
            LiveJob { record: watch::Sender::new(job), cancel: AtomicBool::new(false), images: Mutex::new(images) };
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), Arc::new(live));
        metrics::gauge!("editserve_edit_queue_depth").increment(1.0);
        permit.send(id);
    }

    /// Queues a statistics job on `layer` (the default edit layer when None).
    pub async fn create_statistics(
        &self,
        model: &str,
        layer: Option<String>,
        images: StatisticsImages,
    ) -> Result<JobRecord, CoreError> {
        let package = self.registry.package(model)?;
        let layer = layer.unwrap_or_else(|| package.surface.default_edit_layer().to_string());
        if package.surface.layer(&layer).is_none() {
            return Err(invalid(format!("'{layer}' is not an editable layer of '{model}'")));
        }
        let (directory, uploaded, total) = match images {
            StatisticsImages::Uploaded(images) if images.is_empty() => {
                return Err(invalid("give at least one 'image' part"))
            }
            StatisticsImages::Uploaded(images) => {
                // The job decodes them later: what is not an image (or is too large) is refused now, not then.
                let limits = self.registry.decode_limits();
                for (index, image) in images.iter().enumerate() {
                    check_header(image, limits).map_err(|e| CoreError::image(index, &e))?;
                }
                let total = images.len();
                (None, Some(images), total)
            }
            StatisticsImages::Directory(name) => {
                let root = self.statistics_dir.clone();
                let (directory, total) = blocking(move || {
                    let directory = statistics_directory(root.as_deref(), &name)?;
                    let total = files(&directory, MAX_STATISTICS_IMAGES)?.len();
                    Ok((directory, total))
                })
                .await?;
                (Some(directory), None, total)
            }
        };
        let plan = StatisticsPlan { layer, directory };
        let request = serde_json::to_value(&plan).map_err(|e| CoreError::Internal(e.to_string()))?;
        let permit = self.queue.try_reserve().map_err(|_| CoreError::EditQueueFull(self.queue.max_capacity()))?;
        let sha = request_sha256(model, &request);
        let job = queued_job(JobKind::Statistics, model, request, sha, None, total, &now_rfc3339());
        self.metadata.create_job(&job).await?;
        self.metadata
            .record_audit(
                "statistics.create",
                &job.id,
                &caller::current(),
                Some(json!({"model": model, "layer": plan.layer})),
            )
            .await?;
        self.enqueue(job.clone(), uploaded, permit);
        Ok(job)
    }

    /// Queues the evaluation job that runs `plan` (validated by `Evaluations`), recorded with its pending
    /// evaluation in one transaction; `total` is the dataset's images.
    pub(crate) async fn create_evaluation(
        &self,
        model: &str,
        plan: serde_json::Value,
        total: usize,
        evaluation: EvaluationRecord,
    ) -> Result<JobRecord, CoreError> {
        let permit = self.queue.try_reserve().map_err(|_| CoreError::EditQueueFull(self.queue.max_capacity()))?;
        let sha = request_sha256(model, &plan);
        let job = queued_job(JobKind::Evaluation, model, plan, sha, None, total, &evaluation.created_at);
        self.metadata.create_evaluation(&job, &EvaluationRecord { job: job.id.clone(), ..evaluation }).await?;
        self.enqueue(job.clone(), None, permit);
        Ok(job)
    }
}
