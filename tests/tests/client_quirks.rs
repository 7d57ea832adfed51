//! Clients nobody here wrote, as they speak: V1 refs sent as numbers, V1 JSON in binary
//! frames, a V1 socket that sends V2 arrays (the close names it, the log says it, rate
//! limited), a client that reconnects in a hot loop (429), and the origin check on both
//! transports. Each test failed before its fix.

use std::time::Duration;

use cinder_tests::{Client, TestServer, capture_logs, logged};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

async fn v1(server: &TestServer, user: &str) -> Client {
    Client::connect(&server.ws_url(&format!("vsn=1.0.0&token={}", server.token(user))))
        .await
        .expect("connects")
}

/// The next reply, past the counter's `count` broadcasts.
async fn reply(c: &mut Client) -> Value {
    loop {
        let frame = c.recv().await;
        if frame["event"] == "phx_reply" {
            return frame;
        }
    }
}

#[tokio::test]
async fn v1_refs_come_back_as_the_client_sent_them() {
    let server = TestServer::start().await;
    let mut c = v1(&server, "1").await;
    c.send(json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": 1}))
        .await;
    let beat = reply(&mut c).await;
    assert_eq!(
        beat["ref"],
        json!(1),
        "an integer ref stays an integer: {beat}"
    );
    c.send(
        json!({"topic": "counter:v1", "event": "phx_join", "payload": {}, "ref": 2, "join_ref": 2}),
    )
    .await;
    let joined = reply(&mut c).await;
    assert_eq!(
        (joined["ref"].clone(), joined["payload"]["status"].clone()),
        (json!(2), json!("ok"))
    );
    // The channel's join ref is the number 2: a message with it is the channel's.
    c.send(json!({"topic": "counter:v1", "event": "inc", "payload": {}, "ref": 3, "join_ref": 2}))
        .await;
    let counted = reply(&mut c).await;
    assert_eq!(counted["ref"], json!(3));
    assert_eq!(counted["payload"]["response"]["count"], json!(1));
    c.send(
        json!({"topic": "counter:v1", "event": "inc", "payload": {}, "ref": "4", "join_ref": 2}),
    )
    .await;
    assert_eq!(
        reply(&mut c).await["ref"],
        json!("4"),
        "a string ref stays a string"
    );
    // As in Phoenix, "2" is not the join ref 2: the message is stale and dropped.
    c.send(
        json!({"topic": "counter:v1", "event": "inc", "payload": {}, "ref": 5, "join_ref": "2"}),
    )
    .await;
    c.send(json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": 6}))
        .await;
    assert_eq!(
        reply(&mut c).await["ref"],
        json!(6),
        "the stale inc got no reply"
    );
    c.send(json!({"topic": "counter:v1", "event": "inc", "payload": {}, "ref": {"a": 1}}))
        .await;
    assert_eq!(
        c.close_code().await,
        1007,
        "a ref that is an object is not a ref"
    );
}

#[tokio::test]
async fn a_v1_channel_that_crashes_or_stops_is_told_with_its_join_ref_as_sent() {
    let server = TestServer::start().await;
    let mut c = v1(&server, "1").await;
    for (join_ref, event, end) in [
        (json!("abc"), "panic", "phx_error"),
        (json!(7), "stop", "phx_close"),
    ] {
        let topic = format!("bad:{event}");
        c.send(json!({"topic": topic, "event": "phx_join", "payload": {}, "ref": 1, "join_ref": join_ref}))
            .await;
        assert_eq!(reply(&mut c).await["payload"]["status"], "ok");
        c.send(
            json!({"topic": topic, "event": event, "payload": {}, "ref": 2, "join_ref": join_ref}),
        )
        .await;
        // Every frame is JSON (`recv` parses it); the channel's end carries its join ref.
        let ended = loop {
            let frame = c.recv().await;
            if frame["event"] == end {
                break frame;
            }
        };
        assert_eq!(ended["ref"], join_ref, "{ended}");
    }
}

#[tokio::test]
async fn v1_json_in_binary_frames_is_read_as_text() {
    let server = TestServer::start().await;
    let mut c = v1(&server, "1").await;
    let join = json!({"topic": "counter:bin", "event": "phx_join", "payload": {}, "ref": "1"});
    c.send_binary(join.to_string().into_bytes()).await;
    let joined = reply(&mut c).await;
    assert_eq!(joined["payload"]["status"], "ok", "{joined}");
    c.send_binary(br#"{"topic":"counter:bin","event":"inc","payload":{},"ref":2}"#.to_vec())
        .await;
    assert_eq!(
        reply(&mut c).await["payload"]["response"]["count"],
        json!(1)
    );
    c.send_binary(vec![0xff, 0xfe]).await;
    assert_eq!(c.close_code().await, 1007);
}

#[tokio::test]
async fn v2_arrays_on_a_v1_socket_close_naming_the_mismatch_and_are_logged_at_a_bounded_rate() {
    capture_logs();
    let server = TestServer::start().await;
    let mut c = v1(&server, "1").await;
    c.send(json!(["1", "1", "room:lobby", "phx_join", {}]))
        .await;
    let frame = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1007);
    assert!(
        frame
            .reason
            .contains("V1 serializer expects an object frame; the client sent a V2 array"),
        "{}",
        frame.reason
    );
    let lines = logged("client cut off for what it sent");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("peer=127.0.0.1:") && l.contains("the client sent a V2 array")),
        "{lines:?}"
    );
    // A client doing it again and again is not logged each time.
    for _ in 0..40 {
        let mut c = v1(&server, "loop").await;
        c.send(json!(["1", "1", "room:lobby", "phx_join", {}]))
            .await;
        let _ = c.close_code().await;
    }
    let lines = logged("client cut off for what it sent").len();
    assert!(lines < 30, "{lines} log lines for 41 closes");
}

/// A WebSocket upgrade request by hand: the status and headers of the answer.
async fn upgrade(server: &TestServer, query: &str, origin: Option<&str>) -> String {
    let mut tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /socket/websocket?{query} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut head = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut head))
        .await
        .expect("an answer")
        .expect("read");
    String::from_utf8_lossy(&head[..n]).into_owned()
}

#[tokio::test]
async fn a_client_reconnecting_in_a_hot_loop_is_answered_429_with_retry_after() {
    let server = TestServer::start_with(|c| {
        c.limits.connect_burst = 3;
        c.limits.connects_per_sec = 1;
    })
    .await;
    let query = format!("vsn=2.0.0&token={}", server.token("looper"));
    for _ in 0..3 {
        let answer = upgrade(&server, &query, None).await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    }
    let answer = upgrade(&server, &query, None).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("too many connects"), "{answer}");
    // Another user is not held back by this one.
    let other = format!("vsn=2.0.0&token={}", server.token("other"));
    assert!(
        upgrade(&server, &other, None)
            .await
            .starts_with("HTTP/1.1 101")
    );
    let stats = cinder_tests::stats(server.addr).await;
    assert_eq!(stats["connects_throttled"], json!(1), "{stats}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        upgrade(&server, &query, None)
            .await
            .starts_with("HTTP/1.1 101"),
        "one more a second"
    );
}

#[tokio::test]
async fn check_origin_refuses_other_origins_on_both_transports_with_403() {
    let server = TestServer::start_with(|c| {
        c.check_origin = vec!["https://chat.example".into(), "//*.example.org".into()];
    })
    .await;
    let query = format!("vsn=2.0.0&token={}", server.token("1"));
    for allowed in [
        Some("https://chat.example"),
        Some("http://a.example.org:8080"),
        None,
    ] {
        let answer = upgrade(&server, &query, allowed).await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{allowed:?}: {answer}");
    }
    for refused in ["https://evil.example", "http://chat.example", "null"] {
        let answer = upgrade(&server, &query, Some(refused)).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{refused}: {answer}");
        assert!(answer.contains("origin not allowed"), "{answer}");
    }
    // The official client's way in, through tungstenite with the header.
    let mut request = server
        .ws_url(&query)
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("origin", "https://evil.example".parse().expect("header"));
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 403),
        other => panic!("connected from a refused origin: {:?}", other.map(|_| ())),
    }
    // LongPoll: the same check, answered in LongPoll's shape.
    let longpoll = |origin: &str| {
        let origin = origin.to_owned();
        let query = query.clone();
        let addr = server.addr;
        async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let request = format!(
                "GET /socket/longpoll?{query} HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n"
            );
            tcp.write_all(request.as_bytes()).await.expect("write");
            let mut answer = String::new();
            tcp.read_to_string(&mut answer).await.expect("read");
            answer
        }
    };
    let refused = longpoll("https://evil.example").await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let body: Value =
        serde_json::from_str(refused.split("\r\n\r\n").nth(1).unwrap_or("")).expect("JSON");
    assert_eq!(body["status"], 403);
    let allowed = longpoll("https://chat.example").await;
    assert!(allowed.contains(r#""status":410"#), "{allowed}");
}
