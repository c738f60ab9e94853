//! The Open Inference Protocol v2 routes against a real server, checked by a client we did not write:
//! NVIDIA's `tritonclient[http]` (in `.venv-contract`, which `make setup` builds) runs
//! `tests/clients/tritonclient_check.py` with a token of the `infer` scope. The FP32 input it sends is the
//! photo preprocessed here by the server's own rules, so both inputs must agree.

mod common;

use std::process::Command;

use common::{foolbox_photos, model_dir, root, TestServer};
use editserve::models::ModelPackage;

#[tokio::test]
async fn tritonclient_speaks_to_the_v2_routes() {
    let server = TestServer::start(&["--tokens", "reader infer r-secret"]).await;
    let (photo, label) = foolbox_photos().into_iter().next().unwrap();
    let package = ModelPackage::open(&model_dir()).unwrap();
    let image = image::open(&photo).unwrap();
    let input = package.config.preprocessing.apply(&image);
    let scratch = tempfile::tempdir().unwrap();
    let pixels = scratch.path().join("pixels.f32");
    std::fs::write(&pixels, input.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();

    let output = Command::new(root().join(".venv-contract/bin/python"))
        .arg(root().join("tests/clients/tritonclient_check.py"))
        .args(["--url", &format!("127.0.0.1:{}", server.port()), "--model", "efficientnet-lite0"])
        .arg("--photo")
        .arg(&photo)
        .args(["--label", &label.to_string(), "--token", "r-secret"])
        .arg("--pixels")
        .arg(&pixels)
        .output()
        .expect("run .venv-contract/bin/python (make setup builds it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("all tritonclient checks passed"), "{stdout}");
}
