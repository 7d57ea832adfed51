//! Presence through a real server at the frame level: the shapes on the wire, and entries
//! that must not outlive their channel.

use cinder_tests::{TestServer, reply};
use serde_json::{Value, json};

fn keys(state: &Value) -> Vec<String> {
    let mut keys: Vec<String> = state
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_tracking_channel_gets_presence_state_and_the_topic_a_presence_diff() {
    let server = TestServer::start().await;
    let mut a = server.client("a").await;
    assert_eq!(
        a.join("1", "bad:p", json!({"track": "alice"})).await[4]["status"],
        "ok"
    );
    let state = a.recv().await;
    assert_eq!(
        (&state[0], &state[1], &state[3]),
        (&json!("1"), &Value::Null, &json!("presence_state"))
    );
    assert_eq!(keys(&state[4]), ["alice"]);
    let alice_ref = state[4]["alice"]["metas"][0]["phx_ref"].clone();
    assert!(alice_ref.is_string());

    let mut b = server.client("b").await;
    b.join("1", "bad:p", json!({"track": "bob"})).await;
    assert_eq!(keys(&b.recv().await[4]), ["alice", "bob"]);
    let diff = a.recv().await;
    assert_eq!(
        (&diff[0], &diff[3]),
        (&Value::Null, &json!("presence_diff"))
    );
    assert_eq!(keys(&diff[4]["joins"]), ["bob"]);
    assert_eq!(diff[4]["leaves"], json!({}));

    b.send(json!(["1", "2", "bad:p", "phx_leave", {}])).await;
    let diff = a.recv().await;
    assert_eq!(diff[3], "presence_diff");
    assert_eq!(keys(&diff[4]["leaves"]), ["bob"]);
    assert_eq!(diff[4]["joins"], json!({}));
    server.stop().await;
}

#[tokio::test]
async fn a_join_refused_after_tracking_leaves_no_entry() {
    let server = TestServer::start().await;
    let mut observer = server.client("o").await;
    observer
        .join("1", "bad:ghosts", json!({"track": "observer"}))
        .await;
    observer.recv().await;
    let mut ghost = server.client("g").await;
    let refused = ghost
        .join("1", "bad:ghosts", json!({"track": "ghost", "refuse": true}))
        .await;
    assert_eq!(
        refused,
        reply(
            Some("1"),
            "1",
            "bad:ghosts",
            "error",
            json!({"reason": "refused after tracking"})
        )
    );
    let mut late = server.client("l").await;
    late.join("1", "bad:ghosts", json!({"track": "late"})).await;
    assert_eq!(keys(&late.recv().await[4]), ["late", "observer"]);
    server.stop().await;
}
