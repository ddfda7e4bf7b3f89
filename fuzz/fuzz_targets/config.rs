//! The mesh-file parser on arbitrary text: it returns a document or a
//! `(field path, reason)` error, never panics, and every error names a path.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The value parsers the snapshot builder applies to fields.
    let _ = wasmesh_api::parse_duration(&text);
    let _ = wasmesh_api::parse_size(&text);
    if let Err((path, reason)) = wasmesh_api::MeshFile::parse(&text) {
        assert!(!path.is_empty(), "an error without a path: {reason}");
    }
});
