//! Validation of edit requests into the plans jobs run with.

use super::*;

/// The guard as a job runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct GuardSettings {
    /// None: the natural check photos.
    pub(super) dataset: Option<String>,
    pub(super) max_changed: f64,
}

/// What an edit job runs, as stored with it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct EditPlan {
    pub(super) parent: u32,
    pub(super) exemplars: Vec<String>,
    pub(super) params: EditParams,
    pub(super) statistics: Option<String>,
    /// None in plans queued before the guard existed.
    #[serde(default)]
    pub(super) guard: Option<GuardSettings>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct StatisticsPlan {
    pub(super) layer: String,
    pub(super) directory: Option<PathBuf>,
}

/// A subdirectory of the configured statistics directory; never a path outside it.
pub(super) fn statistics_directory(root: Option<&std::path::Path>, name: &str) -> Result<PathBuf, CoreError> {
    subdirectory(root, name, "statistics directory", "--statistics-dir")
}

impl Jobs {
    /// The edit a request asks for, with every default filled in, or why it cannot run.
    pub(super) async fn plan(
        &self,
        model: &str,
        surface: &crate::core::scheduler::EditSurface,
        request: &EditInput,
    ) -> Result<EditPlan, CoreError> {
        let parent = request.parent.clone().unwrap_or_else(VersionRef::default_alias);
        let parent = self.versions.ready(model, &parent).await?;
        if request.exemplars.is_empty() || request.exemplars.len() > MAX_EXEMPLARS {
            return Err(invalid(format!(
                "an edit takes 1 to {MAX_EXEMPLARS} exemplars, got {}",
                request.exemplars.len()
            )));
        }
        for id in &request.exemplars {
            if self.metadata.exemplar(id).await?.is_none() {
                return Err(CoreError::not_found(Resource::Exemplar, id));
            }
        }
        let settings = request.settings;
        let method = settings.method.unwrap_or(Method::Rewrite);
        let solver = settings.solver.unwrap_or(Solver::default_for(method));
        let layer_names = match (&request.layer, &request.layers) {
            (Some(_), Some(_)) => return Err(invalid("name 'layer' or 'layers', not both".to_string())),
            (None, Some(layers)) if layers.is_empty() || layers.len() > MAX_LAYERS => {
                return Err(invalid(format!("'layers' takes 1 to {MAX_LAYERS} layers, got {}", layers.len())))
            }
            (None, Some(layers)) => layers.clone(),
            (Some(layer), None) => vec![layer.clone()],
            (None, None) => surface.default_layers(solver, request.exemplars.len(), request.statistics.is_some()),
        };
        let mut params = EditParams::new(method, solver, &layer_names[0]);
        params.following_layers = layer_names[1..].to_vec();
        for position in params.layer_positions(&surface.editable_layers)? {
            let layer = &surface.editable_layers[position];
            if solver != Solver::Adam {
                let name = serde_name(solver);
                if method != Method::Rewrite {
                    return Err(invalid(format!("the {name} solver solves a rewrite only; fine-tuning uses adam")));
                }
                if layer.weight_shape.get(2..) != Some(&[1, 1][..]) {
                    return Err(invalid(format!(
                        "the {name} solver needs a 1x1 conv; '{}' is {:?}",
                        layer.name, layer.weight_shape
                    )));
                }
            }
        }
        if let Some(rank) = settings.rank {
            if !(1..=MAX_RANK).contains(&rank) {
                return Err(invalid(format!("rank must be between 1 and {MAX_RANK}, got {rank}")));
            }
            params.rank = rank;
        }
        if let Some(steps) = settings.steps {
            if !(1..=MAX_STEPS).contains(&steps) {
                return Err(invalid(format!("steps must be between 1 and {MAX_STEPS}, got {steps}")));
            }
            params.steps = steps;
        }
        if let Some(lr) = settings.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(invalid(format!("lr must be a positive number, got {lr}")));
            }
            params.lr = lr;
        }
        params.seed = settings.seed.unwrap_or(params.seed);
        if let Some(id) = &request.statistics {
            let statistics =
                self.metadata.statistics(id).await?.ok_or_else(|| CoreError::not_found(Resource::Statistics, id))?;
            if statistics.model != model || statistics.layer != params.layer {
                return Err(invalid(format!(
                    "statistics '{id}' are of layer '{}' of model '{}', not of '{}' of '{model}'",
                    statistics.layer, statistics.model, params.layer
                )));
            }
        }
        if request.description.as_ref().is_some_and(|d| d.chars().count() > MAX_DESCRIPTION) {
            return Err(invalid(format!("description is longer than {MAX_DESCRIPTION} characters")));
        }
        let guard = self.guard_settings(request.guard.as_ref()).await?;
        Ok(EditPlan {
            parent,
            exemplars: request.exemplars.clone(),
            params,
            statistics: request.statistics.clone(),
            guard: Some(guard),
        })
    }

    pub(super) async fn guard_settings(&self, request: Option<&GuardInput>) -> Result<GuardSettings, CoreError> {
        let max_changed = request.and_then(|g| g.max_changed).unwrap_or(DEFAULT_MAX_CHANGED);
        if !(0.0..=1.0).contains(&max_changed) {
            return Err(invalid(format!("guard.max_changed must be between 0 and 1, got {max_changed}")));
        }
        let dataset = match request.and_then(|g| g.dataset.as_deref()) {
            None | Some("default") => None,
            Some(id) => {
                self.metadata.dataset(id).await?.ok_or_else(|| CoreError::not_found(Resource::Dataset, id))?;
                Some(id.to_string())
            }
        };
        Ok(GuardSettings { dataset, max_changed })
    }
}
