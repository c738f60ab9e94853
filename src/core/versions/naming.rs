//! How requests name versions: numbers, the reserved names and aliases.

use super::*;

pub const BASE: &str = "base";

pub const LATEST: &str = "latest";

pub const DEFAULT: &str = "default";

pub(super) const LONGEST_ALIAS: usize = 64;

/// A version as a request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionRef {
    Number(u32),
    Alias(String),
}

impl VersionRef {
    /// Digits name a number; anything else an alias.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text
                .parse()
                .map(VersionRef::Number)
                .map_err(|_| CoreError::InvalidArgument(format!("version number {text} is out of range")));
        }
        if text.is_empty() {
            return Err(CoreError::InvalidArgument("a version is a number or an alias, got an empty string".into()));
        }
        Ok(VersionRef::Alias(text.to_string()))
    }

    pub fn default_alias() -> Self {
        VersionRef::Alias(DEFAULT.into())
    }
}

impl std::fmt::Display for VersionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VersionRef::Number(n) => write!(f, "{n}"),
            VersionRef::Alias(alias) => write!(f, "'{alias}'"),
        }
    }
}

pub(super) fn is_valid_alias(alias: &str) -> bool {
    let mut bytes = alias.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && alias.len() <= LONGEST_ALIAS
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
