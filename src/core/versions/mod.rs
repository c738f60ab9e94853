//! Versions of the loaded models and their aliases: naming a version by number or alias, listing and
//! deleting versions, setting aliases, and classifying with any ready version. A version is its parent
//! plus one change; the changes of its lineage are read from the blob store once and kept, since a ready
//! version never changes.

mod aliases;
mod lineage;
mod naming;

use lineage::*;
pub use naming::*;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use serde_json::json;

use super::caller;
use super::registry::{ModelInfo, ModelInput, Prediction, Registry};
use super::scheduler::{Lineage, Probabilities, Target};
use super::{Conflict, CoreError, Resource};
use crate::edit::statistics::files_sha256;
use crate::models::ModelPackage;
use crate::store::{BlobStore, MetadataStore, VersionRecord, VersionState};

/// A version with what its record does not say: whether it is on the device now, and the aliases naming it.
#[derive(Debug, Clone)]
pub struct VersionDetails {
    pub model: String,
    pub number: u32,
    /// None for version 0, the base weights, which has no edit.
    pub record: Option<VersionRecord>,
    /// Bytes the version holds on the device beyond the base (its edited layers) while it is resident; None
    /// when it is not. The base is always resident and holds nothing beyond itself.
    pub resident_bytes: Option<u64>,
    pub aliases: Vec<String>,
}

impl VersionDetails {
    /// The base weights are always ready.
    pub fn state(&self) -> VersionState {
        self.record.as_ref().map_or(VersionState::Ready, |r| r.state)
    }
}

/// A page of a model's versions, newest first.
#[derive(Debug)]
pub struct VersionPage {
    pub versions: Vec<VersionDetails>,
    /// The number to pass as `before` for the next page; None on the last.
    pub next_before: Option<u32>,
}

pub struct Versions {
    registry: Arc<Registry>,
    metadata: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    lineages: Mutex<LineageCache>,
    /// Serialises management actions' checks with their writes (this process is the database's only
    /// writer; several replicas would need the database's own locks instead).
    pub(crate) writes: tokio::sync::Mutex<()>,
}

impl Versions {
    pub fn new(registry: Arc<Registry>, metadata: Arc<dyn MetadataStore>, blobs: Arc<dyn BlobStore>) -> Self {
        Self {
            registry,
            metadata,
            blobs,
            lineages: Mutex::new(LineageCache::new(LINEAGE_CACHE_BYTES)),
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// The number `reference` names now (aliases move); the model must be loaded.
    pub async fn resolve(&self, model: &str, reference: &VersionRef) -> Result<u32, CoreError> {
        self.registry.ensure_loaded(model)?;
        match reference {
            VersionRef::Number(n) => Ok(*n),
            VersionRef::Alias(alias) if alias == BASE => Ok(0),
            VersionRef::Alias(alias) if alias == LATEST => Ok(self.metadata.latest_ready(model).await?.unwrap_or(0)),
            VersionRef::Alias(alias) => {
                let stored = self.metadata.aliases(model).await?.into_iter().find(|(name, _)| name == alias);
                match stored {
                    Some((_, number)) => Ok(number),
                    None if alias == DEFAULT => Ok(0),
                    None => Err(CoreError::NotFound {
                        kind: Resource::Version,
                        message: format!("model '{model}' has no version or alias named '{alias}'"),
                    }),
                }
            }
        }
    }

    /// The record of an edited version (None for version 0); deleted and unknown versions are not found.
    async fn record(&self, model: &str, number: u32) -> Result<Option<VersionRecord>, CoreError> {
        if number == 0 {
            return Ok(None);
        }
        let missing = |what: &str| CoreError::NotFound {
            kind: Resource::Version,
            message: format!("version {number} of model '{model}' {what}"),
        };
        match self.metadata.version(model, number).await? {
            None => Err(missing("does not exist")),
            Some(record) if record.state == VersionState::Deleted => Err(missing("was deleted")),
            Some(record) => Ok(Some(record)),
        }
    }

    /// The number of a ready version, or why it cannot be used.
    pub async fn ready(&self, model: &str, reference: &VersionRef) -> Result<u32, CoreError> {
        let number = self.resolve(model, reference).await?;
        if let Some(record) = self.record(model, number).await? {
            let why = match record.state {
                VersionState::Ready | VersionState::Deleted => return Ok(number),
                VersionState::Pending => format!("is pending: its job {} has not finished", record.job),
                VersionState::Failed => format!("failed: {}", record.error.unwrap_or_default()),
            };
            return Err(CoreError::Conflict(
                Conflict::VersionNotReady,
                format!("version {number} of model '{model}' {why}"),
            ));
        }
        Ok(number)
    }

    /// What the device worker needs to classify with a ready version.
    pub async fn target(&self, model: &str, reference: &VersionRef) -> Result<Target, CoreError> {
        let number = self.ready(model, reference).await?;
        if number == 0 {
            return Ok(Target::base(model));
        }
        Ok(Target { model: model.to_string(), version: number, lineage: self.lineage(model, number).await? })
    }

    /// The changes from the base to `number` (a ready version, or 0), oldest first.
    pub async fn lineage(&self, model: &str, number: u32) -> Result<Lineage, CoreError> {
        let key = (model.to_string(), number);
        if let Some(found) = self.lineages.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(found);
        }
        let mut changes = Vec::new();
        let mut current = number;
        // Parents of a version cannot be deleted while it exists, so the chain is whole.
        while let Some(record) = self.record(model, current).await? {
            let blob = record.delta_blob.ok_or_else(|| {
                CoreError::Internal(format!("version {current} of model '{model}' has no stored change"))
            })?;
            changes.push(Bytes::from(self.blobs.get(&blob).await?));
            current = record.parent;
        }
        changes.reverse();
        let lineage = Arc::new(changes);
        self.lineages.lock().unwrap_or_else(|p| p.into_inner()).insert(key, Arc::clone(&lineage));
        Ok(lineage)
    }

    fn details(
        &self,
        model: &str,
        number: u32,
        record: Option<VersionRecord>,
        aliases: &BTreeMap<String, u32>,
    ) -> VersionDetails {
        let names = aliases.iter().filter(|(_, n)| **n == number).map(|(name, _)| name.clone()).collect();
        let resident_bytes = match record {
            None => Some(0),
            Some(_) => self.registry.worker().resident_bytes(model, number),
        };
        VersionDetails { model: model.to_string(), number, record, resident_bytes, aliases: names }
    }

    pub async fn get(&self, model: &str, reference: &VersionRef) -> Result<VersionDetails, CoreError> {
        let number = self.resolve(model, reference).await?;
        let record = self.record(model, number).await?;
        let aliases = self.aliases(model).await?;
        Ok(self.details(model, number, record, &aliases))
    }

    /// Newest first; version 0 comes last, on the last page.
    pub async fn list(&self, model: &str, before: Option<u32>, limit: u32) -> Result<VersionPage, CoreError> {
        self.registry.ensure_loaded(model)?;
        let aliases = self.aliases(model).await?;
        let records = self.metadata.versions(model, before, limit).await?;
        let full = records.len() == limit as usize;
        let mut versions: Vec<VersionDetails> =
            records.into_iter().map(|r| self.details(model, r.number, Some(r), &aliases)).collect();
        let lowest = versions.last().map_or(before.unwrap_or(u32::MAX), |v| v.number);
        if !full && lowest > 0 {
            versions.push(self.details(model, 0, None, &aliases));
        }
        let next_before = match versions.last() {
            Some(last) if full && last.number > 0 => Some(last.number),
            _ => None,
        };
        Ok(VersionPage { versions, next_before })
    }

    pub async fn delete(&self, model: &str, reference: &VersionRef) -> Result<u32, CoreError> {
        let _writes = self.writes.lock().await;
        let number = self.resolve(model, reference).await?;
        let in_use = |why: String| {
            CoreError::Conflict(Conflict::VersionInUse, format!("version {number} of model '{model}' {why}"))
        };
        let Some(record) = self.record(model, number).await? else {
            return Err(in_use("is the base weights and is never deleted".into()));
        };
        if record.state == VersionState::Pending {
            return Err(CoreError::Conflict(
                Conflict::VersionNotReady,
                format!("version {number} of model '{model}' is pending; cancel its job {} instead", record.job),
            ));
        }
        let stored = self.metadata.aliases(model).await?;
        let names: Vec<&str> = stored.iter().filter(|(_, n)| *n == number).map(|(name, _)| name.as_str()).collect();
        if !names.is_empty() {
            return Err(in_use(format!("is named by the alias(es) {}; move or delete them first", names.join(", "))));
        }
        let children = self.metadata.children(model, number).await?;
        if children > 0 {
            return Err(in_use(format!("is the parent of {children} version(s); delete them first")));
        }
        self.metadata.delete_version(model, number).await?;
        self.lineages.lock().unwrap_or_else(|p| p.into_inner()).remove(&(model.to_string(), number));
        // Best effort: a deleted version is unreachable, and a full queue only delays its eviction.
        let _ = self.registry.worker().forget(model, number);
        self.metadata.record_audit("version.delete", &format!("{model}/{number}"), &caller::current(), None).await?;
        Ok(number)
    }

    /// Ties the model name's versions to the weights in `weights`: a name whose ready (or pending) versions
    /// were made on other weights is refused, since their changes would be applied to the wrong base.
    pub async fn bind_base(&self, model: &str, weights: &std::path::Path) -> Result<(), CoreError> {
        let path = weights.to_path_buf();
        let sha256 = tokio::task::spawn_blocking(move || files_sha256(&[path]))
            .await
            .map_err(|e| CoreError::Internal(format!("hashing the weights: {e}")))?
            .map_err(|e| CoreError::InvalidPackage(e.to_string()))?;
        let _writes = self.writes.lock().await;
        let recorded = self.metadata.base_weights(model).await?;
        if recorded.as_deref() == Some(sha256.as_str()) {
            return Ok(());
        }
        if recorded.is_some() && self.metadata.live_versions(model).await? > 0 {
            return Err(CoreError::Conflict(
                Conflict::WeightsChanged,
                format!(
                    "model '{model}' has versions made on other weights (sha256 {}), not on {} (sha256 {sha256}); \
                     load these weights under another name",
                    recorded.unwrap_or_default(),
                    weights.display()
                ),
            ));
        }
        Ok(self.metadata.set_base_weights(model, &sha256).await?)
    }

    /// A model's life cycle in one call, for start-up and `POST /v1/models` alike: the package in `dir` under
    /// `name`, bound to its weights (refused when the name's versions were made on other weights), then
    /// loaded and warmed up.
    pub async fn load_model(&self, name: &str, dir: &std::path::Path) -> Result<ModelInfo, CoreError> {
        self.registry.check_new_name(name)?;
        let mut package = ModelPackage::open(dir).map_err(|e| CoreError::InvalidPackage(e.to_string()))?;
        package.name = name.to_string();
        self.bind_base(name, &package.weights_path()).await?;
        self.registry.load(package).await
    }

    /// Records a model's loading or unloading in the audit log, beside its versions' history.
    pub async fn record_model_event(
        &self,
        action: &str,
        model: &str,
        detail: Option<serde_json::Value>,
    ) -> Result<(), CoreError> {
        Ok(self.metadata.record_audit(action, model, &caller::current(), detail).await?)
    }

    /// Classifies with the version `reference` names (the `default` alias when None); returns its number.
    pub async fn classify(
        &self,
        model: &str,
        reference: Option<&VersionRef>,
        images: Vec<Bytes>,
        top_k: usize,
    ) -> Result<(u32, Vec<Vec<Prediction>>), CoreError> {
        let target = self.target(model, reference.unwrap_or(&VersionRef::default_alias())).await?;
        let number = target.version;
        Ok((number, self.registry.classify(target, images, top_k).await?))
    }

    /// Every class's probability for each input under the version `reference` names; returns its number.
    pub async fn probabilities(
        &self,
        model: &str,
        reference: &VersionRef,
        input: ModelInput,
    ) -> Result<(u32, Probabilities), CoreError> {
        let target = self.target(model, reference).await?;
        let number = target.version;
        Ok((number, self.registry.probabilities(target, input).await?))
    }

    /// One image through several versions: `(number, predictions)` in the order asked.
    pub async fn compare(
        &self,
        model: &str,
        references: &[VersionRef],
        image: Bytes,
        top_k: usize,
    ) -> Result<Vec<(u32, Vec<Prediction>)>, CoreError> {
        let mut targets = Vec::with_capacity(references.len());
        for reference in references {
            targets.push(self.target(model, reference).await?);
        }
        let results = self.registry.classify_each(&targets, vec![image], top_k).await?;
        Ok(targets
            .iter()
            .zip(results)
            .map(|(t, mut per_image)| (t.version, per_image.pop().unwrap_or_default()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lineage(sizes: &[usize]) -> Lineage {
        Arc::new(sizes.iter().map(|&n| Bytes::from(vec![0u8; n])).collect())
    }

    #[test]
    fn the_lineage_cache_keeps_within_its_budget() {
        let mut cache = LineageCache::new(10);
        let key = |n: u32| ("m".to_string(), n);
        cache.insert(key(1), lineage(&[4]));
        cache.insert(key(2), lineage(&[2, 2]));
        assert!(cache.get(&key(1)).is_some(), "1 is now the most recently used");
        cache.insert(key(3), lineage(&[5]));
        assert!(cache.get(&key(2)).is_none(), "2 was the least recently used");
        assert_eq!(cache.bytes, 9);
        cache.insert(key(4), lineage(&[11]));
        assert!(cache.get(&key(4)).is_none(), "over the budget on its own: never cached");
        cache.remove(&key(1));
        assert_eq!(cache.bytes, 5);
    }

    #[test]
    fn version_names_parse() {
        assert_eq!(VersionRef::parse("12").ok(), Some(VersionRef::Number(12)));
        assert_eq!(VersionRef::parse("prod-2").ok(), Some(VersionRef::Alias("prod-2".into())));
        assert!(VersionRef::parse("").is_err());
        assert!(VersionRef::parse("99999999999").is_err());
        assert!(is_valid_alias("canary_1") && !is_valid_alias("1abc") && !is_valid_alias("Prod"));
    }
}
