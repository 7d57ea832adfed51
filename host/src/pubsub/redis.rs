//! The cluster adapter: [`LocalPubSub`] for this node's subscribers, plus one Redis channel
//! per topic (`cinder:t:<topic>`) and per socket id (`cinder:s:<id>`) that this node has
//! subscribers for, subscribed with the first and dropped with the last, so a node
//! receives only what its sockets and rooms listen to. A broadcast is delivered locally at
//! once and published once, tagged with this node's id; every other node subscribed to the
//! topic delivers it to its own subscribers (each encoding it at most once per serializer,
//! as locally), and the origin skips its own echo. One link, one worker, in order: a room's
//! broadcasts reach every node in the order it made them.
//!
//! Each node also listens on a channel of its own (`cinder:n:<node>`) for what another node
//! sends it alone ([`PubSub::send_to`]: the calls and answers of owned rooms); sent on the
//! same link, it keeps its order with the broadcasts.
//!
//! The wire form (this adapter's own; Cinder nodes of one version talk to each other):
//! `[1][origin length: u8][origin][kind: 0 JSON, 1 binary][event length: u16 BE][event]
//! [payload]`; kinds 4 and 5 are 0 and 1 made by a room owned for the cluster, with its
//! owner's fence and the subscriber of one node to skip after the kind (`[fence: u64 BE]
//! [node length: u8][node][subscriber: u64 BE]`, node length 0 and no subscriber when none
//! is skipped); `[1][origin length][origin][2]
//! [data]` is a replication message of the layer above (presence deltas, ordered with the
//! broadcasts of the topic's channel), and `[1][origin length][origin][3][data]` a message
//! to one node. A message that does not parse is counted in `cluster_malformed` and
//! dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::{
    Broadcast, ClusterListener, DirectListener, LocalPubSub, PubSub, Subscriber, SubscriberId,
};
use crate::cluster::{Link, Listener};
use crate::protocol::Payload;
use crate::stats::Stats;

/// The channel prefix of a topic.
const TOPIC: &str = "cinder:t:";
/// The channel prefix of a socket id.
const SOCKET: &str = "cinder:s:";
/// The channel prefix of a node's own channel.
const NODE: &str = "cinder:n:";
/// The wire form's version.
const WIRE: u8 = 1;
/// How long [`PubSub::ready`] waits for Redis at most.
const READY_WAIT: Duration = Duration::from_secs(1);

/// How long [`PubSub::replicate_counted`] waits for Redis at most.
const COUNT_WAIT: Duration = Duration::from_secs(1);

/// A cluster member's PubSub.
pub struct RedisPubSub {
    local: Arc<LocalPubSub>,
    link: Arc<Link>,
    above: Arc<OnceLock<Box<dyn ClusterListener>>>,
    direct: Arc<OnceLock<Box<dyn DirectListener>>>,
}

/// What the link hands the adapter.
struct Receiver {
    node: Arc<str>,
    local: Arc<LocalPubSub>,
    above: Arc<OnceLock<Box<dyn ClusterListener>>>,
    direct: Arc<OnceLock<Box<dyn DirectListener>>>,
    stats: Arc<Stats>,
}

impl Listener for Receiver {
    fn message(&self, channel: &[u8], data: &[u8]) {
        match received(&self.node, channel, data) {
            Some(Received::Topic(b)) => {
                Stats::bump(&self.stats.cluster_received);
                self.local.topics.publish(&b);
            }
            Some(Received::Socket(id)) => {
                Stats::bump(&self.stats.cluster_received);
                self.local.sockets.publish(&super::disconnect(&id));
            }
            Some(Received::Replica {
                origin,
                topic,
                data,
            }) => {
                if let Some(above) = self.above.get() {
                    above.replica(origin, topic, data);
                }
            }
            Some(Received::Direct { origin, data }) => {
                if let Some(direct) = self.direct.get() {
                    Stats::bump(&self.stats.cluster_received);
                    direct.message(origin, data);
                }
            }
            Some(Received::Own) => {}
            None => Stats::bump(&self.stats.cluster_malformed),
        }
    }

    fn node_down(&self, node: &str) {
        if let Some(above) = self.above.get() {
            above.node_down(node);
        }
        if let Some(direct) = self.direct.get() {
            direct.node_down(node);
        }
    }

    fn node_up(&self, node: &str) {
        if let Some(above) = self.above.get() {
            above.node_up(node);
        }
        if let Some(direct) = self.direct.get() {
            direct.node_up(node);
        }
    }

    fn reconnected(&self) {
        if let Some(above) = self.above.get() {
            above.reconnected();
        }
        if let Some(direct) = self.direct.get() {
            direct.reconnected();
        }
    }
}

impl RedisPubSub {
    /// The adapter over `link`, which it listens to from now on.
    pub fn new(link: Arc<Link>, stats: Arc<Stats>) -> Arc<RedisPubSub> {
        let local = Arc::new(LocalPubSub::new());
        let above = Arc::new(OnceLock::new());
        let direct = Arc::new(OnceLock::new());
        link.listen(Box::new(Receiver {
            node: link.node().clone(),
            local: local.clone(),
            above: above.clone(),
            direct: direct.clone(),
            stats,
        }));
        Arc::new(RedisPubSub {
            local,
            link,
            above,
            direct,
        })
    }
}

/// What a channel message is.
enum Received<'a> {
    /// A broadcast from another node.
    Topic(Arc<Broadcast>),
    /// A `disconnect` of a socket id from another node.
    Socket(String),
    /// A replication message of the layer above, from node `origin`.
    Replica {
        origin: &'a str,
        topic: &'a str,
        data: &'a [u8],
    },
    /// A message to this node from node `origin`.
    Direct { origin: &'a str, data: &'a [u8] },
    /// This node's own, already delivered.
    Own,
}

/// The kinds of message.
const JSON: u8 = 0;
const BINARY: u8 = 1;
const REPLICA: u8 = 2;
const DIRECT: u8 = 3;
/// Added to `JSON` or `BINARY`: made by an owned room (a fence, maybe a subscriber of one
/// node to skip).
const OWNED: u8 = 4;

/// The wire form's header: the version, the origin node and the kind.
fn header(node: &str, kind: u8, room: usize) -> Option<Vec<u8>> {
    let origin = u8::try_from(node.len()).ok()?;
    let mut out = Vec::with_capacity(3 + node.len() + room);
    out.push(WIRE);
    out.push(origin);
    out.extend_from_slice(node.as_bytes());
    out.push(kind);
    Some(out)
}

/// The wire form of broadcast `b` made on `node`.
fn encode(node: &str, b: &Broadcast) -> Option<Vec<u8>> {
    let (event, payload) = (&b.event, &b.payload);
    let event_len = u16::try_from(event.len()).ok()?;
    let (kind, body) = match payload {
        Payload::Json(raw) => (JSON, raw.get().as_bytes()),
        Payload::Binary(bytes) => (BINARY, &bytes[..]),
    };
    let owned = b.fence != 0 || b.except_on.is_some();
    let kind = kind + if owned { OWNED } else { 0 };
    let mut out = header(node, kind, 19 + event.len() + body.len())?;
    if owned {
        out.extend_from_slice(&b.fence.to_be_bytes());
        match &b.except_on {
            Some((other, id)) => {
                out.push(u8::try_from(other.len()).ok().filter(|n| *n > 0)?);
                out.extend_from_slice(other.as_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
            None => out.push(0),
        }
    }
    out.extend_from_slice(&event_len.to_be_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(body);
    Some(out)
}

/// The wire form of a replication message (`REPLICA`) or a message to one node
/// (`DIRECT`) made on `node`.
fn encode_data(node: &str, kind: u8, data: &[u8]) -> Option<Vec<u8>> {
    let mut out = header(node, kind, data.len())?;
    out.extend_from_slice(data);
    Some(out)
}

/// Reads a channel message arriving at node `node`; `None` when it does not parse.
fn received<'a>(node: &str, channel: &'a [u8], data: &'a [u8]) -> Option<Received<'a>> {
    let channel = std::str::from_utf8(channel).ok()?;
    let (&wire, rest) = data.split_first()?;
    if wire != WIRE {
        return None;
    }
    let (&origin_len, rest) = rest.split_first()?;
    let (origin, rest) = rest.split_at_checked(origin_len.into())?;
    if origin == node.as_bytes() {
        return Some(Received::Own);
    }
    if let Some(id) = channel.strip_prefix(SOCKET) {
        return Some(Received::Socket(id.to_owned()));
    }
    if channel.strip_prefix(NODE) == Some(node) {
        let (&DIRECT, data) = rest.split_first()? else {
            return None;
        };
        let origin = std::str::from_utf8(origin).ok()?;
        return Some(Received::Direct { origin, data });
    }
    let topic = channel.strip_prefix(TOPIC)?;
    let (&kind, rest) = rest.split_first()?;
    if kind == REPLICA {
        return Some(Received::Replica {
            origin: std::str::from_utf8(origin).ok()?,
            topic,
            data: rest,
        });
    }
    let (kind, fence, except, rest) = if kind >= OWNED {
        let (fence, rest) = rest.split_at_checked(8)?;
        let fence = u64::from_be_bytes(fence.try_into().ok()?);
        let (&len, rest) = rest.split_first()?;
        if len == 0 {
            (kind - OWNED, fence, None, rest)
        } else {
            let (other, rest) = rest.split_at_checked(len.into())?;
            let (id, rest) = rest.split_at_checked(8)?;
            let id = u64::from_be_bytes(id.try_into().ok()?);
            let except = (other == node.as_bytes()).then_some(id);
            (kind - OWNED, fence, except, rest)
        }
    } else {
        (kind, 0, None, rest)
    };
    let (event_len, rest) = rest.split_at_checked(2)?;
    let event_len = u16::from_be_bytes([event_len[0], event_len[1]]);
    let (event, body) = rest.split_at_checked(event_len.into())?;
    let event = std::str::from_utf8(event).ok()?.to_owned();
    let payload = match kind {
        JSON => Payload::json(std::str::from_utf8(body).ok()?.to_owned()).ok()?,
        BINARY => Payload::Binary(bytes::Bytes::copy_from_slice(body)),
        _ => return None,
    };
    Some(Received::Topic(Arc::new(
        Broadcast::new(topic.into(), event, payload, except).fenced(fence),
    )))
}

impl PubSub for RedisPubSub {
    fn subscribe(&self, topic: &Arc<str>, id: SubscriberId, subscriber: Arc<dyn Subscriber>) {
        self.local.topics.subscribe(topic, id, subscriber, || {
            self.link.subscribe(format!("{TOPIC}{topic}"));
        });
    }

    fn unsubscribe(&self, topic: &str, id: SubscriberId) {
        self.local.topics.unsubscribe(topic, id, || {
            self.link.unsubscribe(format!("{TOPIC}{topic}"));
        });
    }

    fn resubscribe(&self, topic: &str, subscribers: Vec<(SubscriberId, Arc<dyn Subscriber>)>) {
        self.local.resubscribe(topic, subscribers);
    }

    fn publish(&self, broadcast: Arc<Broadcast>) -> usize {
        if let Some(wire) = encode(self.link.node(), &broadcast) {
            self.link
                .publish(format!("{TOPIC}{}", broadcast.topic), wire);
        }
        self.local.publish(broadcast)
    }

    fn subscribe_socket(
        &self,
        socket_id: &Arc<str>,
        id: SubscriberId,
        subscriber: Arc<dyn Subscriber>,
    ) {
        self.local.sockets.subscribe(socket_id, id, subscriber, || {
            self.link.subscribe(format!("{SOCKET}{socket_id}"));
        });
    }

    fn unsubscribe_socket(&self, socket_id: &str, id: SubscriberId) {
        self.local.sockets.unsubscribe(socket_id, id, || {
            self.link.unsubscribe(format!("{SOCKET}{socket_id}"));
        });
    }

    fn disconnect(&self, socket_id: &str) -> usize {
        if let Some(wire) = encode(self.link.node(), &super::disconnect(socket_id)) {
            self.link.publish(format!("{SOCKET}{socket_id}"), wire);
        }
        self.local.disconnect(socket_id)
    }

    fn ready(&self, _topic: &str) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.link.ready(READY_WAIT))
    }

    fn publish_local(&self, broadcast: Arc<Broadcast>) -> usize {
        self.local.publish(broadcast)
    }

    fn replicate(&self, topic: &str, data: Vec<u8>) {
        if let Some(wire) = encode_data(self.link.node(), REPLICA, &data) {
            self.link.publish(format!("{TOPIC}{topic}"), wire);
        }
    }

    fn replicate_counted(
        &self,
        topic: &str,
        data: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let Some(wire) = encode_data(self.link.node(), REPLICA, &data) else {
            return Box::pin(std::future::ready(0));
        };
        let heard = self
            .link
            .publish_counted(format!("{TOPIC}{topic}"), wire, COUNT_WAIT);
        // This node hears its own too, when it is subscribed.
        Box::pin(async move { heard.await.saturating_sub(1) })
    }

    fn on_cluster(&self, listener: Box<dyn ClusterListener>) -> bool {
        let _ = self.above.set(listener);
        true
    }

    fn send_to(&self, node: &str, data: Vec<u8>) {
        if let Some(wire) = encode_data(self.link.node(), DIRECT, &data) {
            self.link.publish(format!("{NODE}{node}"), wire);
        }
    }

    fn on_direct(&self, listener: Box<dyn DirectListener>) -> bool {
        if self.direct.set(listener).is_ok() {
            self.link.subscribe(format!("{NODE}{}", self.link.node()));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broadcast(event: &str, payload: Payload) -> Broadcast {
        Broadcast::new("t".into(), event.into(), payload, None)
    }

    #[test]
    fn the_wire_form_round_trips_and_the_origin_skips_its_own() {
        let payload = Payload::json(r#"{"body":"hi"}"#.into()).expect("json");
        let wire = encode("a", &broadcast("new_message", payload.clone())).expect("encodes");
        let Some(Received::Topic(b)) = received("b", b"cinder:t:room:1", &wire) else {
            panic!("a broadcast for node b")
        };
        assert_eq!(&*b.topic, "room:1");
        assert_eq!(b.event, "new_message");
        assert_eq!(b.payload, payload);
        assert_eq!((b.fence, b.except), (0, None));
        assert!(matches!(
            received("a", b"cinder:t:room:1", &wire),
            Some(Received::Own)
        ));
        let binary = Payload::Binary(bytes::Bytes::from_static(&[0, 1, 255]));
        let wire = encode("a", &broadcast("frame", binary.clone())).expect("encodes");
        let Some(Received::Topic(b)) = received("b", b"cinder:t:t", &wire) else {
            panic!("a broadcast")
        };
        assert_eq!(b.payload, binary);
    }

    #[test]
    fn an_owned_rooms_broadcast_carries_its_fence_and_the_member_to_skip() {
        let owned = broadcast("count", Payload::empty()).fenced(7);
        let wire = encode("a", &owned).expect("encodes");
        let Some(Received::Topic(b)) = received("b", b"cinder:t:t", &wire) else {
            panic!("a broadcast")
        };
        assert_eq!((b.fence, b.except), (7, None));
        let from = broadcast("count", Payload::empty())
            .fenced(8)
            .except_on("b".into(), 42);
        let wire = encode("a", &from).expect("encodes");
        for (node, except) in [("b", Some(42)), ("c", None)] {
            let Some(Received::Topic(b)) = received(node, b"cinder:t:t", &wire) else {
                panic!("a broadcast")
            };
            assert_eq!((b.fence, b.except), (8, except), "at {node}");
        }
        for cut in 0..wire.len() {
            assert!(
                received("b", b"cinder:t:t", &wire[..cut]).is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_message_to_one_node_reaches_that_node_only() {
        let wire = encode_data("a", DIRECT, b"call").expect("encodes");
        assert!(matches!(
            received("b", b"cinder:n:b", &wire),
            Some(Received::Direct {
                origin: "a",
                data: b"call"
            })
        ));
        assert!(received("c", b"cinder:n:b", &wire).is_none());
        let broadcast = encode("a", &broadcast("e", Payload::empty())).expect("encodes");
        assert!(received("b", b"cinder:n:b", &broadcast).is_none());
    }

    #[test]
    fn what_does_not_parse_is_refused_not_trusted() {
        let wire = encode("a", &broadcast("e", Payload::empty())).expect("encodes");
        for cut in 0..wire.len() {
            assert!(
                received("b", b"cinder:t:x", &wire[..cut]).is_none(),
                "cut at {cut}"
            );
        }
        let mut bad_json = wire.clone();
        bad_json.pop();
        assert!(received("b", b"cinder:t:x", &bad_json).is_none());
        let mut future = wire.clone();
        future[0] = 2;
        assert!(received("b", b"cinder:t:x", &future).is_none());
        assert!(received("b", b"other:x", &wire).is_none());
    }
}
