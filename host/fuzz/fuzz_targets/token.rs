//! Connect-token verification on any input: arbitrary strings as tokens, and arbitrary
//! headers and claims correctly signed (so the fuzzer gets past the signature). It never
//! panics, and an accepted token's socket id is exactly its `user_id` as written.
#![no_main]

use base64::Engine as _;
use hmac::Mac as _;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret";

fn signed(header: &[u8], claims: &[u8]) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let signing = format!("{}.{}", b64(header), b64(claims));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(signing.as_bytes());
    format!("{signing}.{}", b64(&mac.finalize().into_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let verifier = cinder::auth::Verifier::hs256(SECRET, 7 * 86_400);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = verifier.verify(Some(text));
    }
    // Split the input into a header and claims, signed.
    let cut = data.first().map_or(0, |n| usize::from(*n)).min(data.len());
    let (header, claims) = data.split_at(cut);
    if let Ok(identity) = verifier.verify(Some(&signed(header, claims))) {
        let claims: serde_json::Value = serde_json::from_slice(claims).expect("accepted claims are JSON");
        if let Some(id) = identity.socket_id {
            let user = id.strip_prefix("user_socket:").expect("a socket id");
            assert!(user.len() <= cinder::auth::MAX_USER_ID_BYTES);
            assert!(claims.get("user_id").is_some());
        }
        assert!(serde_json::from_str::<serde_json::Value>(&identity.assigns).is_ok());
    }
});
