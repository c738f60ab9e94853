//! Time limits over real sockets: a connection that sends nothing, or an incomplete request head, is closed
//! after the header timeout; a request whose body arrives too slowly is answered 504 `deadline_exceeded`.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (or 10 s pass); what it sent, and when it closed.
async fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received)).await;
    (String::from_utf8_lossy(&received).into_owned(), started.elapsed())
}

#[tokio::test]
async fn silent_and_slow_clients_are_cut_off() {
    let server = TestServer::start(&["--header-timeout-secs", "1", "--request-timeout-secs", "2"]).await;
    let address = format!("127.0.0.1:{}", server.port());

    let mut silent = TcpStream::connect(&address).await.unwrap();
    let (_, after) = read_until_closed(&mut silent).await;
    assert!(after < Duration::from_secs(5), "a silent connection stayed open {after:?}");

    let mut slow_head = TcpStream::connect(&address).await.unwrap();
    slow_head.write_all(b"GET /healthz HTTP/1.1\r\nHost: editserve\r\n").await.unwrap();
    let (_, after) = read_until_closed(&mut slow_head).await;
    assert!(after < Duration::from_secs(5), "an incomplete head stayed open {after:?}");

    // The head in time, the body never finished: the request timeout answers.
    let mut slow_body = TcpStream::connect(&address).await.unwrap();
    let head = "POST /v1/models/efficientnet-lite0/classify HTTP/1.1\r\nHost: editserve\r\n\
                Content-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n";
    slow_body.write_all(head.as_bytes()).await.unwrap();
    slow_body.write_all(&[0xFF, 0xD8]).await.unwrap();
    let (answer, after) = read_until_closed(&mut slow_body).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("deadline_exceeded"), "{answer}");
    assert!(after < Duration::from_secs(6), "answered after {after:?}");

    // A complete request is served as before.
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
}
