//! The host import boundary: an arbitrary `on-request` decision, as a guest
//! could hand it back, through the host's caps, validation and merge. Never
//! panics; what it accepts is valid HTTP.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wasmesh_proxy::fuzzing::request_decision(data);
});
