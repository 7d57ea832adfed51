//! What nodes tell each other about owned rooms (placement `owner` on a cluster), and this
//! node's channels whose room runs on another node.
//!
//! A member's node forwards its channels' joins, messages and leaves to the owner's node
//! ([`ToOwner`]); the owner answers each channel on its node ([`ToMember`]: join answers,
//! replies, pushes, the channel's end). Both go over [`PubSub::send_to`], on the link that
//! carries the room's broadcasts, so what the owner does reaches a member's node in the
//! order it did it: a join's answer before the broadcasts that follow it, a reply before
//! the broadcast its message made. Answers are handled on the link's task as they arrive
//! (the join answer gives the channel its place in the room's feed there), never queued
//! behind the room's mailbox.
//!
//! Every answer but `Moved` carries the owner's fence (the fencing number of its lease): a
//! member's node drops answers from an owner older than the one it forwards to, so a stale
//! owner cannot reach a channel that moved on. (`Moved` only makes the member's node ask
//! Redis who owns the room: from anyone, it costs a lookup, and several at once cost one.)
//!
//! The wire form (Cinder nodes of one version talk to each other): a tag, then the fields
//! in order; numbers are u64 big-endian, strings and bodies u32 length-prefixed, optional
//! strings a presence byte first, bodies a kind byte first (0 JSON, 1 binary). A message
//! that does not parse is counted in `cluster_malformed` and dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::feed::Feed;
use super::outbound::{Outbound, OutboundTx};
use super::{JoinResult, MemberId};
use crate::protocol::{Payload, Status, reason};
use crate::stats::Stats;

/// What a member's node asks the owner of `topic`; `member` is the channel's id on the
/// member's node.
#[derive(Debug, PartialEq)]
pub(super) enum ToOwner {
    /// A channel joins (`adopt`: it joined an earlier owner; run `join` again, answer only
    /// a refusal).
    Join {
        topic: Arc<str>,
        member: MemberId,
        join_ref: Option<String>,
        socket_id: Option<String>,
        assigns: String,
        payload: Payload,
        msg_ref: Option<String>,
        adopt: bool,
    },
    /// A channel's message.
    In {
        topic: Arc<str>,
        member: MemberId,
        event: String,
        payload: Payload,
        msg_ref: Option<String>,
    },
    /// A channel left.
    Leave {
        topic: Arc<str>,
        member: MemberId,
        reason: String,
    },
    /// Every channel of the sending node in the room (after it joined them to this owner
    /// again): the owner forgets the others (their leave was lost).
    Members {
        topic: Arc<str>,
        members: Vec<MemberId>,
    },
}

impl ToOwner {
    pub(super) fn topic(&self) -> &Arc<str> {
        match self {
            ToOwner::Join { topic, .. }
            | ToOwner::In { topic, .. }
            | ToOwner::Leave { topic, .. }
            | ToOwner::Members { topic, .. } => topic,
        }
    }
}

/// What the owner (of fence `fence`) tells a member's node about its channel `member`.
#[derive(Debug, PartialEq)]
pub(super) enum ToMember {
    /// The join succeeded, with this reply.
    Joined {
        member: MemberId,
        fence: u64,
        msg_ref: Option<String>,
        reply: Payload,
    },
    /// The join was refused (or failed), with this error reply.
    Refused {
        member: MemberId,
        fence: u64,
        reply: Payload,
    },
    /// A reply to the channel's message.
    Reply {
        member: MemberId,
        fence: u64,
        msg_ref: Option<String>,
        status: Status,
        payload: Payload,
    },
    /// A push to the channel.
    Push {
        member: MemberId,
        fence: u64,
        event: String,
        payload: Payload,
    },
    /// The channel ended: `phx_error` (crashed) or `phx_close`.
    Down {
        member: MemberId,
        fence: u64,
        crashed: bool,
    },
    /// This node does not run the room (anymore): ask the cluster who does.
    Moved { member: MemberId },
}

const JOIN: u8 = 1;
const IN: u8 = 2;
const LEAVE: u8 = 3;
const MEMBERS: u8 = 4;
const JOINED: u8 = 11;
const REFUSED: u8 = 12;
const REPLY: u8 = 13;
const PUSH: u8 = 14;
const DOWN: u8 = 15;
const MOVED: u8 = 16;

/// Either message, as it arrives.
#[derive(Debug, PartialEq)]
pub(super) enum Wire {
    ToOwner(ToOwner),
    ToMember(ToMember),
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, n: u8) -> &mut Self {
        self.0.push(n);
        self
    }
    fn u64(&mut self, n: u64) -> &mut Self {
        self.0.extend_from_slice(&n.to_be_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        // Bodies are bounded by the frame limit, far below 4 GiB.
        self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    fn opt(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            None => self.u8(0),
            Some(s) => self.u8(1).str(s),
        }
    }
    fn payload(&mut self, p: &Payload) -> &mut Self {
        match p {
            Payload::Json(raw) => self.u8(0).str(raw.get()),
            Payload::Binary(b) => self.u8(1).bytes(b),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&n, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(n)
    }
    fn u64(&mut self) -> Option<u64> {
        let (n, rest) = self.0.split_at_checked(8)?;
        self.0 = rest;
        Some(u64::from_be_bytes(n.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_at_checked(4)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        let (b, rest) = rest.split_at_checked(len)?;
        self.0 = rest;
        Some(b)
    }
    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
    fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }
    fn opt(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.string()?)),
            _ => None,
        }
    }
    fn payload(&mut self) -> Option<Payload> {
        match self.u8()? {
            // Written by a Cinder node from a payload it had checked.
            0 => Payload::json(self.string()?).ok(),
            1 => Some(Payload::Binary(bytes::Bytes::copy_from_slice(
                self.bytes()?,
            ))),
            _ => None,
        }
    }
    fn status(&mut self) -> Option<Status> {
        match self.u8()? {
            0 => Some(Status::Ok),
            1 => Some(Status::Error),
            _ => None,
        }
    }
}

impl ToOwner {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            ToOwner::Join {
                topic,
                member,
                join_ref,
                socket_id,
                assigns,
                payload,
                msg_ref,
                adopt,
            } => {
                w.u8(JOIN)
                    .str(topic)
                    .u64(*member)
                    .opt(join_ref.as_deref())
                    .opt(socket_id.as_deref())
                    .str(assigns)
                    .payload(payload)
                    .opt(msg_ref.as_deref())
                    .u8(u8::from(*adopt));
            }
            ToOwner::In {
                topic,
                member,
                event,
                payload,
                msg_ref,
            } => {
                w.u8(IN)
                    .str(topic)
                    .u64(*member)
                    .str(event)
                    .payload(payload)
                    .opt(msg_ref.as_deref());
            }
            ToOwner::Leave {
                topic,
                member,
                reason,
            } => {
                w.u8(LEAVE).str(topic).u64(*member).str(reason);
            }
            ToOwner::Members { topic, members } => {
                // One per channel of the node in the room: bounded by its channel limits.
                w.u8(MEMBERS).str(topic).u64(members.len() as u64);
                for member in members {
                    w.u64(*member);
                }
            }
        }
        w.0
    }
}

impl ToMember {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            ToMember::Joined {
                member,
                fence,
                msg_ref,
                reply,
            } => {
                w.u8(JOINED)
                    .u64(*member)
                    .u64(*fence)
                    .opt(msg_ref.as_deref())
                    .payload(reply);
            }
            ToMember::Refused {
                member,
                fence,
                reply,
            } => {
                w.u8(REFUSED).u64(*member).u64(*fence).payload(reply);
            }
            ToMember::Reply {
                member,
                fence,
                msg_ref,
                status,
                payload,
            } => {
                w.u8(REPLY)
                    .u64(*member)
                    .u64(*fence)
                    .opt(msg_ref.as_deref())
                    .u8(match status {
                        Status::Ok => 0,
                        Status::Error => 1,
                    })
                    .payload(payload);
            }
            ToMember::Push {
                member,
                fence,
                event,
                payload,
            } => {
                w.u8(PUSH)
                    .u64(*member)
                    .u64(*fence)
                    .str(event)
                    .payload(payload);
            }
            ToMember::Down {
                member,
                fence,
                crashed,
            } => {
                w.u8(DOWN).u64(*member).u64(*fence).u8(u8::from(*crashed));
            }
            ToMember::Moved { member } => {
                w.u8(MOVED).u64(*member);
            }
        }
        w.0
    }
}

impl Wire {
    /// Reads a message; `None` when it does not parse (or has bytes left over).
    pub(super) fn decode(data: &[u8]) -> Option<Wire> {
        let mut r = Reader(data);
        let wire = match r.u8()? {
            JOIN => Wire::ToOwner(ToOwner::Join {
                topic: r.str()?.into(),
                member: r.u64()?,
                join_ref: r.opt()?,
                socket_id: r.opt()?,
                assigns: r.string()?,
                payload: r.payload()?,
                msg_ref: r.opt()?,
                adopt: r.u8()? == 1,
            }),
            IN => Wire::ToOwner(ToOwner::In {
                topic: r.str()?.into(),
                member: r.u64()?,
                event: r.string()?,
                payload: r.payload()?,
                msg_ref: r.opt()?,
            }),
            LEAVE => Wire::ToOwner(ToOwner::Leave {
                topic: r.str()?.into(),
                member: r.u64()?,
                reason: r.string()?,
            }),
            MEMBERS => {
                let topic = r.str()?.into();
                let n = r.u64()?;
                // Each takes 8 bytes: a count the message cannot hold is refused before
                // anything is allocated for it.
                if n > (r.0.len() / 8) as u64 {
                    return None;
                }
                let members = (0..n).map(|_| r.u64()).collect::<Option<Vec<_>>>()?;
                Wire::ToOwner(ToOwner::Members { topic, members })
            }
            JOINED => Wire::ToMember(ToMember::Joined {
                member: r.u64()?,
                fence: r.u64()?,
                msg_ref: r.opt()?,
                reply: r.payload()?,
            }),
            REFUSED => Wire::ToMember(ToMember::Refused {
                member: r.u64()?,
                fence: r.u64()?,
                reply: r.payload()?,
            }),
            REPLY => Wire::ToMember(ToMember::Reply {
                member: r.u64()?,
                fence: r.u64()?,
                msg_ref: r.opt()?,
                status: r.status()?,
                payload: r.payload()?,
            }),
            PUSH => Wire::ToMember(ToMember::Push {
                member: r.u64()?,
                fence: r.u64()?,
                event: r.string()?,
                payload: r.payload()?,
            }),
            DOWN => Wire::ToMember(ToMember::Down {
                member: r.u64()?,
                fence: r.u64()?,
                crashed: r.u8()? == 1,
            }),
            MOVED => Wire::ToMember(ToMember::Moved { member: r.u64()? }),
            _ => return None,
        };
        r.0.is_empty().then_some(wire)
    }
}

/// What a room hears besides its mailbox: calls of channels on other nodes (when it is the
/// owner), news about the owner it forwards to (when it is not), the cluster's events.
pub(super) enum RemoteMsg {
    /// A call from a channel on node `origin`.
    Call { origin: Arc<str>, call: ToOwner },
    /// A channel of this node whose room runs elsewhere ended by the owner's answer
    /// (refused, down) or because its socket stopped waiting for the join (`leave`: tell
    /// the owner).
    Gone { member: MemberId, leave: bool },
    /// The node this room forwards to does not run it.
    Moved,
    /// Node `node` is gone.
    NodeDown(Arc<str>),
    /// The link is back after an outage: what was sent meanwhile is lost.
    Reconnected,
    /// This node stops: a room it owns saves its state and gives its lease up, and its
    /// members on other nodes ask for the new owner at once; answered on `done`.
    HandOff(oneshot::Sender<()>),
}

/// A channel of this node whose room runs on another node: what the owner's answers need.
pub(super) struct Proxied {
    pub(super) topic: Arc<str>,
    pub(super) join_ref: Option<String>,
    pub(super) out: OutboundTx,
    pub(super) feed: Arc<Feed>,
    /// The room's inbox on this node.
    pub(super) room: mpsc::UnboundedSender<RemoteMsg>,
    /// The fence of the owner the room forwards to: older answers are dropped.
    pub(super) fence: u64,
    /// The join not answered yet, and its ref.
    pub(super) pending: Option<(oneshot::Sender<JoinResult>, Option<String>)>,
}

/// This node's channels whose room runs on another node, by channel id.
#[derive(Default)]
pub(super) struct Proxies {
    // A std lock: held for a map operation and a queue push, never across an await.
    channels: Mutex<HashMap<MemberId, Proxied>>,
}

impl Proxies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MemberId, Proxied>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn add(&self, member: MemberId, proxied: Proxied) {
        self.lock().insert(member, proxied);
    }

    /// Takes a channel out (it left, or its room now runs here).
    pub(super) fn take(&self, member: MemberId) -> Option<Proxied> {
        self.lock().remove(&member)
    }

    /// Points a channel at an owner of `fence`: whether its join waits for an answer, and
    /// the join's ref; `None` when the channel is gone.
    pub(super) fn point(&self, member: MemberId, fence: u64) -> Option<(bool, Option<String>)> {
        let mut channels = self.lock();
        let proxied = channels.get_mut(&member)?;
        proxied.fence = fence;
        Some(match &proxied.pending {
            Some((_, msg_ref)) => (true, msg_ref.clone()),
            None => (false, None),
        })
    }

    /// Applies an owner's answer, on the link's task.
    pub(super) fn answer(&self, answer: ToMember, stats: &Stats) {
        let mut channels = self.lock();
        let member = match &answer {
            ToMember::Joined { member, .. }
            | ToMember::Refused { member, .. }
            | ToMember::Reply { member, .. }
            | ToMember::Push { member, .. }
            | ToMember::Down { member, .. }
            | ToMember::Moved { member } => *member,
        };
        let Some(proxied) = channels.get_mut(&member) else {
            return;
        };
        let fence = match &answer {
            ToMember::Joined { fence, .. }
            | ToMember::Refused { fence, .. }
            | ToMember::Reply { fence, .. }
            | ToMember::Push { fence, .. }
            | ToMember::Down { fence, .. } => *fence,
            ToMember::Moved { .. } => proxied.fence,
        };
        if fence < proxied.fence {
            Stats::bump(&stats.fenced);
            return;
        }
        let topic = proxied.topic.clone();
        let join_ref = proxied.join_ref.clone();
        match answer {
            ToMember::Joined { msg_ref, reply, .. } => {
                let Some((done, _)) = proxied.pending.take() else {
                    return;
                };
                if done.is_closed() {
                    // The socket stopped waiting (and told its client): undone at the owner.
                    if let Some(gone) = channels.remove(&member) {
                        let _ = gone.room.send(RemoteMsg::Gone {
                            member,
                            leave: true,
                        });
                    }
                    return;
                }
                proxied.out.send(Outbound::Reply {
                    join_ref,
                    msg_ref,
                    topic,
                    status: Status::Ok,
                    payload: reply,
                });
                // Here, on the link's task: the broadcasts the owner made after this
                // answer are appended to the feed after the cursor is placed.
                let cursor = proxied.feed.cursor(member, proxied.out.clone());
                if done.send(JoinResult::Joined(cursor)).is_err() {
                    // The socket stopped waiting: the channel is undone at the owner.
                    if let Some(gone) = channels.remove(&member) {
                        let _ = gone.room.send(RemoteMsg::Gone {
                            member,
                            leave: true,
                        });
                    }
                }
            }
            ToMember::Refused { reply, .. } => {
                if let Some(gone) = channels.remove(&member) {
                    match gone.pending {
                        Some((done, _)) => {
                            let _ = done.send(JoinResult::Refused(reply));
                        }
                        None => gone.out.send(Outbound::ChannelDown {
                            topic,
                            join_ref,
                            member,
                            crashed: true,
                        }),
                    }
                    let _ = gone.room.send(RemoteMsg::Gone {
                        member,
                        leave: false,
                    });
                }
            }
            ToMember::Reply {
                msg_ref,
                status,
                payload,
                ..
            } => proxied.out.send(Outbound::Reply {
                join_ref,
                msg_ref,
                topic,
                status,
                payload,
            }),
            ToMember::Push { event, payload, .. } => proxied.out.send(Outbound::Push {
                join_ref,
                topic,
                event,
                payload,
            }),
            ToMember::Down { crashed, .. } => {
                if let Some(gone) = channels.remove(&member) {
                    match gone.pending {
                        Some((done, _)) => {
                            let _ = done.send(JoinResult::Refused(
                                crate::protocol::reason_payload(reason::JOIN_CRASHED),
                            ));
                        }
                        None => gone.out.send(Outbound::ChannelDown {
                            topic,
                            join_ref,
                            member,
                            crashed,
                        }),
                    }
                    let _ = gone.room.send(RemoteMsg::Gone {
                        member,
                        leave: false,
                    });
                }
            }
            ToMember::Moved { .. } => {
                let _ = proxied.room.send(RemoteMsg::Moved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips_and_a_cut_one_is_refused() {
        let json = Payload::json(r#"{"a":1}"#.into()).expect("json");
        let binary = Payload::Binary(bytes::Bytes::from_static(&[0, 255]));
        let messages = vec![
            Wire::ToOwner(ToOwner::Join {
                topic: "counter:1".into(),
                member: 7,
                join_ref: Some("3".into()),
                socket_id: None,
                assigns: "{}".into(),
                payload: json.clone(),
                msg_ref: Some("3".into()),
                adopt: true,
            }),
            Wire::ToOwner(ToOwner::In {
                topic: "t".into(),
                member: u64::MAX,
                event: "inc".into(),
                payload: binary.clone(),
                msg_ref: None,
            }),
            Wire::ToOwner(ToOwner::Leave {
                topic: "t".into(),
                member: 1,
                reason: "left".into(),
            }),
            Wire::ToOwner(ToOwner::Members {
                topic: "t".into(),
                members: vec![1, u64::MAX, 3],
            }),
            Wire::ToMember(ToMember::Joined {
                member: 1,
                fence: 9,
                msg_ref: None,
                reply: json.clone(),
            }),
            Wire::ToMember(ToMember::Refused {
                member: 1,
                fence: 9,
                reply: json.clone(),
            }),
            Wire::ToMember(ToMember::Reply {
                member: 1,
                fence: 9,
                msg_ref: Some("x".into()),
                status: Status::Error,
                payload: binary,
            }),
            Wire::ToMember(ToMember::Push {
                member: 1,
                fence: 9,
                event: "e".into(),
                payload: json,
            }),
            Wire::ToMember(ToMember::Down {
                member: 1,
                fence: 9,
                crashed: true,
            }),
            Wire::ToMember(ToMember::Moved { member: 2 }),
        ];
        for message in messages {
            let bytes = match &message {
                Wire::ToOwner(m) => m.encode(),
                Wire::ToMember(m) => m.encode(),
            };
            assert_eq!(Wire::decode(&bytes).as_ref(), Some(&message));
            for cut in 0..bytes.len() {
                assert!(Wire::decode(&bytes[..cut]).is_none(), "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Wire::decode(&longer).is_none());
        }
        assert!(Wire::decode(&[99]).is_none());
        // A count of members the message cannot hold allocates nothing.
        let mut huge = vec![MEMBERS];
        huge.extend_from_slice(&1u32.to_be_bytes());
        huge.push(b't');
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(Wire::decode(&huge).is_none());
    }
}
