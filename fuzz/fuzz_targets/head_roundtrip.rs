//! HTTP head ↔ WIT: a request head as hyper would accept it, the host's
//! view of its headers (what a guest's `headers()` gets), set back through a
//! decision: the same headers come out.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wasmesh_proxy::fuzzing::head_roundtrip(data);
});
