//! Plugin administration through the real server: uploads validated and refused with the
//! reason, versions listed, activated, rolled back and deleted, and live rooms moved to a
//! new version between two messages (the counter's state handed over) or left on theirs
//! when the new version cannot take the state.

use cinder_tests::{
    Client, TestServer, admin, bad_components, reply, stats, test_plugins_dir, test_uploads_dir,
    upload,
};
use serde_json::{Value, json};

fn read(path: std::path::PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make plugins`)", path.display()))
}

fn text(path: std::path::PathBuf) -> String {
    String::from_utf8(read(path)).expect("UTF-8 manifest")
}

fn counter_v2() -> (String, Vec<u8>) {
    let dir = test_uploads_dir();
    (
        text(dir.join("counter-2.0.0.toml")),
        read(dir.join("counter-2.0.0.wasm")),
    )
}

/// Joins `topic` and returns the client with the join reply's response.
async fn joined(server: &TestServer, topic: &str) -> (Client, Value) {
    let mut c = server.client("1").await;
    let r = c.join("1", topic, json!({})).await;
    assert_eq!(r[4]["status"], "ok", "join {topic}: {r}");
    (c, r[4]["response"].clone())
}

/// Sends `inc` and returns the reply's response, skipping the `count` broadcast.
async fn inc(c: &mut Client, topic: &str, msg_ref: &str) -> Value {
    c.send(json!(["1", msg_ref, topic, "inc", {}])).await;
    loop {
        let frame = c.recv().await;
        if frame[3] == "phx_reply" {
            assert_eq!(frame[1], msg_ref, "{frame}");
            assert_eq!(frame[4]["status"], "ok", "{frame}");
            return frame[4]["response"].clone();
        }
        assert_eq!(frame[3], "count", "{frame}");
    }
}

fn plugin<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("{name} listed in {list}"))
}

#[tokio::test]
async fn every_bad_upload_is_refused_with_its_reason_and_the_running_version_keeps_serving() {
    let server = TestServer::start_with(|c| c.limits.max_upload_bytes = 2 << 20).await;
    let addr = server.addr;
    let (mut c, _) = joined(&server, "counter:bad").await;
    assert_eq!(inc(&mut c, "counter:bad", "2").await, json!({"count": 1}));

    let manifest = |version: &str| {
        format!("name = \"counter\"\nversion = \"{version}\"\ntopics = [\"counter:*\"]\n")
    };
    for (what, wasm, words) in bad_components() {
        let (status, body) = upload(addr, &manifest("9.0.0"), &wasm, true).await;
        assert_eq!(status, 422, "{what}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(words),
            "{what}: {error:?} should say {words:?}"
        );
        assert!(
            error.contains("counter"),
            "{what}: {error:?} names the plugin"
        );
    }

    let (v2_manifest, v2) = counter_v2();
    let chat = read(test_plugins_dir().join("chat.wasm"));
    let refusals: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        ("bad TOML", "name = ".into(), v2.clone(), 400, "manifest"),
        ("not semver", manifest("two"), v2.clone(), 400, "not semver"),
        (
            "unknown field",
            format!("{}colour = 1\n", manifest("9.0.0")),
            v2.clone(),
            400,
            "colour",
        ),
        (
            "a pattern of another plugin",
            "name = \"thief\"\nversion = \"1.0.0\"\ntopics = [\"room:lobby\"]\n".into(),
            chat.clone(),
            409,
            "overlaps \"room:*\" of plugin chat",
        ),
        (
            "a stored version with other bytes",
            manifest("1.0.0"),
            v2.clone(),
            409,
            "immutable",
        ),
        (
            "over the size cap",
            manifest("9.0.0"),
            vec![0; 3 << 20],
            413,
            "max_upload_bytes",
        ),
    ];
    for (what, manifest, wasm, expected, words) in refusals {
        let (status, body) = upload(addr, &manifest, &wasm, true).await;
        assert_eq!(status, expected, "{what}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(words),
            "{what}: {error:?} should say {words:?}"
        );
    }
    let (status, body) = admin(addr, "POST", "/api/plugins", Some("{}")).await;
    assert_eq!(status, 400, "not multipart: {body}");

    // Nothing changed: the room counts on under 1.0.0, the only stored version.
    assert_eq!(inc(&mut c, "counter:bad", "3").await, json!({"count": 2}));
    let (status, list) = admin(addr, "GET", "/api/plugins", None).await;
    assert_eq!(status, 200);
    let counter = plugin(&list, "counter");
    assert_eq!(counter["active"], "1.0.0");
    assert_eq!(
        counter["versions"].as_array().map(Vec::len),
        Some(1),
        "{counter}"
    );
    assert!(
        list.as_array()
            .is_some_and(|a| a.iter().all(|p| p["name"] != "thief"))
    );

    // And the good upload still goes through afterwards.
    let (status, body) = upload(addr, &v2_manifest, &v2, true).await;
    assert_eq!(status, 201, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn activating_moves_live_rooms_with_their_state_and_rollback_goes_back() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let (mut a, join) = joined(&server, "counter:a").await;
    assert_eq!(join, json!({"count": 0}));
    let (mut b, _) = joined(&server, "counter:b").await;
    let (mut chat, _) = joined(&server, "room:lobby").await;
    for i in 1..=3 {
        assert_eq!(
            inc(&mut a, "counter:a", &format!("a{i}")).await,
            json!({"count": i})
        );
    }
    assert_eq!(inc(&mut b, "counter:b", "b1").await, json!({"count": 1}));

    // Stored but not active: nothing moves.
    let (v2_manifest, v2) = counter_v2();
    let (status, body) = upload(addr, &v2_manifest, &v2, false).await;
    assert_eq!(
        (status, body["activation"].clone()),
        (201, Value::Null),
        "{body}"
    );
    assert_eq!(inc(&mut a, "counter:a", "a4").await, json!({"count": 4}));

    let (status, activation) = admin(
        addr,
        "POST",
        "/api/plugins/counter/activate",
        Some(r#"{"version":"2.0.0"}"#),
    )
    .await;
    assert_eq!(status, 200, "{activation}");
    assert_eq!(activation["previous"], "1.0.0");
    assert_eq!(
        (activation["rooms"].clone(), activation["swapped"].clone()),
        (json!(2), json!(2)),
        "{activation}"
    );
    assert_eq!(activation["failed"], json!([]));
    assert!(
        activation["pause_us"]["p99"].as_u64().is_some(),
        "{activation}"
    );

    // Same sockets, same channels, the count carried over, the new behaviour visible.
    assert_eq!(
        inc(&mut a, "counter:a", "a5").await,
        json!({"count": 5, "version": "2.0.0"})
    );
    assert_eq!(
        inc(&mut b, "counter:b", "b2").await,
        json!({"count": 2, "version": "2.0.0"})
    );
    a.send(json!(["1", "a6", "counter:a", "inc", {"by": 10}]))
        .await;
    let mut r = a.recv().await;
    if r[3] == "count" {
        r = a.recv().await;
    }
    assert_eq!(
        r,
        reply(
            Some("1"),
            "a6",
            "counter:a",
            "ok",
            json!({"count": 15, "version": "2.0.0"})
        )
    );
    // A room of another plugin was not touched.
    chat.send(json!(["1", "c1", "room:lobby", "new_message", {"body": "still here"}]))
        .await;
    assert_eq!(chat.recv().await[3], "new_message");

    let (status, rolled) = admin(addr, "POST", "/api/plugins/counter/rollback", None).await;
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(
        (rolled["version"].clone(), rolled["previous"].clone()),
        (json!("1.0.0"), json!("2.0.0"))
    );
    assert_eq!(inc(&mut a, "counter:a", "a7").await, json!({"count": 16}));

    // Nothing to roll back to now; the active version cannot be deleted; 2.0.0 can.
    let (status, body) = admin(addr, "POST", "/api/plugins/counter/rollback", None).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = admin(addr, "DELETE", "/api/plugins/counter/versions/1.0.0", None).await;
    assert_eq!(status, 409);
    let (status, _) = admin(addr, "DELETE", "/api/plugins/counter/versions/2.0.0", None).await;
    assert_eq!(status, 204);
    let (status, body) = admin(
        addr,
        "POST",
        "/api/plugins/counter/activate",
        Some(r#"{"version":"2.0.0"}"#),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = admin(addr, "DELETE", "/api/plugins/counter", None).await;
    assert_eq!(status, 409, "live rooms");
    let s = stats(addr).await;
    assert_eq!(
        (s["room_swaps"].clone(), s["room_swap_failures"].clone()),
        (json!(4), json!(0))
    );
    server.stop().await;
}

#[tokio::test]
async fn a_version_that_refuses_the_state_leaves_the_room_on_the_running_version() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let (mut a, _) = joined(&server, "counter:keep").await;
    assert_eq!(inc(&mut a, "counter:keep", "1").await, json!({"count": 1}));
    // The misbehave plugin, uploaded as a counter version: its restore refuses any state.
    let misbehave = read(test_plugins_dir().join("misbehave.wasm"));
    let manifest = "name = \"counter\"\nversion = \"3.0.0\"\ntopics = [\"counter:*\"]\n";
    let (status, body) = upload(addr, manifest, &misbehave, true).await;
    assert_eq!(status, 201, "{body}");
    let activation = &body["activation"];
    assert_eq!(
        (activation["rooms"].clone(), activation["swapped"].clone()),
        (json!(1), json!(0)),
        "{body}"
    );
    let failed = &activation["failed"][0];
    assert_eq!(failed["topic"], "counter:keep");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("restore") && e.contains("misbehave refuses 8 bytes")),
        "{failed}"
    );
    // The live room stays on 1.0.0 with its count; a new room gets 3.0.0.
    assert_eq!(inc(&mut a, "counter:keep", "2").await, json!({"count": 2}));
    let (mut fresh, _) = joined(&server, "counter:new").await;
    fresh
        .send(json!(["1", "2", "counter:new", "count", {}]))
        .await;
    assert_eq!(
        fresh.recv().await[4]["response"],
        json!({"count": 1}),
        "misbehave's call counter"
    );
    assert_eq!(stats(addr).await["room_swap_failures"], 1);
    server.stop().await;
}

#[tokio::test]
async fn uploads_need_the_admin_token_and_unknown_plugins_are_404() {
    let server = TestServer::start().await;
    let r = cinder_tests::http_get(server.addr, "/api/plugins").await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    let (status, _) = admin(server.addr, "POST", "/api/plugins/nope/rollback", None).await;
    assert_eq!(status, 404);
    let (status, _) = admin(server.addr, "DELETE", "/api/plugins/nope", None).await;
    assert_eq!(status, 404);
    let (status, body) = admin(
        server.addr,
        "POST",
        "/api/plugins/counter/activate",
        Some("{}"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("must name the version")),
        "{body}"
    );
    let (status, body) = admin(
        server.addr,
        "POST",
        "/api/plugins/counter/activate",
        Some(r#"{"versoin": "1.0.0"}"#),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown field")),
        "{body}"
    );
    server.stop().await;
}
