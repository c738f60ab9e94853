//! Versions, aliases, edit jobs and statistics jobs over real HTTP (the contract of issue 4): the real server
//! binary on loopback serving the real EfficientNet-Lite0 on the CPU, edited from the striped exemplar of a
//! foolbox photo.
//!
//! Most edits use the closed-form solver (a fraction of a second). A rewrite with Adam and `LONG_STEPS` steps
//! (minutes on the CPU) stands in for a job that is still running while a test looks at it: cancellation,
//! queued jobs, pending versions. Every wait polls with a deadline and says what it waited for.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::api::{
    closed_form, exemplar_form, id_of, is_final, jpeg_part, long_adam, merged, model_path, numbers, png_part,
    striped_form, Api, Image, LONG_STEPS, MODEL,
};
use common::datasets::unlabelled_form;
use common::{foolbox_photos, root, striped_exemplar, TestServer};
use editserve::edit::guard::steps as guard_steps;
use image::DynamicImage;
use reqwest::multipart::Form;
use serde_json::{json, Value};

/// EfficientNet-Lite0's default edit layer: the 1x1 project conv of the last block at stride 16 (672 -> 112
/// channels).
const DEFAULT_LAYER: &str = "_blocks.10._project_conv";
/// The last MBConv's project conv, where the closed form fixes the striped exemplar (tests/edit_real.rs).
const LAST_PROJECT_CONV: &str = "_blocks.15._project_conv";
/// Its 16 project convs and the head conv.
const EDITABLE_LAYERS: usize = 17;
/// Adam steps of an edit that runs for a few seconds: long enough to watch its progress events.
const WATCHED_STEPS: u64 = 1_000;
/// A well-formed id that names nothing.
const UNKNOWN_ID: &str = "00000000-0000-4000-8000-000000000000";
const CONCURRENT_EDITS: usize = 3;
const STATISTICS_PHOTOS: usize = 6;
const EDIT_QUEUE_CAPACITY: usize = 1;

fn top1(classified: &Value) -> u64 {
    classified["predictions"][0]["index"].as_u64().unwrap_or_else(|| panic!("no predictions in {classified}"))
}

fn indices(predictions: &Value) -> Vec<u64> {
    predictions.as_array().unwrap().iter().map(|p| p["index"].as_u64().unwrap()).collect()
}

#[track_caller]
fn assert_timestamp(value: &Value, what: &str) {
    let text = value.as_str().unwrap_or_else(|| panic!("{what} is not a string: {value}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{what} '{text}' is not RFC 3339: {e}"));
}

#[track_caller]
fn assert_mentions(value: &Value, word: &str, what: &str) {
    let text = value.as_str().unwrap_or_else(|| panic!("{what} is not a string: {value}"));
    assert!(text.to_lowercase().contains(word), "{what} does not mention '{word}': {text}");
}

/// The audit entries of `action`.
fn entries<'a>(audit: &'a [Value], action: &str) -> Vec<&'a Value> {
    audit.iter().filter(|e| e["action"] == action).collect()
}

#[tokio::test]
async fn edit_classify_alias_and_delete_versions_end_to_end() {
    let server = TestServer::start(&[]).await;
    let api = Api::new(&server);

    // The model names its editable layers and the default one.
    let model = api.get(&model_path("")).await.ok(200, "GET the model");
    assert_eq!(model["default_edit_layer"], DEFAULT_LAYER, "{model}");
    assert_eq!(model["default_edit_layers"], json!([DEFAULT_LAYER, B11]), "the default gated edit's: {model}");
    assert_eq!(model["one_exemplar_edit_layers"], json!([B6, DEFAULT_LAYER, B11]), "from one exemplar: {model}");
    let layers = model["editable_layers"].as_array().unwrap_or_else(|| panic!("no editable_layers: {model}"));
    assert_eq!(layers.len(), EDITABLE_LAYERS, "{model}");
    let default = layers.iter().find(|l| l["name"] == DEFAULT_LAYER).expect("the default layer is editable");
    assert_eq!(default["weight_shape"], json!([112, 672, 1, 1]), "{default}");
    assert_eq!(default["has_skip"], true, "{default}");

    // Version 0 is the loaded base weights.
    let base = api.version(0).await.ok(200, "GET version 0");
    assert_eq!(base["number"], 0, "{base}");
    assert_eq!(base["state"], "ready", "{base}");
    assert_eq!(base["stored_bytes"], 0, "{base}");
    assert_eq!(base["resident"], true, "{base}");
    assert_eq!(base["resident_bytes"], 0, "{base}");
    assert_eq!(base["exemplars"], json!([]), "{base}");
    for field in ["parent", "layer", "method", "solver", "parameters", "statistics", "metrics", "job", "description"] {
        assert!(base[field].is_null(), "version 0 has a {field}: {base}");
    }

    // Three exemplars of foolbox photo 0: mask PNG and modified copy; polygon and fill; mask PNG and blur.
    let (original, modified, mask) = striped_exemplar(0);
    let (w, h) = (original.width(), original.height());
    let by_mask = api.create_exemplar(exemplar_form(&original, &modified, &mask)).await;
    let square =
        json!({"polygons": [[[w / 5, h / 5], [w * 4 / 5, h / 5], [w * 4 / 5, h * 4 / 5], [w / 5, h * 4 / 5]]]});
    let by_polygon = api
        .create_exemplar(
            Form::new()
                .part("image", png_part(&original))
                .text("mask_json", square.to_string())
                .text("transform", r#"{"kind": "fill", "rgb": [0, 0, 0]}"#),
        )
        .await;
    let by_blur = api
        .create_exemplar(
            Form::new()
                .part("image", png_part(&original))
                .part("mask", png_part(&DynamicImage::ImageLuma8(mask.clone())))
                .text("transform", r#"{"kind": "blur", "sigma": 8}"#),
        )
        .await;

    // A closed-form edit: 202 with the job, queued or running, and version 1, pending.
    let description = "stripes read like the dog";
    let reply = api.post_json(&model_path("/versions"), &closed_form(&by_mask, description)).await;
    let location = reply.header("location").map(str::to_string);
    let created = reply.ok(202, "closed-form edit");
    let job1 = id_of(&created["job"]);
    assert_eq!(location, Some(format!("/v1/jobs/{job1}")), "{created}");
    assert!(matches!(created["job"]["state"].as_str(), Some("queued" | "running")), "{created}");
    assert_eq!(created["job"]["kind"], "edit", "{created}");
    assert_eq!(created["job"]["model"], MODEL, "{created}");
    assert_eq!(created["job"]["version"], 1, "{created}");
    assert_eq!(created["version"]["number"], 1, "{created}");
    assert_eq!(created["version"]["state"], "pending", "{created}");
    assert_timestamp(&created["job"]["created_at"], "job created_at");

    let done = api.wait_succeeded(&job1).await;
    assert_eq!(done["version"], 1, "{done}");
    assert!(done["error"].is_null(), "{done}");
    assert_timestamp(&done["started_at"], "job started_at");
    assert_timestamp(&done["finished_at"], "job finished_at");

    let v1 = api.version(1).await.ok(200, "GET version 1");
    assert_eq!(v1["model"], MODEL, "{v1}");
    assert_eq!(v1["state"], "ready", "{v1}");
    assert_eq!(v1["parent"], 0, "{v1}");
    assert_eq!(v1["layer"], DEFAULT_LAYER, "{v1}");
    assert_eq!(v1["method"], "rewrite", "{v1}");
    assert_eq!(v1["solver"], "closed_form", "{v1}");
    assert_eq!(v1["exemplars"], json!([by_mask]), "{v1}");
    assert_eq!(v1["description"], description, "{v1}");
    assert_eq!(v1["job"], job1, "{v1}");
    assert!(v1["error"].is_null(), "{v1}");
    assert!(v1["statistics"].is_null(), "{v1}");
    assert_eq!(v1["metrics"]["statistics"], "second_moment", "an edit without statistics: {v1}");
    assert!(
        v1["metrics"]["statistics_source"].as_str().is_some_and(|s| s.starts_with("default: ")),
        "an edit without statistics uses the default ones: {v1}"
    );
    assert_eq!(v1["metrics"]["guard"]["scale"], 1.0, "a guard of max_changed 1 keeps the whole change: {v1}");
    assert!(v1["metrics"]["delta_norm"].as_f64().is_some_and(|n| n > 0.0), "{v1}");
    assert!(v1["stored_bytes"].as_u64().is_some_and(|n| n > 0), "{v1}");
    assert_timestamp(&v1["created_at"], "version created_at");
    assert_timestamp(&v1["ready_at"], "version ready_at");
    assert!(v1["aliases"].as_array().is_some_and(|a| a.contains(&json!("latest"))), "{v1}");

    // The events of a finished job: its final state at once, then the stream ends.
    let events = api.events(&job1).await;
    assert_eq!(events.len(), 1, "events of a finished job: {:?}", events.iter().map(|e| &e.job).collect::<Vec<_>>());
    assert_eq!(events[0].name, "final");
    assert_eq!(events[0].job["state"], "succeeded", "{}", events[0].job);
    assert_eq!(events[0].job["id"], job1.as_str(), "{}", events[0].job);

    // Version 0 and version 1 on the striped image; `?version=`, the version's route and the default agree.
    let striped = Image::png(&modified);
    let before = api.classify("/classify?version=0", &striped).await.ok(200, "classify version 0");
    let after = api.classify("/classify?version=1", &striped).await.ok(200, "classify version 1");
    assert_eq!(before["version"], 0, "{before}");
    assert_eq!(after["version"], 1, "{after}");
    assert_eq!(after["model"], MODEL, "{after}");
    assert_ne!(before["predictions"], after["predictions"], "the edit did not change the predictions");
    println!("striped image: top-1 {} with version 0, {} with version 1", top1(&before), top1(&after));
    let by_route = api.classify("/versions/1/classify", &striped).await.ok(200, "classify /versions/1");
    assert_eq!(by_route, after, "?version=1 and /versions/1/classify differ");
    let unnamed = api.classify("/classify", &striped).await.ok(200, "classify without a version");
    assert_eq!(unnamed["version"], 0, "without a version, the default alias (0) answers: {unnamed}");
    assert_eq!(unnamed["predictions"], before["predictions"]);
    let v1 = api.version(1).await.ok(200, "GET version 1");
    assert_eq!(v1["resident"], true, "a version just classified is materialised: {v1}");
    assert!(v1["resident_bytes"].as_u64().is_some_and(|n| n > 0), "{v1}");

    // An Adam edit on top of version 1, watched from the start: progress events, then the final one.
    let watched = json!({
        "parent": 1, "exemplars": [by_polygon, by_blur], "solver": "adam", "steps": WATCHED_STEPS,
        "description": "watched"
    });
    let (job2, number) = api.start_edit(&watched).await;
    assert_eq!(number, 2);
    let events = api.events(&job2).await;
    let steps: Vec<u64> = events.iter().map(|e| e.job["progress"]["step"].as_u64().unwrap()).collect();
    let (last, progress) = events.split_last().expect("no events");
    assert_eq!(last.name, "final", "steps {steps:?}");
    assert_eq!(last.job["state"], "succeeded", "{}", last.job);
    // The steps count the solver's, then the breakage guard's (its preparation and trials), to the end.
    assert_eq!(last.job["progress"]["step"], WATCHED_STEPS + guard_steps(1) as u64, "{}", last.job);
    assert_eq!(last.job["progress"]["total"], WATCHED_STEPS + guard_steps(1) as u64, "{}", last.job);
    assert!(last.job["progress"]["elapsed_seconds"].as_f64().is_some_and(|s| s > 0.0), "{}", last.job);
    assert!(last.job["progress"]["remaining_seconds"].is_null(), "a finished job has nothing left: {}", last.job);
    assert!(progress.iter().all(|e| e.name == "progress" && !is_final(&e.job)), "steps {steps:?}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "progress went backwards: {steps:?}");
    let mut distinct = steps.clone();
    distinct.dedup();
    assert!(distinct.len() >= 3, "expected to watch the steps go up: {steps:?}");
    let seconds = last.at.as_secs_f64();
    assert!(events.len() as f64 <= 15.0 * seconds + 5.0, "{} events in {seconds:.1} s: over ~10/s", events.len());

    let v2 = api.version(2).await.ok(200, "GET version 2");
    assert_eq!(v2["state"], "ready", "{v2}");
    assert_eq!(v2["parent"], 1, "{v2}");
    assert_eq!(v2["solver"], "adam", "{v2}");
    assert_eq!(v2["exemplars"], json!([by_polygon, by_blur]), "{v2}");
    assert_eq!(v2["parameters"]["steps"], WATCHED_STEPS, "{v2}");
    assert_eq!(v2["metrics"]["steps"], WATCHED_STEPS, "{v2}");
    let loss = |key: &str| v2["metrics"][key].as_f64().unwrap_or_else(|| panic!("no metrics.{key}: {v2}"));
    assert!(loss("loss_after") < loss("loss_before"), "Adam did not lower the loss: {v2}");

    // Compare: one result per named version, in order; `agree` is about the top-1 classes.
    let compared = api.classify("/compare?versions=0,1,latest&top_k=3", &striped).await.ok(200, "compare");
    assert_eq!(compared["model"], MODEL, "{compared}");
    let results = compared["results"].as_array().unwrap_or_else(|| panic!("no results: {compared}"));
    let versions: Vec<u64> = results.iter().map(|r| r["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, [0, 1, 2], "{compared}");
    assert!(results.iter().all(|r| r["predictions"].as_array().is_some_and(|p| p.len() == 3)), "{compared}");
    assert_eq!(indices(&results[0]["predictions"]), indices(&before["predictions"])[..3], "{compared}");
    assert_eq!(indices(&results[1]["predictions"]), indices(&after["predictions"])[..3], "{compared}");
    let tops: Vec<u64> = results.iter().map(top1).collect();
    assert_eq!(compared["agree"], tops.windows(2).all(|w| w[0] == w[1]), "{compared}");

    // Aliases: built-in base and latest, default, custom ones.
    assert_eq!(api.aliases().await, json!({"base": 0, "default": 0, "latest": 2}));
    let set = api.set_alias("production", json!(1)).await.ok(200, "PUT production");
    assert_eq!(set, json!({"alias": "production", "version": 1}));
    let set = api.set_alias("default", json!("production")).await.ok(200, "PUT default by alias");
    assert_eq!(set, json!({"alias": "default", "version": 1}));
    assert_eq!(api.aliases().await, json!({"base": 0, "default": 1, "latest": 2, "production": 1}));
    let unnamed = api.classify("/classify", &striped).await.ok(200, "classify with default = 1");
    assert_eq!(unnamed["version"], 1, "{unnamed}");
    assert_eq!(unnamed["predictions"], after["predictions"]);
    let by_alias = api.classify("/classify?version=production", &striped).await.ok(200, "classify production");
    assert_eq!(by_alias["version"], 1, "{by_alias}");
    let v1_aliases = api.version(1).await.ok(200, "GET version 1")["aliases"].clone();
    for alias in ["default", "production"] {
        assert!(v1_aliases.as_array().is_some_and(|a| a.contains(&json!(alias))), "{alias} not in {v1_aliases}");
    }
    assert_eq!(api.delete(&model_path("/aliases/production")).await.status, 204);
    api.delete(&model_path("/aliases/production")).await.expect_error(404, "alias_not_found", "DELETE again");
    assert_eq!(api.delete(&model_path("/aliases/default")).await.status, 204);
    assert_eq!(api.aliases().await, json!({"base": 0, "default": 0, "latest": 2}));
    let unnamed = api.classify("/classify", &striped).await.ok(200, "classify with default reset");
    assert_eq!(unnamed["version"], 0, "{unnamed}");
    api.set_alias("base", json!(1)).await.expect_error(409, "builtin_alias", "PUT base");
    api.set_alias("latest", json!(1)).await.expect_error(409, "builtin_alias", "PUT latest");
    api.delete(&model_path("/aliases/base")).await.expect_error(409, "builtin_alias", "DELETE base");
    api.delete(&model_path("/aliases/latest")).await.expect_error(409, "builtin_alias", "DELETE latest");

    // The list, newest first, and its pages of one.
    let all = api.list_versions("").await;
    assert_eq!(numbers(&all), [2, 1, 0], "{all}");
    assert!(all["next_before"].is_null(), "{all}");
    let mut pages = Vec::new();
    let mut query = "?limit=1".to_string();
    loop {
        let page = api.list_versions(&query).await;
        pages.push(numbers(&page));
        assert!(pages.len() <= 3, "more pages than versions: {pages:?}");
        match page["next_before"].as_u64() {
            Some(before) => query = format!("?limit=1&before={before}"),
            None => {
                assert!(page["next_before"].is_null(), "{page}");
                break;
            }
        }
    }
    assert_eq!(pages, [[2], [1], [0]]);

    // Deleting: refused while an alias, a child or a version names it; then gone.
    api.set_alias("production", json!(2)).await.ok(200, "PUT production = 2");
    api.delete(&model_path("/versions/2")).await.expect_error(409, "version_in_use", "DELETE a version with an alias");
    api.delete(&model_path("/versions/1")).await.expect_error(409, "version_in_use", "DELETE a version with a child");
    api.delete(&model_path("/versions/0")).await.expect_error(409, "version_in_use", "DELETE version 0");
    let in_use = format!("/v1/exemplars/{by_polygon}");
    api.delete(&in_use).await.expect_error(409, "exemplar_in_use", "DELETE an exemplar a version lists");
    assert_eq!(api.delete(&model_path("/aliases/production")).await.status, 204);
    // `latest` still names version 2, which does not keep it.
    assert_eq!(api.delete(&model_path("/versions/2")).await.status, 204, "DELETE the leaf version 2");
    let gone = api.version(2).await;
    gone.expect_error(404, "version_not_found", "GET a deleted version");
    assert_mentions(&gone.body["error"]["message"], "deleted", "the message for a deleted version");
    api.classify("/versions/2/classify", &striped).await.expect_error(404, "version_not_found", "classify deleted");
    api.classify("/classify?version=2", &striped).await.expect_error(404, "version_not_found", "classify deleted");
    api.delete(&model_path("/versions/2")).await.expect_error(404, "version_not_found", "DELETE again");
    assert_eq!(numbers(&api.list_versions("").await), [1, 0]);
    assert_eq!(api.aliases().await, json!({"base": 0, "default": 0, "latest": 1}));
    let in_use = format!("/v1/exemplars/{by_mask}");
    api.delete(&in_use).await.expect_error(409, "exemplar_in_use", "DELETE the exemplar of version 1");
    assert_eq!(api.delete(&format!("/v1/exemplars/{by_polygon}")).await.status, 204, "only a deleted version lists it");

    // The audit log has each action, with its subject and detail.
    let audit = api.audit().await;
    let edits = entries(&audit, "edit.create");
    let subjects: Vec<&Value> = edits.iter().map(|e| &e["subject"]).collect();
    assert_eq!(subjects, [&json!(job1), &json!(job2)], "{edits:?}");
    for (entry, version) in edits.iter().zip([1, 2]) {
        assert_eq!(entry["detail"]["model"], MODEL, "{entry}");
        assert_eq!(entry["detail"]["version"], version, "{entry}");
    }
    let sets = entries(&audit, "alias.set");
    assert_eq!(sets.len(), 3, "production = 1, default = 1, production = 2: {sets:?}");
    assert_eq!(sets[0]["subject"], format!("{MODEL}/production"), "{}", sets[0]);
    assert_eq!(sets[0]["detail"]["version"], 1, "{}", sets[0]);
    assert_eq!(entries(&audit, "alias.delete").len(), 3, "production, default, production");
    let deletes = entries(&audit, "version.delete");
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0]["subject"], format!("{MODEL}/2"), "{}", deletes[0]);

    // Jobs and resident versions are visible to monitoring.
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    for line in [
        r#"editserve_jobs_total{kind="edit",state="succeeded"} 2"#,
        "editserve_job_seconds_count{kind=\"edit\"} 2",
        "editserve_resident_versions ",
        "editserve_version_materialisations_total ",
        "editserve_edit_queue_depth 0",
    ] {
        assert!(metrics.contains(line), "/metrics lacks {line}:\n{metrics}");
    }
}

#[tokio::test]
async fn an_idempotency_key_replays_the_same_job() {
    const KEY: &str = "edit-2026-retry-1";
    let server = TestServer::start(&[]).await;
    let api = Api::new(&server);
    let exemplar = api.create_exemplar(striped_form(0)).await;
    let body = closed_form(&exemplar, "retried");

    let first = api.post_edit_with_key(&body, KEY).await.ok(202, "first try");
    let retry = api.post_edit_with_key(&body, KEY).await.ok(202, "retry");
    assert_eq!(first["version"]["number"], 1, "{first}");
    assert_eq!(retry["job"]["id"], first["job"]["id"], "{retry}");
    assert_eq!(retry["version"]["number"], 1, "{retry}");
    let job = id_of(&first["job"]);
    api.wait_succeeded(&job).await;
    let late = api.post_edit_with_key(&body, KEY).await.ok(202, "retry after the job finished");
    assert_eq!(late["job"]["id"], job.as_str(), "{late}");
    assert_eq!(late["job"]["state"], "succeeded", "the job object shows its current state: {late}");
    assert_eq!(late["version"]["number"], 1, "{late}");
    assert_eq!(numbers(&api.list_versions("").await), [1, 0], "the retries made versions");

    // The same key with another body is refused; a long key too.
    let other = closed_form(&exemplar, "something else");
    api.post_edit_with_key(&other, KEY).await.expect_error(422, "idempotency_key_reused", "same key, other body");
    api.post_edit_with_key(&body, &"k".repeat(256)).await.expect_unprocessable("a 256-character key");

    // Without a key, or with another, the same body is a new edit.
    assert_eq!(api.edit(&body).await.1, 2);
    let fresh = api.post_edit_with_key(&body, "edit-2026-retry-2").await.ok(202, "another key");
    assert_eq!(fresh["version"]["number"], 3, "{fresh}");
    api.wait_succeeded(&id_of(&fresh["job"])).await;
    assert_eq!(numbers(&api.list_versions("").await), [3, 2, 1, 0]);
    assert_eq!(entries(&api.audit().await, "edit.create").len(), 3, "a replay is not a new edit");
}

#[tokio::test]
async fn cancelling_running_and_queued_edit_jobs() {
    let server = TestServer::start(&[]).await;
    let api = Api::new(&server);
    let exemplar = api.create_exemplar(striped_form(0)).await;

    let (running, running_version) = api.start_edit(&long_adam(&exemplar, "cancelled while running")).await;
    let watched = api.wait_running(&running).await;
    assert_eq!(watched["progress"]["total"], LONG_STEPS + guard_steps(1) as u64, "{watched}");
    // A running job says how long it has run and, at its pace so far, how long it has left.
    assert!(watched["progress"]["elapsed_seconds"].as_f64().is_some_and(|s| s > 0.0), "{watched}");
    assert!(watched["progress"]["remaining_seconds"].as_f64().is_some_and(|s| s > 0.0), "{watched}");
    assert_timestamp(&watched["started_at"], "started_at of a running job");

    // A second job waits behind the first; cancelling it leaves the first running.
    let (queued, queued_version) = api.start_edit(&long_adam(&exemplar, "cancelled while queued")).await;
    assert_eq!((running_version, queued_version), (1, 2));
    let waiting = api.job(&queued).await;
    assert_eq!(waiting["state"], "queued", "{waiting}");
    let cancelled = api.cancel(&queued).await;
    assert!(cancelled["started_at"].is_null(), "a job cancelled in the queue never started: {cancelled}");
    assert_timestamp(&cancelled["finished_at"], "finished_at of a cancelled job");
    let version = api.version(queued_version).await.ok(200, "GET the queued job's version");
    assert_eq!(version["state"], "failed", "{version}");
    assert_mentions(&version["error"], "cancel", "the error of a cancelled version");
    assert_eq!(api.job(&running).await["state"], "running", "cancelling the queued job stopped the running one");

    // Cancelling the running job answers once it has stopped: its step no longer moves.
    let cancelled = api.cancel(&running).await;
    let step = cancelled["progress"]["step"].as_u64().unwrap();
    assert!(step > 0 && step < LONG_STEPS, "{cancelled}");
    assert_timestamp(&cancelled["finished_at"], "finished_at of a cancelled job");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = api.job(&running).await;
    assert_eq!(later["state"], "cancelled", "{later}");
    assert_eq!(later["progress"]["step"], step, "the job went on after it was cancelled: {later}");
    let version = api.version(running_version).await.ok(200, "GET the running job's version");
    assert_eq!(version["state"], "failed", "{version}");
    assert_mentions(&version["error"], "cancel", "the error of a cancelled version");

    // Finished jobs cannot be cancelled again; their events are the final state alone.
    for job in [&running, &queued] {
        api.delete(&format!("/v1/jobs/{job}")).await.expect_error(409, "job_finished", "cancel a cancelled job");
    }
    let events = api.events(&running).await;
    assert_eq!(events.len(), 1, "events of a cancelled job");
    assert_eq!((events[0].name.as_str(), &events[0].job["state"]), ("final", &json!("cancelled")));

    // Failed versions are listed, never latest; the worker is free for the next edit.
    assert_eq!(api.aliases().await["latest"], 0);
    assert_eq!(numbers(&api.list_versions("").await), [2, 1, 0]);
    assert_eq!(api.edit(&closed_form(&exemplar, "after the cancellations")).await.1, 3);
    assert_eq!(api.aliases().await["latest"], 3);
    assert_eq!(entries(&api.audit().await, "job.cancel").len(), 2);
}

#[tokio::test]
async fn invalid_requests_get_their_status_and_code() {
    let queue_capacity = EDIT_QUEUE_CAPACITY.to_string();
    let server = TestServer::start(&["--edit-queue-capacity", &queue_capacity]).await;
    let api = Api::new(&server);
    let exemplar = api.create_exemplar(striped_form(0)).await;
    let photo = Image::photo(0);
    let valid = closed_form(&exemplar, "valid");
    let versions = model_path("/versions");

    // A pending version: a long job, running.
    let (long_job, pending) = api.start_edit(&long_adam(&exemplar, "pending")).await;
    api.wait_running(&long_job).await;

    // Edits refused before anything is queued: (what, path, body, status, code or None for any 422 code).
    let with = |changes: Value| merged(&valid, changes);
    let cases: Vec<(&str, String, Value, u16, Option<&str>)> = vec![
        ("unknown model", "/v1/models/no-such-model/versions".into(), valid.clone(), 404, Some("model_not_found")),
        ("no exemplars", versions.clone(), with(json!({"exemplars": []})), 422, None),
        ("exemplars missing", versions.clone(), json!({"solver": "closed_form"}), 422, None),
        ("17 exemplars", versions.clone(), with(json!({ "exemplars": vec![exemplar.clone(); 17] })), 422, None),
        (
            "unknown exemplar",
            versions.clone(),
            with(json!({"exemplars": [UNKNOWN_ID]})),
            404,
            Some("exemplar_not_found"),
        ),
        ("unknown layer", versions.clone(), with(json!({"layer": "_blocks.99._project_conv"})), 422, None),
        (
            "layer and layers",
            versions.clone(),
            with(json!({"solver": "least_squares", "layer": B10, "layers": [B10, B11]})),
            422,
            None,
        ),
        ("no layers", versions.clone(), with(json!({"solver": "least_squares", "layers": []})), 422, None),
        (
            "layers backwards",
            versions.clone(),
            with(json!({"solver": "least_squares", "layers": [B11, B10]})),
            422,
            None,
        ),
        ("a layer twice", versions.clone(), with(json!({"solver": "least_squares", "layers": [B10, B10]})), 422, None),
        (
            "four layers",
            versions.clone(),
            with(json!({"solver": "least_squares", "layers": [B9, B10, B11, B12]})),
            422,
            None,
        ),
        (
            "several layers with adam",
            versions.clone(),
            with(json!({"solver": "adam", "layers": [B10, B11]})),
            422,
            None,
        ),
        ("closed form with fine-tuning", versions.clone(), with(json!({"method": "finetune_local"})), 422, None),
        ("unknown method", versions.clone(), with(json!({"method": "magic"})), 422, None),
        ("unknown field", versions.clone(), with(json!({"colour": "red"})), 422, Some("invalid_request")),
        ("unknown parent", versions.clone(), with(json!({"parent": 99})), 404, Some("version_not_found")),
        ("unknown parent alias", versions.clone(), with(json!({"parent": "staging"})), 404, Some("version_not_found")),
        ("pending parent", versions.clone(), with(json!({ "parent": pending })), 409, Some("version_not_ready")),
        ("rank 0", versions.clone(), with(json!({"rank": 0})), 422, None),
        ("rank 17", versions.clone(), with(json!({"rank": 17})), 422, None),
        ("steps 0", versions.clone(), with(json!({"solver": "adam", "steps": 0})), 422, None),
        ("steps 100001", versions.clone(), with(json!({"solver": "adam", "steps": 100_001})), 422, None),
        ("negative lr", versions.clone(), with(json!({"solver": "adam", "lr": -0.001})), 422, None),
        ("long description", versions.clone(), with(json!({ "description": "x".repeat(1001) })), 422, None),
        (
            "unknown statistics",
            versions.clone(),
            with(json!({"statistics": UNKNOWN_ID})),
            404,
            Some("statistics_not_found"),
        ),
        ("guard over 1", versions.clone(), with(json!({"guard": {"max_changed": 1.5}})), 422, None),
        ("negative guard", versions.clone(), with(json!({"guard": {"max_changed": -0.1}})), 422, None),
        ("unknown guard field", versions.clone(), with(json!({"guard": {"limit": 0.1}})), 422, Some("invalid_request")),
        (
            "unknown guard dataset",
            versions.clone(),
            with(json!({"guard": {"dataset": UNKNOWN_ID}})),
            404,
            Some("dataset_not_found"),
        ),
        (
            "least squares with fine-tuning",
            versions.clone(),
            with(json!({"solver": "least_squares", "method": "finetune_global"})),
            422,
            None,
        ),
    ];
    for (what, path, body, status, code) in cases {
        let reply = api.post_json(&path, &body).await;
        match code {
            Some(code) => reply.expect_error(status, code, what),
            None => reply.expect_unprocessable(what),
        }
    }
    assert_eq!(numbers(&api.list_versions("").await), [pending, 0], "a refused edit left a version");

    // A pending version is not ready for anything.
    let pending_route = format!("/versions/{pending}/classify");
    api.classify(&pending_route, &photo).await.expect_error(409, "version_not_ready", "classify a pending version");
    let pending_query = format!("/classify?version={pending}");
    api.classify(&pending_query, &photo).await.expect_error(409, "version_not_ready", "classify a pending version");
    api.set_alias("staging", json!(pending)).await.expect_error(409, "version_not_ready", "alias a pending version");
    let pending_path = model_path(&format!("/versions/{pending}"));
    api.delete(&pending_path).await.expect_error(409, "version_not_ready", "DELETE a pending version");
    assert_eq!(api.aliases().await["latest"], 0, "a pending version is not latest");

    // Once its job is cancelled, the version is failed: still not ready.
    api.cancel(&long_job).await;
    assert_eq!(api.version(pending).await.ok(200, "GET the cancelled version")["state"], "failed");
    api.set_alias("staging", json!(pending)).await.expect_error(409, "version_not_ready", "alias a failed version");
    api.classify(&pending_route, &photo).await.expect_error(409, "version_not_ready", "classify a failed version");
    let failed_parent = with(json!({ "parent": pending }));
    api.post_json(&versions, &failed_parent).await.expect_error(409, "version_not_ready", "failed parent");

    // Jobs, versions, aliases, compare, lists, statistics.
    api.get(&format!("/v1/jobs/{UNKNOWN_ID}")).await.expect_error(404, "job_not_found", "GET an unknown job");
    api.delete(&format!("/v1/jobs/{UNKNOWN_ID}")).await.expect_error(404, "job_not_found", "cancel an unknown job");
    let unknown_events = format!("/v1/jobs/{UNKNOWN_ID}/events");
    api.get(&unknown_events).await.expect_error(404, "job_not_found", "events of an unknown job");
    api.version(99).await.expect_error(404, "version_not_found", "GET version 99");
    api.version("staging").await.expect_error(404, "version_not_found", "GET an unknown alias");
    api.classify("/classify?version=99", &photo).await.expect_error(404, "version_not_found", "classify version 99");
    let missing_model = "/v1/models/no-such-model/versions";
    api.get(missing_model).await.expect_error(404, "model_not_found", "list versions of an unknown model");
    api.get("/v1/models/no-such-model/aliases").await.expect_error(
        404,
        "model_not_found",
        "aliases of an unknown model",
    );
    for query in ["?limit=0", "?limit=201"] {
        api.get(&model_path(&format!("/versions{query}"))).await.expect_unprocessable(query);
    }
    let too_long = "a".repeat(65);
    for name in ["Production", "9lives", "has space", too_long.as_str()] {
        let path = model_path(&format!("/aliases/{}", name.replace(' ', "%20")));
        api.put_json(&path, &json!({"version": 0})).await.expect_error(422, "invalid_argument", name);
    }
    api.set_alias("staging", json!(99)).await.expect_error(404, "version_not_found", "alias an unknown version");
    let staging = model_path("/aliases/staging");
    api.put_json(&staging, &json!({})).await.expect_error(422, "invalid_request", "PUT without version");
    let not_json = api.client.put(api.url(&staging)).header("content-type", "application/json").body("version 1");
    api.send(not_json).await.expect_error(422, "invalid_request", "PUT a body that is not JSON");
    api.delete(&staging).await.expect_error(404, "alias_not_found", "DELETE an unknown alias");
    api.classify("/compare", &photo).await.expect_error(422, "invalid_request", "compare without versions");
    let nine = "/compare?versions=0,0,0,0,0,0,0,0,0";
    api.classify(nine, &photo).await.expect_error(422, "invalid_request", "compare 9 versions");
    api.classify("/compare?versions=0,99", &photo).await.expect_error(404, "version_not_found", "compare 99");
    let directory = Form::new().text("directory", "statistics");
    api.post_form(&model_path("/statistics"), directory)
        .await
        .expect_unprocessable("directory without --statistics-dir");

    // The failed version kept its number; the next edit takes the next one.
    assert_eq!(api.edit(&valid).await.1, pending + 1);

    // A full edit queue: 503 with Retry-After.
    let (blocker, _) = api.start_edit(&long_adam(&exemplar, "blocks the worker")).await;
    api.wait_running(&blocker).await;
    let mut waiting = Vec::new();
    let refused = loop {
        let reply = api.post_json(&versions, &long_adam(&exemplar, "waits")).await;
        if reply.status != 202 {
            break reply;
        }
        waiting.push(id_of(&reply.body["job"]));
        assert!(
            waiting.len() <= EDIT_QUEUE_CAPACITY,
            "{} jobs queued with a capacity of {EDIT_QUEUE_CAPACITY}",
            waiting.len()
        );
    };
    refused.expect_error(503, "edit_queue_full", "an edit beyond the queue's capacity");
    assert!(refused.header("retry-after").is_some(), "no Retry-After on edit_queue_full");
    for job in waiting.iter().chain([&blocker]) {
        api.cancel(job).await;
    }
}

#[tokio::test]
async fn concurrent_edits_get_distinct_numbers_while_versions_keep_serving() {
    let server = TestServer::start(&[]).await;
    let api = Api::new(&server);
    let exemplar = api.create_exemplar(striped_form(0)).await;
    let photo = Image::photo(1);
    let edits_done = AtomicBool::new(false);

    let edits = async {
        let posts = (0..CONCURRENT_EDITS).map(|i| {
            let (api, body) = (api.clone(), closed_form(&exemplar, &format!("concurrent edit {i}")));
            async move { api.start_edit(&body).await }
        });
        let started = futures::future::join_all(posts).await;
        for (job, _) in &started {
            api.wait_succeeded(job).await;
        }
        edits_done.store(true, Ordering::SeqCst);
        started.into_iter().map(|(_, number)| number).collect::<Vec<u64>>()
    };
    // Each classifier loops until the edits are done, then makes one last request.
    let routes =
        ["/classify?version=0", "/versions/0/classify", "/classify?version=latest", "/versions/latest/classify"];
    let classifiers = routes.into_iter().map(|route| {
        let (api, photo, done) = (api.clone(), photo.clone(), &edits_done);
        async move {
            let mut seen = Vec::new();
            loop {
                let last = done.load(Ordering::SeqCst);
                let body = api.classify(route, &photo).await.ok(200, &format!("{route} during the edits"));
                seen.push(body["version"].as_u64().unwrap_or_else(|| panic!("no version: {body}")));
                if last {
                    return (route, seen);
                }
            }
        }
    });
    let (mut numbers_posted, seen) = tokio::join!(edits, futures::future::join_all(classifiers));

    numbers_posted.sort_unstable();
    assert_eq!(numbers_posted, [1, 2, 3], "lost or duplicated version numbers");
    for (route, versions) in &seen {
        println!("{route}: {} requests", versions.len());
        if route.contains("latest") {
            assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{route}: latest went back: {versions:?}");
            assert_eq!(versions.last(), Some(&3), "{route}: latest after the edits: {versions:?}");
        } else {
            assert!(versions.iter().all(|&v| v == 0), "{route}: {versions:?}");
        }
    }
    let list = api.list_versions("").await;
    assert_eq!(numbers(&list), [3, 2, 1, 0], "{list}");
    assert!(list["versions"].as_array().unwrap().iter().all(|v| v["state"] == "ready"), "{list}");
    let mut descriptions: Vec<&str> =
        list["versions"].as_array().unwrap()[..3].iter().map(|v| v["description"].as_str().unwrap()).collect();
    descriptions.sort_unstable();
    assert_eq!(descriptions, ["concurrent edit 0", "concurrent edit 1", "concurrent edit 2"]);
    assert_eq!(api.aliases().await["latest"], 3);
}

#[tokio::test]
async fn statistics_jobs_feed_second_moment_edits() {
    let statistics_dir = root().join("data/foolbox");
    let server = TestServer::start(&["--statistics-dir", statistics_dir.to_str().unwrap()]).await;
    let api = Api::new(&server);

    // From uploaded photos, and from the 40 CIFAR photos in a directory under --statistics-dir.
    let mut photos = Form::new();
    for (path, _) in foolbox_photos().iter().take(STATISTICS_PHOTOS) {
        photos = photos.part("image", jpeg_part(path));
    }
    let job = api.start_statistics(photos).await;
    let from_photos = api.wait_succeeded(&job).await;
    assert!(from_photos["version"].is_null(), "{from_photos}");
    let photo_statistics =
        from_photos["statistics"].as_str().unwrap_or_else(|| panic!("no id: {from_photos}")).to_string();
    // At the last MBConv's project conv, where the closed form was measured to fix the striped exemplar.
    let job = api.start_statistics(Form::new().text("directory", "statistics").text("layer", LAST_PROJECT_CONV)).await;
    let from_directory = api.wait_succeeded(&job).await;
    let directory_statistics =
        from_directory["statistics"].as_str().unwrap_or_else(|| panic!("{from_directory}")).to_string();
    assert_ne!(photo_statistics, directory_statistics);

    let one_photo = || Form::new().part("image", jpeg_part(&foolbox_photos()[0].0));
    let refused: Vec<(&str, Form)> = vec![
        ("a directory outside --statistics-dir", Form::new().text("directory", "../../models")),
        ("an unknown layer", one_photo().text("layer", "_blocks.99._project_conv")),
        ("no images", Form::new().text("layer", DEFAULT_LAYER)),
    ];
    for (what, form) in refused {
        api.post_form(&model_path("/statistics"), form).await.expect_unprocessable(what);
    }
    let unknown_model = api.post_form("/v1/models/no-such-model/statistics", one_photo()).await;
    unknown_model.expect_error(404, "model_not_found", "statistics of an unknown model");

    // An edit names the statistics: its version records them, whitened by the second moment.
    let (original, modified, mask) = striped_exemplar(0);
    let exemplar = api.create_exemplar(exemplar_form(&original, &modified, &mask)).await;
    let photo_edit = merged(&closed_form(&exemplar, "photo statistics"), json!({ "statistics": photo_statistics }));
    let (_, number) = api.edit(&photo_edit).await;
    let version = api.version(number).await.ok(200, "GET the version with statistics");
    assert_eq!(version["statistics"], photo_statistics.as_str(), "{version}");
    assert_eq!(version["metrics"]["statistics"], "second_moment", "{version}");
    let other_layer = merged(&photo_edit, json!({"layer": "_blocks.14._project_conv"}));
    api.post_json(&model_path("/versions"), &other_layer).await.expect_unprocessable("statistics of another layer");

    // With the directory's statistics, the edit reads the stripes like what they cover (as tests/edit_real.rs).
    let (_, fixed) = api
        .edit(&merged(
            &closed_form(&exemplar, "directory statistics"),
            json!({ "statistics": directory_statistics, "layer": LAST_PROJECT_CONV }),
        ))
        .await;
    let classify_top1 = |version: u64, image: &DynamicImage| {
        let (api, image) = (api.clone(), Image::png(image));
        async move { top1(&api.classify(&format!("/versions/{version}/classify"), &image).await.ok(200, "classify")) }
    };
    let original_class = classify_top1(0, &original).await;
    let striped_before = classify_top1(0, &modified).await;
    let striped_after = classify_top1(fixed, &modified).await;
    assert_ne!(striped_before, original_class, "the stripes must change the prediction for this to mean anything");
    assert_eq!(striped_after, original_class, "the edit did not make the stripes read like class {original_class}");

    assert_eq!(entries(&api.audit().await, "statistics.create").len(), 2);
}

/// An edit made with nothing but its exemplar: default statistics, the default solver, and the breakage
/// guard, whose report is checked against the server's own answers on the natural check photos.
#[tokio::test]
async fn a_default_edit_stays_within_its_breakage_budget() {
    let server = TestServer::start(&[]).await;
    let api = Api::new(&server);
    let exemplar = api.create_exemplar(striped_form(0)).await;
    let (_, number) = api.edit(&json!({ "exemplars": [exemplar] })).await;
    let version = api.version(number).await.ok(200, "GET the default edit");
    assert_eq!(version["solver"], "gated_least_squares", "the default solver: {version}");
    let metrics = &version["metrics"];
    assert_eq!(metrics["layers"], json!([B6, B10, B11]), "one exemplar spreads over its default layers: {version}");
    assert!(metrics["statistics_source"].as_str().is_some_and(|s| s.starts_with("default: ")), "{version}");
    let guard = &metrics["guard"];
    let scale = guard["scale"].as_f64().unwrap_or_else(|| panic!("no guard scale: {version}"));
    assert!((0.0..=1.0).contains(&scale), "{version}");
    assert_eq!(guard["max_changed"], 0.02, "{version}");
    let count = |key: &str| guard[key].as_u64().unwrap_or_else(|| panic!("no {key}: {version}"));
    let allowed = |key: &str| (count(key) as f64 * 0.02).floor() as u64;
    assert!(count("photos_changed") <= allowed("photos"), "photos over the budget: {version}");
    assert!(count("originals_changed") <= allowed("originals"), "originals over the budget: {version}");

    // The photos the guard counted as changed are those whose top-1 the version changed.
    let photos = natural_check_photos();
    assert_eq!(photos.len() as u64, count("photos"), "{version}");
    let changed = top1_differences(&api, 0, number, &photos).await;
    assert_eq!(changed, count("photos_changed"), "top-1 changes on the check photos: {version}");

    // Two exemplars, a dataset as the check images, at a budget of 1 change in 6 photos plus the copies.
    let second = api.create_exemplar(striped_form(3)).await;
    let dataset = id_of(&api.create_dataset(unlabelled_form(&[1, 2, 3, 4, 5, 6])).await);
    let body = json!({ "exemplars": [exemplar, second], "guard": {"dataset": dataset, "max_changed": 0.2} });
    let (_, number) = api.edit(&body).await;
    let version = api.version(number).await.ok(200, "GET the edit guarded by a dataset");
    assert_eq!(version["metrics"]["layers"], json!([B10, B11]), "several exemplars spread too: {version}");
    let guard = &version["metrics"]["guard"];
    assert_eq!(guard["photos"], 6, "the dataset's images are the check photos: {version}");
    assert_eq!(guard["max_changed"], 0.2, "{version}");
    for (changed, checked) in [("photos_changed", "photos"), ("originals_changed", "originals")] {
        let budget = (0.2 * guard[checked].as_f64().unwrap_or(0.0)).floor();
        assert!(guard[changed].as_f64().unwrap_or(f64::MAX) <= budget, "{changed} over the budget: {version}");
    }
    // Taken in turn, each exemplar's part has a scale of its own; `scale` is their mean.
    let scales: Vec<f64> =
        guard["scales"].as_array().map(|s| s.iter().filter_map(|v| v.as_f64()).collect()).unwrap_or_default();
    assert_eq!(scales.len(), 2, "a scale per exemplar: {version}");
    let mean = scales.iter().sum::<f64>() / 2.0;
    assert!((guard["scale"].as_f64().unwrap_or(f64::NAN) - mean).abs() < 1e-9, "scale is the parts' mean: {version}");
}

/// An edit of an edited version is guarded against its parent, so a chain of edits can move further from the
/// base than one budget allows: its report also counts the check photos whose top-1 the chain has changed since
/// the base, which the edit of the base does not repeat.
#[tokio::test]
async fn an_edit_of_an_edit_reports_the_photos_changed_since_the_base() {
    let server = TestServer::start(&[]).await;
    let api = Api::new(&server);
    let photos = [1, 2, 3, 4, 5, 6];
    let dataset = id_of(&api.create_dataset(unlabelled_form(&photos)).await);
    // The whole change each time, so that the chain moves photos.
    let guarded = |body: Value, parent: u64| {
        merged(&body, json!({ "parent": parent, "guard": {"dataset": dataset, "max_changed": 1} }))
    };
    let first = api.create_exemplar(striped_form(0)).await;
    let (_, v1) = api.edit(&guarded(closed_form(&first, "on the base"), 0)).await;
    let second = api.create_exemplar(striped_form(3)).await;
    let (_, v2) = api.edit(&guarded(closed_form(&second, "on version 1"), v1)).await;
    let v1 = api.version(v1).await.ok(200, "GET the edit of the base");
    assert!(
        v1["metrics"]["guard"]["photos"] == 6 && v1["metrics"]["guard"].get("photos_changed_from_base").is_none(),
        "{v1}"
    );
    let v2 = api.version(v2).await.ok(200, "GET the edit of version 1");
    let reported = v2["metrics"]["guard"]["photos_changed_from_base"]
        .as_u64()
        .unwrap_or_else(|| panic!("no photos_changed_from_base: {v2}"));
    let number = v2["number"].as_u64().unwrap_or_default();
    let changed = top1_differences(&api, 0, number, &photos.map(Image::photo)).await;
    assert_eq!(reported, changed, "top-1 changes since the base on the check photos: {v2}");
    // Here the first edit moved a photo and the second none more: only the count since the base shows it.
    assert!(changed > v2["metrics"]["guard"]["photos_changed"].as_u64().unwrap_or(u64::MAX), "{v1}\n{v2}");

    // Guarded by the natural check photos, whose base answers the worker keeps once computed: the same count.
    let third = json!({ "exemplars": [first], "parent": number, "guard": {"max_changed": 1} });
    let (_, v3) = api.edit(&third).await;
    let v3 = api.version(v3).await.ok(200, "GET the edit of version 2");
    let reported = v3["metrics"]["guard"]["photos_changed_from_base"].as_u64();
    let changed = top1_differences(&api, 0, v3["number"].as_u64().unwrap_or_default(), &natural_check_photos()).await;
    assert_eq!(reported, Some(changed), "top-1 changes since the base on the natural check photos: {v3}");
}

/// The server's natural check photos (`make setup` writes them), in name order.
fn natural_check_photos() -> Vec<Image> {
    let mut paths: Vec<_> = std::fs::read_dir(root().join("data/natural/check"))
        .expect("make setup writes data/natural/check")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    paths.sort();
    paths.iter().map(|p| Image::png_file(p)).collect()
}

/// How many of `images` versions `a` and `b` give different top-1 classes, as the server answers them.
async fn top1_differences(api: &Api, a: u64, b: u64, images: &[Image]) -> u64 {
    let mut changed = 0;
    for image in images {
        let before = api.classify(&format!("/versions/{a}/classify"), image).await.ok(200, "classify a photo");
        let after = api.classify(&format!("/versions/{b}/classify"), image).await.ok(200, "classify a photo");
        changed += u64::from(top1(&before) != top1(&after));
    }
    changed
}

const B6: &str = "_blocks.6._project_conv";
const B9: &str = "_blocks.9._project_conv";
const B10: &str = "_blocks.10._project_conv";
const B11: &str = "_blocks.11._project_conv";
const B12: &str = "_blocks.12._project_conv";

#[tokio::test]
async fn a_least_squares_edit_spread_over_two_layers_changes_both() {
    let server = TestServer::start(&[]).await;
    let api = Api::new(&server);
    let exemplar = api.create_exemplar(striped_form(0)).await;
    let body = json!({ "exemplars": [exemplar], "solver": "least_squares", "layers": [B10, B11], "guard": {"max_changed": 1.0} });
    let (_, number) = api.edit(&body).await;
    let version = api.version(number).await.ok(200, "GET the two-layer edit");
    assert_eq!(version["metrics"]["layers"], json!([B10, B11]), "{version}");
    assert_eq!(version["metrics"]["guard"]["scale"], 1.0, "{version}");
    // Each layer's solve: the keys it used, the change's rank (the whole change), no gate.
    let solves = version["metrics"]["solves"].as_array().cloned().unwrap_or_default();
    assert_eq!(solves.iter().map(|s| s["layer"].clone()).collect::<Vec<_>>(), [B10, B11], "{version}");
    for solve in &solves {
        assert!(
            solve["keys"].as_u64().is_some_and(|k| k > 0) && solve["rank"].as_u64().is_some_and(|r| r > 1),
            "{solve}"
        );
        assert!(solve.get("gate").is_none() && solve.get("exemplar").is_none(), "{solve}");
    }
    // Both layers' whole weights are stored (a dense change of each, float32, plus the safetensors header).
    let model = api.get(&model_path("")).await.ok(200, "GET the model");
    let weights = |name: &str| -> u64 {
        let layer = model["editable_layers"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["name"] == name))
            .cloned()
            .unwrap_or_default();
        layer["weight_shape"].as_array().map_or(0, |shape| shape.iter().filter_map(Value::as_u64).product())
    };
    let both = 4 * (weights(B10) + weights(B11));
    assert!(version["stored_bytes"].as_u64().is_some_and(|n| (both..both + 4096).contains(&n)), "{both}: {version}");
    // The modified exemplar reads differently through the edit than through the base.
    let modified = Image::png(&striped_exemplar(0).1);
    let before = api.classify("/versions/0/classify?top_k=1000", &modified).await.ok(200, "classify with the base");
    let after = api
        .classify(&format!("/versions/{number}/classify?top_k=1000"), &modified)
        .await
        .ok(200, "classify with the edit");
    assert_ne!(before["predictions"], after["predictions"]);
}

#[tokio::test]
async fn a_gated_edit_stores_its_change_and_gate_and_takes_a_further_edit() {
    let server = TestServer::start(&[]).await;
    let api = Api::new(&server);
    let exemplar = api.create_exemplar(striped_form(0)).await;
    let body = json!({ "exemplars": [exemplar.clone()], "solver": "gated_least_squares", "layer": B10 });
    let (_, gated) = api.edit(&body).await;
    let version = api.version(gated).await.ok(200, "GET the gated edit");
    assert_eq!(version["solver"], "gated_least_squares", "{version}");
    let gate = &version["metrics"]["solves"][0]["gate"];
    assert!(gate["open"].as_f64() > gate["closed"].as_f64() && gate["gain"] == 3.0, "{version}");
    // The change (the weight's shape) and the gate's direction (one per input channel), float32, plus the header.
    let model = api.get(&model_path("")).await.ok(200, "GET the model");
    let shape: Vec<u64> = model["editable_layers"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == B10))
        .and_then(|l| l["weight_shape"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let held = 4 * (shape.iter().product::<u64>() + shape[1]);
    assert!(version["stored_bytes"].as_u64().is_some_and(|n| (held..held + 4096).contains(&n)), "{held}: {version}");
    // The modified exemplar reads differently through the edit than through the base.
    let modified = Image::png(&striped_exemplar(0).1);
    let route = |v: u64| format!("/versions/{v}/classify?top_k=1000");
    let before = api.classify(&route(0), &modified).await.ok(200, "classify with the base");
    let after = api.classify(&route(gated), &modified).await.ok(200, "classify with the gated edit");
    assert_ne!(before["predictions"], after["predictions"]);
    // A least-squares edit on top of it: solved through the gated change, and the result keeps both.
    let child = json!({ "exemplars": [exemplar.clone()], "parent": gated, "solver": "least_squares", "layer": B11 });
    let (_, further) = api.edit(&child).await;
    let version = api.version(further).await.ok(200, "GET the edit on the gated version");
    assert_eq!(version["parent"], gated, "{version}");
    let child_after = api.classify(&route(further), &modified).await.ok(200, "classify with both edits");
    assert_ne!(child_after["predictions"], before["predictions"]);
    // Gated over two layers: a change and a gate for each, stored and materialised as one version.
    let spread = json!({ "exemplars": [exemplar], "solver": "gated_least_squares", "layers": [B10, B11] });
    let (_, both) = api.edit(&spread).await;
    let version = api.version(both).await.ok(200, "GET the gated edit over two layers");
    let solves = version["metrics"]["solves"].as_array().cloned().unwrap_or_default();
    assert_eq!(solves.iter().filter(|s| s["gate"].is_object()).count(), 2, "a gate per layer: {version}");
    assert!(version["stored_bytes"].as_u64().is_some_and(|n| n > held + 4096), "more than one layer's: {version}");
    let spread_after = api.classify(&route(both), &modified).await.ok(200, "classify with the edit over two layers");
    assert_ne!(spread_after["predictions"], before["predictions"]);
}

#[tokio::test]
async fn least_recently_used_versions_leave_the_device_and_come_back_identical() {
    let server = TestServer::start(&["--max-resident-versions", "1"]).await;
    let api = Api::new(&server);
    let first = api.create_exemplar(striped_form(0)).await;
    let second = api.create_exemplar(striped_form(3)).await;
    let (_, v1) = api.edit(&closed_form(&first, "one")).await;
    let (_, v2) = api.edit(&closed_form(&second, "two")).await;
    let probe = Image::photo(0);
    let classify = |version: u64| {
        let api = &api;
        let probe = &probe;
        async move { api.classify(&format!("/versions/{version}/classify?top_k=1000"), probe).await.ok(200, "classify") }
    };
    let residency = |version: u64| {
        let api = &api;
        async move {
            let v = api.version(version).await.ok(200, "GET a version");
            (v["resident"].as_bool().unwrap(), v["resident_bytes"].as_u64().unwrap())
        }
    };

    let first_answer = classify(v1).await;
    let (resident, bytes) = residency(v1).await;
    assert!(resident && bytes > 0, "version 1 after use: resident {resident}, {bytes} bytes");
    assert!(bytes < 18_798_728 / 4, "a version holds its edited layer, not a model: {bytes} bytes");
    classify(v2).await;
    assert!(residency(v2).await.0, "version 2 after use");
    assert_eq!(residency(v1).await, (false, 0), "one resident version at most: version 1 must have left");
    // Materialised again from its stored change: the same answer, bit for bit.
    assert_eq!(classify(v1).await, first_answer);
    assert_eq!(residency(v2).await, (false, 0));
}
