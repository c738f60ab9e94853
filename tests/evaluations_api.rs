//! Evaluation jobs over HTTP with the real server and the real EfficientNet-Lite0: version 0 against a
//! closed-form edit (stripes over photo 0's centre) on the 20 foolbox photos paired with their striped
//! copies, followed over Server-Sent Events, with every score checked against an independent computation
//! from the top-1 classes that the classify route gives for each image and version; the exclusion options;
//! unlabelled datasets; every refused request; listing; cancellation; and a kill -9 during an evaluation,
//! after which the job and the evaluation are failed with no results and a new evaluation works.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;

use common::api::{closed_form, id_of, long_adam, model_path, png, striped_form, Api};
use common::datasets::{bytes_part, pairs_form, striped_pair, unlabelled_form, Pair};
use common::{root, striped_exemplar, TestServer};
use reqwest::multipart::Form;
use serde_json::{json, Value};

/// The top-1 class of each image with `version`, from one multipart classify request.
async fn top1(api: &Api, version: u64, images: &[Vec<u8>]) -> Vec<u64> {
    let form = images.iter().fold(Form::new(), |form, bytes| form.part("image", bytes_part(bytes, "image")));
    let route = model_path(&format!("/versions/{version}/classify?top_k=1"));
    let body = api.post_form(&route, form).await.ok(200, "classify the dataset's images");
    body["results"].as_array().unwrap().iter().map(|r| r["predictions"][0]["index"].as_u64().unwrap()).collect()
}

/// One version's top-1 classes on the originals and on the transformed images.
struct Run {
    version: u64,
    images: Vec<u64>,
    transformed: Option<Vec<u64>>,
}

async fn run(api: &Api, version: u64, pairs: &[Pair]) -> Run {
    let originals: Vec<Vec<u8>> = pairs.iter().map(|p| p.original.clone()).collect();
    let transformed: Vec<Vec<u8>> = pairs.iter().map(|p| p.transformed.clone()).collect();
    Run {
        version,
        images: top1(api, version, &originals).await,
        transformed: Some(top1(api, version, &transformed).await),
    }
}

fn fraction(count: usize, of: usize) -> Value {
    if of == 0 {
        Value::Null
    } else {
        json!(count as f64 / of as f64)
    }
}

/// The scores as the contract defines them, computed here from the classify route's answers.
fn expected_scores(labels: Option<&[u64]>, excluded: &BTreeSet<u64>, runs: &[Run]) -> Vec<Value> {
    let base = &runs[0];
    let scored: Vec<usize> =
        (0..base.images.len()).filter(|&i| !excluded.contains(&labels.map_or(base.images[i], |l| l[i]))).collect();
    let n = scored.len();
    let judged = |run: &Run| run.transformed.clone().unwrap_or_else(|| run.images.clone());
    let errors = |run: &Run| labels.map(|l| scored.iter().filter(|&&i| judged(run)[i] != l[i]).count());
    runs.iter()
        .map(|run| {
            let count = |f: &dyn Fn(usize) -> bool| scored.iter().filter(|&&i| f(i)).count();
            let mut per_class = BTreeMap::new();
            let mut confusions: BTreeMap<(u64, u64), u64> = BTreeMap::new();
            if let Some(l) = labels {
                for &i in &scored {
                    let entry = per_class.entry(l[i].to_string()).or_insert_with(|| (0, 0, 0));
                    entry.0 += 1;
                    entry.1 += u64::from(run.images[i] == l[i]);
                    entry.2 += u64::from(run.transformed.as_ref().is_some_and(|t| t[i] == l[i]));
                    if judged(run)[i] != l[i] {
                        *confusions.entry((l[i], judged(run)[i])).or_default() += 1;
                    }
                }
            }
            let per_class: serde_json::Map<String, Value> = per_class
                .into_iter()
                .map(|(label, (images, correct, transformed))| {
                    let transformed = if run.transformed.is_some() { json!(transformed) } else { Value::Null };
                    (label, json!({"images": images, "correct": correct, "transformed_correct": transformed}))
                })
                .collect();
            let mut confusions: Vec<((u64, u64), u64)> = confusions.into_iter().collect();
            confusions.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let confusions: Vec<Value> = confusions
                .iter()
                .take(10)
                .map(|((label, predicted), count)| json!({"label": label, "predicted": predicted, "count": count}))
                .collect();
            let errors_corrected = match (errors(base), errors(run)) {
                (Some(before), Some(after)) if before > 0 => {
                    json!(100.0 * ((before as f64 - after as f64) / before as f64).max(-1.0))
                }
                _ => Value::Null,
            };
            let on_transformed = |f: &dyn Fn(&[u64], usize) -> bool| match &run.transformed {
                Some(t) => fraction(count(&|i| f(t, i)), n),
                None => Value::Null,
            };
            json!({
                "version": run.version,
                "baseline": std::ptr::eq(run, base),
                "images": n,
                "accuracy": labels.map_or(Value::Null, |l| fraction(count(&|i| run.images[i] == l[i]), n)),
                "transformed_accuracy": labels.map_or(Value::Null, |l| on_transformed(&|t, i| t[i] == l[i])),
                "errors_corrected": errors_corrected,
                "changed": fraction(count(&|i| run.images[i] != base.images[i]), n),
                "transformed_changed": on_transformed(&|t, i| base.transformed.as_ref().is_some_and(|b| t[i] != b[i])),
                "per_class": per_class,
                "confusions": confusions,
            })
        })
        .collect()
}

/// Equal, numbers within 1e-9.
#[track_caller]
fn assert_close(actual: &Value, expected: &Value, path: &str) {
    match (actual, expected) {
        (Value::Number(a), Value::Number(e)) => {
            let (a, e) = (a.as_f64().unwrap(), e.as_f64().unwrap());
            assert!((a - e).abs() < 1e-9, "{path}: {a}, expected {e}");
        }
        (Value::Object(a), Value::Object(e)) => {
            assert_eq!(a.keys().collect::<Vec<_>>(), e.keys().collect::<Vec<_>>(), "{path}: the keys differ");
            for (key, value) in e {
                assert_close(&a[key], value, &format!("{path}.{key}"));
            }
        }
        (Value::Array(a), Value::Array(e)) => {
            assert_eq!(a.len(), e.len(), "{path}: {actual} vs {expected}");
            for (i, (a, e)) in a.iter().zip(e).enumerate() {
                assert_close(a, e, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(actual, expected, "{path}"),
    }
}

/// Posts an evaluation and checks the 202, its Location and job: (job id, evaluation id).
async fn start_evaluation(api: &Api, body: &Value) -> (String, String) {
    let reply = api.post_json(&model_path("/evaluations"), body).await;
    let location = reply.header("location").map(str::to_string);
    let created = reply.ok(202, &format!("POST evaluations {body}"));
    let job = id_of(&created["job"]);
    assert_eq!(location, Some(format!("/v1/jobs/{job}")), "{created}");
    assert_eq!(
        (&created["job"]["kind"], &created["job"]["state"]),
        (&json!("evaluation"), &json!("queued")),
        "{created}"
    );
    (job, created["evaluation"].as_str().unwrap_or_else(|| panic!("no evaluation id: {created}")).to_string())
}

async fn evaluation(api: &Api, id: &str) -> Value {
    api.get(&format!("/v1/evaluations/{id}")).await.ok(200, &format!("GET evaluation {id}"))
}

/// Runs an evaluation to its end (polling) and answers it.
async fn evaluate(api: &Api, body: &Value) -> Value {
    let (job, id) = start_evaluation(api, body).await;
    api.wait_succeeded(&job).await;
    let done = evaluation(api, &id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    done
}

#[tokio::test]
async fn evaluations_score_versions_as_the_classify_route_answers() {
    let server = TestServer::start(&[]).await;
    let api = Api::new(&server);
    let exemplar = api.create_exemplar(striped_form(0)).await;
    let (_, edited) = api.edit(&closed_form(&exemplar, "stripes on photo 0")).await;
    let pairs: Vec<Pair> = (0..20).map(striped_pair).collect();
    let labels: Vec<u64> = pairs.iter().map(|p| p.label as u64).collect();
    let dataset = id_of(&api.create_dataset(pairs_form(&pairs)).await);

    // Version 0 against the edit, followed over SSE to the end.
    let (job, id) = start_evaluation(&api, &json!({"dataset": dataset, "versions": [edited]})).await;
    let events = api.events(&job).await;
    let last = events.last().expect("at least one event");
    assert_eq!((last.name.as_str(), &last.job["state"]), ("final", &json!("succeeded")), "{}", last.job);
    assert_eq!(
        (&last.job["progress"]["step"], &last.job["progress"]["total"]),
        (&json!(20), &json!(20)),
        "{}",
        last.job
    );
    assert!(events[..events.len() - 1].iter().all(|e| e.name == "progress"));
    let done = evaluation(&api, &id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        (&done["model"], &done["dataset"], &done["job"]),
        (&json!("efficientnet-lite0"), &json!(dataset), &json!(job))
    );
    assert_eq!(
        (&done["baseline"], &done["versions"], &done["excluded_classes"]),
        (&json!(0), &json!([edited]), &json!([]))
    );
    assert!(done["error"].is_null() && done["finished_at"].is_string() && done["created_at"].is_string(), "{done}");

    let runs = [run(&api, 0, &pairs).await, run(&api, edited, &pairs).await];
    let expected = expected_scores(Some(&labels), &BTreeSet::new(), &runs);
    assert_close(&done["results"], &json!(expected), "results");
    // The stripes cost the base model accuracy, which is what the edit is for.
    assert!(
        done["results"][0]["transformed_accuracy"].as_f64() < done["results"][0]["accuracy"].as_f64(),
        "{}",
        done["results"][0]
    );

    // Aliases name the versions; exclude_classes and the exemplar's class leave out their images.
    let exemplar_class = top1(&api, 0, &[png(&striped_exemplar(0).0)]).await[0];
    let body = json!({"dataset": dataset, "versions": ["latest"], "baseline": "base", "exclude_classes": [559, 559],
                      "exclude_exemplar_classes": true});
    let excluding = evaluate(&api, &body).await;
    let excluded: BTreeSet<u64> = [559, exemplar_class].into();
    assert_eq!(excluding["excluded_classes"], json!(excluded.iter().collect::<Vec<_>>()), "{excluding}");
    assert_close(&excluding["results"], &json!(expected_scores(Some(&labels), &excluded, &runs)), "results excluding");
    let kept = labels.iter().filter(|l| !excluded.contains(l)).count();
    assert_eq!(excluding["results"][1]["images"], kept);

    // Unlabelled: changes only.
    let unlabelled = id_of(&api.create_dataset(unlabelled_form(&(0..20).collect::<Vec<_>>())).await);
    let changes = evaluate(&api, &json!({"dataset": unlabelled, "versions": [edited, 0]})).await;
    let plain: Vec<Run> = runs
        .iter()
        .chain([&runs[0]])
        .map(|r| Run { version: r.version, images: r.images.clone(), transformed: None })
        .collect();
    assert_close(&changes["results"], &json!(expected_scores(None, &BTreeSet::new(), &plain)), "unlabelled results");
    assert!(changes["results"][1]["accuracy"].is_null() && changes["results"][1]["errors_corrected"].is_null());

    // Refused before anything is queued.
    let path = model_path("/evaluations");
    let mut form = Form::new().text("kind", "labelled").text("labels", "[1000]");
    form = form.part("image", bytes_part(&pairs[0].original, "photo.jpg"));
    let beyond = id_of(&api.create_dataset(form).await);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("an unknown dataset", json!({"dataset": "nope", "versions": [0]}), 404, "dataset_not_found"),
        ("no versions", json!({"dataset": dataset, "versions": []}), 422, "invalid_argument"),
        (
            "nine versions",
            json!({"dataset": dataset, "versions": [0, 0, 0, 0, 0, 0, 0, 0, 0]}),
            422,
            "invalid_argument",
        ),
        ("an unknown field", json!({"dataset": dataset, "versions": [0], "colour": 1}), 422, "invalid_request"),
        ("an unknown version", json!({"dataset": dataset, "versions": [99]}), 404, "version_not_found"),
        (
            "an unknown baseline alias",
            json!({"dataset": dataset, "versions": [0], "baseline": "nope"}),
            404,
            "version_not_found",
        ),
        (
            "an excluded class beyond the model's",
            json!({"dataset": dataset, "versions": [0], "exclude_classes": [1000]}),
            422,
            "invalid_argument",
        ),
        ("a label beyond the model's classes", json!({"dataset": beyond, "versions": [0]}), 422, "invalid_argument"),
    ];
    for (what, body, status, code) in cases {
        api.post_json(&path, &body).await.expect_error(status, code, what);
    }
    let reply =
        api.post_json("/v1/models/no-such-model/evaluations", &json!({"dataset": dataset, "versions": [0]})).await;
    reply.expect_error(404, "model_not_found", "an unknown model");
    api.get("/v1/evaluations/nope").await.expect_error(404, "evaluation_not_found", "an unknown evaluation");

    // A pending version cannot be evaluated; an evaluation queued behind it can be cancelled.
    let (long_job, pending) = api.start_edit(&long_adam(&exemplar, "long")).await;
    api.wait_running(&long_job).await;
    let reply = api.post_json(&path, &json!({"dataset": dataset, "versions": [pending]})).await;
    reply.expect_error(409, "version_not_ready", "a pending version");
    let (queued, cancelled) = start_evaluation(&api, &json!({"dataset": dataset, "versions": [edited]})).await;
    api.cancel(&queued).await;
    let stopped = evaluation(&api, &cancelled).await;
    assert_eq!((&stopped["state"], &stopped["results"]), (&json!("cancelled"), &Value::Null), "{stopped}");
    api.cancel(&long_job).await;

    // Newest first, in pages.
    let all: Vec<&Value> = vec![&stopped["id"], &changes["id"], &excluding["id"], &done["id"]];
    let page = api.get(&model_path("/evaluations?limit=3")).await.ok(200, "list evaluations");
    let ids: Vec<&Value> = page["evaluations"].as_array().unwrap().iter().map(|e| &e["id"]).collect();
    assert_eq!(ids, all[..3], "{page}");
    let next = page["next_before"].as_str().unwrap_or_else(|| panic!("no next_before: {page}"));
    let rest = api.get(&model_path(&format!("/evaluations?limit=3&before={next}"))).await.ok(200, "the next page");
    assert_eq!(
        rest["evaluations"].as_array().unwrap().iter().map(|e| &e["id"]).collect::<Vec<_>>(),
        all[3..],
        "{rest}"
    );
    assert_eq!(rest["next_before"], Value::Null, "{rest}");
    assert_eq!(rest["evaluations"][0], done, "a listed evaluation is as GET answers it");
    api.get(&model_path("/evaluations?before=nope")).await.expect_error(
        422,
        "invalid_argument",
        "before names no evaluation",
    );
    api.get(&model_path("/evaluations?limit=0")).await.expect_error(422, "invalid_request", "limit 0");

    // Deleting the dataset keeps the evaluations' results.
    assert_eq!(api.delete(&format!("/v1/datasets/{dataset}")).await.status, 204);
    assert_eq!(evaluation(&api, &id).await, done);
    let creations = api.audit().await.iter().filter(|e| e["action"] == "evaluation.create").count();
    assert_eq!(creations, 4);
}

#[tokio::test]
async fn kill_9_during_an_evaluation_fails_it_without_results() {
    let data = tempfile::tempdir().unwrap();
    let models = root().join("models");
    let mut server = TestServer::start_with(&models, data.path(), &[]).await;
    let api = Api::new(&server);
    let exemplar = api.create_exemplar(striped_form(0)).await;
    let (_, edited) = api.edit(&closed_form(&exemplar, "stripes on photo 0")).await;
    let pairs: Vec<Pair> = (0..20).map(striped_pair).collect();
    let small = id_of(&api.create_dataset(pairs_form(&pairs[..4])).await);
    // 100 pairs through 9 versions: tens of seconds on the CPU; the kill comes after the first batch.
    let many: Vec<Pair> = pairs.iter().cycle().take(100).cloned().collect();
    let large = id_of(&api.create_dataset(pairs_form(&many)).await);
    let (job, id) = start_evaluation(&api, &json!({"dataset": large, "versions": vec![edited; 8]})).await;
    api.wait_running(&job).await;
    // SAFETY: signalling our own child process; terminate() then reaps it.
    unsafe { libc::kill(server.pid() as i32, libc::SIGKILL) };
    assert_eq!(server.terminate().signal(), Some(libc::SIGKILL));

    let server = TestServer::start_with(&models, data.path(), &[]).await;
    let api = Api::new(&server);
    let failed = api.job(&job).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("stopped")), "{failed}");
    let lost = evaluation(&api, &id).await;
    assert_eq!((&lost["state"], &lost["results"]), (&json!("failed"), &Value::Null), "{lost}");
    assert!(lost["error"].as_str().is_some_and(|e| e.contains("stopped")) && lost["finished_at"].is_string(), "{lost}");

    // The datasets' images survived the start-up sweep: a new evaluation runs on them.
    let fresh = evaluate(&api, &json!({"dataset": small, "versions": [edited]})).await;
    assert_eq!(fresh["results"].as_array().map(Vec::len), Some(2), "{fresh}");
    assert_eq!(fresh["results"][0]["images"], 4);
}
