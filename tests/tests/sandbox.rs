//! Untrusted plugins and hostile clients cannot hurt the host: each protection proven
//! through a real server, with the misbehaving test plugin (`bad:*`) doing the harm.

use std::time::Duration;

use cinder_tests::{ADMIN, Client, TestServer, http_post, reply, rss_kib, stats};
use serde_json::{Value, json};

const CRASH: &str = "phx_error";

/// Joins `topic` as a fresh client and returns it.
async fn member(server: &TestServer, user: &str, topic: &str) -> Client {
    let mut c = server.client(user).await;
    let joined = c.join("1", topic, json!({})).await;
    assert_eq!(
        joined,
        reply(Some("1"), "1", topic, "ok", json!({})),
        "join {topic}"
    );
    c
}

/// Sends `event` on `topic` (joined with join ref "1") and returns the next frame.
async fn call(c: &mut Client, topic: &str, msg_ref: &str, event: &str, payload: Value) -> Value {
    c.send(json!(["1", msg_ref, topic, event, payload])).await;
    c.recv().await
}

fn is_crash(frame: &Value, topic: &str) -> bool {
    frame[2] == topic && frame[3] == CRASH && frame[4] == json!({"reason": "channel_crash"})
}

#[tokio::test]
async fn a_looping_plugin_is_stopped_by_its_deadline_while_other_rooms_keep_answering() {
    // A long deadline, so the loop is still running while the neighbour is asked.
    let server = TestServer::start_with(|c| c.limits.plugin_call_ms = 1000).await;
    let mut evil = member(&server, "evil", "bad:evil").await;
    let mut good = member(&server, "good", "bad:good").await;
    evil.send(json!(["1", "2", "bad:evil", "loop", {}])).await;
    // Twenty answers from the neighbour arrive while the loop burns its second.
    for i in 0..20 {
        let r = call(
            &mut good,
            "bad:good",
            &format!("e{i}"),
            "echo",
            json!({"i": i}),
        )
        .await;
        assert_eq!(
            r,
            reply(
                Some("1"),
                &format!("e{i}"),
                "bad:good",
                "ok",
                json!({"i": i})
            )
        );
    }
    // ...and the loop is still running: the neighbour did not wait for it.
    evil.silent_for(1).await;
    let crashed = evil.recv().await;
    assert!(is_crash(&crashed, "bad:evil"), "{crashed}");
    // The bad room recovers: a rejoin gets a fresh instance.
    assert_eq!(
        evil.join("3", "bad:evil", json!({})).await[4]["status"],
        "ok"
    );
    evil.send(json!(["3", "4", "bad:evil", "count", {}])).await;
    assert_eq!(
        evil.recv().await,
        reply(Some("3"), "4", "bad:evil", "ok", json!({"count": 1}))
    );
    assert_eq!(stats(server.addr).await["room_crashes"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_plugin_over_its_memory_cap_crashes_only_its_room() {
    let server = TestServer::start_with(|c| c.limits.plugin_memory_bytes = 16 << 20).await;
    let mut hog = member(&server, "hog", "bad:hog").await;
    let mut other = member(&server, "other", "bad:other").await;
    let ok = call(&mut hog, "bad:hog", "2", "alloc", json!({"bytes": 1 << 20})).await;
    assert_eq!(ok[4]["response"], json!({"allocated": 1 << 20}));
    let crashed = call(
        &mut hog,
        "bad:hog",
        "3",
        "alloc",
        json!({"bytes": 64 << 20}),
    )
    .await;
    assert!(is_crash(&crashed, "bad:hog"), "{crashed}");
    assert_eq!(
        call(&mut other, "bad:other", "2", "count", json!({})).await[4]["response"],
        json!({"count": 1})
    );
    assert_eq!(hog.join("4", "bad:hog", json!({})).await[4]["status"], "ok");
    server.stop().await;
}

#[tokio::test]
async fn unbounded_recursion_and_panics_crash_only_their_room() {
    let server = TestServer::start().await;
    let mut other = member(&server, "other", "bad:other").await;
    for (topic, command) in [("bad:deep", "recurse"), ("bad:panic", "panic")] {
        let mut c = member(&server, command, topic).await;
        let crashed = call(&mut c, topic, "2", command, json!({})).await;
        assert!(is_crash(&crashed, topic), "{command}: {crashed}");
        assert_eq!(
            c.join("3", topic, json!({})).await[4]["status"],
            "ok",
            "{command}: the room recovers"
        );
    }
    assert_eq!(
        call(&mut other, "bad:other", "2", "count", json!({})).await[4]["response"],
        json!({"count": 1})
    );
    server.stop().await;
}

#[tokio::test]
async fn a_push_flood_is_cut_at_the_per_call_limit() {
    let server = TestServer::start().await;
    let mut c = member(&server, "f", "bad:flood").await;
    c.send(json!(["1", "2", "bad:flood", "push-flood", {"n": 100_000}]))
        .await;
    let limit = cinder::config::Limits::default().max_messages_per_call;
    for i in 0..limit {
        let push = c.recv().await;
        assert_eq!(push, json!(["1", null, "bad:flood", "flood", {"i": i}]));
    }
    assert_eq!(
        c.recv().await,
        reply(
            Some("1"),
            "2",
            "bad:flood",
            "ok",
            json!({"accepted": limit})
        )
    );
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_reply_crashes_that_channel_only() {
    let server = TestServer::start_with(|c| c.limits.max_plugin_payload_bytes = 64 << 10).await;
    let mut big = member(&server, "big", "bad:big").await;
    let mut other = member(&server, "other", "bad:big").await;
    assert_eq!(
        call(
            &mut big,
            "bad:big",
            "2",
            "big-reply",
            json!({"bytes": 1000})
        )
        .await[4]["status"],
        "ok"
    );
    let crashed = call(
        &mut big,
        "bad:big",
        "3",
        "big-reply",
        json!({"bytes": 100_000}),
    )
    .await;
    assert!(is_crash(&crashed, "bad:big"), "{crashed}");
    // Same room, same instance: its state survived.
    assert_eq!(
        call(&mut other, "bad:big", "2", "count", json!({})).await[4]["response"],
        json!({"count": 3})
    );
    assert_eq!(stats(server.addr).await["channel_errors"], 1);
    server.stop().await;
}

#[tokio::test]
async fn long_legal_work_within_the_deadline_completes() {
    let server = TestServer::start().await;
    let mut c = member(&server, "w", "bad:work").await;
    let r = call(&mut c, "bad:work", "2", "sleep-ish", json!({"ms": 5})).await;
    assert_eq!(
        r,
        reply(Some("1"), "2", "bad:work", "ok", json!({"slept": true}))
    );
    server.stop().await;
}

#[tokio::test]
async fn a_crash_loop_quarantines_the_plugin_until_the_cooldown() {
    let server = TestServer::start_with(|c| {
        c.limits.crash_limit = 2;
        c.limits.quarantine_secs = 1;
    })
    .await;
    for i in 0..2 {
        let topic = format!("bad:loop{i}");
        let mut c = member(&server, "crasher", &topic).await;
        assert!(is_crash(
            &call(&mut c, &topic, "2", "panic", json!({})).await,
            &topic
        ));
    }
    let mut c = server.client("late").await;
    assert_eq!(
        c.join("1", "bad:new", json!({})).await,
        reply(
            Some("1"),
            "1",
            "bad:new",
            "error",
            json!({"reason": "plugin unavailable"})
        )
    );
    // Other plugins are not affected.
    assert_eq!(
        c.join("2", "room:lobby", json!({})).await[4]["status"],
        "ok"
    );
    assert_eq!(stats(server.addr).await["quarantines"], 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        c.join("3", "bad:new", json!({})).await[4]["status"],
        "ok",
        "the cooldown passed"
    );
    server.stop().await;
}

#[tokio::test]
async fn plugins_reach_clocks_and_random_but_no_files_network_env_or_args() {
    let server = TestServer::start().await;
    let mut c = member(&server, "caps", "bad:caps").await;
    let r = call(&mut c, "bad:caps", "2", "caps", json!({})).await;
    assert_eq!(
        r[4]["response"],
        json!({
            "read_file": false, "list_dir": false, "write_file": false, "env": 0, "args": 0,
            "connect": false, "listen": false, "clock": true, "random": true,
        })
    );
    server.stop().await;
}

#[tokio::test]
async fn plugin_output_goes_to_the_log_at_a_bounded_rate() {
    let server = TestServer::start_with(|c| c.limits.plugin_log_lines_per_sec = 10).await;
    let mut c = member(&server, "p", "bad:print").await;
    let r = call(&mut c, "bad:print", "2", "print", json!({"n": 50})).await;
    assert_eq!(r[4]["status"], "ok");
    // 100 lines, 10 a second allowed: at least 80 are dropped and counted.
    let dropped = stats(server.addr).await["plugin_log_dropped"]
        .as_u64()
        .expect("a count");
    assert!((80..=100).contains(&dropped), "dropped {dropped}");
    server.stop().await;
}

#[tokio::test]
async fn the_room_cap_refuses_new_rooms_and_an_emptied_room_frees_its_slot() {
    let server = TestServer::start_with(|c| c.limits.max_rooms = 2).await;
    let mut a = member(&server, "a", "bad:1").await;
    let _b = member(&server, "b", "bad:2").await;
    let mut c = server.client("c").await;
    assert_eq!(
        c.join("1", "bad:3", json!({})).await,
        reply(
            Some("1"),
            "1",
            "bad:3",
            "error",
            json!({"reason": "too many rooms"})
        )
    );
    // Joining a live room is fine.
    assert_eq!(c.join("2", "bad:1", json!({})).await[4]["status"], "ok");
    a.send(json!(["1", "2", "bad:1", "phx_leave", {}])).await;
    c.send(json!(["2", "3", "bad:1", "phx_leave", {}])).await;
    a.recv().await;
    let mut freed = false;
    for attempt in 0..50 {
        let join_ref = format!("j{attempt}");
        if c.join(&join_ref, "bad:3", json!({})).await[4]["status"] == "ok" {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "the emptied room's slot was freed");
    assert!(stats(server.addr).await["rooms_refused"].as_u64() >= Some(1));
    server.stop().await;
}

#[tokio::test]
async fn a_socket_over_its_rate_limit_gets_errors_then_is_closed() {
    let server = TestServer::start_with(|c| {
        c.limits.messages_per_sec = 1;
        c.limits.message_burst = 5;
    })
    .await;
    let mut c = server.client("fast").await;
    for i in 0..5 {
        c.send(json!([null, format!("{i}"), "phoenix", "heartbeat", {}]))
            .await;
        assert_eq!(c.recv().await[4]["status"], "ok");
    }
    c.send(json!([null, "6", "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        c.recv().await,
        reply(
            None,
            "6",
            "phoenix",
            "error",
            json!({"reason": "rate limited"})
        )
    );
    for i in 7..20 {
        c.send_text(&json!([null, format!("{i}"), "phoenix", "heartbeat", {}]).to_string())
            .await;
    }
    let mut closed = None;
    while closed.is_none() {
        closed = c.next_close_or_frame().await;
    }
    let frame = closed.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1008);
    assert_eq!(frame.reason.as_str(), "rate limit exceeded");
    server.stop().await;
}

#[tokio::test]
async fn hundreds_of_non_reading_clients_on_a_busy_topic_are_cut_off_and_readers_are_unaffected() {
    let server = TestServer::start_with(|c| c.limits.outbound_queue_bytes = 256 << 10).await;
    let mut slow = Vec::new();
    for i in 0..200 {
        slow.push(member(&server, &format!("slow{i}"), "bad:busy").await);
    }
    let mut reader = member(&server, "reader", "bad:busy").await;
    let before = rss_kib();
    let payload = format!(
        r#"{{"topic":"bad:busy","event":"data","payload":{{"pad":"{}"}}}}"#,
        "x".repeat(16 << 10)
    );
    for i in 0..1000 {
        assert!(
            http_post(server.addr, "/api/broadcast", Some(ADMIN), &payload)
                .await
                .starts_with("HTTP/1.1 202")
        );
        assert_eq!(
            reader.recv().await[3],
            "data",
            "broadcast {i} reached the reader"
        );
    }
    let grown = rss_kib().saturating_sub(before);
    // 16 MB to each of 200 clients would be 3.2 GB if queued; bounded queues keep it small.
    assert!(grown < 512 << 10, "memory grew by {grown} KiB");
    let cut = stats(server.addr).await["slow_disconnects"]
        .as_u64()
        .expect("count");
    assert_eq!(cut, 200, "every non-reading client was cut off");
    for c in &mut slow {
        assert!(c.drains_to_close().await);
    }
    server.stop().await;
}

#[tokio::test]
async fn huge_refs_and_topics_within_the_frame_limit_are_answered_not_fatal() {
    let server = TestServer::start().await;
    let mut c = server.client("1").await;
    let huge = "r".repeat(200_000);
    c.send(json!([null, huge, "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(c.recv().await[1], json!(huge));
    let topic = format!("bad:{}", "t".repeat(100_000));
    assert_eq!(c.join("1", &topic, json!({})).await[4]["status"], "ok");
    server.stop().await;
}

#[tokio::test]
async fn the_bytes_one_call_may_send_are_capped() {
    let server = TestServer::start_with(|c| c.limits.max_plugin_payload_bytes = 256 << 10).await;
    let mut c = member(&server, "f", "bad:bytes").await;
    c.send(json!(["1", "2", "bad:bytes", "push-flood", {"n": 100, "bytes": 32 << 10}]))
        .await;
    let mut pushes = 0;
    let accepted = loop {
        let frame = c.recv().await;
        if frame[3] == "phx_reply" {
            break frame[4]["response"]["accepted"].as_u64().expect("a count");
        }
        pushes += 1;
    };
    // 256 KiB in 32 KiB payloads: seven fit, the eighth would pass the cap.
    assert_eq!(accepted, 7);
    assert_eq!(pushes, accepted);
    server.stop().await;
}

#[tokio::test]
async fn assigns_a_plugin_grows_past_the_cap_crash_the_channel() {
    let server = TestServer::start().await;
    let mut c = member(&server, "a", "bad:assigns").await;
    assert_eq!(
        call(&mut c, "bad:assigns", "2", "assign", json!({"bytes": 1000})).await[4]["status"],
        "ok"
    );
    let crashed = call(
        &mut c,
        "bad:assigns",
        "3",
        "assign",
        json!({"bytes": 100_000}),
    )
    .await;
    assert!(is_crash(&crashed, "bad:assigns"), "{crashed}");
    server.stop().await;
}
