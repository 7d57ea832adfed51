//! Topic fan-out: who is subscribed to a topic, and delivering a broadcast to all of them;
//! and, apart from topics, who listens on a socket id for `disconnect`.
//!
//! A broadcast is shared (`Arc`) by every subscriber and encoded at most once per
//! serializer, by whichever subscriber needs that encoding first (the fastlane). Subscribers
//! are opaque sinks; this module knows nothing of sockets, rooms or plugins. Two adapters
//! implement the trait: [`LocalPubSub`] (one node, the embedded default) and
//! [`RedisPubSub`] (a cluster member: the local one plus one Redis channel per topic the
//! node has subscribers for); both pass [`conformance::local_suite`].
//!
//! Socket ids (`user_socket:42`) and room topics are two namespaces: a room joined at a
//! topic spelled like a socket id never hears a socket's `disconnect`, and nothing a room
//! broadcasts reaches the sockets listening on an id.

pub mod conformance;
mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};

use crate::protocol::{self, Frame, Payload, Vsn};

pub use redis::RedisPubSub;

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
    /// On a cluster, the subscriber of another node that must not receive it: a
    /// `broadcast_from` of a channel whose room runs on this node.
    pub except_on: Option<(Arc<str>, SubscriberId)>,
    /// The fence of the owner that made it (a room owned for the cluster), 0 for any
    /// other: a node drops broadcasts of an owner older than one it heard from.
    pub fence: u64,
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
            except_on: None,
            fence: 0,
            encoded: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// The same broadcast, skipping subscriber `id` of node `node` too.
    pub fn except_on(mut self, node: Arc<str>, id: SubscriberId) -> Self {
        self.except_on = Some((node, id));
        self
    }

    /// The same broadcast, made by the owner of fence `fence`.
    pub fn fenced(mut self, fence: u64) -> Self {
        self.fence = fence;
        self
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

/// A PubSub adapter. Every adapter passes the shared suite, [`conformance`].
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
    /// "disconnect", %{})`); returns how many listeners on this node heard it.
    fn disconnect(&self, socket_id: &str) -> usize;
    /// Resolves once broadcasts made on other nodes to `topic`, subscribed before, reach
    /// this node's subscribers: at once on one node; a cluster adapter waits for its
    /// broker's answer, for a bounded time.
    fn ready(&self, _topic: &str) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(std::future::ready(()))
    }
    /// Delivers to this node's subscribers only (what a replicated layer computed here,
    /// such as a presence diff); returns how many received it.
    fn publish_local(&self, broadcast: Arc<Broadcast>) -> usize {
        self.publish(broadcast)
    }
    /// Sends `data`, a replication message of the layer above (presence), to the other
    /// nodes subscribed to `topic`, after this node's broadcasts made before it; nothing on
    /// one node.
    fn replicate(&self, _topic: &str, _data: Vec<u8>) {}
    /// [`PubSub::replicate`], resolving to how many other nodes heard it (0 on one node, or
    /// while the cluster is unreachable).
    fn replicate_counted(
        &self,
        _topic: &str,
        _data: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        Box::pin(std::future::ready(0))
    }
    /// Where replication messages and the cluster's events go; set once. False on one
    /// node, where there is nothing to replicate and the listener is never called.
    fn on_cluster(&self, _listener: Box<dyn ClusterListener>) -> bool {
        false
    }
    /// Sends `data` to node `node` alone, in one order with this node's broadcasts (what
    /// was published before it arrives before it); nothing on one node.
    fn send_to(&self, _node: &str, _data: Vec<u8>) {}
    /// Where what other nodes send this node ([`PubSub::send_to`]) goes, with the
    /// cluster's events; set once. False on one node.
    fn on_direct(&self, _listener: Box<dyn DirectListener>) -> bool {
        false
    }
}

/// What the channel layer hears of the cluster: messages sent to this node, nodes gone,
/// the link back after an outage. Called on the link's task, in the order the messages
/// were sent (and with the broadcasts around them): it must not block.
pub trait DirectListener: Send + Sync {
    /// `data`, sent to this node by node `origin`.
    fn message(&self, origin: &str, data: &[u8]);
    /// Node `node` is gone.
    fn node_down(&self, node: &str);
    /// Node `node` is there (it joined, or was taken for gone and proved alive).
    fn node_up(&self, node: &str);
    /// The link came back after an outage: what was sent meanwhile is lost.
    fn reconnected(&self);
}

/// What the layer above hears of the cluster (presence): called on the link's task, so it
/// must not block.
pub trait ClusterListener: Send + Sync {
    /// A replication message from node `origin` for `topic`.
    fn replica(&self, origin: &str, topic: &str, data: &[u8]);
    /// Node `node` is gone (its heartbeat expired): what it replicated is no longer so.
    fn node_down(&self, node: &str);
    /// Node `node` joined, or is back after it was taken for gone: it may hold what this
    /// node does not.
    fn node_up(&self, node: &str);
    /// The link came back after an outage: replication messages made meanwhile are lost.
    fn reconnected(&self);
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
        self.topics.subscribe(topic, id, subscriber, || {});
    }

    fn unsubscribe(&self, topic: &str, id: SubscriberId) {
        self.topics.unsubscribe(topic, id, || {});
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
        self.sockets.subscribe(socket_id, id, subscriber, || {});
    }

    fn unsubscribe_socket(&self, socket_id: &str, id: SubscriberId) {
        self.sockets.unsubscribe(socket_id, id, || {});
    }

    fn disconnect(&self, socket_id: &str) -> usize {
        self.sockets.publish(&disconnect(socket_id))
    }
}

/// The `disconnect` broadcast to the sockets with this id.
fn disconnect(socket_id: &str) -> Arc<Broadcast> {
    Arc::new(Broadcast::new(
        socket_id.into(),
        protocol::event::DISCONNECT.into(),
        Payload::empty(),
        None,
    ))
}

impl Names {
    /// Adds a subscriber; true when it is the name's first. `first` runs under the lock,
    /// so what it asks of a broker is in the order of the changes.
    fn subscribe(
        &self,
        topic: &Arc<str>,
        id: SubscriberId,
        subscriber: Arc<dyn Subscriber>,
        first: impl FnOnce(),
    ) {
        let mut topics = self.names.write().unwrap_or_else(|p| p.into_inner());
        let subs = topics.entry(topic.clone()).or_default();
        subs.push((id, subscriber));
        if subs.len() == 1 {
            first();
        }
    }

    /// Removes a subscriber; `last` runs under the lock when it was the name's last.
    fn unsubscribe(&self, topic: &str, id: SubscriberId, last: impl FnOnce()) {
        let mut topics = self.names.write().unwrap_or_else(|p| p.into_inner());
        if let Some(subs) = topics.get_mut(topic) {
            subs.retain(|(sid, _)| *sid != id);
            // A name has subscribers or no entry: empty now means this one was its last.
            if subs.is_empty() {
                topics.remove(topic);
                last();
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

    #[test]
    fn local_adapter_passes_the_shared_suite() {
        conformance::local_suite(&LocalPubSub::new());
    }

    #[test]
    fn a_broadcast_is_encoded_once_per_serializer() {
        let b = conformance::broadcast("t", "e", None);
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
