//! Datasets over HTTP with the real server: uploads of each kind (the foolbox photos, their striped copies
//! as pairs), listing, reading and deleting, datasets read from directories of `--datasets-dir`, and every
//! way an upload is refused, each a JSON error with the right status. The server runs with small limits so
//! that the limits can be reached: 25 images, 4 MB per dataset, and 1 MB for every other route (which the
//! 1.5 MB dataset of the 20 photos must not be held to).

mod common;

use std::path::Path;

use common::api::{png, Api, Reply};
use common::datasets::{bytes_part, labelled_form, pairs_form, striped_pair, unlabelled_form};
use common::{foolbox_photos, raw_post, TestServer};
use image::{DynamicImage, RgbImage};
use reqwest::multipart::Form;
use serde_json::{json, Value};

const MAX_IMAGES: usize = 25;
const MAX_DATASET_BYTES: usize = 4_000_000;

/// A small PNG of one colour.
fn tiny_png(width: u32, height: u32) -> Vec<u8> {
    png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(width, height, image::Rgb([200, 30, 30]))))
}

fn tiny_images(form: Form, count: usize) -> Form {
    (0..count).fold(form, |form, _| form.part("image", bytes_part(&tiny_png(8, 8), "tiny.png")))
}

/// A directory of the datasets directory: photos copied in, and `dataset.json` when given.
fn dataset_dir(root: &Path, name: &str, photos: &[usize], manifest: Option<Value>) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for &i in photos {
        let (path, _) = &foolbox_photos()[i];
        std::fs::copy(path, dir.join(path.file_name().unwrap())).unwrap();
    }
    if let Some(manifest) = manifest {
        std::fs::write(dir.join("dataset.json"), manifest.to_string()).unwrap();
    }
}

fn photo_name(index: usize) -> String {
    foolbox_photos()[index].0.file_name().unwrap().to_string_lossy().into_owned()
}

#[track_caller]
fn expect_refused(reply: &Reply, code: &str, mentions: &str, what: &str) {
    reply.expect_error(422, code, what);
    let message = reply.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(mentions), "{what}: the message should mention '{mentions}': {message}");
}

#[tokio::test]
async fn datasets_are_uploaded_listed_read_deleted_and_bad_ones_refused() {
    let datasets_dir = tempfile::tempdir().unwrap();
    let root = datasets_dir.path();
    let server = TestServer::start(&[
        "--datasets-dir",
        root.to_str().unwrap(),
        "--max-dataset-images",
        &MAX_IMAGES.to_string(),
        "--max-dataset-bytes",
        &MAX_DATASET_BYTES.to_string(),
        "--max-body-bytes",
        "1000000",
    ])
    .await;
    let api = Api::new(&server);
    let photos = foolbox_photos();

    // Each kind. The 20 photos are 1.5 MB: over --max-body-bytes, within --max-dataset-bytes.
    let all: Vec<usize> = (0..20).collect();
    let labelled = api.create_dataset(labelled_form(&all, "foolbox")).await;
    let distinct: std::collections::BTreeSet<usize> = photos.iter().map(|(_, label)| *label).collect();
    assert_eq!(labelled["kind"], "labelled");
    assert_eq!(labelled["name"], "foolbox");
    assert_eq!((&labelled["images"], &labelled["labelled"]), (&json!(20), &json!(true)));
    assert_eq!(labelled["classes"], distinct.len(), "{labelled}");
    let unlabelled = api.create_dataset(unlabelled_form(&[0, 1, 2])).await;
    assert_eq!((&unlabelled["kind"], &unlabelled["images"]), (&json!("unlabelled"), &json!(3)));
    assert_eq!(
        (&unlabelled["labelled"], &unlabelled["classes"], &unlabelled["name"]),
        (&json!(false), &json!(0), &Value::Null)
    );
    let pairs: Vec<_> = (0..4).map(striped_pair).collect();
    let paired = api.create_dataset(pairs_form(&pairs)).await;
    assert_eq!((&paired["kind"], &paired["images"], &paired["classes"]), (&json!("pairs"), &json!(4), &json!(4)));

    let listed = api.get("/v1/datasets").await.ok(200, "GET /v1/datasets")["datasets"].clone();
    let ids: Vec<&Value> = listed.as_array().unwrap().iter().map(|d| &d["id"]).collect();
    assert_eq!(ids, [&paired["id"], &unlabelled["id"], &labelled["id"]], "newest first: {listed}");
    for dataset in [&labelled, &unlabelled, &paired] {
        let id = dataset["id"].as_str().unwrap();
        assert_eq!(&api.get(&format!("/v1/datasets/{id}")).await.ok(200, "GET a dataset"), dataset);
    }

    // Refused uploads: 422 with a message that says what is wrong.
    let jpeg = |i: usize| bytes_part(&std::fs::read(&photos[i].0).unwrap(), "photo.jpg");
    let corrupt = std::fs::read(&photos[2].0).unwrap()[..5000].to_vec();
    let (_, shrunk, _) = common::striped_exemplar(1);
    let shrunk = png(&shrunk.crop_imm(0, 0, 100, 80));
    let cases: Vec<(&str, Form, &str, &str)> = vec![
        ("no kind", Form::new().part("image", jpeg(0)), "invalid_argument", "needs a 'kind'"),
        (
            "an unknown kind",
            Form::new().text("kind", "photos").part("image", jpeg(0)),
            "invalid_argument",
            "got 'photos'",
        ),
        (
            "labels that are not JSON",
            Form::new().text("kind", "labelled").part("image", jpeg(0)).text("labels", "[243,"),
            "invalid_request",
            "labels",
        ),
        (
            "labels that are no array",
            Form::new().text("kind", "labelled").part("image", jpeg(0)).text("labels", "{\"a\":1}"),
            "invalid_argument",
            "JSON array",
        ),
        (
            "fewer labels than images",
            Form::new().text("kind", "labelled").part("image", jpeg(0)).part("image", jpeg(1)).text("labels", "[243]"),
            "invalid_argument",
            "1 labels for 2 images",
        ),
        (
            "a label out of range",
            Form::new().text("kind", "labelled").part("image", jpeg(0)).text("labels", "[100000]"),
            "invalid_argument",
            "labels[0]",
        ),
        (
            "a negative label",
            Form::new().text("kind", "labelled").part("image", jpeg(0)).text("labels", "[-3]"),
            "invalid_argument",
            "labels[0]",
        ),
        (
            "labelled without labels",
            Form::new().text("kind", "labelled").part("image", jpeg(0)),
            "invalid_argument",
            "needs 'labels'",
        ),
        (
            "unlabelled with labels",
            Form::new().text("kind", "unlabelled").part("image", jpeg(0)).text("labels", "[1]"),
            "invalid_argument",
            "takes no labels",
        ),
        (
            "unequal pair counts",
            pairs_form(&pairs[..2]).part("original", jpeg(3)),
            "invalid_argument",
            "3 originals and 2 transformed",
        ),
        (
            "a pair of two sizes",
            Form::new()
                .text("kind", "pairs")
                .part("original", jpeg(0))
                .part("transformed", bytes_part(&pairs[0].transformed, "t.png"))
                .part("original", jpeg(1))
                .part("transformed", bytes_part(&shrunk, "t.png"))
                .text("labels", "[1, 2]"),
            "invalid_argument",
            "pair 1",
        ),
        (
            "an image part in a pairs dataset",
            pairs_form(&pairs[..1]).part("image", jpeg(0)),
            "invalid_argument",
            "not 'image'",
        ),
        (
            "an undecodable image",
            Form::new()
                .text("kind", "unlabelled")
                .part("image", jpeg(0))
                .part("image", jpeg(1))
                .part("image", bytes_part(&corrupt, "cut.jpg")),
            "invalid_argument",
            "image 2",
        ),
        (
            "bytes that are no image",
            Form::new().text("kind", "unlabelled").part("image", bytes_part(b"not an image at all", "x.bin")),
            "invalid_argument",
            "image 0",
        ),
        ("an empty dataset", Form::new().text("kind", "unlabelled"), "invalid_argument", "empty"),
        (
            "too many images",
            tiny_images(Form::new().text("kind", "unlabelled"), MAX_IMAGES + 1),
            "invalid_argument",
            "over the limit of 25",
        ),
        (
            "a name over 200 characters",
            tiny_images(Form::new().text("kind", "unlabelled").text("name", "n".repeat(201)), 1),
            "invalid_argument",
            "200",
        ),
        (
            "an unknown part",
            tiny_images(Form::new().text("kind", "unlabelled").text("colour", "red"), 1),
            "invalid_request",
            "colour",
        ),
        (
            "a directory with images",
            tiny_images(Form::new().text("directory", "loose"), 1),
            "invalid_request",
            "directory",
        ),
        (
            "a directory outside --datasets-dir",
            Form::new().text("directory", "../.."),
            "invalid_argument",
            "not a directory inside",
        ),
        ("a directory that does not exist", Form::new().text("directory", "nowhere"), "invalid_argument", "nowhere"),
    ];
    for (what, form, code, mentions) in cases {
        expect_refused(&api.post_form("/v1/datasets", form).await, code, mentions, what);
    }
    // 26 tiny images were refused, 25 are not: the limit counts images.
    api.create_dataset(tiny_images(Form::new().text("kind", "unlabelled"), MAX_IMAGES)).await;

    // Over --max-dataset-bytes: refused from Content-Length before reading, and mid-stream when chunked.
    let port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    let declared =
        format!("Content-Type: multipart/form-data; boundary=X\r\nContent-Length: {}\r\n", MAX_DATASET_BYTES + 1);
    let (status, body) = raw_post(port, "/v1/datasets", &declared, &[]).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");
    let head = b"--X\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n\r\n".to_vec();
    let chunk = vec![7u8; 1024 * 1024];
    let chunks: Vec<&[u8]> = std::iter::once(head.as_slice()).chain(std::iter::repeat_n(chunk.as_slice(), 5)).collect();
    let chunked = "Content-Type: multipart/form-data; boundary=X\r\nTransfer-Encoding: chunked\r\n";
    let (status, body) = raw_post(port, "/v1/datasets", chunked, &chunks).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");

    // Directories of --datasets-dir: with a dataset.json, or every image file as an unlabelled image.
    let (a, b, c) = (photo_name(0), photo_name(1), photo_name(2));
    let labelled_items = json!([{"image": a, "label": 243}, {"image": b, "label": 559}, {"image": c, "label": 438}]);
    dataset_dir(root, "labelled", &[0, 1, 2], Some(json!({"kind": "labelled", "items": labelled_items})));
    let from_dir = api.create_dataset(Form::new().text("directory", "labelled").text("name", "from a directory")).await;
    assert_eq!(
        (&from_dir["kind"], &from_dir["images"], &from_dir["classes"]),
        (&json!("labelled"), &json!(3), &json!(3))
    );
    assert_eq!(from_dir["name"], "from a directory");
    std::fs::write(root.join("labelled/striped.png"), &pairs[0].transformed).unwrap();
    let pair_items = json!([{"original": a, "transformed": "striped.png", "label": 243}]);
    dataset_dir(root, "pairs", &[], None);
    std::fs::write(root.join("pairs/dataset.json"), json!({"kind": "pairs", "items": [{"original": format!("../labelled/{a}"), "transformed": "x.png", "label": 1}]}).to_string()).unwrap();
    expect_refused(
        &api.post_form("/v1/datasets", Form::new().text("directory", "pairs")).await,
        "invalid_argument",
        "not a file inside",
        "a file outside the dataset's directory",
    );
    std::fs::write(root.join("labelled/dataset.json"), json!({"kind": "pairs", "items": pair_items}).to_string())
        .unwrap();
    let pairs_dir = api.create_dataset(Form::new().text("directory", "labelled")).await;
    assert_eq!(
        (&pairs_dir["kind"], &pairs_dir["images"], &pairs_dir["classes"]),
        (&json!("pairs"), &json!(1), &json!(1))
    );
    dataset_dir(root, "loose", &[3, 4], None);
    std::fs::write(root.join("loose/notes.txt"), "not an image").unwrap();
    let loose = api.create_dataset(Form::new().text("directory", "loose")).await;
    assert_eq!(
        (&loose["kind"], &loose["images"], &loose["labelled"]),
        (&json!("unlabelled"), &json!(2), &json!(false))
    );
    let missing_label = json!({"kind": "labelled", "items": [{"image": a, "label": 243}, {"image": b}]});
    std::fs::write(root.join("labelled/dataset.json"), missing_label.to_string()).unwrap();
    expect_refused(
        &api.post_form("/v1/datasets", Form::new().text("directory", "labelled")).await,
        "invalid_argument",
        "labels[1]",
        "an item without its label",
    );
    std::fs::write(root.join("labelled/dataset.json"), "{\"kind\": \"labelled\"").unwrap();
    expect_refused(
        &api.post_form("/v1/datasets", Form::new().text("directory", "labelled")).await,
        "invalid_argument",
        "dataset.json",
        "a dataset.json that is not JSON",
    );

    // Deleting: 204, then gone; the other datasets stay.
    let id = unlabelled["id"].as_str().unwrap();
    assert_eq!(api.delete(&format!("/v1/datasets/{id}")).await.status, 204);
    api.get(&format!("/v1/datasets/{id}")).await.expect_error(404, "dataset_not_found", "GET a deleted dataset");
    api.delete(&format!("/v1/datasets/{id}")).await.expect_error(404, "dataset_not_found", "DELETE it again");
    let listed = api.get("/v1/datasets").await.ok(200, "GET /v1/datasets");
    assert!(listed["datasets"].as_array().unwrap().iter().all(|d| d["id"] != id), "{listed}");
    api.get(&format!("/v1/datasets/{}", labelled["id"].as_str().unwrap())).await.ok(200, "the labelled dataset stays");

    let audit = api.audit().await;
    let actions = |action: &str| audit.iter().filter(|e| e["action"] == action).count();
    assert_eq!(actions("dataset.create"), 7, "{audit:?}");
    assert_eq!(actions("dataset.delete"), 1, "{audit:?}");
}
