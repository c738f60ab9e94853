//! Exemplars, textures and the audit log over real HTTP, against a real SQLite file and blob directory.

mod common;

use std::io::Cursor;

use common::{root, TestServer};
use image::{DynamicImage, GrayImage, ImageFormat, Luma, Rgb, RgbImage};
use reqwest::multipart::{Form, Part};
use serde_json::Value;

fn png(image: DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
    out
}

fn photo() -> RgbImage {
    RgbImage::from_fn(64, 48, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, 77]))
}

/// The left half of a 64 x 48 image.
fn left_half() -> Vec<u8> {
    png(DynamicImage::ImageLuma8(GrayImage::from_fn(64, 48, |x, _| Luma([if x < 32 { 255 } else { 0 }]))))
}

fn file(bytes: Vec<u8>) -> Part {
    Part::bytes(bytes).file_name("f.png").mime_str("image/png").unwrap()
}

async fn post(client: &reqwest::Client, server: &TestServer, path: &str, form: Form) -> (u16, Value) {
    let response = client.post(server.url(path)).multipart(form).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn fetch_png(client: &reqwest::Client, server: &TestServer, id: &str, which: &str) -> RgbImage {
    let response = client.get(server.url(&format!("/v1/exemplars/{id}/{which}"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    image::load_from_memory(&response.bytes().await.unwrap()).unwrap().to_rgb8()
}

#[tokio::test]
async fn exemplars_by_mask_polygon_and_transform_persist_across_restarts() {
    let data = tempfile::tempdir().unwrap();
    let models = root().join("models");
    let mut server = TestServer::start_with(&models, data.path(), &[]).await;
    let client = reqwest::Client::new();
    let image = png(DynamicImage::ImageRgb8(photo()));

    // Mask PNG and an uploaded modified copy.
    let modified = png(DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 48, Rgb([9, 9, 9]))));
    let form =
        Form::new().part("image", file(image.clone())).part("mask", file(left_half())).part("modified", file(modified));
    let (status, by_mask) = post(&client, &server, "/v1/exemplars", form).await;
    assert_eq!(status, 201, "{by_mask}");
    assert_eq!((by_mask["width"].as_u64(), by_mask["height"].as_u64()), (Some(64), Some(48)));
    assert!((by_mask["mask_fraction"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    let id = by_mask["id"].as_str().unwrap().to_string();
    let got: Value = client.get(server.url(&format!("/v1/exemplars/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, by_mask);
    assert_eq!(fetch_png(&client, &server, &id, "image").await, photo());
    assert_eq!(fetch_png(&client, &server, &id, "modified").await.get_pixel(40, 5).0, [9, 9, 9]);

    // Polygon JSON and a fill transform: only the masked pixels change.
    let form = Form::new()
        .part("image", file(image.clone()))
        .text("mask_json", r#"{"polygons": [[[0, 0], [31, 0], [31, 47], [0, 47]]]}"#)
        .text("transform", r#"{"kind": "fill", "rgb": [250, 0, 0]}"#);
    let (status, by_polygon) = post(&client, &server, "/v1/exemplars", form).await;
    assert_eq!(status, 201, "{by_polygon}");
    assert_eq!(by_polygon["transform"]["kind"], "fill");
    let polygon_id = by_polygon["id"].as_str().unwrap().to_string();
    let filled = fetch_png(&client, &server, &polygon_id, "modified").await;
    assert_eq!(filled.get_pixel(10, 10).0, [250, 0, 0]);
    assert_eq!(filled.get_pixel(50, 10).0, photo().get_pixel(50, 10).0);

    // A texture, tiled over boxes; and a blur.
    let texture =
        png(DynamicImage::ImageRgb8(RgbImage::from_fn(4, 4, |x, _| Rgb(if x < 2 { [255; 3] } else { [0; 3] }))));
    let (status, created) = post(&client, &server, "/v1/textures", Form::new().part("image", file(texture))).await;
    assert_eq!(status, 201, "{created}");
    let texture_id = created["id"].as_str().unwrap();
    let form = Form::new()
        .part("image", file(image.clone()))
        .text("mask_json", r#"{"boxes": [[0, 0, 16, 16]]}"#)
        .text("transform", format!(r#"{{"kind": "texture", "texture": "{texture_id}", "opacity": 1.0}}"#));
    let (status, textured) = post(&client, &server, "/v1/exemplars", form).await;
    assert_eq!(status, 201, "{textured}");
    let textured = fetch_png(&client, &server, textured["id"].as_str().unwrap(), "modified").await;
    assert_eq!((textured.get_pixel(0, 0).0, textured.get_pixel(2, 0).0), ([255; 3], [0; 3]));
    let form = Form::new()
        .part("image", file(image.clone()))
        .part("mask", file(left_half()))
        .text("transform", r#"{"kind": "blur", "sigma": 8}"#);
    assert_eq!(post(&client, &server, "/v1/exemplars", form).await.0, 201);

    // Everything is back after a restart on the same database and blobs.
    assert!(server.terminate().success());
    let server = TestServer::start_with(&models, data.path(), &[]).await;
    let again: Value =
        client.get(server.url(&format!("/v1/exemplars/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(again, by_mask);
    assert_eq!(fetch_png(&client, &server, &polygon_id, "modified").await, filled);

    // Delete, then it is gone; the audit log has every action, by the anonymous caller.
    let delete = || client.delete(server.url(&format!("/v1/exemplars/{id}"))).send();
    assert_eq!(delete().await.unwrap().status(), 204);
    assert_eq!(delete().await.unwrap().status(), 404);
    assert_eq!(client.get(server.url(&format!("/v1/exemplars/{id}"))).send().await.unwrap().status(), 404);
    let audit: Value = client.get(server.url("/v1/audit")).send().await.unwrap().json().await.unwrap();
    let actions: Vec<&str> =
        audit["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "exemplar.create",
            "exemplar.create",
            "texture.create",
            "exemplar.create",
            "exemplar.create",
            "exemplar.delete"
        ]
    );
    assert!(audit["entries"].as_array().unwrap().iter().all(|e| e["caller"] == "anonymous"));
    let future: Value =
        client.get(server.url("/v1/audit?since=2999-01-01T00:00:00Z")).send().await.unwrap().json().await.unwrap();
    assert_eq!(future["entries"].as_array().unwrap().len(), 0);
    assert_eq!(client.get(server.url("/v1/audit?since=yesterday")).send().await.unwrap().status(), 422);
    // A bad limit or an unknown parameter gets the same JSON error as on every other route.
    for query in ["limit=abc", "limit=-1", "limit=0", "limit=1001", "colour=red"] {
        let response = client.get(server.url(&format!("/v1/audit?{query}"))).send().await.unwrap();
        assert_eq!(response.status(), 422, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_request", "{query}: {body}");
    }
    let two: Value = client.get(server.url("/v1/audit?limit=2")).send().await.unwrap().json().await.unwrap();
    assert_eq!(two["entries"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn invalid_exemplars_get_clear_errors() {
    let server = TestServer::start(&[]).await;
    let client = reqwest::Client::new();
    let image = png(DynamicImage::ImageRgb8(photo()));
    let small_mask = png(DynamicImage::ImageLuma8(GrayImage::from_pixel(32, 32, Luma([255]))));
    let empty_mask = png(DynamicImage::ImageLuma8(GrayImage::new(64, 48)));
    let fill = r#"{"kind": "fill", "rgb": [1, 2, 3]}"#;
    let cases: Vec<(&str, Form, u16, &str)> = vec![
        (
            "mask of another size",
            Form::new().part("image", file(image.clone())).part("mask", file(small_mask)).text("transform", fill),
            422,
            "same size",
        ),
        (
            "empty mask",
            Form::new().part("image", file(image.clone())).part("mask", file(empty_mask)).text("transform", fill),
            422,
            "empty",
        ),
        (
            "no modified nor transform",
            Form::new().part("image", file(image.clone())).part("mask", file(left_half())),
            422,
            "modified",
        ),
        (
            "mask and mask_json",
            Form::new()
                .part("image", file(image.clone()))
                .part("mask", file(left_half()))
                .text("mask_json", "{}")
                .text("transform", fill),
            422,
            "not both",
        ),
        ("no image", Form::new().part("mask", file(left_half())).text("transform", fill), 422, "'image' is required"),
        (
            "corrupt image",
            Form::new()
                .part("image", file(b"not an image".to_vec()))
                .part("mask", file(left_half()))
                .text("transform", fill),
            422,
            "image",
        ),
        (
            "unknown part",
            Form::new()
                .part("image", file(image.clone()))
                .part("mask", file(left_half()))
                .text("transform", fill)
                .text("colour", "red"),
            422,
            "colour",
        ),
        (
            "bad transform",
            Form::new()
                .part("image", file(image.clone()))
                .part("mask", file(left_half()))
                .text("transform", r#"{"kind": "paint"}"#),
            422,
            "transform",
        ),
        (
            "bad polygon",
            Form::new()
                .part("image", file(image.clone()))
                .text("mask_json", r#"{"polygons": [[[0, 0], [1, 1]]]}"#)
                .text("transform", fill),
            422,
            "3 points",
        ),
        (
            "unknown texture",
            Form::new()
                .part("image", file(image.clone()))
                .part("mask", file(left_half()))
                .text("transform", r#"{"kind": "texture", "texture": "nope"}"#),
            404,
            "texture",
        ),
    ];
    for (what, form, status, words) in cases {
        let (got, body) = post(&client, &server, "/v1/exemplars", form).await;
        assert_eq!(got, status, "{what}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(words), "{what}: {body}");
    }
    assert_eq!(client.get(server.url("/v1/exemplars/nope/mask")).send().await.unwrap().status(), 404);
    assert_eq!(client.get(server.url("/v1/exemplars/nope/other")).send().await.unwrap().status(), 404);
}
