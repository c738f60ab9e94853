//! Path parameters shared by several routes: each is an extractor and, through `IntoParams`, its own
//! OpenAPI description. And a version as a JSON body names it.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use crate::core::versions::VersionRef;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ModelPath {
    /// A loaded model's name.
    pub name: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct VersionPath {
    /// A loaded model's name.
    pub name: String,
    /// A version number (0 is the model as loaded) or an alias (`base`, `latest`, `default`, or one of yours).
    pub version: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AliasPath {
    /// A loaded model's name.
    pub name: String,
    /// A lowercase letter, then up to 63 lowercase letters, digits, `_` or `-`; `base` and `latest` are built
    /// in and cannot be set.
    pub alias: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IdPath {
    /// The id the resource was created with.
    pub id: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ExemplarImagePath {
    /// The exemplar's id.
    pub id: String,
    /// `image`, `mask` or `modified`.
    pub which: String,
}

/// A version as a JSON request names it: a number or an alias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum VersionName {
    Number(u32),
    Alias(String),
}

impl VersionName {
    /// The version core looks up; an alias is checked as one in a path is (422 `invalid_argument`).
    pub fn reference(&self) -> Result<VersionRef, ApiError> {
        match self {
            VersionName::Number(n) => Ok(VersionRef::Number(*n)),
            VersionName::Alias(text) => Ok(VersionRef::parse(text)?),
        }
    }
}
