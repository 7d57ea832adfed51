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
use cinder_tests::{ADMIN, Client, RedisServer, TestServer, WAIT, http_post, stats};
use serde_json::{Value, json};

/// A cluster node on `redis`, named `id`, with a short down period.
async fn node(redis: &RedisServer, id: &str) -> TestServer {
    let (url, id) = (redis.url(), id.to_owned());
    let server = TestServer::start_with(move |c| {
        c.redis_url = Some(url);
        c.node_id = Some(id);
        c.node_down_ms = 1000;
    })
    .await;
    until("the node's link is up", || async {
        stats(server.addr).await["cluster"]["redis"] == "up"
    })
    .await;
    server
}

/// Waits until `check` holds, for at most 10 s.
async fn until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// A member of `topic` on `server` as `user`.
async fn member(server: &TestServer, user: &str, topic: &str) -> Client {
    let mut c = server.client(user).await;
    let reply = c.join("1", topic, json!({})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    c
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
    on_a.silent_for(50).await;
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
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    let mut on_a = member(&a, "1", "room:lobby").await;
    let mut on_b = member(&b, "2", "room:lobby").await;

    // Redis dies: each node keeps serving its own members.
    let port = redis.kill();
    until("a sees Redis down", || async {
        stats(a.addr).await["cluster"]["redis"] == "down"
    })
    .await;
    on_a.send(json!(["1", null, "room:lobby", "new_message", {"body": "local"}]))
        .await;
    assert_eq!(bodies(&mut on_a, 1).await, ["local"]);
    let after_outage = stats(a.addr).await;
    assert_eq!(after_outage["cluster"]["members"], json!([]));
    assert!(after_outage["cluster_outages"].as_u64() >= Some(1));
    assert!(after_outage["cluster_dropped"].as_u64() >= Some(1));

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
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_its_redis_serves_and_joins_once_it_answers() {
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

    let redis = RedisServer::start_on(port).await;
    until("the node joined", || async {
        stats(a.addr).await["cluster"]["members"][0]["id"] == "early"
    })
    .await;
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
