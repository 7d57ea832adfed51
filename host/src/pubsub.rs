//! Topic fan-out: who is subscribed to a topic, and delivering a broadcast to all of them;
//! and, apart from topics, who listens on a socket id for `disconnect`.
//!
//! A broadcast is shared (`Arc`) by every subscriber and encoded at most once per
//! serializer, by whichever subscriber needs that encoding first (the fastlane). Subscribers
//! are opaque sinks; this module knows nothing of sockets, rooms or plugins. The adapter
//! trait lets a clustered implementation (Redis) replace the local one.
//!
//! Socket ids (`user_socket:42`) and room topics are two namespaces: a room joined at a
//! topic spelled like a socket id never hears a socket's `disconnect`, and nothing a room
//! broadcasts reaches the sockets listening on an id.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use crate::protocol::{self, Frame, Payload, Vsn};

/// Identifies one subscription; used by `broadcast_from` to skip its sender.
pub type SubscriberId = u64;

/// A message for every subscriber of a topic.
#[derive(Debug)]
pub struct Broadcast {
    /// The topic.
    pub topic: Arc<str>,
    /// The event name.
    pub event: String,
    /// The body.
    pub payload: Payload,
    /// The subscriber that must not receive it (`broadcast_from`).
    pub except: Option<SubscriberId>,
    encoded: [OnceLock<Option<Frame>>; 2],
}

impl Broadcast {
    /// A broadcast ready to publish.
    pub fn new(
        topic: Arc<str>,
        event: String,
        payload: Payload,
        except: Option<SubscriberId>,
    ) -> Self {
        Broadcast {
            topic,
            event,
            payload,
            except,
            encoded: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// The frame for a serializer, encoded on first use and shared afterwards. `None` when
    /// this serializer cannot carry the broadcast (binary payload for V1, oversized fields).
    pub fn frame(&self, vsn: Vsn) -> Option<&Frame> {
        self.encoded[vsn.index()]
            .get_or_init(|| {
                protocol::encode_broadcast(vsn, &self.topic, &self.event, &self.payload).ok()
            })
            .as_ref()
    }
}

/// Something that receives the broadcasts of a topic. Delivery must not block: it enqueues.
pub trait Subscriber: Send + Sync {
    /// Takes one broadcast.
    fn deliver(&self, broadcast: &Arc<Broadcast>);
}

/// A PubSub adapter. Every adapter must pass the shared suite in this module's tests.
pub trait PubSub: Send + Sync {
    /// Adds a subscriber to a topic.
    fn subscribe(&self, topic: &Arc<str>, id: SubscriberId, subscriber: Arc<dyn Subscriber>);
    /// Removes a subscriber; unknown ids are ignored.
    fn unsubscribe(&self, topic: &str, id: SubscriberId);
    /// Swaps the sinks of subscribers of `topic` in one step, so no broadcast is missed
    /// or delivered twice in between; ids not subscribed are ignored.
    fn resubscribe(&self, topic: &str, subscribers: Vec<(SubscriberId, Arc<dyn Subscriber>)>);
    /// Delivers to every subscriber of the broadcast's topic; returns how many received it.
    fn publish(&self, broadcast: Arc<Broadcast>) -> usize;
    /// Listens on a socket id (not a topic): [`PubSub::disconnect`] of that id reaches
    /// `subscriber`, as a `disconnect` broadcast.
    fn subscribe_socket(
        &self,
        socket_id: &Arc<str>,
        id: SubscriberId,
        subscriber: Arc<dyn Subscriber>,
    );
    /// Stops listening on a socket id; unknown ids are ignored.
    fn unsubscribe_socket(&self, socket_id: &str, id: SubscriberId);
    /// Closes every socket with this id (Phoenix's `Endpoint.broadcast(socket_id,
    /// "disconnect", %{})`); returns how many listeners heard it.
    fn disconnect(&self, socket_id: &str) -> usize;
}

type Subscribers = Vec<(SubscriberId, Arc<dyn Subscriber>)>;

/// Subscribers by name, in memory.
#[derive(Default)]
struct Names {
    // A std lock: held only to copy a few pointers, never across an await.
    names: RwLock<HashMap<Arc<str>, Subscribers>>,
}

/// The single-node adapter: subscribers in memory, topics and socket ids apart.
#[derive(Default)]
pub struct LocalPubSub {
    topics: Names,
    sockets: Names,
}

impl LocalPubSub {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
}

impl PubSub for LocalPubSub {
    fn subscribe(&self, topic: &Arc<str>, id: SubscriberId, subscriber: Arc<dyn Subscriber>) {
        self.topics.subscribe(topic, id, subscriber);
    }

    fn unsubscribe(&self, topic: &str, id: SubscriberId) {
        self.topics.unsubscribe(topic, id);
    }

    fn resubscribe(&self, topic: &str, subscribers: Vec<(SubscriberId, Arc<dyn Subscriber>)>) {
        self.topics.resubscribe(topic, subscribers);
    }

    fn publish(&self, broadcast: Arc<Broadcast>) -> usize {
        self.topics.publish(&broadcast)
    }

    fn subscribe_socket(
        &self,
        socket_id: &Arc<str>,
        id: SubscriberId,
        subscriber: Arc<dyn Subscriber>,
    ) {
        self.sockets.subscribe(socket_id, id, subscriber);
    }

    fn unsubscribe_socket(&self, socket_id: &str, id: SubscriberId) {
        self.sockets.unsubscribe(socket_id, id);
    }

    fn disconnect(&self, socket_id: &str) -> usize {
        let b = Arc::new(Broadcast::new(
            socket_id.into(),
            protocol::event::DISCONNECT.into(),
            Payload::empty(),
            None,
        ));
        self.sockets.publish(&b)
    }
}

impl Names {
    fn subscribe(&self, topic: &Arc<str>, id: SubscriberId, subscriber: Arc<dyn Subscriber>) {
        let mut topics = self.names.write().unwrap_or_else(|p| p.into_inner());
        topics
            .entry(topic.clone())
            .or_default()
            .push((id, subscriber));
    }

    fn unsubscribe(&self, topic: &str, id: SubscriberId) {
        let mut topics = self.names.write().unwrap_or_else(|p| p.into_inner());
        if let Some(subs) = topics.get_mut(topic) {
            subs.retain(|(sid, _)| *sid != id);
            if subs.is_empty() {
                topics.remove(topic);
            }
        }
    }

    fn resubscribe(&self, topic: &str, subscribers: Vec<(SubscriberId, Arc<dyn Subscriber>)>) {
        let mut new: HashMap<SubscriberId, Arc<dyn Subscriber>> = subscribers.into_iter().collect();
        let mut topics = self.names.write().unwrap_or_else(|p| p.into_inner());
        if let Some(subs) = topics.get_mut(topic) {
            for (id, sub) in subs.iter_mut() {
                if let Some(replacement) = new.remove(id) {
                    *sub = replacement;
                }
            }
        }
    }

    fn publish(&self, broadcast: &Arc<Broadcast>) -> usize {
        let topics = self.names.read().unwrap_or_else(|p| p.into_inner());
        let Some(subs) = topics.get(&*broadcast.topic) else {
            return 0;
        };
        let mut delivered = 0;
        for (id, sub) in subs {
            if broadcast.except != Some(*id) {
                sub.deliver(broadcast);
                delivered += 1;
            }
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<Vec<String>>);
    impl Subscriber for Collect {
        fn deliver(&self, b: &Arc<Broadcast>) {
            self.0
                .lock()
                .expect("lock")
                .push(format!("{}:{}", b.topic, b.event));
        }
    }

    fn broadcast(topic: &str, event: &str, except: Option<SubscriberId>) -> Arc<Broadcast> {
        Arc::new(Broadcast::new(
            topic.into(),
            event.into(),
            Payload::empty(),
            except,
        ))
    }

    /// The suite every adapter must pass.
    fn adapter_suite(ps: &dyn PubSub) {
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
        assert_eq!(*a.0.lock().expect("lock"), ["room:1:x", "room:1:w"]);
        assert_eq!(*b.0.lock().expect("lock"), ["room:1:x", "room:1:y"]);

        // Swapping a sink: the new one gets what follows, once; unknown ids are ignored.
        let c = Arc::new(Collect::default());
        ps.resubscribe("room:1", vec![(1, c.clone()), (7, c.clone())]);
        assert_eq!(ps.publish(broadcast("room:1", "v", None)), 1);
        assert_eq!(*a.0.lock().expect("lock"), ["room:1:x", "room:1:w"]);
        assert_eq!(*c.0.lock().expect("lock"), ["room:1:v"]);

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
        assert_eq!(
            *socket.0.lock().expect("lock"),
            ["user_socket:42:disconnect"]
        );
        assert_eq!(*room.0.lock().expect("lock"), ["user_socket:42:disconnect"]);
        ps.unsubscribe_socket("user_socket:42", 10);
        assert_eq!(ps.disconnect("user_socket:42"), 0);
    }

    #[test]
    fn local_adapter_passes_the_shared_suite() {
        adapter_suite(&LocalPubSub::new());
    }

    #[test]
    fn a_broadcast_is_encoded_once_per_serializer() {
        let b = broadcast("t", "e", None);
        let first = b.frame(Vsn::V2).expect("encodes").clone();
        let Frame::Text(bytes) = b.frame(Vsn::V2).expect("encodes") else {
            panic!("text")
        };
        let Frame::Text(first_bytes) = first else {
            panic!("text")
        };
        assert_eq!(
            bytes.as_bytes().as_ptr(),
            first_bytes.as_bytes().as_ptr(),
            "the same buffer is shared"
        );
        assert_ne!(b.frame(Vsn::V1), b.frame(Vsn::V2));
    }
}
