//! HTTP transport: routes, request/response types, and the error mapping. Everything else is in `core`.

mod aliases;
mod auth;
mod body;
mod datasets;
mod edits;
mod error;
mod evaluations;
mod exemplars;
mod inference_protocol;
mod jobs;
mod models;
mod params;
mod query;
mod versions;

use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tower_http::trace::TraceLayer;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_scalar::{Scalar, Servable};

pub use auth::Tokens;
pub use error::{ApiError, ErrorBody, ErrorCode};

use error::{documented_refusal, ProtocolErrorBody};

use auth::{Access, AccessLimits};

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

/// Every route with its OpenAPI operation: the `#[utoipa::path]` on each handler states its method, path,
/// parameters and answers once, for both the router and the document.
fn routes(dataset_limit: usize) -> OpenApiRouter<Arc<AppState>> {
    // Datasets are uploaded whole: their own limit replaces the one for every other route.
    let (schemas, paths, datasets) = routes!(datasets::list_datasets, datasets::create_dataset);
    let datasets = (schemas, paths, datasets.layer(DefaultBodyLimit::max(dataset_limit)));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(render_metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(models::list_models, models::load_model))
        .routes(routes!(models::get_model, models::unload_model))
        .routes(routes!(models::classify))
        .routes(routes!(versions::list_versions, versions::create_version))
        .routes(routes!(versions::get_version, versions::delete_version))
        .routes(routes!(versions::classify))
        .routes(routes!(versions::compare))
        .routes(routes!(aliases::list_aliases))
        .routes(routes!(aliases::put_alias, aliases::delete_alias))
        .routes(routes!(jobs::create_statistics))
        .routes(routes!(jobs::get_job, jobs::cancel_job))
        .routes(routes!(jobs::job_events))
        .routes(routes!(exemplars::create_texture))
        .routes(routes!(exemplars::create_exemplar))
        .routes(routes!(exemplars::get_exemplar, exemplars::delete_exemplar))
        .routes(routes!(exemplars::exemplar_image))
        .routes(routes!(exemplars::audit))
        .routes(datasets)
        .routes(routes!(datasets::get_dataset, datasets::delete_dataset))
        .routes(routes!(evaluations::list_evaluations, evaluations::create_evaluation))
        .routes(routes!(evaluations::get_evaluation))
        .routes(routes!(inference_protocol::live))
        .routes(routes!(inference_protocol::ready))
        .routes(routes!(inference_protocol::server_metadata))
        .routes(routes!(inference_protocol::model_metadata))
        .routes(routes!(inference_protocol::version_metadata))
        .routes(routes!(inference_protocol::model_ready))
        .routes(routes!(inference_protocol::version_ready))
        .routes(routes!(inference_protocol::infer_default))
        .routes(routes!(inference_protocol::infer_version))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "editserve",
        description = "Inference-and-edit service for image classifiers: classify with any version of a model, \
            edit a layer from one exemplar into a new immutable version, compare versions. Every error answers \
            `{\"error\": {\"code\", \"message\"}}` (`ErrorBody`); clients branch on `code`."
    ),
    components(schemas(ErrorCode, ProtocolErrorBody))
)]
struct ApiDoc;

/// The OpenAPI document of every route; `openapi.yaml` is this, written by `editserve openapi`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut document) = routes(0).split_for_parts();
    utoipa::Modify::modify(&auth::BearerScheme, &mut document);
    document_transport_refusals(&mut document);
    document.info.version = env!("CARGO_PKG_VERSION").to_string();
    let description = document.info.description.get_or_insert_with(String::new);
    description.push_str(&describe_limits());
    document
}

/// What the transport may answer before or instead of a handler: 413 for every operation that reads a body
/// (the body limit), 504 for every operation (the request timeout).
fn document_transport_refusals(document: &mut utoipa::openapi::OpenApi) {
    for (path, operation) in operations_mut(document) {
        let responses = &mut operation.responses.responses;
        if operation.request_body.is_some() {
            responses.entry("413".into()).or_insert_with(|| documented_refusal(path, "`payload_too_large`"));
        }
        let deadline = documented_refusal(path, "`deadline_exceeded`: over --request-timeout-secs");
        responses.insert("504".into(), deadline);
    }
}

/// Every operation of the document with its method and path.
fn operations(
    document: &utoipa::openapi::OpenApi,
) -> impl Iterator<Item = (axum::http::Method, &str, &utoipa::openapi::path::Operation)> {
    use axum::http::Method;
    document.paths.paths.iter().flat_map(|(path, item)| {
        let operations = [
            (Method::GET, &item.get),
            (Method::POST, &item.post),
            (Method::PUT, &item.put),
            (Method::DELETE, &item.delete),
            (Method::PATCH, &item.patch),
        ];
        operations.into_iter().filter_map(move |(method, operation)| Some((method, path.as_str(), operation.as_ref()?)))
    })
}

/// Every operation of the document, to add what many share.
fn operations_mut(
    document: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = (&str, &mut utoipa::openapi::path::Operation)> {
    document.paths.paths.iter_mut().flat_map(|(path, item)| {
        [&mut item.get, &mut item.post, &mut item.put, &mut item.delete, &mut item.patch]
            .into_iter()
            .flatten()
            .map(move |operation| (path.as_str(), operation))
    })
}

/// The limits a client meets, from the constants the server enforces (the first four are defaults of flags).
fn describe_limits() -> String {
    use crate::config::{
        DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_DATASET_BYTES, DEFAULT_MAX_DATASET_IMAGES, DEFAULT_MAX_IMAGES_IN_FLIGHT,
        DEFAULT_MAX_IMAGES_PER_REQUEST, DEFAULT_MAX_PIXELS, DEFAULT_MAX_REQUEST_PIXELS,
    };
    format!(
        "\n\nLimits: request bodies up to {DEFAULT_MAX_BODY_BYTES} bytes (`--max-body-bytes`; 413 \
         `payload_too_large`), dataset uploads up to {DEFAULT_MAX_DATASET_BYTES} bytes and \
         {DEFAULT_MAX_DATASET_IMAGES} images (`--max-dataset-bytes`, `--max-dataset-images`), images up to \
         {DEFAULT_MAX_PIXELS} pixels (`--max-pixels`; 422 `image_too_large`); a classification at most \
         {DEFAULT_MAX_IMAGES_PER_REQUEST} images of {DEFAULT_MAX_REQUEST_PIXELS} pixels together \
         (`--max-images-per-request`, `--max-request-pixels`; 413), and the server holds at most \
         {DEFAULT_MAX_IMAGES_IN_FLIGHT} images decoded at once (`--max-images-in-flight`: a request waits for room); \
         `top_k` {} classes by default, pages of {} by \
         default and at most {}; audit pages at most {}; a comparison names 1 to {} versions; an Idempotency-Key \
         has 1 to {} visible ASCII characters.",
        query::DEFAULT_TOP_K,
        query::DEFAULT_PAGE,
        query::LARGEST_PAGE,
        exemplars::AUDIT_PAGE,
        versions::MOST_COMPARED,
        versions::LONGEST_IDEMPOTENCY_KEY,
    )
}

static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(openapi);

/// The service's routes with the token check, the docs and the fallbacks.
pub fn router(state: Arc<AppState>, tokens: Option<Tokens>) -> Router {
    let limits = AccessLimits {
        protect_metrics: state.config.protect_metrics,
        drain_limit: state.config.max_body_bytes,
        concurrent_per_token: state.config.max_concurrent_per_token,
    };
    let access = Arc::new(Access::new(tokens, &DOCUMENT, limits));
    let (router, _) = routes(state.config.max_dataset_bytes).split_for_parts();
    router
        .route_layer(middleware::from_fn_with_state(access, auth::authorize))
        .merge(Scalar::with_url("/docs", DOCUMENT.clone()))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_string()) })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.config.request_timeout_secs, enforce_deadline))
        .layer(middleware::from_fn(record_metrics))
        .layer(TraceLayer::new_for_http().on_failure(()))
        .with_state(state)
}

/// This document, as JSON; `/docs` shows it as a page.
#[utoipa::path(get, path = "/openapi.json", tag = "health", responses((status = 200, body = Object, description = "OpenAPI 3.1")))]
async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(&DOCUMENT)
}

/// Liveness: 200 while the process serves.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Status, description = "Serving")))]
async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Readiness: 200 once every configured model is loaded and warmed up.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, body = Status, description = "Ready (`ready`)"),
    (status = 503, body = Status, description = "Still loading (`loading`)"),
))]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.registry.is_ready() {
        Json(Status { status: "ready" }).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Status { status: "loading" })).into_response()
    }
}

#[derive(Serialize, ToSchema)]
struct Status {
    status: &'static str,
}

/// Prometheus metrics: `http_requests_total` and `http_request_duration_seconds` (by route, method, status),
/// `editserve_inference_batch_size`, `editserve_inference_seconds`, `editserve_queue_depth`,
/// `editserve_model_load_seconds` (by model).
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, body = String, content_type = "text/plain", description = "Prometheus text exposition format"),
))]
async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// Abandons a request that takes longer than the request timeout (its work is dropped, as when a client
/// goes away) and answers 504 instead.
async fn enforce_deadline(State(seconds): State<u64>, request: Request, next: Next) -> Response {
    // Cloning a Uri shares its bytes: nothing is copied on the way of every request.
    let uri = request.uri().clone();
    match tokio::time::timeout(std::time::Duration::from_secs(seconds), next.run(request)).await {
        Ok(response) => response,
        Err(_) => error::refusal_for(uri.path(), ApiError::DeadlineExceeded { seconds }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The limits written as literals in `#[utoipa::path]` attributes are those the handlers enforce.
    #[test]
    fn the_documented_limits_are_the_enforced_ones() {
        let document = serde_json::to_value(openapi()).unwrap();
        let parameter = |path: &str, method: &str, name: &str| {
            let parameters = document["paths"][path][method]["parameters"].as_array().unwrap().clone();
            parameters.into_iter().find(|p| p["name"] == name).unwrap()["schema"].clone()
        };
        let largest = |schema: serde_json::Value, key: &str| schema[key].as_f64().unwrap() as u64;
        assert_eq!(
            largest(parameter("/v1/models/{name}/versions", "get", "limit"), "maximum"),
            u64::from(query::LARGEST_PAGE)
        );
        let evaluations = parameter("/v1/models/{name}/evaluations", "get", "limit");
        assert_eq!(largest(evaluations, "maximum"), u64::from(query::LARGEST_PAGE));
        assert_eq!(largest(parameter("/v1/audit", "get", "limit"), "maximum"), u64::from(exemplars::AUDIT_PAGE));
        let key = parameter("/v1/models/{name}/versions", "post", "Idempotency-Key");
        assert_eq!(largest(key, "maxLength"), versions::LONGEST_IDEMPOTENCY_KEY as u64);
        let request = &document["components"]["schemas"]["EvaluationRequest"]["properties"]["versions"];
        assert_eq!(request["maxItems"].as_u64(), Some(crate::core::evaluations::MOST_VERSIONS as u64));
    }
}
