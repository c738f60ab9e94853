//! HTTP transport: routes, request/response types, and the error mapping. Everything else is in `core`.

mod body;
mod datasets;
mod error;
mod evaluations;
mod exemplars;
mod models;
mod query;
mod versions;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::config::ServeConfig;
use crate::core::datasets::Datasets;
use crate::core::evaluations::Evaluations;
use crate::core::exemplars::Exemplars;
use crate::core::jobs::Jobs;
use crate::core::registry::Registry;
use crate::core::versions::Versions;

pub struct AppState {
    pub registry: Arc<Registry>,
    pub exemplars: Exemplars,
    pub versions: Arc<Versions>,
    pub jobs: Arc<Jobs>,
    pub datasets: Arc<Datasets>,
    pub evaluations: Evaluations,
    /// Turns true when the server starts draining.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub config: ServeConfig,
    pub metrics: PrometheusHandle,
}

/// The routes, as `(method, path)`; kept beside the router so tests can compare them with openapi.yaml.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/models"),
    ("post", "/v1/models"),
    ("get", "/v1/models/{name}"),
    ("delete", "/v1/models/{name}"),
    ("post", "/v1/models/{name}/classify"),
    ("get", "/v1/models/{name}/versions"),
    ("post", "/v1/models/{name}/versions"),
    ("get", "/v1/models/{name}/versions/{version}"),
    ("delete", "/v1/models/{name}/versions/{version}"),
    ("post", "/v1/models/{name}/versions/{version}/classify"),
    ("post", "/v1/models/{name}/compare"),
    ("get", "/v1/models/{name}/aliases"),
    ("put", "/v1/models/{name}/aliases/{alias}"),
    ("delete", "/v1/models/{name}/aliases/{alias}"),
    ("post", "/v1/models/{name}/statistics"),
    ("get", "/v1/jobs/{id}"),
    ("delete", "/v1/jobs/{id}"),
    ("get", "/v1/jobs/{id}/events"),
    ("post", "/v1/textures"),
    ("post", "/v1/exemplars"),
    ("get", "/v1/exemplars/{id}"),
    ("delete", "/v1/exemplars/{id}"),
    ("get", "/v1/exemplars/{id}/{which}"),
    ("get", "/v1/audit"),
    ("get", "/v1/datasets"),
    ("post", "/v1/datasets"),
    ("get", "/v1/datasets/{id}"),
    ("delete", "/v1/datasets/{id}"),
    ("get", "/v1/models/{name}/evaluations"),
    ("post", "/v1/models/{name}/evaluations"),
    ("get", "/v1/evaluations/{id}"),
];

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.config.max_body_bytes;
    let dataset_limit = state.config.max_dataset_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/v1/models", get(models::list_models).post(models::load_model))
        .route("/v1/models/{name}", get(models::get_model).delete(models::unload_model))
        .route("/v1/models/{name}/classify", post(models::classify))
        .route("/v1/models/{name}/versions", get(versions::list_versions).post(versions::create_version))
        .route("/v1/models/{name}/versions/{version}", get(versions::get_version).delete(versions::delete_version))
        .route("/v1/models/{name}/versions/{version}/classify", post(versions::classify))
        .route("/v1/models/{name}/compare", post(versions::compare))
        .route("/v1/models/{name}/aliases", get(versions::list_aliases))
        .route("/v1/models/{name}/aliases/{alias}", put(versions::put_alias).delete(versions::delete_alias))
        .route("/v1/models/{name}/statistics", post(versions::create_statistics))
        .route("/v1/jobs/{id}", get(versions::get_job).delete(versions::cancel_job))
        .route("/v1/jobs/{id}/events", get(versions::job_events))
        .route("/v1/textures", post(exemplars::create_texture))
        .route("/v1/exemplars", post(exemplars::create_exemplar))
        .route("/v1/exemplars/{id}", get(exemplars::get_exemplar).delete(exemplars::delete_exemplar))
        .route("/v1/exemplars/{id}/{which}", get(exemplars::exemplar_image))
        .route("/v1/audit", get(exemplars::audit))
        // Datasets are uploaded whole: their own limit, set here, replaces the one for every other route.
        .route(
            "/v1/datasets",
            get(datasets::list_datasets).post(datasets::create_dataset).layer(DefaultBodyLimit::max(dataset_limit)),
        )
        .route("/v1/datasets/{id}", get(datasets::get_dataset).delete(datasets::delete_dataset))
        .route("/v1/models/{name}/evaluations", get(evaluations::list_evaluations).post(evaluations::create_evaluation))
        .route("/v1/evaluations/{id}", get(evaluations::get_evaluation))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_string()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(record_metrics))
        .layer(TraceLayer::new_for_http().on_failure(()))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.registry.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response()
    }
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// Request count and latency by route template (not raw path, to keep label cardinality bounded).
async fn record_metrics(request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("route", route), ("method", method), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    response
}
