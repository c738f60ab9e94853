//! End-to-end tests: the real server binary on loopback, the real EfficientNet-Lite0, real photos.

mod common;

use std::collections::HashMap;

use common::{foolbox_photos, model_dir, raw_post, read, reference, TestServer};
use reqwest::multipart::{Form, Part};
use serde_json::Value;

async fn classify_raw(client: &reqwest::Client, server: &TestServer, bytes: Vec<u8>, query: &str) -> (u16, Value) {
    let response = client
        .post(server.url(&format!("/v1/models/efficientnet-lite0/classify{query}")))
        .header("content-type", "image/jpeg")
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn top1(body: &Value) -> u64 {
    body["predictions"][0]["index"].as_u64().unwrap()
}

/// The Python reference pipeline's (PIL preprocessing + upstream model) top-1 for each photo.
fn reference_top1() -> HashMap<String, u64> {
    let photos: Vec<String> = foolbox_photos().iter().map(|(p, _)| p.display().to_string()).collect();
    let package = model_dir();
    let mut args = vec!["classify", "--package", package.to_str().unwrap()];
    args.extend(photos.iter().map(String::as_str));
    reference(&args)
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            (v["path"].as_str().unwrap().to_string(), v["top1"].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn classifies_foolbox_photos_like_the_reference() {
    let server = TestServer::start(&[]).await;
    let client = reqwest::Client::new();
    let expected = reference_top1();
    let mut correct = 0;
    for (path, label) in foolbox_photos() {
        let (status, body) = classify_raw(&client, &server, read(&path), "").await;
        assert_eq!(status, 200, "{body}");
        let predictions = body["predictions"].as_array().unwrap();
        assert_eq!(predictions.len(), 5);
        assert_eq!(body["model"], "efficientnet-lite0");
        let probabilities: Vec<f64> = predictions.iter().map(|p| p["probability"].as_f64().unwrap()).collect();
        assert!(probabilities.windows(2).all(|w| w[0] >= w[1]), "not descending: {probabilities:?}");
        assert!(predictions[0]["label"].as_str().is_some_and(|l| !l.is_empty()));
        let predicted = top1(&body);
        correct += usize::from(predicted == label as u64);
        assert_eq!(predicted, expected[&path.display().to_string()], "{} differs from the reference", path.display());
    }
    println!("top-1 on the 20 foolbox photos: {correct}/20");
    assert!(correct >= 18, "top-1 accuracy {correct}/20");
}

fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    bytes.extend_from_slice(&13u32.to_be_bytes());
    bytes.extend_from_slice(&ihdr);
    bytes.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
    bytes
}

const CLASSIFY: &str = "/v1/models/efficientnet-lite0/classify";

#[tokio::test]
async fn bad_input_gets_a_json_error_and_the_server_keeps_serving() {
    let server = TestServer::start(&[]).await;
    let client = reqwest::Client::new();
    let (photo, label) = foolbox_photos().remove(0);
    let jpeg = read(&photo);
    let random: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    // (what, body, content type, query, status, error code)
    type Case = (&'static str, Vec<u8>, &'static str, &'static str, u16, &'static str);
    let cases: Vec<Case> = vec![
        ("empty body", vec![], "image/jpeg", "", 422, "invalid_request"),
        ("random bytes", random, "image/jpeg", "", 415, "unsupported_image_format"),
        ("truncated JPEG", jpeg[..jpeg.len() / 3].to_vec(), "image/jpeg", "", 422, "invalid_image"),
        ("100000x100000 PNG header", png_declaring(100_000, 100_000), "image/png", "", 422, "image_too_large"),
        ("text/plain", jpeg.clone(), "text/plain", "", 415, "unsupported_media_type"),
        ("top_k=0", jpeg.clone(), "image/jpeg", "?top_k=0", 422, "invalid_argument"),
        ("top_k=1001", jpeg.clone(), "image/jpeg", "?top_k=1001", 422, "invalid_argument"),
        ("top_k=abc", jpeg.clone(), "image/jpeg", "?top_k=abc", 422, "invalid_request"),
    ];
    for (what, body, content_type, query, status, code) in cases {
        let response = client
            .post(server.url(&format!("/v1/models/efficientnet-lite0/classify{query}")))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{what}");
        let error: Value = response.json().await.unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
        assert_eq!(error["error"]["code"], code, "{what}: {error}");
        assert!(error["error"]["message"].as_str().is_some_and(|m| m.len() > 10), "{what}: {error}");
    }

    // Over-limit bodies: refused from Content-Length before reading, and mid-stream when chunked.
    let port = server.base.rsplit(':').next().unwrap().parse().unwrap();
    let declared = "Content-Type: image/jpeg\r\nContent-Length: 17825792\r\n";
    let (status, body) = raw_post(port, CLASSIFY, declared, &[]).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");
    let chunk = vec![0u8; 1024 * 1024];
    let chunks: Vec<&[u8]> = std::iter::repeat_n(chunk.as_slice(), 17).collect();
    let (status, body) =
        raw_post(port, CLASSIFY, "Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n", &chunks).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");

    let response =
        client.post(server.url("/v1/models/no-such-model/classify")).body(jpeg.clone()).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");

    let (status, body) = classify_raw(&client, &server, jpeg, "?top_k=3").await;
    assert_eq!(status, 200);
    assert_eq!(body["predictions"].as_array().unwrap().len(), 3);
    assert_eq!(top1(&body), label as u64);
}

#[tokio::test]
async fn multipart_answers_each_part_in_order() {
    let server = TestServer::start(&[]).await;
    let client = reqwest::Client::new();
    let photos: Vec<_> = foolbox_photos().into_iter().take(3).collect();
    let mut form = Form::new();
    let mut singles = Vec::new();
    for (path, _) in &photos {
        form = form.part("image", Part::bytes(read(path)).file_name("x.jpg").mime_str("image/jpeg").unwrap());
        singles.push(classify_raw(&client, &server, read(path), "?top_k=2").await.1);
    }
    let response =
        client.post(server.url("/v1/models/efficientnet-lite0/classify?top_k=2")).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (result, single) in results.iter().zip(&singles) {
        assert_eq!(result["predictions"].as_array().unwrap().len(), 2);
        assert_eq!(result["predictions"][0]["index"], single["predictions"][0]["index"]);
    }

    let wrong = Form::new().part("picture", Part::bytes(read(&photos[0].0)));
    let response =
        client.post(server.url("/v1/models/efficientnet-lite0/classify")).multipart(wrong).send().await.unwrap();
    assert_eq!(response.status(), 422);
}

#[tokio::test]
async fn concurrent_requests_equal_sequential_ones() {
    concurrent_answers_equal_sequential_ones(&[]).await;
}

/// More executors than cores, each pass several requests of several images' worth: every answer still
/// goes to the request it belongs to.
#[tokio::test]
async fn concurrent_requests_equal_sequential_ones_on_three_executors() {
    concurrent_answers_equal_sequential_ones(&["--inference-streams", "3", "--max-batch-size", "5"]).await;
}

async fn concurrent_answers_equal_sequential_ones(args: &[&str]) {
    let server = TestServer::start(args).await;
    let client = reqwest::Client::new();
    let photos = foolbox_photos();
    let mut sequential = Vec::new();
    for (path, _) in &photos {
        sequential.push(classify_raw(&client, &server, read(path), "").await.1);
    }
    let requests = (0..64).map(|i| {
        let client = client.clone();
        let bytes = read(&photos[i % photos.len()].0);
        let url = server.url("/v1/models/efficientnet-lite0/classify");
        async move {
            let response = client.post(url).header("content-type", "image/jpeg").body(bytes).send().await.unwrap();
            (i, response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    });
    for (i, status, body) in futures::future::join_all(requests).await {
        assert_eq!(status, 200, "request {i}: {body}");
        let expected = &sequential[i % photos.len()];
        let indices =
            |v: &Value| v["predictions"].as_array().unwrap().iter().map(|p| p["index"].clone()).collect::<Vec<_>>();
        assert_eq!(indices(&body), indices(expected), "request {i}");
        for (got, want) in
            body["predictions"].as_array().unwrap().iter().zip(expected["predictions"].as_array().unwrap())
        {
            let (got, want) = (got["probability"].as_f64().unwrap(), want["probability"].as_f64().unwrap());
            // Batched and single passes may pick different kernels: equal up to float32 rounding.
            assert!((got - want).abs() <= 1e-5, "request {i}: {got} vs {want}");
        }
    }
}

#[tokio::test]
async fn health_readiness_models_and_metrics() {
    let server = TestServer::start(&[]).await;
    let client = reqwest::Client::new();
    assert_eq!(client.get(server.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(server.url("/readyz")).send().await.unwrap().status(), 200);

    let models: Value = client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let model = &models["models"][0];
    assert_eq!(model["name"], "efficientnet-lite0");
    assert_eq!(model["architecture"], "efficientnet-lite0");
    assert_eq!(model["num_classes"], 1000);
    assert_eq!(model["input_size"], serde_json::json!([224, 224]));
    assert_eq!(model["device"], "cpu");
    let one: Value =
        client.get(server.url("/v1/models/efficientnet-lite0")).send().await.unwrap().json().await.unwrap();
    assert_eq!(&one, model);
    let missing = client.get(server.url("/v1/models/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let unknown_route = client.get(server.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(unknown_route.status(), 404);
    assert_eq!(unknown_route.json::<Value>().await.unwrap()["error"]["code"], "not_found");

    // Every route of the OpenAPI document is really routed (the fallbacks answer not_found/method_not_allowed).
    let document = serde_json::to_value(editserve::api::openapi()).unwrap();
    let operations =
        document["paths"].as_object().unwrap().iter().flat_map(|(path, item)| {
            item.as_object().unwrap().keys().map(move |method| (method.clone(), path.clone()))
        });
    for (method, path) in operations {
        // DELETE names a model that is not there: the route answers model_not_found, and nothing is unloaded.
        let model = if method == "delete" { "no-such-model" } else { "efficientnet-lite0" };
        let path = path.replace("{name}", model).replace("{id}", "no-such-id").replace("{which}", "mask");
        let url = server.url(&path.replace("{version}", "0").replace("{alias}", "production"));
        let response = match method.as_str() {
            "get" => client.get(url).send().await.unwrap(),
            "post" => client.post(url).send().await.unwrap(),
            "put" => client.put(url).send().await.unwrap(),
            "delete" => client.delete(url).send().await.unwrap(),
            other => panic!("untested method {other}"),
        };
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        let code = serde_json::from_str::<Value>(&body).ok().map(|b| b["error"]["code"].clone());
        assert!(status != 405 && code != Some(serde_json::json!("not_found")), "{method} {path}: {status} {body}");
    }

    let (photo, _) = foolbox_photos().remove(0);
    assert_eq!(classify_raw(&client, &server, read(&photo), "").await.0, 200);
    let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "editserve_inference_batch_size_bucket",
        "editserve_queue_depth",
        "editserve_model_load_seconds",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    assert!(metrics.contains(r#"route="/v1/models/{name}/classify""#), "{metrics}");
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let server = TestServer::start(&["--queue-capacity", "1", "--max-batch-size", "1"]).await;
    let client = reqwest::Client::new();
    let photos = foolbox_photos();
    let requests = (0..48).map(|i| {
        let client = client.clone();
        let bytes = read(&photos[i % photos.len()].0);
        let url = server.url("/v1/models/efficientnet-lite0/classify");
        async move {
            let response = client.post(url).header("content-type", "image/jpeg").body(bytes).send().await.unwrap();
            let retry_after = response.headers().get("retry-after").cloned();
            (response.status().as_u16(), retry_after, response.json::<Value>().await.unwrap())
        }
    });
    let results = futures::future::join_all(requests).await;
    let rejected: Vec<_> = results.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(!rejected.is_empty(), "48 concurrent requests never filled a queue of 1");
    for (status, retry_after, body) in &results {
        assert!(*status == 200 || *status == 503, "{status}: {body}");
        if *status == 503 {
            assert_eq!(body["error"]["code"], "overloaded");
            assert!(retry_after.is_some());
        }
    }
    let (status, _) = classify_raw(&client, &server, read(&photos[0].0), "").await;
    assert_eq!(status, 200, "the server serves again once the queue drains");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let mut server = TestServer::start(&[]).await;
    let client = reqwest::Client::new();
    let photos = foolbox_photos();
    let requests: Vec<_> = (0..16)
        .map(|i| {
            let request = client
                .post(server.url("/v1/models/efficientnet-lite0/classify"))
                .header("content-type", "image/jpeg")
                .body(read(&photos[i % photos.len()].0));
            tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let status = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success(), "exit status {status:?}");
    for request in requests {
        // Every request the server had accepted before SIGTERM is answered; none is cut off.
        match request.await.unwrap() {
            Ok(code) => assert_eq!(code, 200),
            Err(e) => assert!(e.is_connect(), "an accepted request was dropped: {e}"),
        }
    }
}
