//! Aliases: names a client gives versions (`default` answers plain classify requests); `base` and `latest`
//! are computed.

use super::*;

impl Versions {
    /// Every alias of the model, built-in ones included.
    pub async fn aliases(&self, model: &str) -> Result<BTreeMap<String, u32>, CoreError> {
        self.registry.ensure_loaded(model)?;
        let mut aliases: BTreeMap<String, u32> = self.metadata.aliases(model).await?.into_iter().collect();
        aliases.insert(BASE.into(), 0);
        aliases.insert(LATEST.into(), self.metadata.latest_ready(model).await?.unwrap_or(0));
        aliases.entry(DEFAULT.into()).or_insert(0);
        Ok(aliases)
    }

    pub(super) fn settable(alias: &str) -> Result<(), CoreError> {
        if alias == BASE || alias == LATEST {
            return Err(CoreError::Conflict(
                Conflict::BuiltinAlias,
                format!("'{alias}' is built in: 'base' is always version 0 and 'latest' the newest ready version"),
            ));
        }
        if !is_valid_alias(alias) {
            return Err(CoreError::InvalidArgument(format!(
                "alias names are a lowercase letter then up to {} lowercase letters, digits, '_' or '-', got '{alias}'",
                LONGEST_ALIAS - 1
            )));
        }
        Ok(())
    }

    pub async fn set_alias(&self, model: &str, alias: &str, target: &VersionRef) -> Result<u32, CoreError> {
        Self::settable(alias)?;
        let _writes = self.writes.lock().await;
        let number = self.ready(model, target).await?;
        self.metadata.set_alias(model, alias, number).await?;
        self.metadata
            .record_audit(
                "alias.set",
                &format!("{model}/{alias}"),
                &caller::current(),
                Some(json!({ "version": number })),
            )
            .await?;
        Ok(number)
    }

    /// Removes an alias; `default` goes back to version 0.
    pub async fn delete_alias(&self, model: &str, alias: &str) -> Result<(), CoreError> {
        self.registry.ensure_loaded(model)?;
        Self::settable(alias)?;
        let _writes = self.writes.lock().await;
        if !self.metadata.delete_alias(model, alias).await? && alias != DEFAULT {
            return Err(CoreError::NotFound {
                kind: Resource::Alias,
                message: format!("model '{model}' has no alias '{alias}'"),
            });
        }
        self.metadata.record_audit("alias.delete", &format!("{model}/{alias}"), &caller::current(), None).await?;
        Ok(())
    }
}
