//! The suite every PubSub adapter passes, so an adapter is a drop-in for another: what a
//! node's own subscribers see (`local_suite`: counts, `broadcast_from`, swapped sinks,
//! socket ids apart from topics). The unit tests run it on [`super::LocalPubSub`], and
//! `tests/tests/cluster.rs` on [`super::RedisPubSub`] against a real `redis-server`, with
//! the cross-node half (every node's subscribers hear a broadcast once, in order) beside it.
//! It panics on the first difference: it is for tests.

use std::sync::{Arc, Mutex};

use super::{Broadcast, PubSub, Subscriber, SubscriberId};
use crate::protocol::Payload;

/// A subscriber that records `topic:event` of what it hears.
#[derive(Default)]
pub struct Collect(Mutex<Vec<String>>);

impl Collect {
    /// What it heard, in order.
    pub fn heard(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Subscriber for Collect {
    fn deliver(&self, b: &Arc<Broadcast>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{}:{}", b.topic, b.event));
    }
}

/// A broadcast of `event` with an empty payload.
pub fn broadcast(topic: &str, event: &str, except: Option<SubscriberId>) -> Arc<Broadcast> {
    Arc::new(Broadcast::new(
        topic.into(),
        event.into(),
        Payload::empty(),
        except,
    ))
}

/// What one node's subscribers see, the same on every adapter.
pub fn local_suite(ps: &dyn PubSub) {
    let a = Arc::new(Collect::default());
    let b = Arc::new(Collect::default());
    let topic: Arc<str> = "room:1".into();
    ps.subscribe(&topic, 1, a.clone());
    ps.subscribe(&topic, 2, b.clone());
    assert_eq!(ps.publish(broadcast("room:1", "x", None)), 2);
    assert_eq!(ps.publish(broadcast("room:1", "y", Some(1))), 1);
    assert_eq!(ps.publish(broadcast("room:2", "z", None)), 0);
    ps.unsubscribe("room:1", 2);
    ps.unsubscribe("room:1", 99);
    assert_eq!(ps.publish(broadcast("room:1", "w", None)), 1);
    assert_eq!(a.heard(), ["room:1:x", "room:1:w"]);
    assert_eq!(b.heard(), ["room:1:x", "room:1:y"]);

    // Swapping a sink: the new one gets what follows, once; unknown ids are ignored.
    let c = Arc::new(Collect::default());
    ps.resubscribe("room:1", vec![(1, c.clone()), (7, c.clone())]);
    assert_eq!(ps.publish(broadcast("room:1", "v", None)), 1);
    assert_eq!(a.heard(), ["room:1:x", "room:1:w"]);
    assert_eq!(c.heard(), ["room:1:v"]);
    ps.unsubscribe("room:1", 1);

    // Socket ids are not topics: a room subscribed at a topic spelled like a socket id
    // hears no disconnect, and a broadcast there reaches no socket.
    let socket = Arc::new(Collect::default());
    let room = Arc::new(Collect::default());
    let id: Arc<str> = "user_socket:42".into();
    ps.subscribe_socket(&id, 10, socket.clone());
    ps.subscribe(&id, 11, room.clone());
    assert_eq!(
        ps.publish(broadcast("user_socket:42", "disconnect", None)),
        1
    );
    assert_eq!(ps.disconnect("user_socket:42"), 1);
    assert_eq!(socket.heard(), ["user_socket:42:disconnect"]);
    assert_eq!(room.heard(), ["user_socket:42:disconnect"]);
    ps.unsubscribe_socket("user_socket:42", 10);
    ps.unsubscribe("user_socket:42", 11);
    assert_eq!(ps.disconnect("user_socket:42"), 0);
}
