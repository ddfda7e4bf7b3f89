//! The plugins of this workspace compiled to WebAssembly components by this
//! crate's build script: the stock plugins the `wasmesh` binary ships as
//! `builtin:<name>`, and the test fixtures (paths only) for the end-to-end
//! tests. The proxy itself never depends on a plugin crate; it loads bytes.

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));
