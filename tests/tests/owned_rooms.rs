//! Single-owner rooms on a cluster: nodes (in-process, or processes of their own where a
//! test kills one) sharing a `redis-server` the test starts. A room of a plugin placed on
//! an owner (the `counter` example) runs once for the whole cluster: members on every node
//! see one count; the room's lease and snapshot live in Redis while the room does; a stale
//! lease holder is fenced out; a node that stops hands its rooms over with their state; a
//! killed owner's room moves to a survivor, losing at most its snapshot interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cinder::cluster::Link;
use cinder::lease::{Acquired, Leases, Saved};
use cinder::stats::Stats;
use cinder_tests::cluster::{inc, member, node, node_with, process_node, socket_to, until};
use cinder_tests::{Client, RedisServer, stats};
use serde_json::{Value, json};

/// Sends `n` `inc`s through `c` (joined to `topic` with join ref "1") without waiting.
async fn send_incs(c: &mut Client, topic: &str, tag: &str, n: usize) {
    for i in 0..n {
        c.send(json!(["1", format!("{tag}{i}"), topic, "inc", {}]))
            .await;
    }
}

/// What `c` reads until it has `replies` replies and `counts` `count` broadcasts: the
/// counts of its replies and of the broadcasts, in the order they came, and any
/// `phx_error`.
async fn read_counts(c: &mut Client, replies: usize, counts: usize) -> (Vec<u64>, Vec<u64>) {
    let (mut r, mut b) = (Vec::new(), Vec::new());
    while r.len() < replies || b.len() < counts {
        let frame = c.recv().await;
        assert_ne!(frame[3], "phx_error", "the channel crashed: {frame}");
        if frame[3] == "phx_reply" {
            assert_eq!(frame[4]["status"], "ok", "{frame}");
            r.push(frame[4]["response"]["count"].as_u64().expect("a count"));
        } else if frame[3] == "count" {
            b.push(frame[4]["count"].as_u64().expect("a count"));
        }
    }
    (r, b)
}

/// The value of `key` in `redis`, if any.
async fn get(redis: &RedisServer, key: &str) -> Option<String> {
    let reply = redis.command(&["GET", key]).await?;
    // $len\r\nvalue\r\n, or $-1 (RESP2) / _ (RESP3) when missing.
    reply.lines().nth(1).map(str::to_owned)
}

/// Whether `key` exists in `redis`.
async fn exists(redis: &RedisServer, key: &str) -> bool {
    redis
        .command(&["EXISTS", key])
        .await
        .is_some_and(|r| r.trim() == ":1")
}

fn counter(server: &Value, name: &str) -> u64 {
    server[name].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_room_runs_once_for_the_cluster_and_every_member_sees_one_count() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    let topic = "counter:one";
    // The first join takes the room's lease: a owns it.
    let mut on_a = member(&a, "1", topic).await;
    let mut on_b = member(&b, "2", topic).await;
    let lease = get(&redis, &format!("cinder:lease:{topic}"))
        .await
        .expect("a lease");
    assert!(lease.ends_with(" a"), "{lease}");

    // Both push at once: one instance applies every inc once.
    send_incs(&mut on_a, topic, "a", 25).await;
    send_incs(&mut on_b, topic, "b", 25).await;
    let (replies_a, seen_a) = read_counts(&mut on_a, 25, 50).await;
    let (replies_b, seen_b) = read_counts(&mut on_b, 25, 50).await;
    let expected: Vec<u64> = (1..=50).collect();
    assert_eq!(
        seen_a, expected,
        "a's member sees every count once, in order"
    );
    assert_eq!(seen_b, expected, "b's member sees the same sequence");
    let mut replies: Vec<u64> = replies_a.iter().chain(&replies_b).copied().collect();
    replies.sort_unstable();
    assert_eq!(replies, expected, "each inc got its own count");
    assert!(
        replies_b.windows(2).all(|w| w[0] < w[1]),
        "b's replies in order"
    );

    // One instance: a served b's calls, b forwarded them, b never ran the room.
    let (sa, sb) = (stats(a.addr).await, stats(b.addr).await);
    assert_eq!(counter(&sa, "room_leases_won"), 1, "{sa}");
    assert_eq!(counter(&sb, "room_leases_won"), 0, "{sb}");
    assert!(counter(&sa, "owner_served") >= 26, "{sa}");
    assert!(counter(&sb, "owner_forwarded") >= 26, "{sb}");
    assert!(
        counter(&sa, "snapshots_saved") >= 50,
        "saved after every message: {sa}"
    );

    // The room empties: its lease and snapshot go.
    drop(on_a);
    drop(on_b);
    until("the lease and snapshot are gone", || async {
        !exists(&redis, &format!("cinder:lease:{topic}")).await
            && !exists(&redis, &format!("cinder:snap:{topic}")).await
    })
    .await;
    // A new room starts from nothing, as on one node.
    let mut again = member(&b, "3", topic).await;
    assert_eq!(inc(&mut again, topic, "x").await, json!({"count": 1}));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_plugin_runs_on_every_node_with_members() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    let mut on_a = member(&a, "1", "room:lobby").await;
    let mut on_b = member(&b, "2", "room:lobby").await;
    on_a.send(json!(["1", "m", "room:lobby", "new_message", {"body": "hi"}]))
        .await;
    for c in [&mut on_a, &mut on_b] {
        loop {
            let frame = c.recv().await;
            if frame[3] == "new_message" {
                assert_eq!(frame[4]["body"], "hi");
                break;
            }
        }
    }
    // Chat is placed `local`: no lease, nothing forwarded.
    assert!(!exists(&redis, "cinder:lease:room:lobby").await);
    for s in [&a, &b] {
        let st = stats(s.addr).await;
        assert_eq!(counter(&st, "owner_forwarded"), 0, "{st}");
        assert_eq!(counter(&st, "room_leases_won"), 0, "{st}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_lease_holder_is_fenced_out_of_saves_and_renewals() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let ttl = Duration::from_secs(5);
    let start = |id: &str| {
        let link =
            Link::start(&url, id, "-".into(), ttl, Arc::new(Stats::default())).expect("a link");
        (link.clone(), Leases::start(link, ttl))
    };
    let (link_a, a) = start("a");
    let (link_b, b) = start("b");
    until("both links are up", || async {
        link_a.is_up() && link_b.is_up()
    })
    .await;
    let topic: Arc<str> = "counter:fenced".into();
    let Acquired::Won(old, None) = a.acquire(&topic, 0).await else {
        panic!("a takes a free lease, with no snapshot")
    };
    let Acquired::Held { node, fence, .. } = b.acquire(&topic, 0).await else {
        panic!("b finds it held")
    };
    assert_eq!((&*node, fence), ("a", old.fence()));
    assert_eq!(a.save(&old, 1, "1.0.0", b"seven").await, Saved::Stored);

    // a stalls past its lease: the key expires, b takes the room with a's last state.
    redis
        .command(&["DEL", &format!("cinder:lease:{topic}")])
        .await;
    let Acquired::Won(new, Some(snapshot)) = b.acquire(&topic, 0).await else {
        panic!("b takes the expired lease with its snapshot")
    };
    assert!(new.fence() > old.fence());
    assert_eq!(
        (snapshot.version.as_str(), snapshot.state.as_slice()),
        ("1.0.0", &b"seven"[..])
    );

    // a comes back: whatever it tries is refused, and it knows it lost the room.
    assert_eq!(a.save(&old, 2, "1.0.0", b"stale").await, Saved::Fenced);
    assert!(!a.renew(&old).await);
    assert!(!old.valid());
    tokio::time::timeout(Duration::from_secs(1), old.lost())
        .await
        .expect("the loss is heard");
    let state = redis
        .command(&["HGET", &format!("cinder:snap:{topic}"), "state"])
        .await
        .unwrap_or_default();
    assert!(
        state.contains("seven"),
        "the stale write did not land: {state}"
    );

    // The new owner saves; an older save of its own never replaces a newer one.
    assert_eq!(b.save(&new, 2, "1.0.0", b"nine").await, Saved::Stored);
    assert_eq!(b.save(&new, 1, "1.0.0", b"eight").await, Saved::Stored);
    let state = redis
        .command(&["HGET", &format!("cinder:snap:{topic}"), "state"])
        .await
        .unwrap_or_default();
    assert!(state.contains("nine"), "{state}");
    assert!(b.renew(&new).await && new.valid());
    b.release(&new);
    until("released", || async {
        !exists(&redis, &format!("cinder:lease:{topic}")).await
            && !exists(&redis, &format!("cinder:snap:{topic}")).await
    })
    .await;

    // A Redis that lost the fencing counter still gives a fence above the newest heard.
    redis.command(&["DEL", "cinder:fence"]).await;
    let Acquired::Won(after, _) = a.acquire(&topic, new.fence()).await else {
        panic!("a takes the released lease")
    };
    assert!(after.fence() > new.fence());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_hands_its_rooms_over_with_their_state() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    let topic = "counter:handed";
    let _on_a = member(&a, "1", topic).await;
    let mut on_b = member(&b, "2", topic).await;
    for i in 1..=5 {
        assert_eq!(
            inc(&mut on_b, topic, &format!("i{i}")).await,
            json!({"count": i})
        );
    }
    // a stops (as on SIGTERM): b takes the room over at once, from 5.
    let stopped = Instant::now();
    a.stop().await;
    let (replies, _) = {
        send_incs(&mut on_b, topic, "after", 1).await;
        read_counts(&mut on_b, 1, 0).await
    };
    assert_eq!(replies, [6], "the count went on from the handed-over state");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "taken over in {:?}, before a lease would expire",
        stopped.elapsed()
    );
    let st = stats(b.addr).await;
    assert_eq!(counter(&st, "room_leases_won"), 1, "{st}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_room_moves_to_a_survivor_losing_at_most_its_snapshot_interval() {
    let redis = RedisServer::start().await;
    let owner = process_node(&redis, "owner", "1000").await;
    let survivor = node_with(&redis, "survivor", 1000).await;
    // A counter saving every 300 ms at most (the example saves after every message).
    let manifest = std::fs::read_to_string(cinder_tests::test_plugins_dir().join("counter.toml"))
        .expect("make plugins")
        .replace("name = \"counter\"", "name = \"tally\"")
        .replace("counter:*", "tally:*")
        .replace("snapshot_every = \"message\"", "snapshot_every = 300");
    let wasm =
        std::fs::read(cinder_tests::test_plugins_dir().join("counter.wasm")).expect("make plugins");
    let (status, up) = cinder_tests::upload(survivor.addr, &manifest, &wasm, true).await;
    assert_eq!(status, 201, "{up}");
    let topic = "tally:room";
    let mut far = socket_to(owner.addr, "1").await;
    let joined = far.join("1", topic, json!({})).await;
    assert_eq!(joined[4]["status"], "ok", "{joined}");
    let mut near = member(&survivor, "2", topic).await;
    for i in 1..=20 {
        assert_eq!(
            inc(&mut near, topic, &format!("i{i}")).await,
            json!({"count": i})
        );
    }
    // Past the interval: 20 is saved. Three more may not be.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for i in 21..=23 {
        assert_eq!(
            inc(&mut near, topic, &format!("i{i}")).await,
            json!({"count": i})
        );
    }
    let killed = Instant::now();
    owner.kill().await;
    // The survivor's member keeps its channel. What it sent before its node knew the owner
    // was gone is lost with the owner (no reply); what it sends after waits at its node
    // and runs on the new owner. It pushes every 100 ms until a reply comes.
    let mut sent = 0;
    let frame = loop {
        near.send(json!(["1", format!("after{sent}"), topic, "inc", {}]))
            .await;
        sent += 1;
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no reply within 10 s"
        );
        let Ok(frame) = tokio::time::timeout(Duration::from_millis(100), near.recv()).await else {
            continue;
        };
        assert_ne!(frame[3], "phx_error", "the channel crashed: {frame}");
        if frame[3] == "phx_reply" {
            break frame;
        }
    };
    let moved_in = killed.elapsed();
    assert_eq!(frame[4]["status"], "ok", "{frame}");
    let count = frame[4]["response"]["count"].as_u64().expect("a count");
    let lost = 24 - count;
    assert!(
        (21..=24).contains(&count),
        "resumed from the last snapshot (20 or later): got {count}"
    );
    assert!(lost <= 3, "lost {lost}, more than the interval held");
    assert!(
        moved_in < Duration::from_secs(5),
        "moved in {moved_in:?} (lease 1 s)"
    );
    survivor.stop().await;
}

/// The next frame of `event` that `c` gets, skipping others.
async fn next_event(c: &mut Client, event: &str) -> Value {
    loop {
        let frame = c.recv().await;
        if frame[3] == event {
            return frame[4].clone();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_broadcast_from_of_an_owned_room_reach_the_right_members_on_each_node() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "a").await, node(&redis, "b").await);
    // The presence example, placed on an owner under another name.
    let manifest = std::fs::read_to_string(cinder_tests::test_plugins_dir().join("presence.toml"))
        .expect("make plugins")
        .replace("name = \"presence\"", "name = \"roster\"")
        .replace("presence:*", "roster:*")
        .replace("placement = \"local\"", "placement = \"owner\"");
    let wasm = std::fs::read(cinder_tests::test_plugins_dir().join("presence.wasm"))
        .expect("make plugins");
    let (status, up) = cinder_tests::upload(a.addr, &manifest, &wasm, true).await;
    assert_eq!(status, 201, "{up}");
    let topic = "roster:room";
    let mut alice = member(&a, "alice", topic).await;
    let state = next_event(&mut alice, "presence_state").await;
    assert!(state.get("alice").is_some(), "{state}");

    // bob joins on b: his join runs on a, which tracks him and pushes him the state.
    let mut bob = member(&b, "bob", topic).await;
    let state = next_event(&mut bob, "presence_state").await;
    let mut keys: Vec<&String> = state.as_object().expect("a map").keys().collect();
    keys.sort();
    assert_eq!(keys, ["alice", "bob"], "{state}");
    // alice gets bob's join diff (tracked during his join), then broadcast_from's
    // user_joined; bob does not hear himself.
    let diff = next_event(&mut alice, "presence_diff").await;
    assert!(diff["joins"].get("bob").is_some(), "{diff}");
    assert_eq!(
        next_event(&mut alice, "user_joined").await["user_id"],
        "bob"
    );
    let _carol = member(&b, "carol", topic).await;
    assert_eq!(
        next_event(&mut bob, "user_joined").await["user_id"],
        "carol",
        "bob's first user_joined is carol's, not his own"
    );

    // bob leaves: terminate runs on a, his entry leaves everywhere.
    bob.send(json!(["1", "l", topic, "phx_leave", {}])).await;
    let (mut left, mut gone) = (false, false);
    while !(left && gone) {
        let frame = alice.recv().await;
        match frame[3].as_str() {
            Some("user_left") => left |= frame[4]["user_id"] == "bob",
            Some("presence_diff") => gone |= frame[4]["leaves"].get("bob").is_some(),
            _ => {}
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_messages_count_against_the_senders_rate_limit_on_its_own_node() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let url = redis.url();
    let b = cinder_tests::TestServer::start_with(move |c| {
        c.redis_url = Some(url);
        c.node_id = Some("b".into());
        c.node_down_ms = 10_000;
        c.limits.messages_per_sec = 1;
        c.limits.message_burst = 10;
    })
    .await;
    until("b's link is up", || async {
        stats(b.addr).await["cluster"]["redis"] == "up"
    })
    .await;
    let topic = "counter:limited";
    let mut on_a = member(&a, "1", topic).await;
    let mut flooder = member(&b, "2", topic).await;
    send_incs(&mut flooder, topic, "f", 200).await;
    assert_eq!(flooder.close_code().await, 1008, "cut for its rate on b");
    // What b let through reached the owner; nothing past the limit did.
    let count = loop {
        let frame = {
            on_a.send(json!(["1", "g", topic, "get", {}])).await;
            loop {
                let frame = on_a.recv().await;
                if frame[3] == "phx_reply" && frame[1] == "g" {
                    break frame;
                }
            }
        };
        let count = frame[4]["response"]["count"].as_u64().expect("a count");
        if count > 0 {
            break count;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        count <= 12,
        "{count} incs passed a burst of 10 (the join took one)"
    );
    assert!(counter(&stats(b.addr).await, "rate_limited") >= 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_after_the_owner_is_taken_for_gone_waits_out_its_lease_and_takes_the_room() {
    let redis = RedisServer::start().await;
    // A long lease beside a quick heartbeat would be the same: the gap between "gone" and
    // "lease expired" is what this test joins in.
    let owner = process_node(&redis, "owner", "3000").await;
    let survivor = node_with(&redis, "survivor", 3000).await;
    let topic = "counter:late";
    let mut far = socket_to(owner.addr, "1").await;
    let joined = far.join("1", topic, json!({})).await;
    assert_eq!(joined[4]["status"], "ok", "{joined}");
    for i in 1..=3 {
        assert_eq!(
            inc(&mut far, topic, &format!("i{i}")).await,
            json!({"count": i})
        );
    }
    owner.kill().await;
    until("the survivor takes the owner for gone", || async {
        stats(survivor.addr).await["cluster"]["members"]
            .as_array()
            .is_some_and(|m| m.len() == 1)
    })
    .await;
    // The room starts on the survivor only now: it must not forward to the dead owner.
    let mut late = survivor.client("2").await;
    let joined = late.join("1", topic, json!({})).await;
    assert_eq!(joined[4]["status"], "ok", "{joined}");
    assert_eq!(
        joined[4]["response"],
        json!({"count": 3}),
        "taken over from the last save"
    );
    assert_eq!(inc(&mut late, topic, "after").await, json!({"count": 4}));
    survivor.stop().await;
}
