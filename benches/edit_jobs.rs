//! Edit jobs over HTTP against the real `editserve serve` binary (EfficientNet-Lite0 on the CPU):
//!
//! 1. end-to-end edit job latency: `POST /v1/models/efficientnet-lite0/versions` until `GET /v1/jobs/{id}`
//!    (polled every 20 ms) says succeeded, for the default edit (no method or solver given: the gated
//!    least-squares rewrite over the default layers; median of 3, the first run also computing the default
//!    statistics), rewrite/closed_form (median of 5) and rewrite/adam (median of 3), beside the job's own
//!    `metrics.seconds` from the version;
//! 2. classification latency (`POST .../classify`, one raw image/jpeg photo) at concurrency 1 and 4: idle,
//!    while a long adam edit runs (cancelled with `DELETE /v1/jobs/{id}` afterwards), and against a
//!    materialised version (`.../versions/{n}/classify`) idle;
//! 3. bytes per version: `stored_bytes` and `resident_bytes` of a closed_form rewrite and of a finetune_local
//!    version, beside the size of the model weights.
//!
//! Run: `cargo bench --bench edit_jobs`. Environment:
//! - BENCH_SECONDS (default 8): duration of each classification measurement;
//! - BENCH_ADAM_STEPS (default 1000): steps of the timed adam edits (a comma-separated list runs each);
//! - BENCH_BUSY_STEPS (default 100000): steps of the adam edit that keeps the server busy in part 2.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const MODEL: &str = "efficientnet-lite0";
const POLL: Duration = Duration::from_millis(20);
const JOB_TIMEOUT: Duration = Duration::from_secs(1800);
const CLOSED_FORM_RUNS: usize = 5;
const ADAM_RUNS: usize = 3;
const DEFAULT_RUNS: usize = 3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value.trim().parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a valid value")),
        Err(_) => default,
    }
}

/// The foolbox photos (data/foolbox/*.jpg), sorted by name.
fn foolbox_photos() -> Vec<PathBuf> {
    let dir = root().join("data/foolbox");
    let mut photos: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    photos.sort();
    assert!(!photos.is_empty(), "no photos in {}", dir.display());
    photos
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

// ---------------------------------------------------------------------------------------------------------
// The server

struct Server {
    child: Child,
    base: String,
    _data: tempfile::TempDir,
}

impl Server {
    /// Starts `editserve serve` on a free loopback port with an empty data directory and waits for /readyz.
    async fn start(client: &Client) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let data = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_editserve"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--device", "cpu", "--models-dir"])
            .arg(root().join("models"))
            .args(["--models", MODEL, "--data-dir"])
            .arg(data.path())
            .env("EDITSERVE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server { child, base: format!("http://127.0.0.1:{port}"), _data: data };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("the server exited while starting: {status}");
            }
            if let Ok(response) = client.get(server.url("/readyz")).send().await {
                if response.status() == StatusCode::OK {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the server was not ready within 120 s");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn model_url(&self, rest: &str) -> String {
        self.url(&format!("/v1/models/{MODEL}{rest}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON body of `response`, which must have status `expected` (else the panic shows the body).
async fn expect_json(response: reqwest::Response, expected: StatusCode) -> Value {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, expected, "unexpected answer: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

// ---------------------------------------------------------------------------------------------------------
// Exemplars, edit jobs, versions

/// Uploads `photo` as an exemplar whose concept is the central 60% of the image, filled with black.
async fn upload_exemplar(client: &Client, server: &Server, photo: &Path) -> String {
    let (width, height) = image::image_dimensions(photo).unwrap();
    let (w, h) = (width as f64, height as f64);
    let mask = json!({"boxes": [[0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h]]});
    let form = Form::new()
        .part(
            "image",
            Part::bytes(std::fs::read(photo).unwrap()).file_name("photo.jpg").mime_str("image/jpeg").unwrap(),
        )
        .text("mask_json", mask.to_string())
        .text("transform", json!({"kind": "fill", "rgb": [0, 0, 0]}).to_string());
    let response = client.post(server.url("/v1/exemplars")).multipart(form).send().await.unwrap();
    let record = expect_json(response, StatusCode::CREATED).await;
    record["id"].as_str().expect("exemplar id").to_string()
}

/// Queues an edit; answers (job id, version number).
async fn post_edit(client: &Client, server: &Server, body: &Value) -> (String, u64) {
    let response = client.post(server.model_url("/versions")).json(body).send().await.unwrap();
    let accepted = expect_json(response, StatusCode::ACCEPTED).await;
    let job = accepted["job"]["id"].as_str().expect("job id").to_string();
    let version = accepted["version"]["number"].as_u64().expect("version number");
    (job, version)
}

async fn get_job(client: &Client, server: &Server, job: &str) -> Value {
    let response = client.get(server.url(&format!("/v1/jobs/{job}"))).send().await.unwrap();
    expect_json(response, StatusCode::OK).await
}

/// Polls the job every 20 ms until its state is one of `states`; answers the job object.
async fn wait_job(client: &Client, server: &Server, job: &str, states: &[&str]) -> Value {
    let started = Instant::now();
    loop {
        let object = get_job(client, server, job).await;
        let state = object["state"].as_str().unwrap_or_default();
        if states.contains(&state) {
            return object;
        }
        if ["succeeded", "failed", "cancelled"].contains(&state) {
            panic!("job {job} ended {state} while waiting for {states:?}: {object}");
        }
        assert!(started.elapsed() < JOB_TIMEOUT, "job {job} still {state} after {JOB_TIMEOUT:?}");
        tokio::time::sleep(POLL).await;
    }
}

async fn get_version(client: &Client, server: &Server, number: u64) -> Value {
    let response = client.get(server.model_url(&format!("/versions/{number}"))).send().await.unwrap();
    expect_json(response, StatusCode::OK).await
}

struct EditRun {
    /// POST until the poll saw "succeeded".
    wall_s: f64,
    /// The version's metrics.seconds.
    job_s: f64,
    version: u64,
}

/// One edit, end to end.
async fn timed_edit(client: &Client, server: &Server, body: &Value) -> EditRun {
    let started = Instant::now();
    let (job, version) = post_edit(client, server, body).await;
    wait_job(client, server, &job, &["succeeded"]).await;
    let wall_s = started.elapsed().as_secs_f64();
    let object = get_version(client, server, version).await;
    assert_eq!(object["state"], "ready", "version {version} after its job succeeded: {object}");
    let job_s = object["metrics"]["seconds"].as_f64().expect("metrics.seconds");
    EditRun { wall_s, job_s, version }
}

/// `runs` edits with the same body; answers a table row and the first run's version.
async fn edit_row(client: &Client, server: &Server, name: &str, body: &Value, runs: usize) -> (Vec<String>, u64) {
    let mut done = Vec::new();
    for run in 0..runs {
        let result = timed_edit(client, server, body).await;
        eprintln!("  {name} run {}/{runs}: {:.3} s (job {:.3} s)", run + 1, result.wall_s, result.job_s);
        done.push(result);
    }
    let wall: Vec<f64> = done.iter().map(|r| r.wall_s).collect();
    let job: Vec<f64> = done.iter().map(|r| r.job_s).collect();
    let row = vec![
        name.to_string(),
        runs.to_string(),
        format!("{:.3}", median(&wall)),
        format!("{:.3}", wall.iter().copied().fold(f64::INFINITY, f64::min)),
        format!("{:.3}", wall.iter().copied().fold(0.0, f64::max)),
        format!("{:.3}", median(&job)),
    ];
    (row, done[0].version)
}

// ---------------------------------------------------------------------------------------------------------
// Classification under closed-loop load

struct LoadResult {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// A classification of `photo` at `url`; answers the response's "version".
async fn classify_once(client: &Client, url: &str, photo: &[u8]) -> Option<u64> {
    let response = client.post(url).header("content-type", "image/jpeg").body(photo.to_vec()).send().await.unwrap();
    expect_json(response, StatusCode::OK).await["version"].as_u64()
}

/// `concurrency` clients each sending `photo` to `url` back to back for `seconds`.
async fn closed_loop(client: &Client, url: &str, concurrency: usize, seconds: u64, photo: &[u8]) -> LoadResult {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, photo) = (client.clone(), url.to_string(), photo.to_vec());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let response = client
                        .post(&url)
                        .header("content-type", "image/jpeg")
                        .body(photo.clone())
                        .send()
                        .await
                        .unwrap();
                    let status = response.status();
                    let body = response.bytes().await.unwrap();
                    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<f64> = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(!latencies.is_empty(), "no request finished within {seconds} s");
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    LoadResult { requests_per_second: latencies.len() as f64 / elapsed, p50_ms: quantile(0.5), p99_ms: quantile(0.99) }
}

fn load_row(target: &str, load: &str, concurrency: usize, r: &LoadResult) -> Vec<String> {
    eprintln!(
        "  {target}, {load}, concurrency {concurrency}: p50 {:.1} ms p99 {:.1} ms {:.1}/s",
        r.p50_ms, r.p99_ms, r.requests_per_second
    );
    vec![
        target.to_string(),
        load.to_string(),
        concurrency.to_string(),
        format!("{:.1}", r.p50_ms),
        format!("{:.1}", r.p99_ms),
        format!("{:.1}", r.requests_per_second),
    ]
}

// ---------------------------------------------------------------------------------------------------------
// Output

fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            // The first column is a name (left-aligned), the others are numbers (right-aligned).
            .map(|(i, (cell, &width))| if i == 0 { format!("{cell:<width$}") } else { format!("{cell:>width$}") })
            .collect();
        println!("  {}", padded.join("  ").trim_end());
    };
    println!("\n{title}");
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

// ---------------------------------------------------------------------------------------------------------

async fn run() {
    let seconds: u64 = env_or("BENCH_SECONDS", 8);
    let adam_steps: Vec<u64> = std::env::var("BENCH_ADAM_STEPS")
        .unwrap_or_else(|_| "1000".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap_or_else(|_| panic!("BENCH_ADAM_STEPS: '{s}' is not a number of steps")))
        .collect();
    let busy_steps: u64 = env_or("BENCH_BUSY_STEPS", 100_000);

    let photo_path = foolbox_photos().remove(0);
    let photo = std::fs::read(&photo_path).unwrap();
    let client = Client::new();
    let server = Server::start(&client).await;
    let exemplar = upload_exemplar(&client, &server, &photo_path).await;
    eprintln!("server at {}, exemplar {exemplar} from {}", server.base, photo_path.display());

    // 1. Edit job latency.
    eprintln!("edit jobs:");
    let defaults = json!({"exemplars": [exemplar]});
    let (default_row, _) =
        edit_row(&client, &server, "defaults (gated, default layers)", &defaults, DEFAULT_RUNS).await;
    let closed_form = json!({"exemplars": [exemplar], "method": "rewrite", "solver": "closed_form"});
    let (row, closed_form_version) =
        edit_row(&client, &server, "rewrite/closed_form", &closed_form, CLOSED_FORM_RUNS).await;
    let mut edit_rows = vec![default_row, row];
    for &steps in &adam_steps {
        let adam = json!({"exemplars": [exemplar], "method": "rewrite", "solver": "adam", "steps": steps});
        let name = format!("rewrite/adam {steps} steps");
        edit_rows.push(edit_row(&client, &server, &name, &adam, ADAM_RUNS).await.0);
    }

    // 2. Classification latency: idle, beside a running edit, and of a materialised version.
    eprintln!("classification:");
    let base_url = server.model_url("/classify");
    let version_url = server.model_url(&format!("/versions/{closed_form_version}/classify"));
    let mut load_rows = Vec::new();
    // Edits move `latest`, not `default`: the plain classify still answers the base weights.
    assert_eq!(classify_once(&client, &base_url, &photo).await, Some(0), "the plain classify is not on version 0");
    for _ in 0..2 {
        classify_once(&client, &base_url, &photo).await;
    }
    for concurrency in [1, 4] {
        let r = closed_loop(&client, &base_url, concurrency, seconds, &photo).await;
        load_rows.push(load_row("base (version 0)", "idle", concurrency, &r));
    }

    let busy = json!({"exemplars": [exemplar], "method": "rewrite", "solver": "adam", "steps": busy_steps});
    let (busy_job, _) = post_edit(&client, &server, &busy).await;
    wait_job(&client, &server, &busy_job, &["running", "succeeded"]).await;
    let busy_load = format!("adam edit ({busy_steps} steps) running");
    for concurrency in [1, 4] {
        let r = closed_loop(&client, &base_url, concurrency, seconds, &photo).await;
        load_rows.push(load_row("base (version 0)", &busy_load, concurrency, &r));
    }
    let busy_state = get_job(&client, &server, &busy_job).await;
    let busy_progress = format!("{}/{}", busy_state["progress"]["step"], busy_state["progress"]["total"]);
    let cancel = client.delete(server.url(&format!("/v1/jobs/{busy_job}"))).send().await.unwrap();
    let busy_note = match cancel.status() {
        StatusCode::OK => format!("the busy edit was at step {busy_progress} when cancelled"),
        StatusCode::CONFLICT => {
            format!(
                "NOTE: the busy edit finished ({}) before the measurement ended; raise BENCH_BUSY_STEPS",
                busy_state["state"]
            )
        }
        other => panic!("DELETE /v1/jobs/{busy_job}: {other} {}", cancel.text().await.unwrap()),
    };

    // The first classification of a version materialises it; keep that out of the measurement.
    let answered = classify_once(&client, &version_url, &photo).await;
    assert_eq!(answered, Some(closed_form_version), "the version classify answered another version");
    for _ in 0..2 {
        classify_once(&client, &version_url, &photo).await;
    }
    let target = format!("version {closed_form_version} (closed_form)");
    for concurrency in [1, 4] {
        let r = closed_loop(&client, &version_url, concurrency, seconds, &photo).await;
        load_rows.push(load_row(&target, "idle", concurrency, &r));
    }

    // 3. Bytes per version (each classified once so it is resident).
    eprintln!("bytes per version:");
    let finetune = json!({"exemplars": [exemplar], "method": "finetune_local", "steps": 10});
    let finetune_version = timed_edit(&client, &server, &finetune).await.version;
    classify_once(&client, &server.model_url(&format!("/versions/{finetune_version}/classify")), &photo).await;
    let mut byte_rows = Vec::new();
    for (name, number) in [("rewrite/closed_form", closed_form_version), ("finetune_local 10 steps", finetune_version)]
    {
        let object = get_version(&client, &server, number).await;
        byte_rows.push(vec![
            format!("{name} (version {number})"),
            object["stored_bytes"].to_string(),
            object["resident_bytes"].to_string(),
            object["resident"].to_string(),
        ]);
    }
    let weights = std::fs::metadata(root().join("models").join(MODEL).join("model.safetensors")).unwrap().len();
    byte_rows.push(vec!["model weights (model.safetensors)".into(), weights.to_string(), "-".into(), "-".into()]);

    println!(
        "\neditserve edit jobs: {MODEL}, --device cpu, photo {}",
        photo_path.file_name().unwrap().to_string_lossy()
    );
    print_table(
        "edit job latency (POST .../versions until the job succeeded, polled every 20 ms; seconds)",
        &["edit", "runs", "median", "min", "max", "job metrics.seconds (median)"],
        &edit_rows,
    );
    print_table(
        &format!("classification latency (POST .../classify, raw image/jpeg, {seconds} s each)"),
        &["target", "while", "concurrency", "p50 ms", "p99 ms", "requests/s"],
        &load_rows,
    );
    println!("  ({busy_note})");
    print_table("bytes per version", &["version", "stored_bytes", "resident_bytes", "resident"], &byte_rows);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(run());
}
