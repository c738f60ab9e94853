//! API behaviour checked in-process: the router of a real `App` (the real model, a real SQLite file and blob
//! directory in a temporary directory) driven with `tower::ServiceExt::oneshot`, without a socket or a
//! child process, so that each request takes milliseconds. The tests that start the binary stay for what
//! needs a process: signals, restarts, load.

mod common;

use std::net::SocketAddr;

use axum::body::{to_bytes, Body};
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode};
use clap::Parser;
use common::{foolbox_photos, root};
use editserve::config::ServeConfig;
use editserve::server::App;
use serde_json::{json, Value};
use tower::ServiceExt;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    serve: ServeConfig,
}

async fn app(data: &std::path::Path) -> App {
    app_with(data, &[]).await.expect("build the app")
}

async fn app_with(data: &std::path::Path, extra: &[&str]) -> anyhow::Result<App> {
    let models = root().join("models");
    let args = ["test", "--device", "cpu", "--models", "efficientnet-lite0", "--models-dir"];
    let flags = Flags::try_parse_from(
        args.iter()
            .map(|a| a.to_string())
            .chain([models.display().to_string(), "--data-dir".into(), data.display().to_string()])
            .chain(extra.iter().map(|a| a.to_string())),
    )
    .expect("flags");
    App::build(flags.serve).await
}

/// As a client on `peer` would be answered.
async fn send_from(peer: [u8; 4], app: &App, request: Request<Body>) -> (StatusCode, Value) {
    let router = app.router.clone().layer(MockConnectInfo(SocketAddr::from((peer, 40000))));
    let response = router.oneshot(request).await.expect("the router answers");
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.expect("a body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// As a loopback client would be answered (no tokens are configured here).
async fn send(app: &App, request: Request<Body>) -> (StatusCode, Value) {
    send_from([127, 0, 0, 1], app, request).await
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("a request")
}

fn post(uri: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri).header("content-type", content_type).body(body.into()).expect("a request")
}

#[tokio::test]
async fn routes_answer_in_process_with_their_statuses_and_codes() {
    let data = tempfile::tempdir().unwrap();
    let app = app(data.path()).await;
    assert_eq!(send(&app, get("/readyz")).await.0, StatusCode::SERVICE_UNAVAILABLE, "ready before the models load");
    app.load_models().await.expect("load the model");
    assert_eq!(send(&app, get("/readyz")).await.0, StatusCode::OK);

    let (status, models) = send(&app, get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["models"][0]["name"], "efficientnet-lite0");

    // The bull mastiff photo, classified through the whole stack (decode, batching thread, executor).
    let (photo, label) = foolbox_photos().remove(0);
    let jpeg = std::fs::read(&photo).unwrap();
    let (status, body) = send(&app, post("/v1/models/efficientnet-lite0/classify", "image/jpeg", jpeg.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["predictions"][0]["index"], label as u64, "{body}");

    let versions = "/v1/models/efficientnet-lite0/versions";
    let edit = |body: Value| post(versions, "application/json", body.to_string());
    let load = |body: Value| post("/v1/models", "application/json", body.to_string());
    // (request, status, error code)
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (get("/v1/models/nope"), StatusCode::NOT_FOUND, "model_not_found"),
        (get("/v2/nothing"), StatusCode::NOT_FOUND, "not_found"),
        (
            post("/v1/models/efficientnet-lite0/classify", "image/jpeg", Vec::new()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            post("/v1/models/efficientnet-lite0/classify?top_k=x", "image/jpeg", jpeg),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (get("/v1/audit?limit=abc"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (get("/v1/audit?colour=red"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (get(&format!("{versions}?limit=0")), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (get(&format!("{versions}/99")), StatusCode::NOT_FOUND, "version_not_found"),
        (edit(json!({"exemplars": [], "colour": "red"})), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (
            edit(json!({"exemplars": ["00000000-0000-0000-0000-000000000000"]})),
            StatusCode::NOT_FOUND,
            "exemplar_not_found",
        ),
        (get("/v1/jobs/00000000-0000-0000-0000-000000000000"), StatusCode::NOT_FOUND, "job_not_found"),
        (get("/v1/datasets/00000000-0000-0000-0000-000000000000"), StatusCode::NOT_FOUND, "dataset_not_found"),
        // Found by an outside probe (issue 13), each fixed:
        // a JSON body over the limit is 413 like any other, not a parse error;
        (
            post(versions, "application/json", format!("{{\"description\": \"{}\"}}", "x".repeat(17 << 20))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        // `before` past u32 is out of range, not "negative";
        (get(&format!("{versions}?before=4294967296")), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        // no model named "..";
        (
            load(json!({"name": "..", "path": "efficientnet-lite0"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        // a package path outside the models directory is refused alike whether it exists or not.
        (load(json!({"name": "x", "path": "/etc"})), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
    ];
    let (status, document) = send(&app, get("/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(document, serde_json::to_value(editserve::api::openapi()).unwrap());
    for (request, status, code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let documented = documented_statuses(&document, request.method().as_str(), request.uri().path());
        let (got, body) = send(&app, request).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        // The answer is one the OpenAPI document lists for the operation (unrouted paths excepted).
        if let Some(documented) = documented {
            assert!(documented.contains(&got.as_u16().to_string()), "{what}: {got} not in {documented:?}");
        }
    }
    let (_, range) = send(&app, get(&format!("{versions}?before=4294967296"))).await;
    assert!(range["error"]["message"].as_str().unwrap().contains("4294967295"), "{range}");
    let (_, existing) = send(&app, load(json!({"name": "x", "path": "/etc"}))).await;
    let (_, missing) = send(&app, load(json!({"name": "x", "path": "/no/such/dir"}))).await;
    let message = |body: &Value, path: &str| body["error"]["message"].as_str().unwrap().replace(path, "P");
    assert_eq!(message(&existing, "/etc"), message(&missing, "/no/such/dir"), "the answer tells nothing of the disk");
    assert!(!message(&existing, "/etc").contains(root().to_str().unwrap()), "no absolute server path: {existing}");

    // One request is bounded: at most 64 images (the 65th part is refused, not decoded), and at most 100
    // million pixels together by their headers (two 10,000 x 10,000 headers refused before any decoding).
    let tiny = top_down_bmp();
    let (content_type, body) = multipart(&vec![("image", tiny.as_slice()); 65]);
    let (status, body) = send(&app, post("/v1/models/efficientnet-lite0/classify", &content_type, body)).await;
    assert_eq!((status, &body["error"]["code"]), (StatusCode::PAYLOAD_TOO_LARGE, &json!("payload_too_large")));
    assert!(body["error"]["message"].as_str().unwrap().contains("at most 64"), "{body}");
    let (content_type, body) = multipart(&vec![("image", tiny.as_slice()); 64]);
    let (status, body) = send(&app, post("/v1/models/efficientnet-lite0/classify", &content_type, body)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"].as_array().map(Vec::len), Some(64));
    let huge = png_header(10_000, 10_000);
    let (content_type, body) = multipart(&[("image", huge.as_slice()), ("image", huge.as_slice())]);
    let (status, body) = send(&app, post("/v1/models/efficientnet-lite0/classify", &content_type, body)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("200000000 pixels"), "{body}");

    // A statistics job's images are checked when it is asked for, not when it runs.
    let statistics = "/v1/models/efficientnet-lite0/statistics";
    let (content_type, body) = multipart(&[("image", tiny.as_slice()), ("image", b"not an image".as_slice())]);
    let (status, body) = send(&app, post(statistics, &content_type, body)).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, &json!("unsupported_image_format"))
    );
    assert!(body["error"]["message"].as_str().unwrap().starts_with("image 1"), "{body}");
    let claims = png_header(100_000, 100_000);
    let (content_type, body) = multipart(&[("image", claims.as_slice())]);
    let (status, body) = send(&app, post(statistics, &content_type, body)).await;
    assert_eq!((status, &body["error"]["code"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("image_too_large")));

    // A top-down BMP (negative height in its header) is an ordinary 2x2 image.
    let (status, body) = send(&app, post("/v1/models/efficientnet-lite0/classify", "image/bmp", top_down_bmp())).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // With no tokens configured, a peer that is not on loopback is refused every operation; health stays open.
    let (status, body) = send_from([192, 0, 2, 7], &app, get("/v1/models")).await;
    assert_eq!((status, &body["error"]["code"]), (StatusCode::FORBIDDEN, &json!("forbidden")), "{body}");
    assert_eq!(send_from([192, 0, 2, 7], &app, get("/healthz")).await.0, StatusCode::OK);
    let docs = app.router.clone().oneshot(get("/docs")).await.expect("the router answers");
    assert_eq!(docs.status(), StatusCode::OK);
    let page = to_bytes(docs.into_body(), usize::MAX).await.expect("a body");
    assert!(String::from_utf8_lossy(&page).contains("/v1/models/{name}/versions"), "the page embeds the document");
    app.stop().await;
}

/// The statuses the document lists for the operation that serves `method path`, if one does.
fn documented_statuses(document: &Value, method: &str, path: &str) -> Option<Vec<String>> {
    let segments: Vec<&str> = path.split('/').collect();
    let (_, item) = document["paths"].as_object()?.iter().find(|(template, _)| {
        let parts: Vec<&str> = template.split('/').collect();
        parts.len() == segments.len()
            && parts.iter().zip(&segments).all(|(t, s)| t == s || (t.starts_with('{') && t.ends_with('}')))
    })?;
    let responses = item[method.to_ascii_lowercase()]["responses"].as_object()?;
    Some(responses.keys().cloned().collect())
}

/// A 2x2 24-bit BMP stored top-down (negative height), as some encoders write them.
fn top_down_bmp() -> Vec<u8> {
    let row = [0u8, 0, 255, 0, 255, 0, 0, 0]; // two BGR pixels, padded to 4 bytes
    let pixels: Vec<u8> = [row, row].concat();
    let mut bmp = b"BM".to_vec();
    bmp.extend((54 + pixels.len() as u32).to_le_bytes());
    bmp.extend([0u8; 4]);
    bmp.extend(54u32.to_le_bytes());
    bmp.extend(40u32.to_le_bytes()); // BITMAPINFOHEADER
    bmp.extend(2i32.to_le_bytes());
    bmp.extend((-2i32).to_le_bytes());
    bmp.extend(1u16.to_le_bytes());
    bmp.extend(24u16.to_le_bytes());
    bmp.extend([0u8; 24]); // no compression, sizes, resolution, palette
    bmp.extend(pixels);
    bmp
}

/// The start of a PNG that claims `width` x `height` pixels: signature, header, an empty data chunk, end.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        [&(data.len() as u32).to_be_bytes()[..], kind, data, &crc.finalize().to_be_bytes()].concat()
    };
    let header = [&width.to_be_bytes()[..], &height.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
    [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &header), &chunk(b"IDAT", &[]), &chunk(b"IEND", &[])].concat()
}

/// A multipart/form-data body of `parts` (name, bytes), and its content type.
fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "editserve-test-boundary";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"f\"\r\n\r\n").bytes(),
        );
        body.extend(*bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The Open Inference Protocol's routes in-process: an inference in JSON (base64 images in, numbers and the
/// classification extension out), and each refusal with its status, code and the protocol's error shape.
#[tokio::test]
async fn open_inference_answers_and_refusals() {
    use base64::Engine;
    let data = tempfile::tempdir().unwrap();
    let app = app(data.path()).await;
    assert_eq!(send(&app, get("/v2/health/ready")).await.0, StatusCode::BAD_REQUEST, "the protocol's not ready");
    app.load_models().await.expect("load the model");
    assert_eq!(send(&app, get("/v2/health/ready")).await, (StatusCode::OK, json!({"ready": true})));

    let (photo, label) = foolbox_photos().remove(0);
    let encoded = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&photo).unwrap());
    let images = |count: usize, element: &str| json!({"name": "images", "shape": [count], "datatype": "BYTES", "data": vec![element; count]});
    let infer = "/v2/models/efficientnet-lite0/infer";
    let request = json!({"id": "r1", "inputs": [images(1, &encoded)],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]});
    let (status, body) = send(&app, post(infer, "application/json", request.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((&body["id"], &body["model_version"]), (&json!("r1"), &json!("0")));
    let best = body["outputs"][0]["data"][0].as_str().unwrap();
    assert_eq!(best.split(':').nth(1), Some(label.to_string().as_str()), "{body}");
    assert_eq!(body["outputs"][0]["shape"], json!([1, 2]));
    let request = json!({"inputs": [images(1, &encoded)]});
    let (status, body) = send(&app, post(infer, "application/json", request.to_string())).await;
    assert_eq!((status, &body["outputs"][0]["shape"]), (StatusCode::OK, &json!([1, 1000])), "{body}");

    let tiny = base64::engine::general_purpose::STANDARD.encode(top_down_bmp());
    let with_header = |length: &str, body: &str| {
        Request::post(infer).header("inference-header-content-length", length).body(Body::from(body.to_string()))
    };
    let pixels = json!({"name": "pixels", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": vec![0.0; 192]});
    let output = |parameters: Value| json!({"inputs": [images(1, &tiny)], "outputs": [{"name": "probabilities", "parameters": parameters}]});
    let json_post = |uri: &str, body: Value| post(uri, "application/json", body.to_string());
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (json_post(infer, json!({"inputs": []})), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (
            json_post(infer, json!({"inputs": [images(1, &tiny), images(1, &tiny)]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (json_post(infer, json!({"inputs": [images(65, &tiny)]})), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        (
            json_post(infer, json!({"inputs": [images(1, "not base64!")]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json_post(
                infer,
                json!({"inputs": [{"name": "images", "shape": [1, 2], "datatype": "BYTES", "data": [&tiny, &tiny]}]}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (json_post(infer, json!({"inputs": [pixels]})), StatusCode::UNPROCESSABLE_ENTITY, "invalid_argument"),
        (
            json_post(infer, json!({"inputs": [images(1, &tiny)], "outputs": [{"name": "logits"}]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (json_post(infer, output(json!({"classification": "x"}))), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (
            json_post(infer, output(json!({"classification": 1001}))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (with_header("abc", "{}").unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (with_header("99", "{}").unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (get("/v2/models/nope/ready"), StatusCode::NOT_FOUND, "model_not_found"),
        (get("/v2/models/efficientnet-lite0/versions/99"), StatusCode::NOT_FOUND, "version_not_found"),
        (
            json_post("/v2/models/efficientnet-lite0/versions/99/infer", json!({"inputs": [images(1, &tiny)]})),
            StatusCode::NOT_FOUND,
            "version_not_found",
        ),
    ];
    // A refusal before the handler runs (here: a peer off loopback while no tokens are configured) takes the
    // protocol's shape too.
    let (status, body) = send_from([192, 0, 2, 7], &app, get("/v2/models/efficientnet-lite0")).await;
    assert_eq!((status, &body["code"]), (StatusCode::FORBIDDEN, &json!("forbidden")), "{body}");
    assert!(body["error"].is_string(), "{body}");
    let (_, document) = send(&app, get("/openapi.json")).await;
    for (request, status, code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let documented = documented_statuses(&document, request.method().as_str(), request.uri().path());
        let (got, body) = send(&app, request).await;
        assert_eq!((got, &body["code"]), (status, &json!(code)), "{what}: {body}");
        assert!(body["error"].is_string(), "the protocol's error is a message: {body}");
        let documented = documented.unwrap_or_default();
        assert!(documented.contains(&got.as_u16().to_string()), "{what}: {got} not in {documented:?}");
    }
    app.stop().await;
}

/// The images held decoded at once are bounded server-wide: requests beyond the room wait for it (and are
/// all answered), and a room smaller than one request is refused at start-up.
#[tokio::test]
async fn requests_wait_for_room_to_decode() {
    let data = tempfile::tempdir().unwrap();
    let refused = app_with(data.path(), &["--max-images-in-flight", "8"]).await;
    assert!(refused.err().is_some_and(|e| e.to_string().contains("--max-images-in-flight")));
    let app = app_with(data.path(), &["--max-images-in-flight", "64"]).await.expect("build the app");
    app.load_models().await.expect("load the model");
    let tiny = top_down_bmp();
    let (content_type, body) = multipart(&vec![("image", tiny.as_slice()); 64]);
    let request = || post("/v1/models/efficientnet-lite0/classify", &content_type, body.clone());
    let answers = futures::future::join_all((0..4).map(|_| send(&app, request()))).await;
    for (status, body) in answers {
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["results"].as_array().map(Vec::len), Some(64));
    }
    app.stop().await;
}
