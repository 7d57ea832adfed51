//! What the plugin benches share: the runtime configured as the server configures it, and
//! the channel a benchmarked call is about.

use std::sync::Arc;

use cinder::channel::ChannelSocket;
use cinder::config::Limits;
use cinder::presence::Tracker;
use cinder::pubsub::LocalPubSub;
use cinder::runtime::Runtime;

/// Limits with room for every instance a bench makes.
pub fn limits() -> Limits {
    Limits {
        max_rooms: 2000,
        ..Limits::default()
    }
}

/// The runtime (pooling allocator, epoch deadline, WASI and host imports) for `limits`.
pub fn runtime(limits: &Limits) -> Runtime {
    Runtime::new(
        limits,
        Default::default(),
        Arc::new(Tracker::new(
            Arc::new(LocalPubSub::new()),
            limits.presence_bytes_per_socket,
            limits.presence_bytes_total,
        )),
    )
    .expect("runtime")
}

/// A joined channel of user 1 on `topic`.
pub fn socket(topic: &str) -> ChannelSocket {
    ChannelSocket {
        channel: 1,
        presence: Default::default(),
        id: Some("user_socket:1".into()),
        topic: topic.into(),
        join_ref: Some("1".into()),
        assigns: r#"{"user_id":"1"}"#.into(),
    }
}
