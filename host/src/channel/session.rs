//! One socket's channels and the protocol rules that govern them: heartbeats, joins one at
//! a time, join refs (stale messages dropped), duplicate joins, leaves, the channel cap;
//! and what the socket writes next, its queue and its channels' feeds merged in order.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::JoinResult;
use super::feed::Cursor;
use super::hub::Hub;
use super::outbound::{Outbound, OutboundRx, OutboundTx};
use super::room::{ROOM_WAIT, RoomHandle, RoomMsg};
use super::{ChannelSocket, MemberId};
use crate::metrics::{ChannelGauge, JoinResult as JoinEnd};
use crate::presence::Account;
use crate::protocol::{self, Frame, Message, Payload, Status, Vsn, event, reason};
use crate::pubsub::{Broadcast, Subscriber, SubscriberId};
use crate::stats::Stats;

/// Listens on a socket's id for `disconnect` (Phoenix's `Endpoint.broadcast(socket_id,
/// "disconnect", %{})`, e.g. after a logout elsewhere).
struct DisconnectSink {
    out: OutboundTx,
}

impl Subscriber for DisconnectSink {
    fn deliver(&self, broadcast: &Arc<Broadcast>) {
        if broadcast.event == event::DISCONNECT {
            self.out.send(Outbound::Disconnect);
        }
    }
}

struct Joined {
    join_ref: Option<String>,
    member: MemberId,
    room: RoomHandle,
    /// Where this channel is in its room's feed.
    feed: Cursor,
    /// Counts the channel in the joined channels while it lives.
    _counted: ChannelGauge,
}

impl Joined {
    /// Tells the room this channel is gone; it runs `terminate(reason)`.
    async fn leave(&self, reason: &'static str) {
        // A room that is already gone has nothing left to tell.
        let _ = self
            .room
            .tx
            .send(RoomMsg::Leave {
                member: self.member,
                reason,
            })
            .await;
    }
}

/// What a socket writes next: an item of its own queue, or a broadcast from one of its
/// rooms' feeds, already encoded for its serializer and lent by the feed.
pub enum Next<'a> {
    /// From the socket's queue.
    Queued(Outbound),
    /// From a feed.
    Broadcast(&'a Frame),
}

/// The channels of one socket and the protocol rules that govern them.
pub struct Session {
    hub: Arc<Hub>,
    socket_id: Option<Arc<str>>,
    /// The subscription on `socket_id` that listens for `disconnect`.
    id_subscription: Option<SubscriberId>,
    assigns: String,
    /// The presence bytes this socket's channels hold.
    presence: Arc<Account>,
    out: OutboundTx,
    /// The socket's serializer.
    vsn: Vsn,
    /// Whether the transport carries text only (LongPoll): binary payloads are refused as
    /// they are to V1.
    text_only: bool,
    channels: HashMap<Arc<str>, Joined>,
}

/// How often a join is retried when it meets a room that is closing.
const JOIN_RETRIES: usize = 3;

impl Session {
    /// A session for a socket with this identity and serializer, writing to `out`.
    pub fn new(
        hub: Arc<Hub>,
        socket_id: Option<String>,
        assigns: String,
        out: OutboundTx,
        vsn: Vsn,
    ) -> Self {
        let socket_id: Option<Arc<str>> = socket_id.map(Arc::from);
        // A socket with an id listens on it: a `disconnect` broadcast there closes it.
        let id_subscription = socket_id.as_ref().map(|id| {
            let subscription = hub.next_id();
            let sink = Arc::new(DisconnectSink { out: out.clone() });
            hub.pubsub().subscribe_socket(id, subscription, sink);
            subscription
        });
        Session {
            hub,
            socket_id,
            id_subscription,
            assigns,
            presence: Arc::default(),
            out,
            vsn,
            text_only: false,
            channels: HashMap::new(),
        }
    }

    /// The session of a transport that carries text only (LongPoll's JSON answers): a
    /// binary reply becomes an error reply, a binary push is dropped (both counted in
    /// `undeliverable`).
    pub fn text_only(mut self) -> Self {
        self.text_only = true;
        self
    }

    fn reply(&self, msg: &Message, topic: Arc<str>, status: Status, payload: Payload) {
        self.out.send(Outbound::Reply {
            join_ref: msg.join_ref.clone(),
            msg_ref: msg.msg_ref.clone(),
            topic,
            status,
            payload,
        });
    }

    /// Answers a message with an error reply instead of handling it (messages without a
    /// ref get nothing).
    pub fn refuse(&self, msg: &Message, why: &str) {
        if msg.msg_ref.is_some() {
            self.reply(
                msg,
                Arc::from(msg.topic.as_str()),
                Status::Error,
                protocol::reason_payload(why),
            );
        }
    }

    /// Handles one client message.
    pub async fn handle(&mut self, msg: Message) {
        let topic: Arc<str> = Arc::from(msg.topic.as_str());
        if msg.topic == protocol::PHOENIX_TOPIC && msg.event == event::HEARTBEAT {
            return self.reply(&msg, topic, Status::Ok, Payload::empty());
        }
        match msg.event.as_str() {
            event::JOIN => self.join(msg, topic).await,
            event::LEAVE => {
                if self
                    .channels
                    .get(&topic)
                    .is_some_and(|c| is_stale(&msg, &c.join_ref))
                {
                    return;
                }
                self.reply(&msg, topic.clone(), Status::Ok, Payload::empty());
                if let Some(joined) = self.channels.remove(&topic) {
                    self.out.send(Outbound::Close {
                        topic,
                        join_ref: joined.join_ref.clone(),
                    });
                    joined.leave(reason::LEFT).await;
                }
            }
            _ => match self.channels.get(&topic) {
                None => self.reply(
                    &msg,
                    topic,
                    Status::Error,
                    protocol::reason_payload(reason::UNMATCHED_TOPIC),
                ),
                Some(joined) if is_stale(&msg, &joined.join_ref) => {}
                Some(joined) => {
                    let room = joined.room.tx.clone();
                    let m = RoomMsg::In {
                        member: joined.member,
                        event: msg.event,
                        payload: msg.payload,
                        msg_ref: msg.msg_ref,
                    };
                    let _ = room.send(m).await;
                }
            },
        }
    }

    async fn join(&mut self, msg: Message, topic: Arc<str>) {
        let replaced = self.channels.remove(&topic);
        if let Some(old) = &replaced {
            old.leave(reason::DUPLICATE_JOIN).await;
        } else if self.channels.len() >= self.hub.limits().max_channels_per_socket {
            Stats::bump(&self.hub.stats().channels_refused);
            self.hub.stats().metrics.joined(JoinEnd::Refused);
            return self.reply(
                &msg,
                topic,
                Status::Error,
                protocol::reason_payload(reason::TOO_MANY_CHANNELS),
            );
        }
        let member = self.hub.next_id();
        let socket = ChannelSocket {
            channel: member,
            presence: self.presence.clone(),
            id: self.socket_id.clone(),
            topic: topic.clone(),
            // Plugins see a ref's text, whatever JSON a V1 client sent it as.
            join_ref: msg
                .join_ref
                .as_deref()
                .map(|r| protocol::ref_text(self.vsn, r)),
            assigns: self.assigns.clone(),
        };
        let mut outcome = JoinResult::Retry;
        let mut joined_room = None;
        // A room answers within ROOM_WAIT or the client is told it is busy; the socket
        // never hangs on one room.
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        for _ in 0..JOIN_RETRIES {
            let room = match self.hub.room(&topic) {
                Ok(room) => room,
                Err(why) => {
                    outcome = JoinResult::Refused(protocol::reason_payload(why));
                    break;
                }
            };
            let (done, result) = oneshot::channel();
            let m = RoomMsg::Join {
                member,
                socket: socket.clone(),
                out: self.out.clone(),
                payload: msg.payload.clone(),
                msg_ref: msg.msg_ref.clone(),
                done,
            };
            let answer = tokio::time::timeout_at(deadline, async {
                room.tx.send(m).await.ok()?;
                result.await.ok()
            })
            .await;
            outcome = match answer {
                Ok(answer) => answer.unwrap_or(JoinResult::Retry),
                Err(_) => {
                    Stats::bump(&self.hub.stats().room_busy);
                    JoinResult::Refused(protocol::reason_payload(reason::ROOM_BUSY))
                }
            };
            if !matches!(outcome, JoinResult::Retry) {
                joined_room = Some(room);
                break;
            }
        }
        let metrics = &self.hub.stats().metrics;
        metrics.joined(match (&outcome, &joined_room) {
            (JoinResult::Joined(_), Some(_)) => JoinEnd::Ok,
            (JoinResult::Refused(_), _) => JoinEnd::Refused,
            (JoinResult::Crashed, _) => JoinEnd::Crashed,
            _ => JoinEnd::Unavailable,
        });
        match (outcome, joined_room) {
            (JoinResult::Joined(feed), Some(room)) => {
                self.channels.insert(
                    topic.clone(),
                    Joined {
                        join_ref: msg.join_ref.clone(),
                        member,
                        room,
                        feed,
                        _counted: metrics.channel_joined(),
                    },
                );
            }
            (JoinResult::Refused(reply), _) => {
                self.reply(&msg, topic.clone(), Status::Error, reply)
            }
            (JoinResult::Crashed, _) => self.reply(
                &msg,
                topic.clone(),
                Status::Error,
                protocol::reason_payload(reason::JOIN_CRASHED),
            ),
            (JoinResult::Unavailable(why), _) => self.reply(
                &msg,
                topic.clone(),
                Status::Error,
                protocol::reason_payload(why),
            ),
            (JoinResult::Retry | JoinResult::Joined(_), _) => self.reply(
                &msg,
                topic.clone(),
                Status::Error,
                protocol::reason_payload(reason::PLUGIN_UNAVAILABLE),
            ),
        }
        if let Some(old) = replaced {
            self.out.send(Outbound::Close {
                topic,
                join_ref: old.join_ref,
            });
        }
    }

    /// Encodes one item of this socket's queue in its serializer, or `None` when there is
    /// nothing to write: a notice about a channel this socket already replaced or left, or
    /// a push its serializer cannot carry (counted). A reply it cannot carry becomes an
    /// error reply the client can read.
    pub fn encode(&mut self, item: Outbound) -> Option<Frame> {
        let vsn = self.vsn;
        let frame = match item {
            Outbound::Reply {
                join_ref,
                msg_ref,
                topic,
                status,
                payload,
            } => {
                let (join_ref, msg_ref) = (join_ref.as_deref(), msg_ref.as_deref());
                let encoded = if self.text_only && matches!(payload, Payload::Binary(_)) {
                    Err(None)
                } else {
                    protocol::encode_reply(vsn, join_ref, msg_ref, &topic, status, &payload)
                        .map_err(Some)
                };
                return match encoded {
                    Ok(frame) => Some(frame),
                    Err(why) => {
                        Stats::bump(&self.hub.stats().undeliverable);
                        undeliverable_reply(vsn, join_ref, msg_ref, &topic, why.as_ref())
                    }
                };
            }
            Outbound::Push {
                join_ref,
                topic,
                event,
                payload,
            } => protocol::encode_push(vsn, join_ref.as_deref(), &topic, &event, &payload)
                .inspect_err(|_| Stats::bump(&self.hub.stats().undeliverable)),
            Outbound::Disconnect => return None,
            Outbound::Close { topic, join_ref } => {
                Ok(protocol::encode_close(vsn, join_ref.as_deref(), &topic))
            }
            Outbound::ChannelDown {
                topic,
                member,
                crashed,
                ..
            } => {
                // The channel's join ref as this socket holds it (V1: the JSON the client
                // sent), not the room's copy, which is its text.
                let join_ref = self.channel_down(&topic, member)?;
                Ok(if crashed {
                    protocol::encode_crash(vsn, join_ref.as_deref(), &topic)
                } else {
                    protocol::encode_close(vsn, join_ref.as_deref(), &topic)
                })
            }
        };
        match frame {
            Ok(frame) => Some(frame),
            Err(e) => {
                tracing::debug!(error = %e, "message cannot be encoded for this socket");
                None
            }
        }
    }

    /// The room ended a channel; returns the channel's join ref when the socket should tell
    /// the client (`None` when the notice is about a channel this socket already replaced
    /// or left).
    pub fn channel_down(&mut self, topic: &str, member: MemberId) -> Option<Option<String>> {
        match self.channels.get(topic) {
            Some(joined) if joined.member == member => {
                self.channels.remove(topic).map(|joined| joined.join_ref)
            }
            _ => None,
        }
    }

    /// Waits until something is ready to write: an item of the socket's queue or a
    /// broadcast in one of its channels' feeds.
    pub async fn ready(&mut self, rx: &mut OutboundRx) {
        let vsn = self.vsn;
        while self.lowest(rx).is_none() {
            if self.channels.values_mut().all(|c| c.feed.park(vsn)) {
                rx.ready().await;
            }
        }
    }

    /// The next item to write, if one is ready, lowest sequence number first.
    ///
    /// Looking twice keeps the order: whatever was made before the lowest item the first
    /// look found was added before it too, so the second look sees it, even in a source
    /// the first look found empty. Sources are in order themselves, so no head can drop
    /// below what the first look saw.
    pub fn next_ready(&mut self, rx: &mut OutboundRx) -> Option<Next<'_>> {
        self.lowest(rx)?;
        match self.lowest(rx)? {
            None => rx.pop().map(Next::Queued),
            Some(i) => {
                let vsn = self.vsn;
                let joined = self.channels.values_mut().nth(i)?;
                joined.feed.take(vsn).map(Next::Broadcast)
            }
        }
    }

    /// Whether something is ready to write now.
    pub fn next_ready_exists(&mut self, rx: &mut OutboundRx) -> bool {
        self.lowest(rx).is_some()
    }

    /// Where the lowest ready item is: the queue (`None`) or the feed of the `i`th channel.
    fn lowest(&mut self, rx: &mut OutboundRx) -> Option<Option<usize>> {
        let vsn = self.vsn;
        let mut best: Option<(u64, Option<usize>)> = None;
        for (i, joined) in self.channels.values_mut().enumerate() {
            if let Some(seq) = joined.feed.peek(vsn)
                && best.is_none_or(|(lowest, _)| seq < lowest)
            {
                best = Some((seq, Some(i)));
            }
        }
        if let Some(seq) = rx.peek()
            && best.is_none_or(|(lowest, _)| seq < lowest)
        {
            best = Some((seq, None));
        }
        best.map(|(_, source)| source)
    }

    /// The socket closed: every channel leaves with reason `closed`.
    pub async fn close(&mut self) {
        if let (Some(id), Some(subscription)) = (&self.socket_id, self.id_subscription.take()) {
            self.hub.pubsub().unsubscribe_socket(id, subscription);
        }
        for (_, joined) in self.channels.drain() {
            joined.leave(reason::CLOSED).await;
        }
    }
}

/// A message whose join_ref is not the channel's current one is dropped (V1 clients send
/// none and are never stale).
fn is_stale(msg: &Message, current: &Option<String>) -> bool {
    msg.join_ref.is_some() && msg.join_ref != *current
}

/// A reply this socket cannot carry (a binary response to V1 or over LongPoll, `why`
/// `None`; a topic too long for a binary frame) answered with an error the client can read
/// instead, so it does not wait for a reply that never comes.
fn undeliverable_reply(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    why: Option<&protocol::ProtocolError>,
) -> Option<Frame> {
    let reason = match why {
        None => protocol::reason::BINARY_NEEDS_WEBSOCKET,
        Some(protocol::ProtocolError::BinaryUnsupported) => protocol::reason::BINARY_NEEDS_V2,
        Some(_) => protocol::reason::UNENCODABLE,
    };
    let payload = protocol::reason_payload(reason);
    protocol::encode_reply(vsn, join_ref, msg_ref, topic, Status::Error, &payload).ok()
}
