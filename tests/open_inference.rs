//! The Open Inference Protocol v2 routes against a real server, checked by two clients we did not write:
//! NVIDIA's `tritonclient[http]` and the KServe SDK's `InferenceRESTClient` (both in `.venv-contract`, which
//! `make test` builds) run `tests/clients/tritonclient_check.py` and `tests/clients/kserve_check.py` with a
//! token of the `infer` scope. The FP32 input they send is the photo preprocessed here by the server's own
//! rules, so that both inputs must agree.

mod common;

use std::path::Path;
use std::process::Command;

use common::{foolbox_photos, model_dir, root, TestServer};
use editserve::models::ModelPackage;

fn run_client(script: &str, args: &[&str], photo: &Path, pixels: &Path) -> String {
    let output = Command::new(root().join(".venv-contract/bin/python"))
        .arg(root().join("tests/clients").join(script))
        .args(args)
        .arg("--photo")
        .arg(photo)
        .arg("--pixels")
        .arg(pixels)
        .output()
        .expect("run .venv-contract/bin/python (make contract-tools builds it)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{script}:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[tokio::test]
async fn tritonclient_and_kserve_speak_to_the_v2_routes() {
    let server = TestServer::start(&["--tokens", "reader infer r-secret"]).await;
    let (photo, label) = foolbox_photos().into_iter().next().unwrap();
    let package = ModelPackage::open(&model_dir()).unwrap();
    let input = package.config.preprocessing.apply(&image::open(&photo).unwrap());
    let scratch = tempfile::tempdir().unwrap();
    let pixels = scratch.path().join("pixels.f32");
    std::fs::write(&pixels, input.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let label = label.to_string();
    let common = ["--model", "efficientnet-lite0", "--label", &label, "--token", "r-secret"];

    let address = format!("127.0.0.1:{}", server.port());
    let triton = [["--url", address.as_str()].as_slice(), &common].concat();
    let stdout = run_client("tritonclient_check.py", &triton, &photo, &pixels);
    assert!(stdout.contains("all tritonclient checks passed"), "{stdout}");

    let url = server.url("");
    let kserve = [["--url", url.trim_end_matches('/')].as_slice(), &common].concat();
    let stdout = run_client("kserve_check.py", &kserve, &photo, &pixels);
    assert!(stdout.contains("all kserve checks passed"), "{stdout}");
}
