//! Several nodes serving as one: in-process Cinder nodes sharing a real `redis-server`
//! this test starts on a free port. Broadcasts (plugin and API) and `disconnect` cross
//! nodes exactly once and in order; a node hears only the topics it has subscribers for;
//! a node keeps serving its own sockets while Redis is gone and comes back by itself; the
//! Redis PubSub adapter passes the suite every adapter passes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cinder::cluster::Link;
use cinder::pubsub::{PubSub, RedisPubSub, conformance};
use cinder::stats::Stats;
use cinder_tests::cluster::{inc, member, node, node_with, process_node, socket_to, until};
use cinder_tests::{ADMIN, Client, RedisServer, TestServer, WAIT, http_post, stats};
use serde_json::{Value, json};

/// A node that notices a gone member soon: it reads the members every 600 ms.
async fn watchful_node(redis: &RedisServer, id: &str) -> TestServer {
    node_with(redis, id, 3000).await
}

/// How many subscribers Redis has on `channel`.
async fn subscribers(redis: &RedisServer, channel: &str) -> usize {
    let reply = redis
        .command(&["PUBSUB", "NUMSUB", channel])
        .await
        .unwrap_or_default();
    // *2 $len channel :n
    reply
        .lines()
        .find_map(|l| l.strip_prefix(':'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The next `n` `new_message` bodies `c` gets.
async fn bodies(c: &mut Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let frame: Value = c.recv().await;
        if frame[3] == "new_message" {
            out.push(frame[4]["body"].as_str().unwrap_or_default().to_owned());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_broadcasts_cross_nodes_exactly_once_and_in_order() {
    let redis = RedisServer::start().await;
    let (a, b, c) = (
        node(&redis, "a").await,
        node(&redis, "b").await,
        node(&redis, "c").await,
    );
    let mut on_a = member(&a, "1", "room:lobby").await;
    let mut on_b = member(&b, "2", "room:lobby").await;
    let mut also_b = member(&b, "3", "room:lobby").await;
    // Node c has no member of the topic: it is not subscribed and hears nothing of it.
    let mut on_c = member(&c, "4", "room:lobby-2").await;
    assert_eq!(subscribers(&redis, "cinder:t:room:lobby").await, 2);

    let sent: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    for body in &sent {
        on_a.send(json!(["1", null, "room:lobby", "new_message", {"body": body}]))
            .await;
    }
    // Every member on every node gets each message once, in the order it was sent.
    assert_eq!(bodies(&mut on_a, 50).await, sent);
    assert_eq!(bodies(&mut on_b, 50).await, sent);
    assert_eq!(bodies(&mut also_b, 50).await, sent);
    on_b.silent_for(300).await;
    // The sender also has the chat's `ok` to each of its messages.
    on_a.only_replies_for(50).await;
    on_c.silent_for(50).await;
    assert_eq!(stats(c.addr).await["cluster_received"], 0);

    // And back: b's member speaks, a's hears it once.
    on_b.send(json!(["1", null, "room:lobby", "new_message", {"body": "from b"}]))
        .await;
    assert_eq!(bodies(&mut on_a, 1).await, ["from b"]);
    assert_eq!(bodies(&mut on_b, 1).await, ["from b"]);
    on_a.silent_for(300).await;

    // The members' view: every node lists all three.
    let cluster = &stats(a.addr).await["cluster"];
    assert_eq!(cluster["node"], "a");
    let ids: Vec<&str> = cluster["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(
        cluster["members"][1]["address"],
        b.addr.to_string(),
        "{cluster}"
    );

    // The last member on a node leaving drops the node's subscription.
    drop(on_a);
    until("a's subscription is dropped", || async {
        subscribers(&redis, "cinder:t:room:lobby").await == 1
    })
    .await;
    for s in [a, b, c] {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_broadcast_on_one_node_reaches_subscribers_on_another() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    let mut on_b = member(&b, "7", "room:lobby-news").await;
    let body =
        r#"{"topic":"room:lobby-news","event":"new_message","payload":{"body":"from the API"}}"#;
    assert!(
        http_post(a.addr, "/api/broadcast", Some(ADMIN), body)
            .await
            .starts_with("HTTP/1.1 202")
    );
    assert_eq!(
        on_b.recv().await,
        json!([null, null, "room:lobby-news", "new_message", {"body": "from the API"}])
    );
    on_b.silent_for(300).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_the_users_sockets_on_every_node() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    let mut tab_a = a.client("42").await;
    let mut tab_b = b.client("42").await;
    let mut other = member(&b, "7", "room:lobby").await;
    until("both nodes listen on user 42's socket id", || async {
        subscribers(&redis, "cinder:s:user_socket:42").await == 2
    })
    .await;
    let body = r#"{"topic":"user_socket:42","event":"disconnect","payload":{}}"#;
    assert!(
        http_post(a.addr, "/api/broadcast", Some(ADMIN), body)
            .await
            .starts_with("HTTP/1.1 202")
    );
    for tab in [&mut tab_a, &mut tab_b] {
        let frame = tab.closed().await.expect("a close frame");
        assert_eq!(
            (u16::from(frame.code), frame.reason.as_str()),
            (1001, "disconnected")
        );
    }
    other
        .send(json!(["1", null, "room:lobby", "new_message", {"body": "still here"}]))
        .await;
    assert_eq!(bodies(&mut other, 1).await, ["still here"]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_node_serves_its_own_sockets_and_comes_back_by_itself() {
    cinder_tests::capture_logs();
    let redis = RedisServer::start().await;
    let (a, b) = (
        node(&redis, "outage-a").await,
        node(&redis, "outage-b").await,
    );
    let mut on_a = member(&a, "1", "room:lobby").await;
    let mut on_b = member(&b, "2", "room:lobby").await;

    // Redis dies: each node keeps serving its own members.
    let port = redis.kill();
    until("a sees Redis down", || async {
        stats(a.addr).await["cluster"]["redis"] == "down"
    })
    .await;
    for i in 0..10 {
        on_a.send(json!(["1", null, "room:lobby", "new_message", {"body": format!("local {i}")}]))
            .await;
        assert_eq!(bodies(&mut on_a, 1).await, [format!("local {i}")]);
    }
    let after_outage = stats(a.addr).await;
    assert_eq!(after_outage["cluster"]["members"], json!([]));
    assert!(after_outage["cluster_outages"].as_u64() >= Some(1));
    assert!(after_outage["cluster_dropped"].as_u64() >= Some(10));
    // Said once, not once per message.
    let said = |what: &str| {
        cinder_tests::logged(what)
            .iter()
            .filter(|l| l.contains("node=outage-a"))
            .count()
    };
    assert_eq!(said("cluster: Redis unreachable"), 1);

    // Redis comes back (empty, as after a restart): both nodes reconnect and subscribe
    // again by themselves, and messages cross once more.
    let redis = RedisServer::start_on(port).await;
    until("both nodes are subscribed again", || async {
        subscribers(&redis, "cinder:t:room:lobby").await == 2
    })
    .await;
    on_a.send(json!(["1", null, "room:lobby", "new_message", {"body": "again"}]))
        .await;
    assert_eq!(bodies(&mut on_b, 1).await, ["again"]);
    assert_eq!(bodies(&mut on_a, 1).await, ["again"]);
    assert_eq!(said("cluster: Redis unreachable"), 1);
    assert_eq!(said("cluster: Redis link up"), 2, "up at start, up again");
    // The restarted Redis kept nothing: the nodes write the plugins' records back.
    until("the plugin records are back", || async {
        redis
            .command(&["HGET", "cinder:plugin:counter", "v:1.0.0"])
            .await
            .is_some_and(|r| r.contains("sha256"))
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_its_redis_serves_and_joins_once_it_answers() {
    cinder_tests::capture_logs();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let a = TestServer::start_with(move |c| {
        c.redis_url = Some(url);
        c.node_id = Some("early".into());
        c.node_down_ms = 1000;
    })
    .await;
    // It serves at once, alone.
    let mut on_a = member(&a, "1", "room:lobby").await;
    on_a.send(json!(["1", null, "room:lobby", "new_message", {"body": "alone"}]))
        .await;
    assert_eq!(bodies(&mut on_a, 1).await, ["alone"]);
    assert_eq!(stats(a.addr).await["cluster"]["redis"], "down");
    // Said in one line, however many heartbeats failed.
    let said = || {
        cinder_tests::logged("cluster: cannot reach Redis")
            .iter()
            .filter(|l| l.contains("node=early"))
            .count()
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(said(), 1);

    let redis = RedisServer::start_on(port).await;
    until("the node joined", || async {
        stats(a.addr).await["cluster"]["members"][0]["id"] == "early"
    })
    .await;
    assert_eq!(said(), 1);
    assert_eq!(subscribers(&redis, "cinder:t:room:lobby").await, 1);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_leaves_the_members_at_once() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    let count = |addr| async move {
        stats(addr).await["cluster"]["members"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(count(a.addr).await, 2);
    b.stop().await;
    // Not after the down period: the stop removed its record.
    assert_eq!(count(a.addr).await, 1);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_adapter_passes_the_shared_suite_and_crosses_nodes() {
    let redis = RedisServer::start().await;
    let stats = Arc::new(Stats::default());
    let start = |id: &str| {
        let link = Link::start(
            &redis.url(),
            id,
            "127.0.0.1:0".into(),
            Duration::from_secs(1),
            stats.clone(),
        )
        .expect("a link");
        (link.clone(), RedisPubSub::new(link, stats.clone()))
    };
    let ((link_one, one), (link_two, two)) = (start("one"), start("two"));
    until("the links are up", || async {
        link_one.is_up() && link_two.is_up()
    })
    .await;

    // What one node's own subscribers see is what the local adapter gives them.
    conformance::local_suite(&*one);

    // Across nodes: two's subscriber hears one's broadcasts once, in order, and not the
    // one `broadcast_from` skipped on one (that skip is one's own subscriber only).
    let heard = Arc::new(conformance::Collect::default());
    let topic: Arc<str> = "room:x".into();
    two.subscribe(&topic, 1, heard.clone());
    two.ready("room:x").await;
    for i in 0..20 {
        one.publish(conformance::broadcast("room:x", &format!("e{i}"), Some(99)));
    }
    let want: Vec<String> = (0..20).map(|i| format!("room:x:e{i}")).collect();
    let start = Instant::now();
    while heard.heard().len() < want.len() && start.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(heard.heard(), want);
    // Socket ids too.
    let socket = Arc::new(conformance::Collect::default());
    let id: Arc<str> = "user_socket:9".into();
    two.subscribe_socket(&id, 2, socket.clone());
    two.ready("user_socket:9").await;
    assert_eq!(one.disconnect("user_socket:9"), 0);
    let start = Instant::now();
    while socket.heard().is_empty() && start.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(socket.heard(), ["user_socket:9:disconnect"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(heard.heard().len(), 20, "nothing twice");
}

/// The keys of a `{key: {"metas": [...]}}` object.
fn keys(group: &Value) -> Vec<String> {
    let mut keys: Vec<String> = group
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

/// The next frame of `event` that `c` gets, skipping others.
async fn next_event(c: &mut Client, event: &str) -> Value {
    loop {
        let frame = c.recv().await;
        if frame[3] == event {
            return frame;
        }
    }
}

/// A member of `presence:lobby` on `server` as `user`, with the `presence_state` it got.
async fn present(server: &TestServer, user: &str) -> (Client, Value) {
    let mut c = member(server, user, "presence:lobby").await;
    let state = next_event(&mut c, "presence_state").await;
    (c, state[4].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_the_same_from_every_node_and_a_stopped_nodes_entries_leave() {
    let redis = RedisServer::start().await;
    // b's down period is long: its entries must leave when it stops, not when it expires.
    let (a, b, c) = (
        node(&redis, "a").await,
        node_with(&redis, "b", 10_000).await,
        node(&redis, "c").await,
    );
    let (mut on_a, state) = present(&a, "1").await;
    assert_eq!(keys(&state), ["1"]);
    // A joiner on b is sent a's entry in its presence_state; a hears b's join as one diff.
    let (mut on_b, state) = present(&b, "2").await;
    assert_eq!(keys(&state), ["1", "2"]);
    let diff = next_event(&mut on_a, "presence_diff").await;
    assert_eq!(keys(&diff[4]["joins"]), ["2"]);
    // A joiner on c gets both; a and b each hear c's join once.
    let (on_c, state) = present(&c, "3").await;
    assert_eq!(keys(&state), ["1", "2", "3"]);
    for (who, m) in [("a", &mut on_a), ("b", &mut on_b)] {
        let diff = next_event(m, "presence_diff").await;
        assert_eq!(keys(&diff[4]["joins"]), ["3"], "{who}: {diff}");
    }
    // The same phx_ref everywhere: one entry, not one per node.
    let (four, seen_on_b) = present(&b, "4").await;
    assert_eq!(
        state["1"]["metas"][0]["phx_ref"],
        seen_on_b["1"]["metas"][0]["phx_ref"]
    );
    for (who, m) in [("a", &mut on_a), ("b", &mut on_b)] {
        let diff = next_event(m, "presence_diff").await;
        assert_eq!(keys(&diff[4]["joins"]), ["4"], "{who}: {diff}");
    }

    // c's member leaves: one leave diff on a and b.
    drop(on_c);
    for (who, m) in [("a", &mut on_a), ("b", &mut on_b)] {
        let diff = next_event(m, "presence_diff").await;
        assert_eq!(keys(&diff[4]["leaves"]), ["3"], "{who}: {diff}");
    }

    // b stops: its entries leave on a at once, not after its down period (10 s).
    let stopped = Instant::now();
    b.stop().await;
    let diff = next_event(&mut on_a, "presence_diff").await;
    let mut left = keys(&diff[4]["leaves"]);
    if left.len() < 2 {
        let more = next_event(&mut on_a, "presence_diff").await;
        left.extend(keys(&more[4]["leaves"]));
        left.sort();
    }
    assert_eq!(left, ["2", "4"]);
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopped.elapsed()
    );
    drop((on_b, four));
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_presences_leave_everywhere_within_the_down_period() {
    let redis = RedisServer::start().await;
    let a = watchful_node(&redis, "a").await;
    let doomed = process_node(&redis, "doomed", "3000").await;
    let (mut on_a, _) = present(&a, "1").await;
    let mut far = socket_to(doomed.addr, "9").await;
    far.join("1", "presence:lobby", json!({})).await;
    let state = next_event(&mut far, "presence_state").await;
    assert_eq!(keys(&state[4]), ["1", "9"]);
    let diff = next_event(&mut on_a, "presence_diff").await;
    assert_eq!(keys(&diff[4]["joins"]), ["9"]);

    // kill -9: nothing is said; the heartbeat record expires and a drops its entries.
    let killed = Instant::now();
    doomed.kill().await;
    let diff = next_event(&mut on_a, "presence_diff").await;
    assert_eq!(keys(&diff[4]["leaves"]), ["9"]);
    assert_eq!(keys(&diff[4]["joins"]), Vec::<String>::new());
    assert!(
        killed.elapsed() < Duration::from_millis(3000),
        "left {:?} after the kill; the down period is 3 s",
        killed.elapsed()
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_tracked_while_redis_was_away_reaches_the_other_nodes_once_it_is_back() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    let (mut on_a, _) = present(&a, "1").await;
    let (mut on_b, state) = present(&b, "2").await;
    assert_eq!(keys(&state), ["1", "2"]);
    // b's join has crossed before Redis goes.
    assert_eq!(
        keys(&next_event(&mut on_a, "presence_diff").await[4]["joins"]),
        ["2"]
    );

    let port = redis.kill();
    until("a sees Redis down", || async {
        stats(a.addr).await["cluster"]["redis"] == "down"
    })
    .await;
    // Tracked on a while nothing crosses: a knows, b does not yet.
    let (_late, state) = present(&a, "3").await;
    assert_eq!(keys(&state), ["1", "2", "3"]);

    let _redis = RedisServer::start_on(port).await;
    // Back: the nodes sync again, b hears 3 join, and nobody's entries left meanwhile.
    let diff = next_event(&mut on_b, "presence_diff").await;
    assert_eq!(keys(&diff[4]["joins"]), ["3"], "{diff}");
    assert_eq!(keys(&diff[4]["leaves"]), Vec::<String>::new(), "{diff}");
    on_b.silent_for(1500).await;
    a.stop().await;
    b.stop().await;
}

/// Node id -> the version of `plugin` its heartbeat says it serves.
async fn served(addr: std::net::SocketAddr, plugin: &str) -> Vec<(String, String)> {
    stats(addr).await["cluster"]["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        m["id"].as_str().unwrap_or_default().to_owned(),
                        m["versions"][plugin]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_activated_on_one_node_is_served_by_every_node_and_by_nodes_that_start_later() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    // A counter room on b, counting under 1.0.0.
    let mut on_b = member(&b, "1", "counter:shared").await;
    for i in 0..3 {
        assert_eq!(
            inc(&mut on_b, "counter:shared", &format!("i{i}")).await,
            json!({"count": i + 1})
        );
    }

    // counter 2.0.0 uploaded and activated through a: every member reports it.
    let dir = cinder_tests::test_uploads_dir();
    let manifest = std::fs::read_to_string(dir.join("counter-2.0.0.toml")).expect("make plugins");
    let wasm = std::fs::read(dir.join("counter-2.0.0.wasm")).expect("make plugins");
    let (status, up) = cinder_tests::upload(a.addr, &manifest, &wasm, true).await;
    assert_eq!(status, 201, "{up}");
    assert_eq!(
        up["activation"]["nodes"],
        json!({"a": {"version": "2.0.0"}, "b": {"version": "2.0.0"}}),
        "{up}"
    );
    // b's live room moved with its count, no rejoin.
    assert_eq!(
        inc(&mut on_b, "counter:shared", "i3").await,
        json!({"count": 4, "version": "2.0.0"})
    );

    // A node that starts now serves the cluster's active version, not its dir's 1.0.0.
    let c = node(&redis, "c").await;
    let mut on_c = member(&c, "2", "counter:fresh").await;
    assert_eq!(
        inc(&mut on_c, "counter:fresh", "i0").await,
        json!({"count": 1, "version": "2.0.0"})
    );
    until("every heartbeat says 2.0.0", || async {
        served(a.addr, "counter").await
            == [("a", "2.0.0"), ("b", "2.0.0"), ("c", "2.0.0")]
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
    })
    .await;
    // And the plugin list says which node serves which version.
    let (_, list) = cinder_tests::admin(b.addr, "GET", "/api/plugins", None).await;
    let counter = list
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "counter"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        counter["nodes"],
        json!({"a": "2.0.0", "b": "2.0.0", "c": "2.0.0"}),
        "{counter}"
    );

    // A rollback through c takes every node back.
    let (status, back) =
        cinder_tests::admin(c.addr, "POST", "/api/plugins/counter/rollback", None).await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["version"], "1.0.0");
    assert_eq!(
        back["nodes"],
        json!({"a": {"version": "1.0.0"}, "b": {"version": "1.0.0"}, "c": {"version": "1.0.0"}}),
        "{back}"
    );
    assert_eq!(
        inc(&mut on_b, "counter:shared", "i4").await,
        json!({"count": 5})
    );

    // Deleting 2.0.0 on b deletes it everywhere.
    let (status, _) = cinder_tests::admin(
        b.addr,
        "DELETE",
        "/api/plugins/counter/versions/2.0.0",
        None,
    )
    .await;
    assert_eq!(status, 204);
    for s in [&a, &c] {
        until("2.0.0 is gone everywhere", || async {
            let (_, list) = cinder_tests::admin(s.addr, "GET", "/api/plugins", None).await;
            list.as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == "counter"))
                .is_some_and(|p| {
                    p["versions"]
                        .as_array()
                        .is_some_and(|vs| vs.iter().all(|v| v["version"] != "2.0.0"))
                })
        })
        .await;
    }
    for s in [a, b, c] {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_changes_wait_while_the_clusters_redis_is_away() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    drop(redis);
    until("a sees Redis down", || async {
        stats(a.addr).await["cluster"]["redis"] == "down"
    })
    .await;
    let (status, body) = cinder_tests::admin(
        a.addr,
        "POST",
        "/api/plugins/counter/activate",
        Some(r#"{"version":"1.0.0"}"#),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("Redis is unreachable")),
        "{body}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_that_fails_on_one_node_is_reported_with_that_nodes_reason() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    // b gives each instance 16 MiB: a manifest asking for 24 MiB is refused there.
    let url = redis.url();
    let b = TestServer::start_with(move |c| {
        c.redis_url = Some(url);
        c.node_id = Some("b".into());
        c.node_down_ms = 3000;
        c.limits.plugin_memory_bytes = 16 << 20;
    })
    .await;
    until("both are members", || async {
        stats(a.addr).await["cluster"]["members"]
            .as_array()
            .map_or(0, Vec::len)
            == 2
    })
    .await;
    let (manifest, wasm) = cinder_tests::test_plugin("counter");
    let manifest = manifest.replace("version = \"1.0.0\"", "version = \"3.0.0\"")
        + "\n[limits]\nmemory_bytes = 25165824\n";
    let (status, up) = cinder_tests::upload(a.addr, &manifest, &wasm, true).await;
    assert_eq!(status, 201, "{up}");
    let nodes = &up["activation"]["nodes"];
    assert_eq!(nodes["a"], json!({"version": "3.0.0"}), "{up}");
    assert_eq!(nodes["b"]["version"], "1.0.0", "{up}");
    assert_eq!(nodes["b"]["failed"]["version"], "3.0.0", "{up}");
    assert!(
        nodes["b"]["failed"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("memory_bytes")),
        "{up}"
    );
    // b keeps serving its version.
    let mut on_b = member(&b, "1", "counter:still").await;
    assert_eq!(
        inc(&mut on_b, "counter:still", "i").await,
        json!({"count": 1})
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_comes_back_under_its_id_is_a_new_member() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let (mut on_a, _) = present(&a, "1").await;
    let first = process_node(&redis, "phoenix", "5000").await;
    let mut old = socket_to(first.addr, "9").await;
    old.join("1", "presence:lobby", json!({})).await;
    assert_eq!(
        keys(&next_event(&mut on_a, "presence_diff").await[4]["joins"]),
        ["9"]
    );

    // Killed and started again at once, well inside its down period (5 s): its record never
    // expired, but it started anew, so what the old one tracked leaves.
    first.kill().await;
    let second = process_node(&redis, "phoenix", "5000").await;
    let mut new = socket_to(second.addr, "10").await;
    new.join("1", "presence:lobby", json!({})).await;
    let state = next_event(&mut new, "presence_state").await;
    assert!(keys(&state[4]).contains(&"1".to_owned()), "{state}");
    let mut joined = Vec::new();
    let mut left = Vec::new();
    while !(joined.contains(&"10".to_owned()) && left.contains(&"9".to_owned())) {
        let diff = next_event(&mut on_a, "presence_diff").await;
        joined.extend(keys(&diff[4]["joins"]));
        left.extend(keys(&diff[4]["leaves"]));
    }
    second.kill().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taken_for_gone_that_proves_alive_has_its_presence_back() {
    let redis = RedisServer::start().await;
    let a = watchful_node(&redis, "a").await;
    let stalled = process_node(&redis, "stalled", "1000").await;
    let (mut on_a, _) = present(&a, "1").await;
    let mut far = socket_to(stalled.addr, "9").await;
    far.join("1", "presence:lobby", json!({})).await;
    assert_eq!(
        keys(&next_event(&mut on_a, "presence_diff").await[4]["joins"]),
        ["9"]
    );

    // Paused past its down period: taken for gone, its entries leave.
    stalled.signal("STOP");
    assert_eq!(
        keys(&next_event(&mut on_a, "presence_diff").await[4]["leaves"]),
        ["9"]
    );
    // Resumed: its heartbeat is back, and so is what it tracks.
    stalled.signal("CONT");
    let back = tokio::time::timeout(
        Duration::from_secs(10),
        next_event(&mut on_a, "presence_diff"),
    )
    .await
    .expect("a diff once it is back");
    assert_eq!(keys(&back[4]["joins"]), ["9"], "{back}");
    stalled.kill().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_reloaded_by_watch_on_one_node_is_served_by_the_others() {
    let redis = RedisServer::start().await;
    let watched = std::env::temp_dir().join(format!("cinder-watch-{}", std::process::id()));
    std::fs::create_dir_all(&watched).expect("a watched dir");
    let (manifest, wasm) = cinder_tests::test_plugin("counter");
    std::fs::write(watched.join("counter.toml"), &manifest).expect("write");
    std::fs::write(watched.join("counter.wasm"), &wasm).expect("write");
    let (url, dir) = (redis.url(), watched.clone());
    let a = TestServer::start_with(move |c| {
        c.redis_url = Some(url);
        c.node_id = Some("dev".into());
        c.node_down_ms = 3000;
        c.watch = Some(dir);
    })
    .await;
    let b = node(&redis, "b").await;
    let mut on_b = member(&b, "1", "counter:watched").await;
    assert_eq!(
        inc(&mut on_b, "counter:watched", "i0").await,
        json!({"count": 1})
    );

    // a serves (so its watch has taken its first look) before the files change.
    stats(a.addr).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The developer's build writes version 2 into the watched dir on a: the wasm first, so
    // that should the watch look between the two writes, it takes the new bytes under the
    // old version (stored as `1.0.0+<sha>`) and then the new version with its own bytes.
    let uploads = cinder_tests::test_uploads_dir();
    let v2 = std::fs::read(uploads.join("counter-2.0.0.wasm")).expect("make plugins");
    let v2_manifest = std::fs::read(uploads.join("counter-2.0.0.toml")).expect("make plugins");
    std::fs::write(watched.join("counter.wasm"), v2).expect("write");
    std::fs::write(watched.join("counter.toml"), v2_manifest).expect("write");
    until("b serves what a's watch took", || async {
        let served = served(b.addr, "counter").await;
        served.len() == 2 && served.iter().all(|(_, v)| v == "2.0.0")
    })
    .await;
    assert_eq!(
        inc(&mut on_b, "counter:watched", "i1").await,
        json!({"count": 2, "version": "2.0.0"})
    );
    a.stop().await;
    b.stop().await;
    let _ = std::fs::remove_dir_all(&watched);
}
