//! Running a job: its live state and progress, the work on the edit worker, and the atomic finish.

use super::*;

/// A job's state while this process runs it: watchers subscribe to `record`.
pub(super) struct LiveJob {
    pub(super) record: watch::Sender<JobRecord>,
    pub(super) cancel: AtomicBool,
    /// Uploaded statistics images, held until the job runs.
    pub(super) images: Mutex<Option<Vec<Bytes>>>,
}

impl LiveJob {
    /// Applies `update` if the job is still queued (atomically with respect to watchers); whether it was.
    pub(super) fn leave_queue(&self, update: impl FnOnce(&mut JobRecord)) -> bool {
        self.record.send_if_modified(|r| {
            let queued = r.state == JobState::Queued;
            if queued {
                update(r);
            }
            queued
        })
    }
}

impl Progress for LiveJob {
    fn report(&self, step: usize, total: usize, loss: f64) {
        self.record.send_modify(|r| {
            r.step = step as u64;
            r.total = total as u64;
            // Steps without a loss (the guard's trials) keep the last one reported.
            if loss.is_finite() {
                r.loss = Some(loss);
            }
        });
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

impl Jobs {
    pub(super) async fn run(&self, id: &str) {
        metrics::gauge!("editserve_edit_queue_depth").decrement(1.0);
        let Some(live) = self.live(id) else { return };
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let started = now_rfc3339();
        let begun = live.leave_queue(|r| (r.state, r.started_at) = (JobState::Running, Some(started.clone())));
        if !begun {
            return;
        }
        let record = live.record.borrow().clone();
        let clock = std::time::Instant::now();
        let outcome = match self.metadata.start_job(id, &started).await {
            Ok(()) => self.execute(&record, Arc::clone(&live)).await,
            Err(e) => Err(e.into()),
        };
        let kind = serde_name(record.kind);
        metrics::histogram!("editserve_job_seconds", "kind" => kind).record(clock.elapsed().as_secs_f64());
        self.finish(&live, record, outcome).await;
    }

    pub(super) async fn execute(&self, job: &JobRecord, live: Arc<LiveJob>) -> Result<Outcome, CoreError> {
        let package = self.registry.package(&job.model)?;
        let work = match job.kind {
            JobKind::Edit => {
                let plan: EditPlan = plan_of(job)?;
                let mut exemplars = Vec::with_capacity(plan.exemplars.len());
                for id in &plan.exemplars {
                    let record = self
                        .metadata
                        .exemplar(id)
                        .await?
                        .ok_or_else(|| CoreError::not_found(Resource::Exemplar, id))?;
                    exemplars.push(ExemplarPngs {
                        image: self.blobs.get(&record.image_blob).await?.into(),
                        mask: self.blobs.get(&record.mask_blob).await?.into(),
                        modified: self.blobs.get(&record.modified_blob).await?.into(),
                    });
                }
                let moment = match &plan.statistics {
                    Some(id) => {
                        let statistics = self
                            .metadata
                            .statistics(id)
                            .await?
                            .ok_or_else(|| CoreError::not_found(Resource::Statistics, id))?;
                        Some(Bytes::from(self.blobs.get(&statistics.blob).await?))
                    }
                    None => None,
                };
                let lineage = self.versions.lineage(&job.model, plan.parent).await?;
                let guard = match plan.guard {
                    Some(GuardSettings { dataset: Some(id), max_changed }) => {
                        // A pairs dataset's originals are the check images: its transformed images are what an
                        // edit is meant to change.
                        let images = load_images(self.metadata.as_ref(), self.blobs.as_ref(), &id).await?;
                        Some(GuardPlan {
                            max_changed,
                            photos: Some(images.items.into_iter().map(|item| item.image).collect()),
                        })
                    }
                    Some(GuardSettings { dataset: None, max_changed }) => Some(GuardPlan { max_changed, photos: None }),
                    None => None,
                };
                Work::Edit { lineage, exemplars, params: plan.params, moment, guard }
            }
            JobKind::Statistics => {
                let plan: StatisticsPlan = plan_of(job)?;
                let uploaded = live.images.lock().unwrap_or_else(|p| p.into_inner()).take();
                let images = match (uploaded, &plan.directory) {
                    (Some(images), _) => images,
                    (None, Some(directory)) => {
                        let mut images = Vec::new();
                        let listed = directory.clone();
                        for path in blocking(move || files(&listed, MAX_STATISTICS_IMAGES)).await? {
                            let bytes = tokio::fs::read(&path)
                                .await
                                .map_err(|e| CoreError::Internal(format!("{}: {e}", path.display())))?;
                            images.push(Bytes::from(bytes));
                        }
                        images
                    }
                    (None, None) => return Err(CoreError::Internal("the job's images are gone".into())),
                };
                Work::Statistics { layer: plan.layer, images }
            }
            JobKind::Evaluation => {
                Work::Evaluate(evaluation_work(job, &self.versions, self.metadata.as_ref(), self.blobs.as_ref()).await?)
            }
        };
        self.worker.run(package, work, live).await
    }

    /// Stores the outcome, writes the final state (and the version's) in one transaction, and lets
    /// watchers see it.
    pub(super) async fn finish(&self, live: &LiveJob, mut job: JobRecord, outcome: Result<Outcome, CoreError>) {
        let now = now_rfc3339();
        let progress = live.record.borrow().clone();
        (job.step, job.total, job.loss) = (progress.step, progress.total, progress.loss);
        job.finished_at = Some(now.clone());
        let mut ready = None;
        let mut statistics = None;
        let mut evaluation = None;
        let stored = match outcome {
            Ok(Outcome::Edit { delta, metrics }) => {
                let stored_bytes = delta.len() as u64;
                self.blobs.put(delta).await.map(|delta_blob| {
                    ready = Some(VersionOutcome::Ready { delta_blob, stored_bytes, metrics, ready_at: now.clone() });
                })
            }
            Ok(Outcome::Statistics { moment, images, positions }) => self.blobs.put(moment).await.map(|blob| {
                statistics = Some(StatisticsRecord {
                    id: job.id.clone(),
                    model: job.model.clone(),
                    layer: job.request["layer"].as_str().unwrap_or_default().to_string(),
                    blob,
                    images,
                    positions,
                    created_at: now.clone(),
                });
                job.statistics = Some(job.id.clone());
            }),
            Ok(Outcome::Evaluation(outcome)) => {
                evaluation = Some(outcome);
                Ok(())
            }
            Err(CoreError::Cancelled) if self.stopping.load(Ordering::SeqCst) => {
                (job.state, job.error) = (JobState::Failed, Some(RESTART_FAILURE.into()));
                Ok(())
            }
            Err(e) => {
                job.state = if matches!(e, CoreError::Cancelled) { JobState::Cancelled } else { JobState::Failed };
                job.error = Some(e.to_string());
                Ok(())
            }
        };
        if let Err(e) = stored {
            job.state = JobState::Failed;
            job.error = Some(format!("cannot store the result: {e}"));
            (ready, statistics) = (None, None);
        } else if job.error.is_none() {
            job.state = JobState::Succeeded;
        }
        let version = job
            .version
            .map(|_| ready.unwrap_or_else(|| VersionOutcome::Failed { error: job.error.clone().unwrap_or_default() }));
        if let Err(e) = self.metadata.finish_job(&job, version.as_ref(), statistics.as_ref(), evaluation.as_ref()).await
        {
            // The row stays unfinished and the next start marks it failed; the version never turns ready.
            tracing::error!(job = %job.id, error = %e, "cannot record the job's end");
            job.state = JobState::Failed;
            job.error = Some(format!("cannot record the job's end: {e}"));
        }
        tracing::info!(job = %job.id, kind = ?job.kind, state = ?job.state, error = ?job.error, "job finished");
        metrics::counter!("editserve_jobs_total", "kind" => serde_name(job.kind), "state" => serde_name(job.state))
            .increment(1);
        let id = job.id.clone();
        live.record.send_replace(job);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
}
