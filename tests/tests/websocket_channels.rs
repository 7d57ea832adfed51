//! The wire protocol through a real server, named like a protocol spec.

use cinder_tests::{ADMIN, Client, TestServer, http_get, http_post, reply};
use serde_json::json;

#[tokio::test]
async fn answers_heartbeats() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    c.send(json!([null, "1", "phoenix", "heartbeat", {}])).await;
    assert_eq!(c.recv().await, reply(None, "1", "phoenix", "ok", json!({})));
    server.stop().await;
}

/// Two clients joined to `topic`, with join refs "1" and "7"; each join must be answered ok.
async fn two_members(server: &TestServer, topic: &str) -> (Client, Client) {
    let mut a = server.client("a").await;
    let mut b = server.client("b").await;
    for (c, join_ref) in [(&mut a, "1"), (&mut b, "7")] {
        assert_eq!(
            c.join(join_ref, topic, json!({})).await,
            reply(Some(join_ref), join_ref, topic, "ok", json!({}))
        );
    }
    (a, b)
}

#[tokio::test]
async fn joins_replies_and_broadcasts_in_v2() {
    let server = TestServer::start().await;
    let (mut a, mut b) = two_members(&server, "room:lobby").await;
    a.send(json!(["1", "2", "room:lobby", "new_message", {"body": "hi"}]))
        .await;
    // Not intercepted: one frame for the topic, without a join_ref, as Phoenix sends a
    // broadcast.
    let frame = json!([null, null, "room:lobby", "new_message", {"body": "hi"}]);
    assert_eq!(a.recv().await, frame);
    assert_eq!(b.recv().await, frame);
    server.stop().await;
}

#[tokio::test]
async fn an_intercepted_broadcast_reaches_each_member_through_handle_out() {
    // The chat component again, with `new_message` intercepted (cinder-intercept.toml).
    let server = TestServer::start().await;
    let (mut a, mut b) = two_members(&server, "room-out:lobby").await;
    a.send(json!(["1", "2", "room-out:lobby", "new_message", {"body": "hi"}]))
        .await;
    // The sender's `ok` comes first: the intercepted broadcast is handled after the call.
    assert_eq!(
        a.recv().await,
        json!(["1", "2", "room-out:lobby", "phx_reply", {"status": "ok", "response": {}}])
    );
    // handle_out pushes each member's copy, so it carries that member's join_ref.
    assert_eq!(
        a.recv().await,
        json!(["1", null, "room-out:lobby", "new_message", {"body": "hi"}])
    );
    assert_eq!(
        b.recv().await,
        json!(["7", null, "room-out:lobby", "new_message", {"body": "hi"}])
    );
    server.stop().await;
}

/// Plugins are built with a small stack (`.cargo/config.toml`): the most deeply nested
/// payload the host lets through must still parse, recursively, inside one.
#[tokio::test]
async fn a_plugin_parses_the_most_deeply_nested_payload_the_host_accepts() {
    let server = TestServer::start().await;
    let mut a = server.client("a").await;
    a.join("1", "bad:deep", json!({})).await;
    // serde_json stops at 128 levels; the frame's array and the payload take two.
    let nested = format!("{}{}", "[".repeat(125), "]".repeat(125));
    a.send_text(&format!(
        r#"["1","2","bad:deep","parse",{{"extra":{nested}}}]"#
    ))
    .await;
    assert_eq!(
        a.recv().await,
        reply(Some("1"), "2", "bad:deep", "ok", json!({"depth": 126}))
    );
    server.stop().await;
}

#[tokio::test]
async fn refuses_joins_the_plugin_refuses_and_topics_no_plugin_serves() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    assert_eq!(
        c.join("1", "room:secret", json!({})).await,
        reply(
            Some("1"),
            "1",
            "room:secret",
            "error",
            json!({"reason": "unauthorized"})
        )
    );
    assert_eq!(
        c.join("2", "nothing:here", json!({})).await,
        reply(
            Some("2"),
            "2",
            "nothing:here",
            "error",
            json!({"reason": "unmatched topic"})
        )
    );
    server.stop().await;
}

#[tokio::test]
async fn refuses_websocket_events_that_havent_joined() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    c.send(json!(["1", "5", "room:lobby", "new_message", {"body": "x"}]))
        .await;
    assert_eq!(
        c.recv().await,
        reply(
            Some("1"),
            "5",
            "room:lobby",
            "error",
            json!({"reason": "unmatched topic"})
        )
    );
    c.send(json!([null, "6", "room:lobby", "phx_leave", {}]))
        .await;
    assert_eq!(
        c.recv().await,
        reply(None, "6", "room:lobby", "ok", json!({}))
    );
    server.stop().await;
}

#[tokio::test]
async fn leave_replies_ok_then_closes_the_channel() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    c.join("1", "room:lobby", json!({})).await;
    c.send(json!(["1", "2", "room:lobby", "phx_leave", {}]))
        .await;
    assert_eq!(
        c.recv().await,
        reply(Some("1"), "2", "room:lobby", "ok", json!({}))
    );
    assert_eq!(
        c.recv().await,
        json!(["1", "1", "room:lobby", "phx_close", {}])
    );
    c.send(json!(["1", "3", "room:lobby", "new_message", {"body": "x"}]))
        .await;
    assert_eq!(
        c.recv().await,
        reply(
            Some("1"),
            "3",
            "room:lobby",
            "error",
            json!({"reason": "unmatched topic"})
        )
    );
    server.stop().await;
}

#[tokio::test]
async fn duplicate_join_event_closes_existing_channel_after_the_new_reply() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    c.join("1", "room:lobby", json!({})).await;
    assert_eq!(
        c.join("3", "room:lobby", json!({})).await,
        reply(Some("3"), "3", "room:lobby", "ok", json!({}))
    );
    assert_eq!(
        c.recv().await,
        json!(["1", "1", "room:lobby", "phx_close", {}])
    );
    c.send(json!(["3", "4", "room:lobby", "new_message", {"body": "x"}]))
        .await;
    assert_eq!(
        c.recv().await,
        json!([null, null, "room:lobby", "new_message", {"body": "x"}])
    );
    assert_eq!(
        c.recv().await,
        json!(["3", "4", "room:lobby", "phx_reply", {"status": "ok", "response": {}}])
    );
    // One copy: the closed channel is no longer subscribed.
    c.silent_for(100).await;
    server.stop().await;
}

#[tokio::test]
async fn drops_messages_with_a_stale_join_ref() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    c.join("1", "bad:x", json!({})).await;
    c.join("2", "bad:x", json!({})).await;
    assert_eq!(c.recv().await, json!(["1", "1", "bad:x", "phx_close", {}]));
    c.send(json!(["1", "3", "bad:x", "echo", {"stale": true}]))
        .await;
    c.silent_for(150).await;
    c.send(json!(["2", "4", "bad:x", "echo", {"fresh": true}]))
        .await;
    assert_eq!(
        c.recv().await,
        reply(Some("2"), "4", "bad:x", "ok", json!({"fresh": true}))
    );
    server.stop().await;
}

#[tokio::test]
async fn refuses_joins_over_the_channel_cap() {
    let server = TestServer::start_with(|c| c.limits.max_channels_per_socket = 2).await;
    let mut c = server.client("1").await;
    c.join("1", "bad:1", json!({})).await;
    c.join("2", "bad:2", json!({})).await;
    assert_eq!(
        c.join("3", "bad:3", json!({})).await,
        reply(
            Some("3"),
            "3",
            "bad:3",
            "error",
            json!({"reason": "too many channels joined"})
        )
    );
    // A duplicate join is not a new channel.
    assert_eq!(
        c.join("4", "bad:2", json!({})).await,
        reply(Some("4"), "4", "bad:2", "ok", json!({}))
    );
    server.stop().await;
}

#[tokio::test]
async fn a_plugin_stop_replies_then_sends_phx_close() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    c.join("1", "bad:stop", json!({})).await;
    c.send(json!(["1", "2", "bad:stop", "stop", {}])).await;
    assert_eq!(
        c.recv().await,
        reply(Some("1"), "2", "bad:stop", "ok", json!({"stopping": true}))
    );
    assert_eq!(
        c.recv().await,
        json!(["1", "1", "bad:stop", "phx_close", {}])
    );
    server.stop().await;
}

#[tokio::test]
async fn a_trap_sends_phx_error_to_the_room_and_a_rejoin_gets_a_fresh_instance() {
    let server = TestServer::start().await;
    let mut a = server.client("a").await;
    let mut b = server.client("b").await;
    a.join("1", "bad:room", json!({})).await;
    b.join("1", "bad:room", json!({})).await;
    a.send(json!(["1", "2", "bad:room", "count", {}])).await;
    assert_eq!(
        a.recv().await,
        reply(Some("1"), "2", "bad:room", "ok", json!({"count": 1}))
    );
    a.send(json!(["1", "3", "bad:room", "panic", {}])).await;
    let crash = json!(["1", "1", "bad:room", "phx_error", {"reason": "channel_crash"}]);
    assert_eq!(a.recv().await, crash);
    assert_eq!(b.recv().await, crash);
    a.join("4", "bad:room", json!({})).await;
    a.send(json!(["4", "5", "bad:room", "count", {}])).await;
    assert_eq!(
        a.recv().await,
        reply(Some("4"), "5", "bad:room", "ok", json!({"count": 1}))
    );
    server.stop().await;
}

#[tokio::test]
async fn speaks_the_v1_serializer() {
    let server = TestServer::start().await;
    let url = server.ws_url(&format!("token={}", server.token("1")));
    let mut c = Client::connect(&url).await.expect("connects");
    c.send(json!({"topic": "room:lobby", "event": "phx_join", "payload": {}, "ref": "1"}))
        .await;
    assert_eq!(
        c.recv().await,
        json!({"topic": "room:lobby", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": "1"})
    );
    c.send(json!({"topic": "room:lobby", "event": "new_message", "payload": {"body": "v1"}, "ref": "2"})).await;
    assert_eq!(
        c.recv().await,
        json!({"topic": "room:lobby", "event": "new_message", "payload": {"body": "v1"}, "ref": null})
    );
    server.stop().await;
}

#[tokio::test]
async fn carries_v2_binary_pushes_and_replies() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    c.join("1", "bad:bin", json!({})).await;
    let mut frame = vec![0u8, 1, 1, 7, 4];
    frame.extend_from_slice(b"12bad:binecho");
    frame.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    c.send_binary(frame).await;
    let mut expected = vec![1u8, 1, 1, 7, 2];
    expected.extend_from_slice(b"12bad:binok");
    expected.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(c.recv_message().await.into_data().to_vec(), expected);
    server.stop().await;
}

#[tokio::test]
async fn refuses_bad_tokens_and_unknown_serializers_with_403() {
    let server = TestServer::start().await;
    let forged = cinder::auth::mint("other-secret", "1", 60).expect("mint");
    for query in [
        "vsn=2.0.0".to_string(),
        format!("vsn=2.0.0&token={forged}"),
        "vsn=2.0.0&token=abc.def.ghi".to_string(),
        format!("vsn=3.0.0&token={}", server.token("1")),
    ] {
        assert_eq!(
            Client::connect(&server.ws_url(&query)).await.err(),
            Some(403),
            "{query}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn closes_sockets_that_send_malformed_frames_with_1007() {
    let server = TestServer::start().await;
    for garbage in [
        "nope",
        "[\"1\",\"1\",\"t\"]",
        "{\"topic\":1}",
        "[1,2,3,4,5]",
    ] {
        let mut c = server.client("1").await;
        c.send_text(garbage).await;
        let frame = c.closed().await.expect("a close frame");
        assert_eq!(u16::from(frame.code), 1007, "{garbage}");
        assert!(frame.reason.contains("malformed"), "{}", frame.reason);
    }
    server.stop().await;
}

#[tokio::test]
async fn closes_sockets_that_send_oversized_frames_with_1009() {
    let server = TestServer::start_with(|c| c.limits.max_frame_bytes = 4096).await;
    let mut c = server.client("1").await;
    c.send_text(&format!(
        "[null,\"1\",\"phoenix\",\"heartbeat\",{{\"pad\":\"{}\"}}]",
        "x".repeat(8000)
    ))
    .await;
    let frame = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1009);
    server.stop().await;
}

#[tokio::test]
async fn closes_idle_sockets() {
    let server = TestServer::start_with(|c| c.limits.idle_timeout_secs = 1).await;
    let mut c = server.client("1").await;
    let frame = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1001);
    assert_eq!(frame.reason.as_str(), "idle timeout");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1012() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    c.join("1", "room:lobby", json!({})).await;
    let stopping = tokio::spawn(server.stop());
    let frame = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1012);
    stopping.await.expect("server stopped");
}

#[tokio::test]
async fn a_request_that_is_not_an_upgrade_is_refused_with_the_reason() {
    let server = TestServer::start().await;
    let plain = http_get(server.addr, "/socket/websocket?vsn=2.0.0").await;
    assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
    assert!(plain.contains("expected a WebSocket upgrade"), "{plain}");
    server.stop().await;
}

#[tokio::test]
async fn pings_are_answered_in_order_between_broadcasts() {
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    c.join("1", "room:lobby", json!({})).await;
    let body = r#"{"topic":"room:lobby","event":"news","payload":{"n":1}}"#;
    const ROUNDS: u8 = 50;
    for i in 0..ROUNDS {
        c.send_raw(Message::Ping(vec![i].into())).await;
        let answer = http_post(server.addr, "/api/broadcast", Some(ADMIN), body).await;
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
    let (mut pongs, mut news) = (Vec::new(), 0);
    while pongs.len() < usize::from(ROUNDS) || news < ROUNDS {
        match c.recv_any().await {
            Message::Pong(data) => pongs.extend_from_slice(&data),
            Message::Text(text) if text.contains("\"news\"") => news += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pongs, (0..ROUNDS).collect::<Vec<u8>>());
    server.stop().await;
}

#[tokio::test]
async fn the_index_says_where_the_socket_is() {
    let server = TestServer::start().await;
    let body = http_get(server.addr, "/").await;
    assert!(body.contains("\"socket\":\"/socket/websocket\""), "{body}");
    assert!(body.contains("\"chat\""), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn server_push_reaches_subscribers_and_needs_the_admin_token() {
    let server = TestServer::start().await;
    let mut c = server.client("42").await;
    c.join("1", "user:42", json!({})).await;
    let body = r#"{"topic":"user:42","event":"notification","payload":{"id":3}}"#;
    assert!(
        http_post(server.addr, "/api/broadcast", None, body)
            .await
            .starts_with("HTTP/1.1 401")
    );
    assert!(
        http_post(server.addr, "/api/broadcast", Some("wrong"), body)
            .await
            .starts_with("HTTP/1.1 401")
    );
    assert!(
        http_post(server.addr, "/api/broadcast", Some(ADMIN), "{")
            .await
            .starts_with("HTTP/1.1 400")
    );
    assert!(
        http_post(server.addr, "/api/broadcast", Some(ADMIN), body)
            .await
            .starts_with("HTTP/1.1 202")
    );
    assert_eq!(
        c.recv().await,
        json!(["1", null, "user:42", "notification", {"id": 3}])
    );
    server.stop().await;
}

#[tokio::test]
async fn closes_sockets_that_send_text_frames_that_are_not_utf8_with_1007() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    let frame = Frame::message(vec![b'[', 0xff, 0xfe, b']'], OpCode::Data(Data::Text), true);
    c.send_raw(Message::Frame(frame)).await;
    let close = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1007);
    server.stop().await;
}

#[tokio::test]
async fn disconnects_a_client_that_does_not_read_and_keeps_serving_readers() {
    let server = TestServer::start_with(|c| c.limits.outbound_queue_bytes = 64 << 10).await;
    let mut slow = server.client("slow").await;
    let mut reader = server.client("reader").await;
    slow.join("1", "bad:firehose", json!({})).await;
    reader.join("1", "bad:firehose", json!({})).await;
    let payload = format!(
        r#"{{"topic":"bad:firehose","event":"data","payload":{{"pad":"{}"}}}}"#,
        "x".repeat(16 << 10)
    );
    // 2000 x 16 KiB = 32 MiB: far past what the slow client's socket buffers and queue hold.
    for i in 0..2000 {
        assert!(
            http_post(server.addr, "/api/broadcast", Some(ADMIN), &payload)
                .await
                .starts_with("HTTP/1.1 202")
        );
        // The reader keeps up.
        let frame = reader.recv().await;
        assert_eq!(frame[3], "data", "frame {i}");
    }
    // The slow client finds its stream ended, after whatever was buffered.
    assert!(
        slow.drains_to_close().await,
        "the slow client was disconnected"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_disconnect_broadcast_on_the_socket_id_closes_every_socket_with_it() {
    let server = TestServer::start().await;
    let mut tab1 = server.client("42").await;
    let mut tab2 = server.client("42").await;
    let mut other = server.client("7").await;
    tab1.join("1", "room:lobby", json!({})).await;
    other.join("1", "room:lobby", json!({})).await;
    let body = r#"{"topic":"user_socket:42","event":"disconnect","payload":{}}"#;
    assert!(
        http_post(server.addr, "/api/broadcast", Some(ADMIN), body)
            .await
            .starts_with("HTTP/1.1 202")
    );
    for tab in [&mut tab1, &mut tab2] {
        let frame = tab.closed().await.expect("a close frame");
        assert_eq!(
            (u16::from(frame.code), frame.reason.as_str()),
            (1001, "disconnected")
        );
    }
    other
        .send(json!(["1", "2", "room:lobby", "new_message", {"body": "still here"}]))
        .await;
    assert_eq!(
        other.recv().await,
        json!([null, null, "room:lobby", "new_message", {"body": "still here"}])
    );
    server.stop().await;
}

/// A room's broadcasts reach sockets through its feed, its pushes and replies through each
/// socket's queue: a socket still gets them in the order the plugin made them.
#[tokio::test]
async fn broadcasts_pushes_and_replies_arrive_in_the_order_the_plugin_made_them() {
    let server = TestServer::start().await;
    let mut a = server.client("a").await;
    let mut b = server.client("b").await;
    a.join("1", "bad:order", json!({})).await;
    b.join("1", "bad:order", json!({})).await;
    const CALLS: u64 = 150;
    for n in 0..CALLS {
        a.send(json!(["1", n.to_string(), "bad:order", "interleave", {"n": n}]))
            .await;
    }
    for n in 0..CALLS {
        let body = json!({"n": n});
        assert_eq!(
            a.recv().await,
            json!([null, null, "bad:order", "first", body]),
            "call {n}"
        );
        assert_eq!(
            a.recv().await,
            json!(["1", null, "bad:order", "second", body])
        );
        assert_eq!(
            a.recv().await,
            json!([null, null, "bad:order", "third", body])
        );
        assert_eq!(
            a.recv().await,
            reply(Some("1"), &n.to_string(), "bad:order", "ok", body.clone())
        );
        assert_eq!(
            b.recv().await,
            json!([null, null, "bad:order", "first", body])
        );
        assert_eq!(
            b.recv().await,
            json!([null, null, "bad:order", "third", body])
        );
    }
    server.stop().await;
}
