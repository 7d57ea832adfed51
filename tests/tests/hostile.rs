//! What a hostile plugin, client or admin caller tried, and what the host now refuses: each
//! test replays one attack through a real server, most of them with the `hostile` test
//! plugin (`hostile:*`, plugins/hostile) doing the harm.

use std::time::Duration;

use cinder_tests::{
    ADMIN, Client, SECRET, TestServer, WAIT, admin, capture_logs, http_post, logged, reply, stats,
    test_plugin, upload,
};
use serde_json::{Value, json};

/// Joins `topic` as a fresh client of `user` and returns it.
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

/// Sends `event` on `topic` (joined with join ref "1") and returns the reply, skipping
/// pushes and broadcasts before it.
async fn call(c: &mut Client, topic: &str, msg_ref: &str, event: &str, payload: Value) -> Value {
    c.send(json!(["1", msg_ref, topic, event, payload])).await;
    loop {
        let frame = c.recv().await;
        if frame[3] == "phx_reply" && frame[1] == msg_ref {
            return frame;
        }
        assert_ne!(frame[3], "phx_error", "the channel crashed: {frame}");
    }
}

/// The hostile component under another manifest.
fn hostile_as(manifest: &str) -> (String, Vec<u8>) {
    (manifest.to_owned(), test_plugin("hostile").1)
}

/// An admin answer's error text.
fn error_text(answer: &Value) -> String {
    answer["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_plugin_may_not_serve_the_socket_id_or_phoenix_topics() {
    let server = TestServer::start().await;
    let mut victim = server.client("42").await;
    for pattern in [
        "user_socket:*",
        "user_socket:42",
        "user_*",
        "u*",
        "phoenix",
        "phoeni*",
        "p*",
    ] {
        let (manifest, wasm) = hostile_as(&format!(
            "name = \"thief\"\nversion = \"0.1.0\"\ntopics = [\"{pattern}\"]\n"
        ));
        let (status, answer) = upload(server.addr, &manifest, &wasm, true).await;
        assert_eq!(status, 400, "{pattern}: {answer}");
        assert!(
            error_text(&answer).contains("reserved"),
            "{pattern}: {answer}"
        );
    }
    // Had one been taken, a join of user_socket:42 and a `disconnect` from it would have
    // closed user 42's sockets: they are still open.
    let mut thief = server.client("9").await;
    assert_eq!(
        thief.join("1", "user_socket:42", json!({})).await[4]["response"],
        json!({"reason": "unmatched topic"})
    );
    victim
        .send(json!([null, "1", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        victim.recv().await,
        reply(None, "1", "phoenix", "ok", json!({}))
    );
    server.stop().await;
}

#[tokio::test]
async fn disconnect_is_a_reserved_event_for_plugins() {
    let server = TestServer::start().await;
    let mut a = member(&server, "7", "hostile:d").await;
    let mut b = member(&server, "8", "hostile:d").await;
    let r = call(&mut a, "hostile:d", "2", "disconnect", json!({})).await;
    assert_eq!(
        r[4]["response"],
        json!({"error": "event disconnect is reserved"}),
        "{r}"
    );
    // No member saw a `disconnect` event, and both sockets stay open.
    b.send(json!([null, "1", "phoenix", "heartbeat", {}])).await;
    assert_eq!(b.recv().await, reply(None, "1", "phoenix", "ok", json!({})));
    // The admin API still logs a user out everywhere.
    let mut user = server.client("42").await;
    let body = r#"{"topic":"user_socket:42","event":"disconnect","payload":{}}"#;
    assert!(
        http_post(server.addr, "/api/broadcast", Some(ADMIN), body)
            .await
            .starts_with("HTTP/1.1 202")
    );
    let frame = user.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1001);
    server.stop().await;
}

#[tokio::test]
async fn presence_list_reads_only_the_plugins_own_topics() {
    let server = TestServer::start().await;
    // Another plugin's room with someone in it.
    let mut lobby = server.client("alice").await;
    assert_eq!(
        lobby.join("1", "presence:lobby", json!({})).await[4]["status"],
        "ok"
    );
    // A room of the hostile plugin with a presence of its own.
    let mut own = member(&server, "bob", "hostile:own").await;
    let tracked = call(
        &mut own,
        "hostile:own",
        "2",
        "track-big",
        json!({"keys": 1, "bytes": 10}),
    )
    .await;
    assert_eq!(tracked[4]["response"]["tracked"], 1, "{tracked}");
    let mut spy = member(&server, "eve", "hostile:spy").await;
    let stolen = call(
        &mut spy,
        "hostile:spy",
        "2",
        "spy",
        json!({"topic": "presence:lobby"}),
    )
    .await;
    assert_eq!(stolen[4]["response"], json!({}), "{stolen}");
    let mine = call(
        &mut spy,
        "hostile:spy",
        "3",
        "spy",
        json!({"topic": "hostile:own"}),
    )
    .await;
    assert!(mine[4]["response"]["k0"]["metas"].is_array(), "{mine}");
    server.stop().await;
}

#[tokio::test]
async fn a_plugin_cannot_forge_a_log_record() {
    capture_logs();
    let server = TestServer::start().await;
    let mut c = member(&server, "1", "hostile:forge").await;
    let forged = "hi\n2026-12-01T00:00:00.000000Z ERROR cinder::runtime: plugin quarantined: joins refused plugin=chat\r\n";
    let r = call(
        &mut c,
        "hostile:forge",
        "2",
        "log",
        json!({"message": forged}),
    )
    .await;
    assert_eq!(r[4]["status"], "ok");
    let lines = logged("plugin quarantined: joins refused plugin=chat");
    assert!(!lines.is_empty(), "the plugin's line was logged");
    for line in &lines {
        // The forged text stays inside the plugin's own record, which names its topic.
        assert!(line.contains("hostile:forge"), "a forged record: {line:?}");
        assert!(line.contains("\\n"), "{line:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_handle_out_that_broadcasts_again_is_cut_at_one_calls_budget_and_the_room_stays_responsive()
 {
    let server = TestServer::start().await;
    let before = cinder_tests::rss_kib();
    let mut a = member(&server, "a", "hostile:loop").await;
    let r = call(&mut a, "hostile:loop", "2", "loop-out", json!({})).await;
    assert_eq!(r[4]["response"], "ok", "{r}");
    // Every round of handle_out pushes one copy and broadcasts again, until the message's
    // budget of broadcasts (one call's: max_messages_per_call) is spent.
    let budget = cinder::config::Limits::default().max_messages_per_call;
    let mut echoes = 0;
    while let Ok(frame) = tokio::time::timeout(Duration::from_millis(500), a.recv()).await {
        assert_eq!(frame[3], "echo-out", "{frame}");
        echoes += 1;
        assert!(
            echoes <= budget + 1,
            "{echoes} rounds: the loop is not bounded"
        );
    }
    assert!(echoes >= budget - 1, "only {echoes} rounds");
    // The room reads its mailbox again: a second member joins and is answered.
    let mut b = member(&server, "b", "hostile:loop").await;
    let counted = call(&mut b, "hostile:loop", "2", "counters", json!({})).await;
    assert_eq!(counted[4]["response"]["outs"], echoes, "{counted}");
    // Refusals past the budget are counted.
    assert!(stats(server.addr).await["call_refusals"].as_u64() >= Some(1));
    // The registry is free: an unrelated upload goes through.
    let (manifest, wasm) = cinder_tests::test_plugin("counter");
    let manifest = manifest.replace("version = \"1.0.0\"", "version = \"1.0.1\"");
    let (status, answer) = tokio::time::timeout(WAIT, upload(server.addr, &manifest, &wasm, true))
        .await
        .expect("the upload is answered");
    assert_eq!(status, 201, "{answer}");
    let grown = cinder_tests::rss_kib().saturating_sub(before);
    assert!(grown < 256 << 10, "memory grew by {grown} KiB");
    server.stop().await;
}

#[tokio::test]
async fn oversized_broadcasts_are_refused_before_their_payload_is_parsed() {
    let server = TestServer::start_with(|c| c.limits.plugin_call_ms = 30).await;
    let mut c = member(&server, "1", "hostile:huge").await;
    // Thirty 2 MiB payloads, each past the 1 MiB a call may send: copied and parsed, each
    // took milliseconds of host time and the call blew its 30 ms; refused by size where
    // they lie (a tenth of a millisecond each), the call returns with thirty errors.
    let r = call(
        &mut c,
        "hostile:huge",
        "2",
        "huge-broadcast",
        json!({"bytes": 2 << 20, "n": 30}),
    )
    .await;
    assert_eq!(r[4]["response"], json!({"refused": 30}), "{r}");
    assert_eq!(stats(server.addr).await["room_crashes"], 0);
    server.stop().await;
}

#[tokio::test]
async fn timers_past_the_cap_are_refused_and_warned_about_at_a_bounded_rate() {
    capture_logs();
    let server = TestServer::start().await;
    let mut c = member(&server, "1", "hostile:storm").await;
    // Every handle_info arms 100 zero-delay timers; the cap is 64 per channel.
    let r = call(
        &mut c,
        "hostile:storm",
        "2",
        "timer-storm",
        json!({"n": 100}),
    )
    .await;
    assert_eq!(r[4]["status"], "ok");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = stats(server.addr).await;
    let refused = s["timers_refused"]
        .as_u64()
        .expect("timers_refused counted");
    assert!(refused > 100, "{s}");
    // A warning per refusal would be thousands of lines: they are rate-limited per plugin,
    // and what was dropped is counted.
    let warnings = logged("hostile:storm")
        .into_iter()
        .filter(|l| l.contains("WARN"))
        .count();
    assert!(warnings <= 30, "{warnings} warnings in 2 s");
    assert!(s["plugin_warnings_dropped"].as_u64() > Some(0), "{s}");
    // Timers run on a CPU budget per room: past it, they wait.
    assert!(s["timers_deferred"].as_u64() > Some(0), "{s}");
    server.stop().await;
}

#[tokio::test]
async fn plugin_memory_past_the_node_budget_is_refused_without_blaming_the_plugin_and_given_back() {
    let server = TestServer::start_with(|c| {
        c.limits.plugin_memory_total_bytes = 96 << 20;
        c.limits.crash_limit = 2;
        // Touching 28 MiB is memory work, not a loop: on a loaded machine it took longer
        // than the 10 ms a call gets, and the deadline crashed the channel (seen twice
        // under the full suite). This test is about memory; time has tests of its own.
        c.limits.plugin_call_ms = cinder::config::MAX_PLUGIN_CALL_MS;
    })
    .await;
    let mut c = server.client("1").await;
    let mut held = 0;
    let mut refused = 0;
    for i in 0..6 {
        let topic = format!("hostile:m{i}");
        let join_ref = format!("{i}");
        c.send(json!([join_ref, join_ref, topic, "phx_join", {}]))
            .await;
        let joined = c.recv().await;
        if joined[4]["status"] != "ok" {
            assert_eq!(
                joined[4]["response"],
                json!({"reason": "server memory full"}),
                "{joined}"
            );
            refused += 1;
            continue;
        }
        c.send(json!([join_ref, "h", topic, "hoard", {"bytes": 28 << 20}]))
            .await;
        let answer = c.recv().await;
        if answer[3] == "phx_reply" {
            held += 1;
        } else {
            assert_eq!(answer[3], "phx_error", "{answer}");
            refused += 1;
        }
    }
    assert_eq!(held, 3, "three rooms of 28 MiB fit in 96 MiB");
    assert_eq!(refused, 3);
    let s = stats(server.addr).await;
    assert!(s["plugin_memory_bytes"].as_u64() <= Some(96 << 20), "{s}");
    assert!(s["plugin_memory_refused"].as_u64() >= Some(1), "{s}");
    // The node's refusals are not the plugin's crashes: it is not quarantined.
    assert_eq!(s["quarantines"], 0, "{s}");
    drop(c);
    // The rooms emptied and gave their memory back: a new room may hoard again.
    let mut freed = false;
    for _ in 0..50 {
        if stats(server.addr).await["plugin_memory_bytes"].as_u64() == Some(0) {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "memory given back");
    let mut again = member(&server, "2", "hostile:again").await;
    let r = call(
        &mut again,
        "hostile:again",
        "2",
        "hoard",
        json!({"bytes": 28 << 20}),
    )
    .await;
    assert_eq!(r[4]["status"], "ok");
    server.stop().await;
}

#[tokio::test]
async fn presence_bytes_are_capped_per_socket_and_per_node_and_given_back() {
    let server = TestServer::start_with(|c| {
        c.limits.presence_bytes_per_socket = 256 << 10;
        c.limits.presence_bytes_total = 400 << 10;
    })
    .await;
    let mut a = member(&server, "a", "hostile:p1").await;
    let r = call(
        &mut a,
        "hostile:p1",
        "2",
        "track-big",
        json!({"keys": 32, "bytes": 32 << 10}),
    )
    .await;
    let tracked = r[4]["response"]["tracked"].as_u64().expect("a count");
    assert!((6..=7).contains(&tracked), "{r}");
    assert!(
        r[4]["response"]["refusal"]
            .as_str()
            .is_some_and(|e| e.contains("per socket")),
        "{r}"
    );
    let mut b = member(&server, "b", "hostile:p2").await;
    let r = call(
        &mut b,
        "hostile:p2",
        "2",
        "track-big",
        json!({"keys": 32, "bytes": 32 << 10}),
    )
    .await;
    assert!(
        r[4]["response"]["refusal"]
            .as_str()
            .is_some_and(|e| e.contains("node")),
        "{r}"
    );
    let s = stats(server.addr).await;
    assert!(s["presence_bytes"].as_u64() <= Some(400 << 10), "{s}");
    assert!(s["presence_refused"].as_u64() >= Some(2), "{s}");
    drop((a, b));
    let mut freed = false;
    for _ in 0..50 {
        if stats(server.addr).await["presence_bytes"].as_u64() == Some(0) {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "presence bytes given back");
    server.stop().await;
}

#[tokio::test]
async fn admin_input_is_validated_before_any_path_is_built() {
    let server = TestServer::start().await;
    // Served once the plugins are stored.
    let mut c = server.client("1").await;
    assert_eq!(
        c.join("1", "room:lobby", json!({})).await[4]["status"],
        "ok"
    );
    let data = server.data_dir().display().to_string();
    // A component planted outside the store, as a stored version is laid out.
    let outside = std::env::temp_dir().join(format!("cinder-evil-{}", std::process::id()));
    let stored = server.data_dir().join("plugins/chat/versions");
    let version = std::fs::read_dir(&stored)
        .expect("chat is stored")
        .next()
        .expect("a version")
        .expect("entry")
        .path();
    std::fs::create_dir_all(&outside).expect("tmp");
    for file in ["plugin.wasm", "cinder.toml", "record.toml"] {
        std::fs::copy(version.join(file), outside.join(file)).expect("copy");
    }
    let evil = outside.display().to_string();
    let attempts: Vec<(&str, String, Option<String>)> = vec![
        (
            "POST",
            "/api/plugins/chat/activate".into(),
            Some(json!({"version": evil}).to_string()),
        ),
        (
            "POST",
            "/api/plugins/chat/activate".into(),
            Some(json!({"version": "../../counter/versions/1.0.0"}).to_string()),
        ),
        (
            "POST",
            "/api/plugins/chat/rollback".into(),
            Some(json!({"version": ".."}).to_string()),
        ),
        (
            "POST",
            "/api/plugins/..%2F..%2Fetc/activate".into(),
            Some(json!({"version": "1.0.0"}).to_string()),
        ),
        ("DELETE", "/api/plugins/chat/versions/..".into(), None),
        ("DELETE", "/api/plugins/chat/versions/%2e%2e".into(), None),
        ("DELETE", "/api/plugins/..".into(), None),
        ("DELETE", format!("/api/plugins/{}", "n".repeat(5000)), None),
    ];
    for (method, path, body) in attempts {
        let (status, answer) = admin(server.addr, method, &path, body.as_deref()).await;
        assert_eq!(status, 400, "{method} {path}: {answer}");
        // Refused for its form, whatever exists on disk, and never naming the store.
        let text = answer.to_string();
        assert!(!text.contains(&data), "{method} {path}: {text}");
    }
    // Nothing moved: chat still serves.
    assert_eq!(
        c.join("2", "room:lobby", json!({})).await[4]["status"],
        "ok"
    );
    std::fs::remove_dir_all(outside).expect("cleanup");
    server.stop().await;
}

/// A token signed with the test secret, with the given header and claims (as written:
/// a `Value` would round integers past u64).
fn token(header: &Value, claims: &str) -> String {
    use base64::Engine as _;
    let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
    let signing = format!("{}.{}", b64(&header.to_string()), b64(claims));
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(signing.as_bytes());
    let signature =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing}.{signature}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[tokio::test]
async fn tokens_not_yet_valid_with_unknown_crit_or_endless_are_refused_and_big_ids_stay_exact() {
    let server = TestServer::start().await;
    let hs = json!({"alg": "HS256", "typ": "JWT"});
    let refused = [
        (
            hs.clone(),
            json!({"user_id": 1, "exp": now() + 60, "nbf": now() + 86_400}),
        ),
        (
            json!({"alg": "HS256", "crit": ["exp"], "exp": 1}),
            json!({"user_id": 1, "exp": now() + 60}),
        ),
        (hs.clone(), json!({"user_id": 1, "exp": u64::MAX})),
        (hs.clone(), json!({"user_id": 1.5, "exp": now() + 60})),
    ];
    for (header, claims) in refused {
        let t = token(&header, &claims.to_string());
        let url = server.ws_url(&format!("vsn=2.0.0&token={t}"));
        assert_eq!(
            Client::connect(&url).await.err(),
            Some(403),
            "{header} {claims}"
        );
    }
    // Two ids past u64::MAX are two users: a disconnect of one leaves the other.
    let big = |id: &str| token(&hs, &format!(r#"{{"user_id":{id},"exp":{}}}"#, now() + 60));
    let (one, two) = ("18446744073709551616", "18446744073709551617");
    let mut first = Client::connect(&server.ws_url(&format!("vsn=2.0.0&token={}", big(one))))
        .await
        .expect("connects");
    let mut second = Client::connect(&server.ws_url(&format!("vsn=2.0.0&token={}", big(two))))
        .await
        .expect("connects");
    let body = format!(r#"{{"topic":"user_socket:{one}","event":"disconnect","payload":{{}}}}"#);
    assert!(
        http_post(server.addr, "/api/broadcast", Some(ADMIN), &body)
            .await
            .starts_with("HTTP/1.1 202")
    );
    assert_eq!(first.closed().await.map(|f| u16::from(f.code)), Some(1001));
    second
        .send(json!([null, "1", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        second.recv().await,
        reply(None, "1", "phoenix", "ok", json!({}))
    );
    server.stop().await;
}

#[tokio::test]
async fn manifests_with_empty_events_or_overlong_names_are_bad_requests_without_paths() {
    let server = TestServer::start().await;
    let wasm = test_plugin("hostile").1;
    let long = "n".repeat(5000);
    for manifest in [
        "name = \"x\"\nversion = \"0.1.0\"\ntopics = [\"x:*\"]\nintercept = [\"\"]\n".to_owned(),
        format!("name = \"{long}\"\nversion = \"0.1.0\"\ntopics = [\"x:*\"]\n"),
        format!("name = \"x\"\nversion = \"0.1.0+{long}\"\ntopics = [\"x:*\"]\n"),
    ] {
        let (status, answer) = upload(server.addr, &manifest, &wasm, true).await;
        assert_eq!(status, 400, "{answer}");
        let data = server.data_dir().display().to_string();
        assert!(!answer.to_string().contains(&data), "{answer}");
    }
    server.stop().await;
}

#[tokio::test]
async fn frames_with_extra_elements_or_nested_past_the_limit_are_malformed() {
    let server = TestServer::start().await;
    let limit = cinder::protocol::MAX_JSON_DEPTH;
    let deepest = format!("{}{}", "[".repeat(limit), "]".repeat(limit));
    let mut c = server.client("1").await;
    c.send_text(&format!(r#"[null,"1","phoenix","heartbeat",{deepest}]"#))
        .await;
    assert_eq!(
        c.recv().await[4]["status"],
        "ok",
        "the deepest payload is accepted"
    );
    let too_deep = format!("{}{}", "[".repeat(limit + 1), "]".repeat(limit + 1));
    c.send_text(&format!(r#"[null,"2","phoenix","heartbeat",{too_deep}]"#))
        .await;
    let frame = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1007, "{frame:?}");
    let mut c = server.client("1").await;
    c.send_text(r#"[null,"1","phoenix","heartbeat",{},"extra"]"#)
        .await;
    let frame = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1007, "{frame:?}");
    // A plugin's JSON is held to the same depth.
    let mut p = member(&server, "1", "hostile:deep").await;
    let r = call(
        &mut p,
        "hostile:deep",
        "2",
        "nested",
        json!({"depth": limit}),
    )
    .await;
    assert_eq!(r[4]["response"], "ok", "{r}");
    let r = call(
        &mut p,
        "hostile:deep",
        "3",
        "nested",
        json!({"depth": limit + 1}),
    )
    .await;
    assert!(
        r[4]["response"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&limit.to_string())),
        "{r}"
    );
    assert!(stats(server.addr).await["malformed_frames"].as_u64() >= Some(2));
    server.stop().await;
}

#[tokio::test]
async fn a_binary_reply_to_a_v1_client_becomes_an_error_reply() {
    let server = TestServer::start().await;
    let url = server.ws_url(&format!("vsn=1.0.0&token={}", server.token("1")));
    let mut c = Client::connect(&url).await.expect("connects");
    c.send(json!({"topic": "hostile:bin", "event": "phx_join", "payload": {}, "ref": "1"}))
        .await;
    assert_eq!(c.recv().await["payload"]["status"], "ok");
    c.send(json!({"topic": "hostile:bin", "event": "binary-reply", "payload": {}, "ref": "2"}))
        .await;
    let r = c.recv().await;
    assert_eq!(r["ref"], "2", "{r}");
    assert_eq!(
        r["payload"],
        json!({"status": "error", "response": {"reason": "binary payloads need the V2 serializer"}})
    );
    assert_eq!(stats(server.addr).await["undeliverable"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_socket_cut_for_its_rate_gets_its_queued_replies_and_the_close_code() {
    let server = TestServer::start_with(|c| {
        c.limits.messages_per_sec = 1;
        c.limits.message_burst = 10;
    })
    .await;
    let mut c = server.client("1").await;
    // Ten joins at once, then a flood, without reading anything.
    for i in 0..10 {
        c.send(json!([
            format!("{i}"),
            format!("{i}"),
            format!("room:lobby-{i}"),
            "phx_join",
            {}
        ]))
        .await;
    }
    for i in 0..400 {
        c.send(json!([null, format!("h{i}"), "phoenix", "heartbeat", {"pad": "x".repeat(100)}]))
            .await;
    }
    // Read only once the server has cut the socket: what it left unread would have reset
    // the connection, and the client would have lost the replies and the close frame.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut joined = 0;
    let close = loop {
        match c.next_close_or_frame().await {
            Some(frame) => break frame,
            None => joined += 1,
        }
    };
    assert!(joined >= 10, "only {joined} frames before the close");
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_frame_over_the_limit_is_answered_with_1009_even_while_the_client_still_sends() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start().await;
    let url = server.ws_url(&format!("vsn=2.0.0&token={}", server.token("1")));
    let (ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connects");
    let (mut tx, mut rx) = ws.split();
    // The whole frame is sent before anything is read: a server that closes on its header
    // and leaves the rest unread resets the connection under the close frame.
    let _ = tokio::time::timeout(WAIT, tx.send(Message::text("x".repeat(64 << 20)))).await;
    let code = loop {
        match tokio::time::timeout(WAIT, rx.next())
            .await
            .expect("an answer")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1009));
    assert!(stats(server.addr).await["oversized_frames"].as_u64() >= Some(1));
    server.stop().await;
}

#[tokio::test]
async fn a_client_close_is_answered_with_the_same_code() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let server = TestServer::start().await;
    let url = server.ws_url(&format!("vsn=2.0.0&token={}", server.token("1")));
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connects");
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .expect("close sent");
    let answer = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("an answer");
    match answer {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1000),
        other => panic!("no close answer: {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn every_limit_hit_is_counted() {
    let server = TestServer::start_with(|c| {
        c.limits.max_channels_per_socket = 1;
        c.limits.max_frame_bytes = 4096;
        c.limits.idle_timeout_secs = 1;
    })
    .await;
    // The channel cap.
    let mut c = member(&server, "1", "hostile:a").await;
    assert_eq!(
        c.join("2", "hostile:b", json!({})).await[4]["response"],
        json!({"reason": "too many channels joined"})
    );
    // A per-call refusal: more than a call may push.
    let r = call(
        &mut c,
        "hostile:a",
        "3",
        "burst",
        json!({"n": 2000, "bytes": 1}),
    )
    .await;
    assert_eq!(r[4]["response"]["sent"], 1024, "{r}");
    // An oversized frame.
    let mut big = server.client("2").await;
    big.send_text(&"x".repeat(8192)).await;
    assert_eq!(big.closed().await.map(|f| u16::from(f.code)), Some(1009));
    // An idle timeout.
    let mut idle = server.client("3").await;
    assert_eq!(idle.closed().await.map(|f| u16::from(f.code)), Some(1001));
    let s = stats(server.addr).await;
    for counter in [
        "channels_refused",
        "call_refusals",
        "oversized_frames",
        "idle_timeouts",
    ] {
        assert!(s[counter].as_u64() >= Some(1), "{counter}: {s}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_busy_room_answers_joins_and_activations_in_bounded_time() {
    let server = TestServer::start_with(|c| {
        c.limits.plugin_call_ms = 50;
        c.limits.messages_per_sec = 10_000;
        c.limits.message_burst = 10_000;
    })
    .await;
    let mut busy = member(&server, "1", "hostile:busy").await;
    // Eight seconds of legal work queued in the room's mailbox.
    for i in 0..400 {
        busy.send(json!(["1", format!("w{i}"), "hostile:busy", "work", {"ms": 20}]))
            .await;
    }
    // Until the socket has handed them to the room.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wait = cinder::channel::ROOM_WAIT + Duration::from_secs(2);
    let addr = server.addr;
    let activating = tokio::spawn(async move {
        let (manifest, wasm) = test_plugin("hostile");
        let manifest = manifest.replace("version = \"0.1.0\"", "version = \"0.2.0\"");
        upload(addr, &manifest, &wasm, true).await
    });
    // A join behind the queue is answered, not left hanging with its socket.
    let mut late = server.client("2").await;
    let started = std::time::Instant::now();
    late.send(json!(["1", "1", "hostile:busy", "phx_join", {}]))
        .await;
    let joined = late.recv_within(wait).await;
    assert_eq!(
        joined[4]["response"],
        json!({"reason": "room busy"}),
        "{joined}"
    );
    assert!(started.elapsed() < wait);
    late.send(json!([null, "h", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        late.recv().await,
        reply(None, "h", "phoenix", "ok", json!({}))
    );
    // The activation answers too, with the busy room still to move.
    let (status, answer) = tokio::time::timeout(wait, activating)
        .await
        .expect("the activation is answered")
        .expect("upload task");
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        answer["activation"]["pending"],
        json!(["hostile:busy"]),
        "{answer}"
    );
    // Another room of the same plugin was never held up.
    let mut calm = member(&server, "3", "hostile:calm").await;
    assert_eq!(
        call(&mut calm, "hostile:calm", "2", "counters", json!({})).await[4]["status"],
        "ok"
    );
    assert!(stats(server.addr).await["room_busy"].as_u64() >= Some(1));
    server.stop().await;
}
