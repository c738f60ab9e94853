//! Datasets for the datasets and evaluations tests: the 20 labelled foolbox photos as labelled, unlabelled
//! and pairs datasets (each photo with diagonal stripes over its centre as the transformed copy), as
//! multipart forms, and a client call that uploads one.

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use super::api::{jpeg_part, png, Api};
use super::{foolbox_photos, striped_exemplar};

/// Foolbox photo `index` as its JPEG file, its striped copy as PNG, and its label.
#[derive(Clone)]
pub struct Pair {
    pub original: Vec<u8>,
    pub transformed: Vec<u8>,
    pub label: usize,
}

pub fn striped_pair(index: usize) -> Pair {
    let (path, label) = foolbox_photos().remove(index);
    let (_, striped, _) = striped_exemplar(index);
    Pair { original: std::fs::read(path).unwrap(), transformed: png(&striped), label }
}

fn labels_text(labels: &[usize]) -> String {
    serde_json::to_string(labels).unwrap()
}

pub fn bytes_part(bytes: &[u8], name: &str) -> Part {
    Part::bytes(bytes.to_vec()).file_name(name.to_string()).mime_str("application/octet-stream").unwrap()
}

/// The foolbox photos `indices` as a labelled dataset (JPEG parts) named `name`.
pub fn labelled_form(indices: &[usize], name: &str) -> Form {
    let photos = foolbox_photos();
    let mut form = Form::new().text("kind", "labelled").text("name", name.to_string());
    for &i in indices {
        form = form.part("image", jpeg_part(&photos[i].0));
    }
    let labels: Vec<usize> = indices.iter().map(|&i| photos[i].1).collect();
    form.text("labels", labels_text(&labels))
}

/// The foolbox photos `indices` as an unlabelled dataset.
pub fn unlabelled_form(indices: &[usize]) -> Form {
    let photos = foolbox_photos();
    indices.iter().fold(Form::new().text("kind", "unlabelled"), |form, &i| form.part("image", jpeg_part(&photos[i].0)))
}

/// `pairs` as a pairs dataset, labelled.
pub fn pairs_form(pairs: &[Pair]) -> Form {
    let mut form = Form::new().text("kind", "pairs");
    for pair in pairs {
        form = form.part("original", bytes_part(&pair.original, "original.jpg"));
        form = form.part("transformed", bytes_part(&pair.transformed, "transformed.png"));
    }
    let labels: Vec<usize> = pairs.iter().map(|p| p.label).collect();
    form.text("labels", labels_text(&labels))
}

impl Api {
    /// Uploads a dataset and checks the 201: the dataset.
    pub async fn create_dataset(&self, form: Form) -> Value {
        self.post_form("/v1/datasets", form).await.ok(201, "POST /v1/datasets")
    }
}
