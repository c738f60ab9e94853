//! Shared by the integration tests: paths of the set-up's artefacts, a real server process on a free
//! loopback port, the Python reference, and packages of randomly initialised torchvision models; `api`, the
//! HTTP API helpers of the versions tests; `datasets`, the datasets of the datasets and evaluations tests.
#![allow(dead_code)]

pub mod api;
pub mod datasets;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use editserve::imaging::{decode, DecodeLimits};
use editserve::models::{load_package, Classifier, ModelPackage};
use image::{DynamicImage, GrayImage, Luma, Rgb};
use tch::{Device, Tensor};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_dir() -> PathBuf {
    root().join("models/efficientnet-lite0")
}

pub fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

/// The 20 foolbox ImageNet photos with their labels (from the file names), sorted by name.
pub fn foolbox_photos() -> Vec<(PathBuf, usize)> {
    let dir = root().join("data/foolbox");
    let mut photos: Vec<(PathBuf, usize)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let label = stem.rsplit('_').next().unwrap().parse().unwrap();
            (p, label)
        })
        .collect();
    photos.sort();
    assert_eq!(photos.len(), 20, "expected the 20 foolbox ImageNet photos");
    photos
}

/// Runs `tools/reference.py` with the venv's Python and returns its standard output.
pub fn reference(args: &[&str]) -> String {
    let output = Command::new(python())
        .arg(root().join("tools/reference.py"))
        .args(args)
        .output()
        .expect("run the Python reference");
    assert!(output.status.success(), "reference failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Writes a package of torchvision's `arch` with random weights under `dir` (tools/export_torchvision.py)
/// and returns its directory.
pub fn export_torchvision(arch: &str, dir: &Path) -> PathBuf {
    let package_dir = dir.join(arch);
    let output = Command::new(python())
        .arg(root().join("tools/export_torchvision.py"))
        .args(["--arch", arch, "--out"])
        .arg(&package_dir)
        .output()
        .expect("run the exporter");
    assert!(output.status.success(), "export failed: {}", String::from_utf8_lossy(&output.stderr));
    package_dir
}

/// The native model of a package, on the CPU.
pub fn load(package_dir: &Path) -> Box<dyn Classifier> {
    load_package(&ModelPackage::open(package_dir).unwrap(), Device::Cpu).unwrap()
}

/// Runs `tools/reference.py COMMAND --package DIR --input <input> --out <file> EXTRA...` and returns the
/// tensors it wrote.
pub fn reference_on(
    command: &str,
    package_dir: &Path,
    input: &Tensor,
    scratch: &Path,
    extra: &[&str],
) -> Vec<(String, Tensor)> {
    let (input_path, output_path) = (scratch.join("input.safetensors"), scratch.join(format!("{command}.safetensors")));
    Tensor::write_safetensors(&[("input", input)], &input_path).unwrap();
    let mut args = vec![
        command,
        "--package",
        package_dir.to_str().unwrap(),
        "--input",
        input_path.to_str().unwrap(),
        "--out",
        output_path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    reference(&args);
    Tensor::read_safetensors(&output_path).unwrap()
}

/// The reference implementation's logits for `input`.
pub fn reference_logits(package_dir: &Path, input: &Tensor, scratch: &Path) -> Tensor {
    reference_on("logits", package_dir, input, scratch, &[]).remove(0).1
}

/// A copy of the efficientnet-lite0 package in `dir` whose weights lack `key`.
pub fn write_lite0_without(dir: &Path, key: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(model_dir().join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = Tensor::read_safetensors(model_dir().join("model.safetensors")).unwrap();
    tensors.retain(|(name, _)| name != key);
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, dir.join("model.safetensors")).unwrap();
}

/// A POST to `path` over a raw socket that writes what the server accepts and then reads its answer: the server
/// may answer and close before the whole body is sent, which an ordinary client reports as a broken pipe.
pub async fn raw_post(port: u16, path: &str, headers: &str, chunks: &[&[u8]]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in chunks {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real `editserve serve` binary on a free loopback port; killed when dropped.
pub struct TestServer {
    pub base: String,
    child: Option<Child>,
    /// The data directory when the server made its own (removed with it).
    _data: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start(extra_args: &[&str]) -> Self {
        Self::start_in(&root().join("models"), extra_args).await
    }

    /// A server on `models_dir`, loading its `efficientnet-lite0` package, with a fresh data directory.
    pub async fn start_in(models_dir: &Path, extra_args: &[&str]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut server = Self::start_with(models_dir, data.path(), extra_args).await;
        server._data = Some(data);
        server
    }

    /// A server on `models_dir` and `data_dir` (which outlives it, for restart tests).
    pub async fn start_with(models_dir: &Path, data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::spawn("127.0.0.1", models_dir, data_dir, extra_args).await
    }

    /// A server listening on every interface (the default models, a fresh data directory).
    pub async fn start_exposed(extra_args: &[&str]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut server = Self::spawn("0.0.0.0", &root().join("models"), data.path(), extra_args).await;
        server._data = Some(data);
        server
    }

    async fn spawn(host: &str, models_dir: &Path, data_dir: &Path, extra_args: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_editserve"))
            .args(["serve", "--listen", &format!("{host}:{port}"), "--models-dir"])
            .arg(models_dir)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--models", "efficientnet-lite0", "--device", "cpu"])
            .args(extra_args)
            .env("EDITSERVE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start editserve");
        let server = Self { base: format!("http://127.0.0.1:{port}"), child: Some(child), _data: None };
        server.wait_ready(Duration::from_secs(120)).await;
        server
    }

    async fn wait_ready(&self, timeout: Duration) {
        let client = reqwest::Client::new();
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(r) = client.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("server not ready after {timeout:?}");
    }

    pub fn port(&self) -> u16 {
        self.base.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

pub const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 40_000_000 };

/// Foolbox photo `index`, the same photo with diagonal stripes over its centre (which changes the
/// prediction), and the mask of that square: an exemplar for editing the real model.
pub fn striped_exemplar(index: usize) -> (DynamicImage, DynamicImage, GrayImage) {
    let (path, _) = foolbox_photos().remove(index);
    let original = decode(&std::fs::read(path).unwrap(), LIMITS).unwrap();
    let (w, h) = (original.width(), original.height());
    let inside = |x: u32, y: u32| (w / 5..w * 4 / 5).contains(&x) && (h / 5..h * 4 / 5).contains(&y);
    let mut modified = original.to_rgb8();
    for (x, y, pixel) in modified.enumerate_pixels_mut() {
        if inside(x, y) {
            let v = if ((x + y) / 24) % 2 == 1 { 255 } else { 0 };
            *pixel = Rgb([v, v, v]);
        }
    }
    let mask = GrayImage::from_fn(w, h, |x, y| Luma([if inside(x, y) { 255 } else { 0 }]));
    (original, DynamicImage::ImageRgb8(modified), mask)
}

/// Images preprocessed as `package` declares, stacked into one batch.
pub fn preprocess_batch(package: &ModelPackage, images: &[DynamicImage]) -> Tensor {
    let inputs: Vec<Tensor> =
        images.iter().map(|i| editserve::edit::input_tensor(&package.config.preprocessing.apply(i), 3)).collect();
    Tensor::stack(&inputs, 0)
}
