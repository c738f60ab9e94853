//! Throughput and latency of `POST /v1/models/efficientnet-lite0/classify` under closed-loop load, against
//! the raw in-process batched forward pass of the same model on the same machine, and the effect of the
//! malloc setting on both. Run: `make bench` (or `cargo bench --bench http_throughput`).
//! BENCH_SECONDS (default 10) sets each HTTP measurement's duration.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use editserve::models::{load_package, Classifier, ModelPackage};
use tch::{Device, Kind, Tensor};

const RAW_ONLY: &str = "EDITSERVE_BENCH_RAW_ONLY";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Images/s of the bare forward pass at one batch size, over `seconds`.
fn raw_forward(model: &dyn Classifier, batch: i64, seconds: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let input = Tensor::randn([batch, 3, 224, 224], (Kind::Float, Device::Cpu));
    let _ = model.forward(&input);
    let started = Instant::now();
    let mut images = 0;
    while started.elapsed().as_secs_f64() < seconds {
        let _ = model.forward(&input);
        images += batch;
    }
    images as f64 / started.elapsed().as_secs_f64()
}

fn load_model() -> Box<dyn Classifier> {
    let package = ModelPackage::open(&root().join("models/efficientnet-lite0")).unwrap();
    load_package(&package, Device::Cpu).unwrap()
}

/// The raw measurement with glibc's default malloc, in a fresh process (mallopt cannot be undone).
fn raw_forward_default_malloc(batch: i64) -> f64 {
    let output = Command::new(std::env::current_exe().unwrap())
        .env(RAW_ONLY, batch.to_string())
        .env("EDITSERVE_MALLOC", "default")
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().parse().unwrap()
}

struct Server {
    child: Child,
    port: u16,
    /// Removed when the server is dropped.
    _data: tempfile::TempDir,
}

impl Server {
    fn start(malloc: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let data = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_editserve"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--device", "cpu", "--models-dir"])
            .arg(root().join("models"))
            .args(["--models", "efficientnet-lite0", "--data-dir"])
            .arg(data.path())
            .env("EDITSERVE_MALLOC", malloc)
            .env("EDITSERVE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            let ready = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if ready {
                std::thread::sleep(Duration::from_millis(500));
                return Server { child, port, _data: data };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("server did not start");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct LoadResult {
    images_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn closed_loop(port: u16, concurrency: usize, seconds: u64, photos: &[Vec<u8>]) -> LoadResult {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/models/efficientnet-lite0/classify");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (client, url) = (client.clone(), url.clone());
            let photos = photos.to_vec();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = w;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let response = client
                        .post(&url)
                        .header("content-type", "image/jpeg")
                        .body(photos[i % photos.len()].clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    let _ = response.bytes().await.unwrap();
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    i += concurrency;
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
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    LoadResult { images_per_second: latencies.len() as f64 / elapsed, p50_ms: quantile(0.5), p99_ms: quantile(0.99) }
}

fn main() {
    editserve::alloc::tune_from_env();
    let model = load_model();
    if let Some(batch) = std::env::var(RAW_ONLY).ok().and_then(|b| b.parse().ok()) {
        println!("{}", raw_forward(model.as_ref(), batch, 4.0));
        return;
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let mut best = (1, 0.0);
    for batch in [1i64, 4, 8, 16, 32, 64] {
        let rate = raw_forward(model.as_ref(), batch, 3.0);
        println!("raw forward batch {batch:>2}: {rate:7.1} images/s");
        if rate > best.1 {
            best = (batch, rate);
        }
    }
    let batch = best.0;
    let tuned = raw_forward(model.as_ref(), batch, 4.0);
    let default = raw_forward_default_malloc(batch);
    println!(
        "raw forward batch {batch}: tuned malloc {tuned:.1} images/s, glibc default {default:.1}: {:.2}x",
        tuned / default
    );

    let mut photos: Vec<Vec<u8>> = std::fs::read_dir(root().join("data/foolbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    photos.sort();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    for malloc in ["tuned", "default"] {
        let server = Server::start(malloc);
        let levels: &[usize] = if malloc == "tuned" { &[1, 8, 32] } else { &[32] };
        for &concurrency in levels {
            // The machine's speed drifts (shared cores): compare with the raw pass measured right beside.
            let before = raw_forward(model.as_ref(), batch, 3.0);
            let r = runtime.block_on(closed_loop(server.port, concurrency, seconds, &photos));
            let after = raw_forward(model.as_ref(), batch, 3.0);
            let raw = (before + after) / 2.0;
            println!(
                "http ({malloc} malloc) concurrency {concurrency:>2}: {:6.1} images/s  p50 {:7.1} ms  p99 {:7.1} ms  | raw batch {batch} {raw:6.1} images/s  ratio {:.2}",
                r.images_per_second,
                r.p50_ms,
                r.p99_ms,
                r.images_per_second / raw
            );
        }
    }
}
