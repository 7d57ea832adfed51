//! What an operator reads: `GET /metrics` (who may read it, that Prometheus's own
//! `promtool` accepts it, that it counts what clients and plugins did, on one node and on
//! a cluster member), the admin API's
//! live rooms and presence, `--log-format json` with each plugin call's span, and the
//! development token endpoint staying off on a server given its secrets.

use std::process::Stdio;
use std::time::Duration;

use cinder_tests::cluster::{member, node};
use cinder_tests::{ADMIN, RedisServer, ServerProcess, TestServer, admin, admin_as, http_get};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

/// The metrics text, read with `token`.
async fn scrape(server: &TestServer, token: &str) -> (u16, String) {
    let (status, body) = admin_as(server.addr, token, "GET", "/metrics", None).await;
    let text = match body {
        Value::String(text) => text,
        other => other.to_string(),
    };
    (status, text)
}

/// The value of the sample `series` (name and labels as the text writes them).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `promtool check metrics` on `text`: its exit status and what it said. `$PROMTOOL`
/// names the binary (`make test` extracts it from Debian's `prometheus` package).
async fn promtool(text: &str) -> (bool, String) {
    let bin = std::env::var("PROMTOOL")
        .expect("PROMTOOL must name promtool (make test sets it: `make promtool` extracts it)");
    let mut child = tokio::process::Command::new(bin)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("written");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test]
async fn metrics_need_a_token_and_promtool_accepts_what_they_count() {
    let server = TestServer::start_with(|c| {
        c.metrics_token = Some("metrics-token-for-prometheus".into());
    })
    .await;
    // No token, a wrong one: refused, and nothing is counted out.
    let answer = http_get(server.addr, "/metrics").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.to_lowercase().contains("www-authenticate: bearer"),
        "{answer}"
    );
    assert!(!answer.contains("cinder_"), "{answer}");
    let (status, _) = scrape(&server, "metrics-token-for-prometheu").await;
    assert_eq!(status, 401);
    // The metrics token reads /metrics and nothing else.
    let (status, _) = admin_as(
        server.addr,
        "metrics-token-for-prometheus",
        "GET",
        "/api/stats",
        None,
    )
    .await;
    assert_eq!(status, 401);

    // Traffic: a chat member talks, a counter counts, a misbehaving plugin fails, traps
    // and overruns its time.
    let mut chat = server.client("alice").await;
    chat.join("1", "room:lobby", json!({})).await;
    for i in 0..3 {
        chat.send(json!(["1", format!("m{i}"), "room:lobby", "new_message", {"body": "hi"}]))
            .await;
    }
    let mut bad = server.client("mallory").await;
    bad.join("1", "bad:x", json!({})).await;
    bad.send(json!(["1", "e", "bad:x", "error", {}])).await;
    let mut bad = server.client("mallory").await;
    bad.join("1", "bad:y", json!({})).await;
    bad.send(json!(["1", "l", "bad:y", "loop", {}])).await;
    let mut bad2 = server.client("mallory").await;
    bad2.join("1", "bad:z", json!({})).await;
    bad2.send(json!(["1", "p", "bad:z", "panic", {}])).await;
    let refused = server
        .client("eve")
        .await
        .join("1", "room:secret", json!({}))
        .await;
    assert_eq!(refused[4]["status"], "error", "{refused}");

    // Counted once the calls are done.
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let (status, body) = scrape(&server, "metrics-token-for-prometheus").await;
        assert_eq!(status, 200, "{body}");
        text = body;
        let done = sample(
            &text,
            "cinder_plugin_traps_total{cause=\"trap\",plugin=\"misbehave\",version=\"0.1.0\"}",
        )
        .is_some_and(|n| n >= 1.0)
            && sample(
                &text,
                "cinder_plugin_deadline_hits_total{plugin=\"misbehave\",version=\"0.1.0\"}",
            )
            .is_some_and(|n| n >= 1.0)
            && sample(
                &text,
                "cinder_plugin_calls_total{export=\"handle-in\",plugin=\"chat\",version=\"0.1.0\"}",
            )
            .is_some_and(|n| n >= 3.0);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_least = |series: &str, n: f64| {
        let got = sample(&text, series);
        assert!(
            got.is_some_and(|v| v >= n),
            "{series} is {got:?}, want at least {n} in\n{text}"
        );
    };
    at_least(
        "cinder_plugin_calls_total{export=\"handle-in\",plugin=\"chat\",version=\"0.1.0\"}",
        3.0,
    );
    at_least(
        "cinder_plugin_calls_total{export=\"join\",plugin=\"chat\",version=\"0.1.0\"}",
        2.0,
    );
    at_least(
        "cinder_plugin_call_duration_seconds_count{export=\"handle-in\",plugin=\"chat\",version=\"0.1.0\"}",
        3.0,
    );
    at_least(
        "cinder_plugin_call_duration_seconds_bucket{export=\"handle-in\",plugin=\"chat\",version=\"0.1.0\",le=\"+Inf\"}",
        3.0,
    );
    at_least(
        "cinder_plugin_errors_total{plugin=\"misbehave\",version=\"0.1.0\"}",
        1.0,
    );
    at_least(
        "cinder_plugin_traps_total{cause=\"deadline\",plugin=\"misbehave\",version=\"0.1.0\"}",
        1.0,
    );
    at_least(
        "cinder_plugin_deadline_hits_total{plugin=\"misbehave\",version=\"0.1.0\"}",
        1.0,
    );
    at_least(
        "cinder_plugin_traps_total{cause=\"trap\",plugin=\"misbehave\",version=\"0.1.0\"}",
        1.0,
    );
    at_least(
        "cinder_plugin_instantiations_total{plugin=\"misbehave\",version=\"0.1.0\"}",
        3.0,
    );
    at_least(
        "cinder_sockets{serializer=\"2.0.0\",transport=\"websocket\"}",
        4.0,
    );
    at_least("cinder_channels", 1.0);
    at_least("cinder_joins_total{result=\"ok\"}", 4.0);
    at_least("cinder_joins_total{result=\"refused\"}", 1.0);
    at_least("cinder_messages_in_total", 10.0);
    at_least("cinder_message_bytes_in_total", 100.0);
    at_least("cinder_deliveries_out_total", 10.0);
    at_least("cinder_delivery_bytes_out_total", 100.0);
    at_least("cinder_room_crashes_total", 2.0);
    at_least("cinder_channel_errors_total", 1.0);
    at_least(
        "cinder_plugin_rooms{plugin=\"chat\",version=\"0.1.0\"}",
        1.0,
    );
    assert_eq!(
        sample(&text, "cinder_rate_limited_total"),
        Some(0.0),
        "{text}"
    );
    // No topic is ever a label: clients choose them.
    assert!(
        !text.contains("room:lobby") && !text.contains("bad:x"),
        "{text}"
    );

    let (ok, said) = promtool(&text).await;
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
    // The admin token reads it too.
    assert_eq!(scrape(&server, ADMIN).await.0, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_members_metrics_show_its_link_what_crossed_and_the_presence_sync() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    let _here_a = member(&a, "1", "presence:lobby").await;
    // The topic opens on b after a holds an entry: b waits for a's full sync.
    let _here_b = member(&b, "2", "presence:lobby").await;
    let mut talk = member(&a, "3", "room:lobby").await;
    let mut hear = member(&b, "4", "room:lobby").await;
    talk.send(json!(["1", "m", "room:lobby", "new_message", {"body": "across"}]))
        .await;
    loop {
        let frame = hear.recv().await;
        if frame[3] == "new_message" {
            break;
        }
    }
    let (_, on_a) = scrape(&a, ADMIN).await;
    let (_, on_b) = scrape(&b, ADMIN).await;
    let at_least = |text: &str, series: &str, n: f64| {
        let got = sample(text, series);
        assert!(
            got.is_some_and(|v| v >= n),
            "{series} is {got:?}, want at least {n} in\n{text}"
        );
    };
    for text in [&on_a, &on_b] {
        assert_eq!(sample(text, "cinder_cluster_redis_up"), Some(1.0), "{text}");
        assert_eq!(sample(text, "cinder_cluster_members"), Some(2.0), "{text}");
        let (ok, said) = promtool(text).await;
        assert!(
            ok && said.trim().is_empty(),
            "promtool check metrics: {said}\n{text}"
        );
    }
    at_least(&on_a, "cinder_cluster_published_total", 1.0);
    at_least(&on_b, "cinder_cluster_received_total", 1.0);
    at_least(&on_b, "cinder_presence_sync_seconds_count", 1.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_admin_api_lists_live_rooms_and_a_topics_presence() {
    let server = TestServer::start().await;
    let mut a = server.client("ann").await;
    a.join("1", "room:lobby", json!({})).await;
    let mut b = server.client("ben").await;
    b.join("1", "room:lobby", json!({})).await;
    b.join("2", "presence:lobby", json!({})).await;
    let (status, rooms) = admin(server.addr, "GET", "/api/rooms", None).await;
    assert_eq!(status, 200, "{rooms}");
    assert_eq!(rooms["total"], 2, "{rooms}");
    // Most channels first.
    assert_eq!(
        rooms["rooms"][0],
        json!({"topic": "room:lobby", "plugin": "chat", "version": "0.1.0", "members": 2, "here": true})
    );
    assert_eq!(rooms["rooms"][1]["topic"], "presence:lobby");
    let (_, only) = admin(server.addr, "GET", "/api/rooms?plugin=presence", None).await;
    assert_eq!(only["total"], 1, "{only}");

    let (status, here) = admin(
        server.addr,
        "GET",
        "/api/presence?topic=presence:lobby",
        None,
    )
    .await;
    assert_eq!(status, 200, "{here}");
    assert_eq!(
        here["ben"]["metas"].as_array().map(Vec::len),
        Some(1),
        "{here}"
    );
    let (_, nobody) = admin(
        server.addr,
        "GET",
        "/api/presence?topic=presence:nowhere",
        None,
    )
    .await;
    assert_eq!(nobody, json!({}));
    let (status, _) = admin(server.addr, "GET", "/api/presence", None).await;
    assert_eq!(status, 400);
    // Behind the admin token, like the rest of the API.
    let (status, _) = admin_as(server.addr, "nope", "GET", "/api/rooms", None).await;
    assert_eq!(status, 401);

    // A member leaving is seen.
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, rooms) = admin(server.addr, "GET", "/api/rooms?plugin=chat", None).await;
        if rooms["rooms"][0]["members"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rooms}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn development_tokens_are_off_on_a_server_given_its_secret() {
    let server = TestServer::start().await;
    let answer = http_get(server.addr, "/demo/token?user=alice").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("development tokens are off"), "{answer}");
    // The pages are there, with a policy that runs only the server's own scripts.
    let demo = http_get(server.addr, "/demo").await;
    assert!(demo.starts_with("HTTP/1.1 200"), "{demo}");
    assert!(demo.contains("data-test=\"message-input\""), "{demo}");
    assert!(
        demo.to_lowercase()
            .contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{demo}"
    );
    assert!(
        http_get(server.addr, "/admin")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        http_get(server.addr, "/assets/phoenix.min.js")
            .await
            .contains("var Phoenix=")
    );
    assert!(
        http_get(server.addr, "/assets/../Cargo.toml")
            .await
            .starts_with("HTTP/1.1 404")
    );
    server.stop().await;
}

/// The newest JSON log record of `server` holding `needle`, within 5 s.
async fn json_record(server: &ServerProcess, needle: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let line = loop {
        if let Some(line) = server.logged(needle).pop() {
            break line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no record with {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    serde_json::from_str(&line).expect("each record is one JSON object")
}

#[tokio::test]
async fn json_logs_carry_the_plugin_calls_span() {
    let server = ServerProcess::start(1024, &["--log-format", "json"]).await;
    let url = format!(
        "ws://{}/socket/websocket?vsn=2.0.0&token={}",
        server.addr,
        cinder::auth::mint(cinder_tests::SECRET, "joe", 600).expect("mint")
    );
    let mut c = cinder_tests::Client::connect(&url).await.expect("connects");
    c.join("1", "bad:json", json!({})).await;
    c.send(json!(["1", "e", "bad:json", "error", {}])).await;
    c.recv().await;
    let record = json_record(&server, "plugin call returned an error").await;
    assert_eq!(record["level"], "WARN", "{record}");
    assert_eq!(
        record["message"], "plugin call returned an error",
        "{record}"
    );
    assert_eq!(record["error"], "asked to fail", "{record}");
    assert_eq!(
        record["span"],
        json!({"name": "plugin_call", "plugin": "misbehave", "version": "0.1.0", "topic": "bad:json", "export": "handle-in"}),
        "{record}"
    );
    // A check of what a call returned failing is the call's error too, logged in its span.
    c.join("2", "bad:assigns", json!({})).await;
    c.send(json!(["2", "a", "bad:assigns", "assign", {"bytes": 100_000}]))
        .await;
    c.recv().await;
    let record = json_record(&server, "assigns of").await;
    assert_eq!(
        record["message"], "plugin call returned an error",
        "{record}"
    );
    assert_eq!(record["span"]["topic"], "bad:assigns", "{record}");
    assert_eq!(record["span"]["export"], "handle-in", "{record}");
    // Every line of the log is a JSON object.
    for line in server.logged("") {
        serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    server.kill().await;
}
