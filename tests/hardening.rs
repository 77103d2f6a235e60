//! Connection-level protection (docs/api.md, "Limits"): a client that stalls
//! in its headers is disconnected after `server.header_read_timeout_ms`
//! (slowloris), and connections past `server.connections_max` get 503 with
//! `Retry-After` while the others are served. Raw TCP clients.

mod common;

use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::start_node;

fn addr(node: &common::TestNode) -> String {
    node.base.trim_start_matches("http://").to_string()
}

/// Reads until the peer closes (or `wait` passes): what it sent, and whether
/// it closed.
async fn read_to_close(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&received).into(), true),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => return (String::from_utf8_lossy(&received).into(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_in_their_headers_are_disconnected_and_others_are_served() {
    let node = start_node(|config| config.server.header_read_timeout_ms = 500).await;
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut stream = TcpStream::connect(addr(&node)).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\nX-Half: ")
            .await
            .unwrap();
        stalled.push(stream);
    }
    // the node serves others meanwhile
    let reply = node.get(None, "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    let mut closed = 0;
    for stream in &mut stalled {
        let (_, was_closed) = read_to_close(stream, Duration::from_secs(5)).await;
        closed += usize::from(was_closed);
    }
    assert_eq!(closed, 100, "every stalled connection is closed");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_503_with_retry_after() {
    let node = start_node(|config| config.server.connections_max = 4).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(addr(&node)).await.unwrap());
    }
    // give the node the moment to accept the four
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = TcpStream::connect(addr(&node)).await.unwrap();
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_to_close(&mut fifth, Duration::from_secs(5)).await;
    assert!(closed);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
    assert!(answer.contains("connections_max"), "{answer}");
    // a place comes free when a connection closes
    held.pop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut next = TcpStream::connect(addr(&node)).await.unwrap();
        next.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_to_close(&mut next, Duration::from_secs(5)).await;
        if answer.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no place came free: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    node.stop().await;
}
