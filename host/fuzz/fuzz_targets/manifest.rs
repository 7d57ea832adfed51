//! The plugin manifest parser on any input: it never panics, and a manifest it accepts
//! names no path outside the store and serves no reserved topic.
#![no_main]

use cinder::config::Limits;
use cinder::runtime::{Manifest, check_name, check_version, pattern_matches};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(manifest) = Manifest::parse(text, &Limits::default()) else {
        return;
    };
    assert!(check_name(&manifest.name).is_ok());
    assert!(check_version(&manifest.version).is_ok());
    assert!(!manifest.name.contains(['/', '.']));
    for pattern in &manifest.topics {
        for reserved in ["phoenix", "user_socket:", "user_socket:42"] {
            assert!(!pattern_matches(pattern, reserved), "{pattern} covers {reserved}");
        }
    }
});
