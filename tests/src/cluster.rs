//! Helpers for cluster tests: nodes sharing a `redis-server` the test started, in-process
//! or as processes of their own, and the waits their tests share.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Client, RedisServer, SECRET, ServerProcess, TestServer, stats};

/// A cluster node on `redis`, named `id`, with a down period (10 s) no stall of a loaded
/// test machine reaches; tests of node loss give the nodes they time shorter ones.
pub async fn node(redis: &RedisServer, id: &str) -> TestServer {
    node_with(redis, id, 10_000).await
}

/// A cluster node on `redis`, named `id`, down after `down_ms` without a heartbeat.
pub async fn node_with(redis: &RedisServer, id: &str, down_ms: u64) -> TestServer {
    let (url, id) = (redis.url(), id.to_owned());
    let server = TestServer::start_with(move |c| {
        c.redis_url = Some(url);
        c.node_id = Some(id);
        c.node_down_ms = down_ms;
    })
    .await;
    until("the node's link is up", || async {
        stats(server.addr).await["cluster"]["redis"] == "up"
    })
    .await;
    server
}

/// A cluster node on `redis` as a process of its own (for kill -9, SIGSTOP), named `id`,
/// down after `down_ms` without a heartbeat.
pub async fn process_node(redis: &RedisServer, id: &str, down_ms: &str) -> ServerProcess {
    let url = redis.url();
    ServerProcess::start(
        4096,
        &["--redis", &url, "--node-id", id, "--node-down-ms", down_ms],
    )
    .await
}

/// A V2 socket for `user` to the node at `addr` (in-process or a process: every test node
/// has the same secret).
pub async fn socket_to(addr: SocketAddr, user: &str) -> Client {
    let token = cinder::auth::mint(SECRET, user, 3600).expect("mint");
    Client::connect(&format!(
        "ws://{addr}/socket/websocket?vsn=2.0.0&token={token}"
    ))
    .await
    .expect("connects")
}

/// Waits until `check` holds, for at most 10 s.
pub async fn until<F, Fut>(what: &str, check: F)
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

/// A member of `topic` on `server` as `user`, joined with join ref "1".
pub async fn member(server: &TestServer, user: &str, topic: &str) -> Client {
    let mut c = server.client(user).await;
    let reply = c.join("1", topic, json!({})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    c
}

/// `inc` on `counter:<room>` through `c` (joined with join ref "1"); the reply's response.
pub async fn inc(c: &mut Client, topic: &str, msg_ref: &str) -> Value {
    c.send(json!(["1", msg_ref, topic, "inc", {}])).await;
    loop {
        let frame = c.recv().await;
        if frame[3] == "phx_reply" && frame[1] == msg_ref {
            assert_eq!(frame[4]["status"], "ok", "{frame}");
            return frame[4]["response"].clone();
        }
    }
}
