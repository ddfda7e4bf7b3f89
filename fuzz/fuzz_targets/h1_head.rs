//! The raw HTTP/1 head check on arbitrary bytes: never panics, and the
//! verdict does not depend on how the bytes were split into reads.

#![no_main]

use libfuzzer_sys::fuzz_target;

// The check is std + httparse only; include its source rather than build
// the whole proxy (and wasmtime) under the sanitizer.
#[path = "../../host-proxy/src/listener/h1scan.rs"]
#[allow(dead_code)]
mod h1scan;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let mut whole = h1scan::Scanner::default();
    whole.feed(bytes);
    let cut = usize::from(cut) * bytes.len() / 256;
    let mut split = h1scan::Scanner::default();
    split.feed(&bytes[..cut]);
    split.feed(&bytes[cut..]);
    assert_eq!(whole.verdict(), split.verdict(), "split at {cut}");
});
