//! Scoped bearer tokens over real HTTP: 401 (with `WWW-Authenticate: Bearer`) without a token or with an
//! unknown one, 403 for a token without the operation's scope, the token's name in the audit log, open
//! health routes; and with no tokens configured, loopback peers only.

mod common;

use common::api::{png, Api};
use common::{striped_exemplar, TestServer};
use reqwest::multipart::{Form, Part};
use serde_json::Value;

const TOKENS: &str = "reader infer r-secret; editor infer,edit e-secret; root infer,edit,admin a-secret";

fn texture_form() -> Form {
    let (image, _, _) = striped_exemplar(0);
    Form::new().part("image", Part::bytes(png(&image)).file_name("t.png").mime_str("image/png").unwrap())
}

#[tokio::test]
async fn tokens_and_scopes_guard_every_operation() {
    let server = TestServer::start(&["--tokens", TOKENS]).await;
    let api = Api::new(&server);
    let client = reqwest::Client::new();
    let as_token = |request: reqwest::RequestBuilder, secret: &str| request.bearer_auth(secret);

    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(client.get(server.url(open)).send().await.unwrap().status(), 200, "{open}");
    }

    let anonymous = api.send(client.get(server.url("/v1/models"))).await;
    anonymous.expect_error(401, "unauthorized", "no token");
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));
    api.send(as_token(client.get(server.url("/v1/models")), "guess")).await.expect_error(
        401,
        "unauthorized",
        "unknown",
    );
    let head = client.head(server.url("/v1/audit")).send().await.unwrap();
    assert_eq!(head.status(), 401, "HEAD runs the GET handler, so it needs GET's token");

    // infer: read and classify, nothing else.
    api.send(as_token(client.get(server.url("/v1/models")), "r-secret")).await.ok(200, "reader lists models");
    let photo = std::fs::read(common::foolbox_photos()[0].0.clone()).unwrap();
    let classify =
        client.post(server.url("/v1/models/efficientnet-lite0/classify")).header("content-type", "image/jpeg");
    api.send(as_token(classify.body(photo), "r-secret")).await.ok(200, "reader classifies");
    let upload = client.post(server.url("/v1/textures")).multipart(texture_form());
    api.send(as_token(upload, "r-secret")).await.expect_error(403, "forbidden", "reader uploads");

    // edit: uploads, not administration.
    let upload = client.post(server.url("/v1/textures")).multipart(texture_form());
    let texture = api.send(as_token(upload, "e-secret")).await.ok(201, "editor uploads");
    let unload = client.delete(server.url("/v1/models/efficientnet-lite0"));
    api.send(as_token(unload, "e-secret")).await.expect_error(403, "forbidden", "editor unloads");
    api.send(as_token(client.get(server.url("/v1/audit")), "e-secret")).await.expect_error(403, "forbidden", "audit");

    // admin reads the audit log, which names the token that made the texture.
    let audit = api.send(as_token(client.get(server.url("/v1/audit")), "a-secret")).await.ok(200, "root reads audit");
    let entries = audit["entries"].as_array().unwrap();
    let made = entries.iter().find(|e| e["action"] == "texture.create" && e["subject"] == texture["id"]);
    assert_eq!(made.map(|e| &e["caller"]), Some(&Value::from("editor")), "{audit}");
}

#[tokio::test]
async fn metrics_can_want_a_token() {
    let server = TestServer::start(&["--tokens", TOKENS, "--protect-metrics"]).await;
    let client = reqwest::Client::new();
    assert_eq!(client.get(server.url("/metrics")).send().await.unwrap().status(), 401);
    let with_token = client.get(server.url("/metrics")).bearer_auth("r-secret").send().await.unwrap();
    assert_eq!(with_token.status(), 200);
    assert_eq!(client.get(server.url("/healthz")).send().await.unwrap().status(), 200);
}

/// This machine's address on its outward interface (the route to a private address; nothing is sent).
fn outward_address() -> std::net::IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect("10.255.255.255:9").expect("a route off the machine, to find a non-loopback address");
    let ip = socket.local_addr().unwrap().ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}");
    ip
}

#[tokio::test]
async fn without_tokens_only_loopback_peers_are_served() {
    let server = TestServer::start_exposed(&[]).await;
    let api = Api::new(&server);
    let client = reqwest::Client::new();
    let outside = format!("http://{}:{}", outward_address(), server.port());
    let refused = api.send(client.get(format!("{outside}/v1/models"))).await;
    refused.expect_error(403, "forbidden", "a non-loopback peer without tokens");
    assert_eq!(client.get(format!("{outside}/healthz")).send().await.unwrap().status(), 200);
    api.send(client.get(server.url("/v1/models"))).await.ok(200, "loopback");
}

#[tokio::test]
async fn a_token_has_a_bounded_number_of_requests_in_flight() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(&["--tokens", TOKENS, "--max-concurrent-per-token", "1"]).await;
    let api = Api::new(&server);
    let client = reqwest::Client::new();
    // The reader's one request in flight: a classification whose body is still arriving.
    let mut slow = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", server.port())).await.unwrap();
    let head = "POST /v1/models/efficientnet-lite0/classify HTTP/1.1\r\nHost: editserve\r\n\
                Authorization: Bearer r-secret\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n";
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&[0xFF, 0xD8]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let refused = api.send(client.get(server.url("/v1/models")).bearer_auth("r-secret")).await;
    refused.expect_error(429, "too_many_requests", "a second request of the reader");
    assert_eq!(refused.header("retry-after"), Some("1"));
    api.send(client.get(server.url("/v1/models")).bearer_auth("e-secret")).await.ok(200, "another token");

    // When the first request ends (its client goes away), the reader may send again.
    drop(slow);
    let mut status = 0;
    for _ in 0..50 {
        status = client.get(server.url("/v1/models")).bearer_auth("r-secret").send().await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the reader's slot came back");
}
