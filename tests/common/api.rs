//! The HTTP API of a test server for the versions tests (tests/versions_api.rs, tests/versions_durability.rs):
//! request bodies and forms, a client with a timeout on every request, replies with their status checked, and
//! jobs waited for with a deadline that says what was waited for.

use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use image::{DynamicImage, GrayImage, ImageFormat};
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

use super::{foolbox_photos, read, striped_exemplar, TestServer};

pub const MODEL: &str = "efficientnet-lite0";
/// Adam steps of a job that runs far longer than any test waits for it (a few hundred steps/s on the CPU).
pub const LONG_STEPS: u64 = 100_000;
/// How long a job may take to reach the state a test waits for.
pub const JOB_DEADLINE: Duration = Duration::from_secs(120);
pub const POLL_EVERY: Duration = Duration::from_millis(75);
/// Any one request, including reading an event stream to its end.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// The codes a 422 may carry where the contract names only the status.
pub const UNPROCESSABLE: &[&str] = &["invalid_argument", "invalid_request"];

pub fn model_path(rest: &str) -> String {
    format!("/v1/models/{MODEL}{rest}")
}

pub fn png(image: &DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
    out
}

pub fn png_part(image: &DynamicImage) -> Part {
    Part::bytes(png(image)).file_name("image.png").mime_str("image/png").unwrap()
}

pub fn jpeg_part(path: &Path) -> Part {
    Part::bytes(read(path)).file_name("photo.jpg").mime_str("image/jpeg").unwrap()
}

/// An exemplar form: the original, its mask and the modified copy, as PNG parts.
pub fn exemplar_form(original: &DynamicImage, modified: &DynamicImage, mask: &GrayImage) -> Form {
    Form::new()
        .part("image", png_part(original))
        .part("mask", png_part(&DynamicImage::ImageLuma8(mask.clone())))
        .part("modified", png_part(modified))
}

/// The exemplar form of foolbox photo `index` with diagonal stripes over its centre.
pub fn striped_form(index: usize) -> Form {
    let (original, modified, mask) = striped_exemplar(index);
    exemplar_form(&original, &modified, &mask)
}

/// A request body for a closed-form rewrite from one exemplar (a fraction of a second), kept whole by the
/// breakage guard (`max_changed` 1), so that the version surely differs from its parent.
pub fn closed_form(exemplar: &str, description: &str) -> Value {
    json!({"exemplars": [exemplar], "solver": "closed_form", "guard": {"max_changed": 1.0}, "description": description})
}

/// A request body for a rewrite with Adam and `LONG_STEPS` steps (minutes on the CPU).
pub fn long_adam(exemplar: &str, description: &str) -> Value {
    json!({"exemplars": [exemplar], "method": "rewrite", "solver": "adam", "steps": LONG_STEPS, "description": description})
}

/// `base` with the fields of `changes` set (added or replaced).
pub fn merged(base: &Value, changes: Value) -> Value {
    let mut body = base.clone();
    for (key, value) in changes.as_object().expect("changes are an object") {
        body[key] = value.clone();
    }
    body
}

pub fn id_of(object: &Value) -> String {
    object["id"].as_str().unwrap_or_else(|| panic!("no id in {object}")).to_string()
}

pub fn is_final(job: &Value) -> bool {
    matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

/// The version numbers of a `GET .../versions` page, in its order.
pub fn numbers(page: &Value) -> Vec<u64> {
    page["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("no versions in {page}"))
        .iter()
        .map(|v| v["number"].as_u64().unwrap())
        .collect()
}

/// An image body for the classify routes.
#[derive(Clone)]
pub struct Image {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
}

impl Image {
    pub fn png(image: &DynamicImage) -> Self {
        Self { bytes: png(image), content_type: "image/png" }
    }

    pub fn jpeg(path: &Path) -> Self {
        Self { bytes: read(path), content_type: "image/jpeg" }
    }

    pub fn png_file(path: &Path) -> Self {
        Self { bytes: read(path), content_type: "image/png" }
    }

    /// Foolbox photo `index`, as its JPEG file.
    pub fn photo(index: usize) -> Self {
        Self::jpeg(&foolbox_photos()[index].0)
    }
}

/// A response: its status, headers, and JSON body (null when empty).
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("read the response body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("status {status}: the body is not JSON ({e}): {}", String::from_utf8_lossy(&bytes))
            })
        };
        Self { status, headers, body }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body, once the status is checked.
    #[track_caller]
    pub fn ok(self, status: u16, what: &str) -> Value {
        assert_eq!(self.status, status, "{what}: {}", self.body);
        self.body
    }

    /// An error of `status` with `code` and a message.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str, what: &str) {
        assert_eq!(self.status, status, "{what}: {}", self.body);
        assert_eq!(self.body["error"]["code"], code, "{what}: {}", self.body);
        assert!(self.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {}", self.body);
    }

    /// A 422 whose code the contract leaves open between the two 422 codes.
    #[track_caller]
    pub fn expect_unprocessable(&self, what: &str) {
        assert_eq!(self.status, 422, "{what}: {}", self.body);
        let code = self.body["error"]["code"].as_str().unwrap_or_default();
        assert!(UNPROCESSABLE.contains(&code), "{what}: {}", self.body);
    }
}

/// One server event: its name (`progress` or `final`), the job object it carries, and when it arrived.
pub struct Event {
    pub name: String,
    pub job: Value,
    pub at: Duration,
}

/// Parses one event block of a `text/event-stream` (carriage returns already dropped); None for a comment.
pub fn parse_event(block: &[u8], at: Duration) -> Option<Event> {
    let text = std::str::from_utf8(block).expect("the event stream is UTF-8");
    let mut name = "message".to_string();
    let mut data = Vec::new();
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = value.trim().to_string();
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    if data.is_empty() {
        return None;
    }
    let job = serde_json::from_str(&data.join("\n")).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {text}"));
    Some(Event { name, job, at })
}

/// The HTTP API of one server.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn new(server: &TestServer) -> Self {
        let client = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().unwrap();
        Self { client, base: server.base.clone() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        Reply::read(request.send().await.expect("send the request")).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path))).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.client.delete(self.url(path))).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.send(self.client.post(self.url(path)).json(body)).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Reply {
        self.send(self.client.put(self.url(path)).json(body)).await
    }

    pub async fn post_form(&self, path: &str, form: Form) -> Reply {
        self.send(self.client.post(self.url(path)).multipart(form)).await
    }

    pub async fn post_image(&self, path: &str, image: &Image) -> Reply {
        self.send(self.client.post(self.url(path)).header("content-type", image.content_type).body(image.bytes.clone()))
            .await
    }

    /// `POST /v1/models/{MODEL}{route}` with a raw image body.
    pub async fn classify(&self, route: &str, image: &Image) -> Reply {
        self.post_image(&model_path(route), image).await
    }

    pub async fn create_exemplar(&self, form: Form) -> String {
        id_of(&self.post_form("/v1/exemplars", form).await.ok(201, "create an exemplar"))
    }

    pub async fn post_edit_with_key(&self, body: &Value, key: &str) -> Reply {
        self.send(self.client.post(self.url(&model_path("/versions"))).header("idempotency-key", key).json(body)).await
    }

    /// Posts an edit and checks the 202 and its Location: the job id and the new version's number.
    pub async fn start_edit(&self, body: &Value) -> (String, u64) {
        let reply = self.post_json(&model_path("/versions"), body).await;
        let location = reply.header("location").map(str::to_string);
        let created = reply.ok(202, &format!("POST {} {body}", model_path("/versions")));
        let job = id_of(&created["job"]);
        assert_eq!(location, Some(format!("/v1/jobs/{job}")), "Location of {created}");
        let number = created["version"]["number"].as_u64().unwrap_or_else(|| panic!("no version number: {created}"));
        (job, number)
    }

    /// An edit, to the end: its job id and the number of its (ready) version.
    pub async fn edit(&self, body: &Value) -> (String, u64) {
        let (job, number) = self.start_edit(body).await;
        self.wait_succeeded(&job).await;
        (job, number)
    }

    /// Posts a statistics job and checks the 202 and its Location: the job id.
    pub async fn start_statistics(&self, form: Form) -> String {
        let reply = self.post_form(&model_path("/statistics"), form).await;
        let location = reply.header("location").map(str::to_string);
        let created = reply.ok(202, "POST statistics");
        let job = id_of(&created["job"]);
        assert_eq!(location, Some(format!("/v1/jobs/{job}")), "Location of {created}");
        assert_eq!(created["job"]["kind"], "statistics", "{created}");
        assert_eq!(created["job"]["model"], MODEL, "{created}");
        job
    }

    pub async fn job(&self, id: &str) -> Value {
        self.get(&format!("/v1/jobs/{id}")).await.ok(200, &format!("GET job {id}"))
    }

    pub async fn cancel(&self, id: &str) -> Value {
        let cancelled = self.delete(&format!("/v1/jobs/{id}")).await.ok(200, &format!("cancel job {id}"));
        assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
        assert_eq!(cancelled["id"], id, "{cancelled}");
        cancelled
    }

    /// Polls job `id` until `done` holds; panics at the deadline, naming `what` it waited for.
    pub async fn wait_job_until(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            assert!(started.elapsed() < JOB_DEADLINE, "job {id} not {what} after {JOB_DEADLINE:?}: {job}");
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    pub async fn wait_finished(&self, id: &str) -> Value {
        self.wait_job_until(id, "finished", is_final).await
    }

    pub async fn wait_succeeded(&self, id: &str) -> Value {
        let job = self.wait_finished(id).await;
        assert_eq!(job["state"], "succeeded", "job {id}: {job}");
        job
    }

    /// Waits until job `id` runs and has made a step.
    pub async fn wait_running(&self, id: &str) -> Value {
        let running = |job: &Value| job["state"] == "running" && job["progress"]["step"].as_u64().unwrap_or(0) > 0;
        let job = self.wait_job_until(id, "running", |job| is_final(job) || running(job)).await;
        assert_eq!(job["state"], "running", "job {id} finished before it was seen running: {job}");
        job
    }

    /// Reads `GET /v1/jobs/{id}/events` to its end.
    pub async fn events(&self, id: &str) -> Vec<Event> {
        let started = Instant::now();
        let mut response = self.client.get(self.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap();
        assert_eq!(response.status(), 200, "events of job {id}");
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(content_type.starts_with("text/event-stream"), "events of job {id}: Content-Type {content_type}");
        let mut buffer: Vec<u8> = Vec::new();
        let mut events = Vec::new();
        let read = async {
            while let Some(chunk) = response.chunk().await.expect("read the event stream") {
                buffer.extend(chunk.iter().filter(|&&b| b != b'\r'));
                while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = buffer.drain(..end + 2).collect();
                    events.extend(parse_event(&block, started.elapsed()));
                }
            }
        };
        let ended = tokio::time::timeout(JOB_DEADLINE, read).await;
        assert!(ended.is_ok(), "the event stream of job {id} did not end within {JOB_DEADLINE:?}");
        assert!(
            buffer.iter().all(u8::is_ascii_whitespace),
            "an unterminated event: {}",
            String::from_utf8_lossy(&buffer)
        );
        events
    }

    pub async fn version(&self, version: impl std::fmt::Display) -> Reply {
        self.get(&model_path(&format!("/versions/{version}"))).await
    }

    pub async fn list_versions(&self, query: &str) -> Value {
        self.get(&model_path(&format!("/versions{query}"))).await.ok(200, &format!("list versions{query}"))
    }

    pub async fn aliases(&self) -> Value {
        self.get(&model_path("/aliases")).await.ok(200, "GET aliases")["aliases"].clone()
    }

    pub async fn set_alias(&self, alias: &str, version: Value) -> Reply {
        self.put_json(&model_path(&format!("/aliases/{alias}")), &json!({ "version": version })).await
    }

    pub async fn audit(&self) -> Vec<Value> {
        let audit = self.get("/v1/audit").await.ok(200, "GET audit");
        audit["entries"].as_array().unwrap_or_else(|| panic!("no entries: {audit}")).clone()
    }
}
