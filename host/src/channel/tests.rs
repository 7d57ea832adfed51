//! The session and room state machines, driven through their seams (`Router`,
//! `LogicFactory`, `RoomLogic`) with a fake plugin that records what it was called with:
//! what a client sends in, what its socket would write out, as Phoenix frames.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::{
    BoxFuture, CallBudget, CallError, CallResult, ChannelSocket, Handled, Hub, InOutcome,
    InfoOutcome, JoinOutcome, LogicFactory, Next, OutboundRx, Placement, RoomLogic, Route, Router,
    Session, Slowness, SnapshotEvery, Unavailable, outbound_queue,
};
use crate::config::Limits;
use crate::limit::Warnings;
use crate::presence::Tracker;
use crate::protocol::{self, Frame, Message, Payload, Status, Vsn};
use crate::pubsub::LocalPubSub;
use crate::stats::Stats;

type Log = Arc<Mutex<Vec<String>>>;

fn record(log: &Log, line: String) {
    log.lock().expect("log").push(line);
}

/// A plugin that joins everyone but `{"refuse": true}`, answers `echo` with its payload,
/// fails on `fail`, traps on `crash`, and records every call.
struct FakeLogic {
    log: Log,
}

fn handled<T>(outcome: T) -> CallResult<T> {
    Ok(Handled {
        outcome,
        assigns: None,
        effects: Vec::new(),
    })
}

impl RoomLogic for FakeLogic {
    fn version(&self) -> &str {
        "1.0.0"
    }

    fn stateful(&self) -> bool {
        false
    }

    fn budget(&mut self, _: CallBudget) {}

    fn snapshot(&mut self) -> BoxFuture<'_, Result<Vec<u8>, CallError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn restore<'a>(&'a mut self, _: Vec<u8>, _: &'a str) -> BoxFuture<'a, Result<bool, CallError>> {
        Box::pin(async { Ok(false) })
    }

    fn join<'a>(
        &'a mut self,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<JoinOutcome>> {
        Box::pin(async move {
            let join_ref = socket.join_ref.clone().unwrap_or_default();
            record(&self.log, format!("join {} {join_ref}", socket.topic));
            let refuse = matches!(&payload, Payload::Json(raw) if raw.get().contains("refuse"));
            handled(if refuse {
                JoinOutcome::Refused(protocol::reason_payload("no"))
            } else {
                JoinOutcome::Ok(Payload::empty())
            })
        })
    }

    fn handle_in<'a>(
        &'a mut self,
        event: &'a str,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InOutcome>> {
        Box::pin(async move {
            let join_ref = socket.join_ref.clone().unwrap_or_default();
            record(&self.log, format!("in {event} {join_ref}"));
            match event {
                "crash" => Err(CallError::Crashed("asked to".into())),
                "fail" => Err(CallError::Failed("asked to".into())),
                _ => handled(InOutcome::Reply(Status::Ok, payload)),
            }
        })
    }

    fn handle_out<'a>(
        &'a mut self,
        _: &'a str,
        _: Payload,
        _: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>> {
        Box::pin(async { handled(InfoOutcome::NoReply) })
    }

    fn handle_info<'a>(
        &'a mut self,
        _: Payload,
        _: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>> {
        Box::pin(async { handled(InfoOutcome::NoReply) })
    }

    fn terminate<'a>(
        &'a mut self,
        reason: &'a str,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, Result<Vec<crate::channel::Effect>, CallError>> {
        Box::pin(async move {
            let join_ref = socket.join_ref.clone().unwrap_or_default();
            record(&self.log, format!("terminate {reason} {join_ref}"));
            Ok(Vec::new())
        })
    }
}

/// Makes fake instances and counts them.
struct FakePlugin {
    log: Log,
    made: AtomicUsize,
}

impl LogicFactory for FakePlugin {
    fn crashed(&self, topic: &str, cause: &str) {
        record(&self.log, format!("crashed {topic}: {cause}"));
    }

    fn instantiate<'a>(
        &'a self,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn RoomLogic>, Unavailable>> {
        self.made.fetch_add(1, Ordering::Relaxed);
        let log = self.log.clone();
        Box::pin(async move { Ok(Box::new(FakeLogic { log }) as Box<dyn RoomLogic>) })
    }
}

/// Routes `room:*` to the fake plugin.
struct FakeRouter(Route);

impl Router for FakeRouter {
    fn route(&self, topic: &str) -> Option<Route> {
        topic.starts_with("room:").then(|| self.0.clone())
    }
}

/// One socket of a node whose only plugin is the fake one.
struct Socket {
    session: Session,
    rx: OutboundRx,
    log: Log,
    plugin: Arc<FakePlugin>,
}

fn socket_with(limits: Limits) -> Socket {
    let log = Log::default();
    let plugin = Arc::new(FakePlugin {
        log: log.clone(),
        made: AtomicUsize::new(0),
    });
    let stats = Arc::new(Stats::default());
    let route = Route {
        plugin: "fake".into(),
        version: "1.0.0".into(),
        intercepts: Arc::new([]),
        factory: plugin.clone(),
        warnings: Arc::new(Warnings::new(stats.clone())),
        metrics: Arc::new(stats.metrics.plugin("fake", "1.0.0")),
        placement: Placement::Local,
        snapshot_every: SnapshotEvery::default(),
    };
    let pubsub = Arc::new(LocalPubSub::new());
    let tracker = Arc::new(Tracker::new(pubsub.clone(), 1 << 20, 1 << 20));
    let hub = Hub::new(
        Arc::new(FakeRouter(route)),
        pubsub,
        tracker,
        limits.clone(),
        stats,
        None,
    );
    let (out, rx) = outbound_queue(Slowness::from_limits(&limits));
    let session = Session::new(hub, Some("user_socket:1".into()), "{}".into(), out, Vsn::V2);
    Socket {
        session,
        rx,
        log,
        plugin,
    }
}

fn socket() -> Socket {
    socket_with(Limits::default())
}

impl Socket {
    /// The client sends `[join_ref, ref, topic, event, payload]`.
    async fn send(&mut self, frame: Value) {
        let msg: Message =
            protocol::decode_text(Vsn::V2, &frame.to_string()).expect("a valid frame");
        self.session.handle(msg).await;
    }

    /// What the socket writes until it has been quiet for a while, as JSON.
    async fn written(&mut self) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let ready =
                tokio::time::timeout(Duration::from_millis(100), self.session.ready(&mut self.rx));
            if ready.await.is_err() {
                return frames;
            }
            while let Some(next) = self.session.next_ready(&mut self.rx) {
                let frame = match next {
                    Next::Broadcast(frame) => Some(frame.clone()),
                    Next::Queued(item) => self.session.encode(item),
                };
                if let Some(Frame::Text(text)) = frame {
                    frames.push(serde_json::from_str(text.as_str()).expect("JSON"));
                }
            }
        }
    }

    fn calls(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }
}

fn ok(join_ref: &str, msg_ref: &str, topic: &str, response: Value) -> Value {
    json!([join_ref, msg_ref, topic, "phx_reply", {"status": "ok", "response": response}])
}

#[tokio::test]
async fn a_join_is_answered_ok_once_the_plugin_accepted_it() {
    let mut s = socket();
    s.send(json!(["1", "1", "room:a", "phx_join", {}])).await;
    assert_eq!(s.written().await, [ok("1", "1", "room:a", json!({}))]);
    assert_eq!(s.calls(), ["join room:a 1"]);
}

#[tokio::test]
async fn a_refused_join_is_answered_with_the_plugins_reply_and_leaves_no_channel() {
    let mut s = socket();
    s.send(json!(["1", "1", "room:a", "phx_join", {"refuse": true}]))
        .await;
    assert_eq!(
        s.written().await,
        [
            json!(["1", "1", "room:a", "phx_reply", {"status": "error", "response": {"reason": "no"}}])
        ]
    );
    s.send(json!(["1", "2", "room:a", "echo", {}])).await;
    assert_eq!(
        s.written().await[0][4]["response"],
        json!({"reason": "unmatched topic"})
    );
}

#[tokio::test]
async fn a_message_to_a_topic_not_joined_is_an_unmatched_topic() {
    let mut s = socket();
    s.send(json!(["1", "5", "room:a", "echo", {}])).await;
    assert_eq!(
        s.written().await,
        [
            json!(["1", "5", "room:a", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
        ]
    );
    assert!(s.calls().is_empty());
}

#[tokio::test]
async fn a_duplicate_join_leaves_the_old_channel_and_closes_its_ref_after_the_new_reply() {
    let mut s = socket();
    s.send(json!(["1", "1", "room:a", "phx_join", {}])).await;
    s.written().await;
    s.send(json!(["2", "2", "room:a", "phx_join", {}])).await;
    assert_eq!(
        s.written().await,
        [
            ok("2", "2", "room:a", json!({})),
            json!(["1", "1", "room:a", "phx_close", {}])
        ]
    );
    assert_eq!(
        s.calls(),
        [
            "join room:a 1",
            "terminate duplicate_join 1",
            "join room:a 2"
        ]
    );
}

#[tokio::test]
async fn a_leave_is_answered_ok_then_closed_and_the_plugin_terminates_with_left() {
    let mut s = socket();
    s.send(json!(["1", "1", "room:a", "phx_join", {}])).await;
    s.written().await;
    s.send(json!(["1", "2", "room:a", "phx_leave", {}])).await;
    assert_eq!(
        s.written().await,
        [
            ok("1", "2", "room:a", json!({})),
            json!(["1", "1", "room:a", "phx_close", {}])
        ]
    );
    assert_eq!(
        s.calls().last().map(String::as_str),
        Some("terminate left 1")
    );
}

#[tokio::test]
async fn a_message_with_a_stale_join_ref_is_dropped() {
    let mut s = socket();
    s.send(json!(["1", "1", "room:a", "phx_join", {}])).await;
    s.send(json!(["2", "2", "room:a", "phx_join", {}])).await;
    s.written().await;
    s.send(json!(["1", "3", "room:a", "echo", {"old": true}]))
        .await;
    assert!(s.written().await.is_empty(), "a stale ref is not answered");
    s.send(json!(["2", "4", "room:a", "echo", {"new": true}]))
        .await;
    assert_eq!(
        s.written().await,
        [ok("2", "4", "room:a", json!({"new": true}))]
    );
    assert!(!s.calls().iter().any(|c| c == "in echo 1"));
}

#[tokio::test]
async fn a_plugin_error_crashes_only_that_channel() {
    let mut s = socket();
    s.send(json!(["1", "1", "room:a", "phx_join", {}])).await;
    s.send(json!(["2", "2", "room:b", "phx_join", {}])).await;
    s.written().await;
    s.send(json!(["1", "3", "room:a", "fail", {}])).await;
    assert_eq!(
        s.written().await,
        [json!(["1", "1", "room:a", "phx_error", {"reason": "channel_crash"}])]
    );
    s.send(json!(["2", "4", "room:b", "echo", {}])).await;
    assert_eq!(s.written().await, [ok("2", "4", "room:b", json!({}))]);
}

#[tokio::test]
async fn a_crash_errors_the_rooms_channels_and_a_rejoin_gets_a_fresh_instance() {
    let mut s = socket();
    s.send(json!(["1", "1", "room:a", "phx_join", {}])).await;
    s.written().await;
    s.send(json!(["1", "2", "room:a", "crash", {}])).await;
    assert_eq!(
        s.written().await,
        [json!(["1", "1", "room:a", "phx_error", {"reason": "channel_crash"}])]
    );
    assert!(s.calls().iter().any(|c| c.starts_with("crashed room:a")));
    // The crashed room is gone: terminate is not called, and the rejoin makes a new one.
    assert!(!s.calls().iter().any(|c| c.starts_with("terminate")));
    s.send(json!(["3", "3", "room:a", "phx_join", {}])).await;
    assert_eq!(s.written().await, [ok("3", "3", "room:a", json!({}))]);
    assert_eq!(s.plugin.made.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn joins_past_the_channel_cap_are_refused() {
    let mut s = socket_with(Limits {
        max_channels_per_socket: 1,
        ..Limits::default()
    });
    s.send(json!(["1", "1", "room:a", "phx_join", {}])).await;
    s.send(json!(["2", "2", "room:b", "phx_join", {}])).await;
    assert_eq!(
        s.written().await[1],
        json!(["2", "2", "room:b", "phx_reply", {"status": "error", "response": {"reason": "too many channels joined"}}])
    );
    assert_eq!(s.calls(), ["join room:a 1"]);
}

#[tokio::test]
async fn the_socket_closing_terminates_every_channel_with_closed() {
    let mut s = socket();
    s.send(json!(["1", "1", "room:a", "phx_join", {}])).await;
    s.send(json!(["2", "2", "room:b", "phx_join", {}])).await;
    s.written().await;
    s.session.close().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut ends: Vec<String> = s
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("terminate"))
        .collect();
    ends.sort();
    assert_eq!(ends, ["terminate closed 1", "terminate closed 2"]);
}
