//! Versions survive the server: after a SIGTERM or a kill -9, a server restarted on the same data directory
//! has its ready versions, aliases and exemplars back, and every version's probabilities are bitwise equal to
//! before; jobs that were running are failed (never ready), and version numbers are never reused.
//!
//! The real server binary on loopback, the real EfficientNet-Lite0 on the CPU, closed-form edits (a fraction
//! of a second) from striped foolbox photos, and a rewrite with Adam and `LONG_STEPS` steps for a job that is
//! still running when the server is killed.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::api::{closed_form, long_adam, merged, model_path, numbers, striped_form, Api, Image};
use common::{foolbox_photos, root, striped_exemplar, TestServer};
use serde_json::{json, Value};

const NUM_CLASSES: usize = 1000;
/// Version fields that describe the running process rather than the stored version.
const PROCESS_FIELDS: &[&str] = &["resident", "resident_bytes"];

/// A request body for a closed-form rewrite from one exemplar on top of `parent`.
fn closed_form_on(parent: u64, exemplar: &str, description: &str) -> Value {
    merged(&closed_form(exemplar, description), json!({ "parent": parent }))
}

/// The versions of a list without the fields that describe the process (what is materialised now).
fn durable(page: &Value) -> Vec<Value> {
    let mut versions = page["versions"].as_array().unwrap_or_else(|| panic!("no versions in {page}")).clone();
    for version in &mut versions {
        for field in PROCESS_FIELDS {
            version.as_object_mut().unwrap().remove(*field);
        }
    }
    versions
}

/// An image for the classify routes, with a name for the messages.
struct Probe {
    name: String,
    image: Image,
}

/// Striped photos 0 and 3 (the exemplars' modified images) and clean photos 1 and 2.
fn probe_images() -> Vec<Probe> {
    let mut probes = Vec::new();
    for index in [0, 3] {
        let (_, modified, _) = striped_exemplar(index);
        probes.push(Probe { name: format!("striped photo {index}"), image: Image::png(&modified) });
    }
    for (path, _) in &foolbox_photos()[1..3] {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        probes.push(Probe { name, image: Image::jpeg(path) });
    }
    probes
}

/// The probability of every class, in class-index order, for `version` on each image.
async fn probabilities(api: &Api, version: u64, probes: &[Probe]) -> Vec<Vec<f64>> {
    let mut all = Vec::new();
    for probe in probes {
        let route = format!("/versions/{version}/classify?top_k={NUM_CLASSES}");
        let body = api.classify(&route, &probe.image).await.ok(200, &format!("classify {}", probe.name));
        assert_eq!(body["version"], version, "{}", probe.name);
        let mut probabilities = vec![f64::NAN; NUM_CLASSES];
        for prediction in body["predictions"].as_array().unwrap() {
            let index = prediction["index"].as_u64().unwrap() as usize;
            probabilities[index] = prediction["probability"].as_f64().unwrap();
        }
        assert!(probabilities.iter().all(|p| !p.is_nan()), "version {version} left out classes on {}", probe.name);
        all.push(probabilities);
    }
    all
}

/// Asserts that the probabilities of `version` are bit for bit those recorded before the restart.
#[track_caller]
fn assert_bitwise_equal(version: u64, probes: &[Probe], before: &[Vec<f64>], after: &[Vec<f64>]) {
    for ((probe, before), after) in probes.iter().zip(before).zip(after) {
        let differs = before.iter().zip(after).position(|(b, a)| b.to_bits() != a.to_bits());
        if let Some(index) = differs {
            panic!(
                "version {version} on {}: class {index} has probability {} after the restart, {} before",
                probe.name, after[index], before[index]
            );
        }
    }
}

/// How many blobs the data directory holds.
fn blob_files(data: &Path) -> usize {
    let shards = std::fs::read_dir(data.join("blobs")).unwrap();
    shards.map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap().count()).sum()
}

/// A server on a fresh data directory, which outlives it for `restart`.
async fn first_start() -> (tempfile::TempDir, TestServer, Api) {
    let data = tempfile::tempdir().unwrap();
    let (server, api) = restart(data.path()).await;
    (data, server, api)
}

/// A server on the models of the set-up and the data directory `data`.
async fn restart(data: &Path) -> (TestServer, Api) {
    let server = TestServer::start_with(&root().join("models"), data, &[]).await;
    let api = Api::new(&server);
    (server, api)
}

#[tokio::test]
async fn sigterm_restart_brings_back_versions_aliases_exemplars_and_exact_probabilities() {
    let (data, mut server, api) = first_start().await;

    let first = api.create_exemplar(striped_form(0)).await;
    let second = api.create_exemplar(striped_form(3)).await;
    let (job1, v1) = api.edit(&closed_form_on(0, &first, "stripes on photo 0")).await;
    let (job2, v2) = api.edit(&closed_form_on(v1, &second, "stripes on photo 3, on top")).await;
    assert_eq!((v1, v2), (1, 2));
    let set = api.set_alias("production", json!(v2)).await.ok(200, "PUT alias production");
    assert_eq!(set, json!({"alias": "production", "version": v2}));

    // Two versions deleted before the restart: 3 repeats version 1's change (the same blob, which must stay),
    // 4 has a change of its own (a blob nothing refers to any more, which the restart removes).
    let (_, v3) = api.edit(&closed_form_on(0, &first, "the change of version 1 again")).await;
    let (_, v4) = api.edit(&closed_form_on(0, &second, "a change of its own")).await;
    let (third, first_version) = (api.version(v3).await.ok(200, "GET 3"), api.version(v1).await.ok(200, "GET 1"));
    assert_eq!(third["stored_bytes"], first_version["stored_bytes"], "{third} {first_version}");
    for version in [v4, v3] {
        assert_eq!(api.delete(&model_path(&format!("/versions/{version}"))).await.status, 204, "DELETE {version}");
    }
    let blobs_before = blob_files(data.path());

    let images = probe_images();
    let mut before = Vec::new();
    for version in [0, v1, v2] {
        before.push(probabilities(&api, version, &images).await);
    }
    assert_ne!(before[0][0], before[1][0], "version 1 classifies the striped photo like version 0");
    assert_ne!(before[1][1], before[2][1], "version 2 classifies its striped photo like version 1");
    let versions = durable(&api.list_versions("?limit=200").await);
    let aliases = api.aliases().await;
    assert_eq!(aliases, json!({"base": 0, "default": 0, "latest": 2, "production": 2}));
    let exemplars = [
        api.get(&format!("/v1/exemplars/{first}")).await.ok(200, "GET the first exemplar"),
        api.get(&format!("/v1/exemplars/{second}")).await.ok(200, "GET the second exemplar"),
    ];

    let status = server.terminate();
    assert!(status.success(), "SIGTERM: {status:?}");
    let (_server, api) = restart(data.path()).await;
    assert_eq!(blob_files(data.path()), blobs_before - 1, "only the deleted version 4's change is removed");

    assert_eq!(durable(&api.list_versions("?limit=200").await), versions, "the versions changed across the restart");
    assert_eq!(api.aliases().await, aliases, "the aliases changed across the restart");
    for (id, exemplar) in [&first, &second].into_iter().zip(&exemplars) {
        assert_eq!(&api.get(&format!("/v1/exemplars/{id}")).await.ok(200, "GET an exemplar"), exemplar);
    }
    for (job, version) in [(&job1, v1), (&job2, v2)] {
        let job = api.job(job).await;
        assert_eq!((&job["state"], &job["version"]), (&json!("succeeded"), &json!(version)), "{job}");
    }
    for (version, before) in [0, v1, v2].into_iter().zip(&before) {
        let after = probabilities(&api, version, &images).await;
        assert_bitwise_equal(version, &images, before, &after);
    }
    let production =
        api.classify("/versions/production/classify", &images[1].image).await.ok(200, "classify production");
    assert_eq!(production["version"], v2, "{production}");
}

#[tokio::test]
async fn kill_9_fails_the_running_job_requeues_the_queued_one_and_keeps_the_ready_versions() {
    let (data, mut server, api) = first_start().await;

    let exemplar = api.create_exemplar(striped_form(0)).await;
    let (_, ready) = api.edit(&closed_form_on(0, &exemplar, "made before the kill")).await;
    let images = probe_images();
    let before = [probabilities(&api, 0, &images).await, probabilities(&api, ready, &images).await];
    assert_ne!(before[0][0], before[1][0], "the edit did not change the striped photo's probabilities");

    // A long job, running when the server is killed.
    let (job, doomed) = api.start_edit(&long_adam(&exemplar, "killed")).await;
    assert_eq!(doomed, ready + 1);
    api.wait_running(&job).await;
    // A job queued behind it: it has not started, so the restart queues it again.
    let (waiting, resumed) = api.start_edit(&closed_form_on(ready, &exemplar, "queued at the kill")).await;
    assert_eq!(api.job(&waiting).await["state"], "queued");
    // SAFETY: signalling our own child process; terminate() then reaps it (its SIGTERM comes too late to matter).
    unsafe { libc::kill(server.pid() as i32, libc::SIGKILL) };
    let status = server.terminate();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");

    let (_server, api) = restart(data.path()).await;

    // The job and its version are failed, for good.
    let failed = api.job(&job).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap_or_else(|| panic!("a failed job without an error: {failed}"));
    assert!(error.contains("stopped"), "the error should say the server stopped: {error}");
    api.delete(&format!("/v1/jobs/{job}")).await.expect_error(409, "job_finished", "cancel the failed job");
    let version = api.version(doomed).await.ok(200, "GET the killed job's version");
    assert_eq!(version["state"], "failed", "{version}");
    assert!(version["error"].as_str().is_some_and(|e| !e.is_empty()), "{version}");
    let doomed_route = format!("/versions/{doomed}/classify");
    api.classify(&doomed_route, &images[0].image).await.expect_error(409, "version_not_ready", "classify it");
    assert_ne!(api.aliases().await["latest"], doomed, "latest must not move to the failed version");

    // The queued job ran after the restart.
    let done = api.wait_finished(&waiting).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(api.version(resumed).await.ok(200, "GET the resumed version")["state"], "ready");

    // The ready versions answer bit for bit as before.
    for (version, before) in [0, ready].into_iter().zip(&before) {
        let after = probabilities(&api, version, &images).await;
        assert_bitwise_equal(version, &images, before, &after);
    }

    // The failed version keeps its number: the next edit gets the one after.
    let (_, next) = api.edit(&closed_form_on(ready, &exemplar, "after the restart")).await;
    assert_eq!(next, resumed + 1, "a version number was reused");
    assert_eq!(numbers(&api.list_versions("?limit=200").await), [next, resumed, doomed, ready, 0]);
    assert_eq!(api.aliases().await["latest"], next);
}

#[tokio::test]
async fn sigterm_ends_event_streams_and_fails_the_running_job() {
    let (data, mut server, api) = first_start().await;
    let exemplar = api.create_exemplar(striped_form(0)).await;
    let (job, number) = api.start_edit(&long_adam(&exemplar, "followed at the stop")).await;
    api.wait_running(&job).await;
    let mut stream = reqwest::get(server.url(&format!("/v1/jobs/{job}/events"))).await.unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some(), "the first event comes at once");

    let stopped = std::time::Instant::now();
    let status = server.terminate();
    assert!(status.success(), "SIGTERM: {status:?}");
    // The job had about 100,000 steps to go: minutes, had the drain waited for its stream.
    assert!(stopped.elapsed() < std::time::Duration::from_secs(20), "the stop took {:?}", stopped.elapsed());
    while let Ok(Some(_)) = stream.chunk().await {}

    // Stopped, not cancelled by anyone: failed as after a crash, and so is its version.
    let (_server, api) = restart(data.path()).await;
    let failed = api.job(&job).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("stopped")), "{failed}");
    assert_eq!(api.version(number).await.ok(200, "GET its version")["state"], "failed");
}
