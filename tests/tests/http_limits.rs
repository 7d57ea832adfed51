//! What an unauthenticated HTTP caller may hold: slow and idle connections time out,
//! connections past the cap are refused with a clear answer, requests without the admin
//! token are refused before their body is read, and the server keeps accepting when the
//! process runs out of file descriptors.

use std::time::Duration;

use cinder_tests::{ServerProcess, TestServer, http_get, stats};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Reads what the server sends until it closes, or `None` if it is still open after `wait`.
async fn read_to_close(s: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(wait, s.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

/// A connection that sent the start of a request and stops (slowloris).
async fn slow(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    s
}

#[tokio::test]
async fn slow_headers_time_out_and_connections_past_the_cap_get_a_clear_refusal() {
    let server = TestServer::start_with(|c| {
        c.limits.max_connections = Some(20);
        c.limits.http_header_timeout_secs = 1;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(slow(server.addr).await);
    }
    // Past the cap: answered at once, and closed.
    for _ in 0..5 {
        let mut s = slow(server.addr).await;
        let answer = read_to_close(&mut s, Duration::from_millis(500))
            .await
            .expect("refused at once");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("connection cap"), "{answer}");
    }
    // The slow ones are cut once their headers are late.
    for s in &mut held {
        assert!(
            read_to_close(s, Duration::from_secs(3)).await.is_some(),
            "a slow connection stayed open"
        );
    }
    assert!(http_get(server.addr, "/").await.starts_with("HTTP/1.1 200"));
    let s = stats(server.addr).await;
    assert!(s["connections_refused"].as_u64() >= Some(5), "{s}");
    assert!(s["http_timeouts"].as_u64() >= Some(20), "{s}");
    server.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let server = TestServer::start_with(|c| c.limits.http_header_timeout_secs = 1).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.expect("a response");
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(
        read_to_close(&mut s, Duration::from_secs(3))
            .await
            .is_some(),
        "the idle connection stayed open"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_request_without_the_admin_token_is_refused_before_its_body_is_read() {
    let server = TestServer::start().await;
    for path in [
        "/api/broadcast",
        "/api/plugins",
        "/api/plugins/chat/activate",
    ] {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("write");
        let mut answer = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer before the body"))
            .expect("read");
        assert_eq!(&answer, b"HTTP/1.1 401", "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn accepting_goes_on_through_file_descriptor_exhaustion_and_is_logged_once() {
    // A cap above what the process may open: the kernel, not the cap, runs out.
    let server = ServerProcess::start(64, &["--max-connections", "1000"]).await;
    let mut held = Vec::new();
    for _ in 0..100 {
        match TcpStream::connect(server.addr).await {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(held);
    // Once descriptors are free again, new clients are served.
    let mut served = false;
    for _ in 0..50 {
        if http_get(server.addr, "/").await.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "no client served after the exhaustion");
    let lines = server.logged("accept");
    assert!(lines.len() <= 1, "{} accept lines: {lines:?}", lines.len());
    assert_eq!(lines.len(), 1, "the exhaustion was logged");
    server.kill().await;
}
