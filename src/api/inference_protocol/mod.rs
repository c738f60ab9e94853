//! The Open Inference Protocol v2 over REST (KServe v2 / Triton), with its classification and binary tensor
//! data extensions, beside the service's own routes: health, server and model metadata, model readiness and
//! inference. `{version}` is a version number or alias, as everywhere else. Errors answer the protocol's
//! `{"error": message}`, the transport's refusals (tokens, limits, deadline) too.

mod tensors;

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::{IntoResponses, ToSchema};

use self::tensors::{Elements, Input, Output, OutputData, HEADER_LENGTH};
pub use self::tensors::{InferRequest, InferResponse};
use super::body::read_body;
use super::error::{ApiError, ProtocolError, ProtocolErrorBody};
use super::models::check_request_pixels;
use super::params::{ModelPath, VersionPath};
use super::versions::version_ref;
use super::AppState;
use crate::core::registry::ModelInput;
use crate::core::versions::VersionRef;
use crate::imaging::InputTensor;
use crate::store::VersionState;

/// Inputs and outputs of every model, by the protocol's names.
const IMAGES: &str = "images";
const PIXELS: &str = "pixels";
const PROBABILITIES: &str = "probabilities";

/// The refusals of the protocol's metadata and readiness routes, stated once for the OpenAPI document.
#[derive(IntoResponses)]
#[expect(dead_code, reason = "only documents the answers; ProtocolError makes the real ones")]
pub enum LookupRefusals {
    #[response(status = 404, description = "`model_not_found`, `version_not_found`, `alias_not_found`")]
    NotFound(ProtocolErrorBody),
    #[response(status = 409, description = "`version_not_ready`")]
    NotReady(ProtocolErrorBody),
    #[response(status = 422, description = "`invalid_argument`: not a version number or alias")]
    Invalid(ProtocolErrorBody),
}

/// The refusals of the protocol's inference routes.
#[derive(IntoResponses)]
#[expect(dead_code, reason = "only documents the answers; ProtocolError makes the real ones")]
pub enum InferRefusals {
    #[response(status = 404, description = "`model_not_found`, `version_not_found`, `alias_not_found`")]
    NotFound(ProtocolErrorBody),
    #[response(status = 409, description = "`version_not_ready`")]
    NotReady(ProtocolErrorBody),
    #[response(status = 413, description = "`payload_too_large`: the body, images or pixels over the limits")]
    TooLarge(ProtocolErrorBody),
    #[response(status = 415, description = "`unsupported_image_format`")]
    Unsupported(ProtocolErrorBody),
    #[response(
        status = 422,
        description = "`invalid_request`, `invalid_argument`, `empty_image`, `invalid_image`, `image_too_large`"
    )]
    Invalid(ProtocolErrorBody),
    #[response(status = 503, description = "`overloaded`, `model_unloaded`, `shutting_down`")]
    Unavailable(ProtocolErrorBody),
}

#[derive(Serialize, ToSchema)]
pub struct Liveness {
    live: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    ready: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ServerMetadata {
    name: &'static str,
    version: &'static str,
    extensions: Vec<&'static str>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelMetadata {
    name: String,
    /// The ready versions (the newest 200 for the model; the one asked for a version).
    versions: Vec<String>,
    platform: &'static str,
    inputs: Vec<TensorMetadata>,
    outputs: Vec<TensorMetadata>,
}

#[derive(Serialize, ToSchema)]
pub struct TensorMetadata {
    name: &'static str,
    datatype: &'static str,
    /// -1 for a dimension of any size.
    shape: Vec<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelReadiness {
    name: String,
    ready: bool,
}

/// Liveness: 200 while the process serves.
#[utoipa::path(get, path = "/v2/health/live", tag = "open-inference", responses((status = 200, body = Liveness)))]
pub async fn live() -> Json<Liveness> {
    Json(Liveness { live: true })
}

/// Readiness: 200 once every configured model is loaded, 400 before (the protocol's 4xx for false).
#[utoipa::path(get, path = "/v2/health/ready", tag = "open-inference", responses(
    (status = 200, body = Readiness), (status = 400, body = Readiness, description = "Still loading")))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ready = state.registry.is_ready();
    let status = if ready { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    (status, Json(Readiness { ready })).into_response()
}

/// The server's name, version and protocol extensions.
#[utoipa::path(get, path = "/v2", tag = "open-inference", security(("bearer" = ["infer"])),
    responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "editserve",
        version: env!("CARGO_PKG_VERSION"),
        extensions: vec!["classification", "binary_tensor_data"],
    })
}

/// A model's inputs, outputs and ready versions.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "open-inference", security(("bearer" = ["infer"])),
    params(ModelPath), responses((status = 200, body = ModelMetadata), LookupRefusals))]
pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name }): Path<ModelPath>,
) -> Result<Json<ModelMetadata>, ProtocolError> {
    let page = state.versions.list(&name, None, super::query::LARGEST_PAGE).await?;
    let ready = page.versions.iter().filter(|v| v.state() == VersionState::Ready);
    let versions = ready.map(|v| v.number.to_string()).collect();
    Ok(Json(metadata(&state, name, versions)?))
}

/// One version's inputs and outputs.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", tag = "open-inference",
    security(("bearer" = ["infer"])), params(VersionPath),
    responses((status = 200, body = ModelMetadata), LookupRefusals))]
pub async fn version_metadata(
    State(state): State<Arc<AppState>>,
    Path(VersionPath { name, version }): Path<VersionPath>,
) -> Result<Json<ModelMetadata>, ProtocolError> {
    let number = state.versions.ready(&name, &version_ref(&version)?).await?;
    Ok(Json(metadata(&state, name, vec![number.to_string()])?))
}

fn metadata(state: &AppState, name: String, versions: Vec<String>) -> Result<ModelMetadata, ApiError> {
    let info = state.registry.model(&name)?;
    let [height, width] = info.input_size.map(i64::from);
    Ok(ModelMetadata {
        name,
        versions,
        platform: "editserve",
        inputs: vec![
            TensorMetadata { name: IMAGES, datatype: "BYTES", shape: vec![-1] },
            TensorMetadata { name: PIXELS, datatype: "FP32", shape: vec![-1, 3, height, width] },
        ],
        outputs: vec![TensorMetadata { name: PROBABILITIES, datatype: "FP32", shape: vec![-1, info.num_classes] }],
    })
}

/// 200 when the model's `default` version can classify.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "open-inference", security(("bearer" = ["infer"])),
    params(ModelPath), responses((status = 200, body = ModelReadiness), LookupRefusals))]
pub async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name }): Path<ModelPath>,
) -> Result<Json<ModelReadiness>, ProtocolError> {
    state.versions.ready(&name, &VersionRef::default_alias()).await?;
    Ok(Json(ModelReadiness { name, ready: true }))
}

/// 200 when the version can classify; 409 while its edit runs.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", tag = "open-inference",
    security(("bearer" = ["infer"])), params(VersionPath),
    responses((status = 200, body = ModelReadiness), LookupRefusals))]
pub async fn version_ready(
    State(state): State<Arc<AppState>>,
    Path(VersionPath { name, version }): Path<VersionPath>,
) -> Result<Json<ModelReadiness>, ProtocolError> {
    state.versions.ready(&name, &version_ref(&version)?).await?;
    Ok(Json(ModelReadiness { name, ready: true }))
}

/// Inference with the model's `default` version: one input, `images` (BYTES: encoded images, base64 in
/// JSON) or `pixels` (FP32 N x 3 x H x W, preprocessed); the output `probabilities`, or with the
/// `classification` parameter the k best classes as `"score:index:label"`. Binary tensor data (the
/// `Inference-Header-Content-Length` header) in both directions.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "open-inference", security(("bearer" = ["infer"])),
    params(ModelPath, ("Inference-Header-Content-Length" = Option<u64>, Header,
        description = "The JSON header's length when binary tensor data follows it")),
    request_body(content((InferRequest = "application/json"), (InferRequest = "application/octet-stream"))),
    responses((status = 200, body = InferResponse), InferRefusals))]
pub async fn infer_default(
    State(state): State<Arc<AppState>>,
    Path(ModelPath { name }): Path<ModelPath>,
    request: Request,
) -> Result<Response, ProtocolError> {
    infer(&state, name, VersionRef::default_alias(), request).await
}

/// Inference with one version, as `/v2/models/{name}/infer` does with the `default` one.
#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", tag = "open-inference",
    security(("bearer" = ["infer"])),
    params(VersionPath, ("Inference-Header-Content-Length" = Option<u64>, Header,
        description = "The JSON header's length when binary tensor data follows it")),
    request_body(content((InferRequest = "application/json"), (InferRequest = "application/octet-stream"))),
    responses((status = 200, body = InferResponse), InferRefusals))]
pub async fn infer_version(
    State(state): State<Arc<AppState>>,
    Path(VersionPath { name, version }): Path<VersionPath>,
    request: Request,
) -> Result<Response, ProtocolError> {
    let reference = version_ref(&version)?;
    infer(&state, name, reference, request).await
}

async fn infer(
    state: &AppState,
    model: String,
    reference: VersionRef,
    request: Request,
) -> Result<Response, ProtocolError> {
    let header_length = header_length(request.headers())?;
    let body = read_body(request.into_body(), state.config.max_body_bytes).await?;
    let (request, inputs) = tensors::parse(&body, header_length)?;
    drop(body);
    let [input] = <[Input; 1]>::try_from(inputs).map_err(|inputs| {
        ApiError::InvalidRequest(format!("{} inputs: send one, '{IMAGES}' or '{PIXELS}'", inputs.len()))
    })?;
    let (count, model_input) = model_input(state, input)?;
    let wanted = wanted_outputs(&request)?;
    let (number, probabilities) = state.versions.probabilities(&model, &reference, model_input).await?;
    let mut outputs = Vec::with_capacity(wanted.len());
    for (binary, classification) in wanted {
        let output = match classification {
            Some(k) => {
                let best = state.registry.rank(&model, &probabilities, k)?;
                let texts = best.iter().flatten().map(|p| format!("{:.6}:{}:{}", p.probability, p.index, p.label));
                let texts = texts.collect();
                Output {
                    name: PROBABILITIES.into(),
                    datatype: "BYTES",
                    shape: vec![count, k],
                    data: OutputData::Strings(texts),
                    binary,
                }
            }
            None => {
                let classes = probabilities.first().map_or(0, Vec::len);
                let values = probabilities.iter().flatten().copied().collect();
                Output {
                    name: PROBABILITIES.into(),
                    datatype: "FP32",
                    shape: vec![count, classes],
                    data: OutputData::Float(values),
                    binary,
                }
            }
        };
        outputs.push(output);
    }
    let (json, binary) = tensors::encode(model, number, request.id, outputs);
    if binary.is_empty() {
        return Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response());
    }
    let json_length = json.len();
    let mut response = ([(header::CONTENT_TYPE, "application/octet-stream")], [json, binary].concat()).into_response();
    response.headers_mut().insert(HeaderName::from_static(HEADER_LENGTH), HeaderValue::from(json_length));
    Ok(response)
}

fn header_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(value) = headers.get(HEADER_LENGTH) else { return Ok(None) };
    let length = value.to_str().ok().and_then(|v| v.trim().parse().ok());
    length
        .map(Some)
        .ok_or_else(|| ApiError::InvalidRequest("Inference-Header-Content-Length must be a byte count".into()))
}

/// The input as the model takes it, with its image count; within the per-request limits.
fn model_input(state: &AppState, input: Input) -> Result<(usize, ModelInput), ApiError> {
    let count = input.shape.first().copied().unwrap_or(0);
    let most = state.config.max_images_per_request;
    if count > most {
        return Err(ApiError::TooMany(format!(
            "{count} images where one request may hold {most} (--max-images-per-request)"
        )));
    }
    let wrong = |what: &str| ApiError::InvalidRequest(format!("input '{}' {what}", input.name));
    match (input.name.as_str(), input.elements) {
        (IMAGES, Elements::Bytes(images)) => {
            if !matches!(input.shape.as_slice(), [_] | [_, 1]) {
                return Err(wrong("must have the shape [N] or [N, 1]: one encoded image per element"));
            }
            check_request_pixels(state, &images)?;
            Ok((count, ModelInput::Encoded(images)))
        }
        (PIXELS, Elements::Float(values)) => {
            let &[_, 3, height, width] = input.shape.as_slice() else {
                return Err(wrong("must have the shape [N, 3, H, W]"));
            };
            let (height, width) = (u32::try_from(height), u32::try_from(width));
            let (Ok(height), Ok(width)) = (height, width) else { return Err(wrong("is too large")) };
            let plane = 3 * height as usize * width as usize;
            let tensors = values.chunks(plane.max(1)).map(|c| InputTensor { data: c.to_vec(), height, width });
            Ok((count, ModelInput::Preprocessed(tensors.collect())))
        }
        (IMAGES, _) => Err(wrong("must be BYTES")),
        (PIXELS, _) => Err(wrong("must be FP32")),
        (other, _) => Err(ApiError::InvalidRequest(format!(
            "no input named '{other}': send '{IMAGES}' (BYTES) or '{PIXELS}' (FP32)"
        ))),
    }
}

/// Each output asked for: (as binary data, the classification's k). All outputs when none is named.
fn wanted_outputs(request: &InferRequest) -> Result<Vec<(bool, Option<usize>)>, ApiError> {
    let flag = |value: Option<&serde_json::Value>, name: &str| match value {
        None => Ok(None),
        Some(v) => {
            v.as_bool().map(Some).ok_or_else(|| ApiError::InvalidRequest(format!("'{name}' must be true or false")))
        }
    };
    let binary_default = flag(tensors::parameter(&request.parameters, "binary_data_output"), "binary_data_output")?;
    let binary_default = binary_default.unwrap_or(false);
    let Some(outputs) = &request.outputs else { return Ok(vec![(binary_default, None)]) };
    outputs
        .iter()
        .map(|output| {
            if output.name != PROBABILITIES {
                return Err(ApiError::InvalidRequest(format!(
                    "no output named '{}': the output is '{PROBABILITIES}'",
                    output.name
                )));
            }
            let binary = flag(tensors::parameter(&output.parameters, "binary_data"), "binary_data")?;
            let classification = match tensors::parameter(&output.parameters, "classification") {
                None => None,
                Some(k) => match k.as_u64() {
                    Some(0) => None,
                    Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
                    None => return Err(ApiError::InvalidRequest("'classification' must be a class count".into())),
                },
            };
            Ok((binary.unwrap_or(binary_default), classification))
        })
        .collect()
}
