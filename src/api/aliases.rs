//! Aliases: names clients give versions (`default` answers plain classify requests).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::params::{AliasPath, ModelPath, VersionName};
use super::versions::json_body;
use super::AppState;

#[derive(Serialize, ToSchema)]
pub struct AliasList {
    aliases: BTreeMap<String, u32>,
}

/// A model's aliases and the versions they name, built-in ones (`base`, `latest`, `default`) included.
#[utoipa::path(get, path = "/v1/models/{name}/aliases", tag = "aliases", security(("bearer" = ["infer"])), params(ModelPath), responses(
    (status = 200, body = AliasList),
    (status = 404, body = ErrorBody, description = "`model_not_found`"),
))]
pub async fn list_aliases(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name: model }): Path<ModelPath>,
) -> Result<Json<AliasList>, ApiError> {
    Ok(Json(AliasList { aliases: state.versions.aliases(&model).await? }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AliasTarget {
    version: VersionName,
}

#[derive(Serialize, ToSchema)]
pub struct AliasSet {
    alias: String,
    version: u32,
}

/// Points an alias at a ready version; `default` answers plain classify requests.
#[utoipa::path(put, path = "/v1/models/{name}/aliases/{alias}", tag = "aliases", security(("bearer" = ["edit"])), params(AliasPath),
    request_body = AliasTarget,
    responses(
        (status = 200, body = AliasSet),
        (status = 404, body = ErrorBody, description = "`model_not_found`, `version_not_found`, `alias_not_found`"),
        (status = 409, body = ErrorBody, description = "`builtin_alias`, `version_not_ready`"),
        (status = 422, body = ErrorBody, description = "`invalid_request`, `invalid_argument`"),
    ))]
pub async fn put_alias(
    State(state): State<Arc<AppState>>,
    Path(AliasPath { name: model, alias }): Path<AliasPath>,
    body: Result<Json<AliasTarget>, JsonRejection>,
) -> Result<Json<AliasSet>, ApiError> {
    state.registry.ensure_loaded(&model)?;
    let target = json_body(body, state.config.max_body_bytes)?.version.reference()?;
    let version = state.versions.set_alias(&model, &alias, &target).await?;
    Ok(Json(AliasSet { alias, version }))
}

/// Removes an alias (`default` then names version 0 again).
#[utoipa::path(delete, path = "/v1/models/{name}/aliases/{alias}", tag = "aliases", security(("bearer" = ["edit"])), params(AliasPath), responses(
    (status = 204, description = "Removed"),
    (status = 404, body = ErrorBody, description = "`model_not_found`, `alias_not_found`"),
    (status = 409, body = ErrorBody, description = "`builtin_alias`"),
    (status = 422, body = ErrorBody, description = "`invalid_argument`"),
))]
pub async fn delete_alias(
    State(state): State<Arc<AppState>>,
    Path(AliasPath { name: model, alias }): Path<AliasPath>,
) -> Result<StatusCode, ApiError> {
    state.versions.delete_alias(&model, &alias).await?;
    Ok(StatusCode::NO_CONTENT)
}
