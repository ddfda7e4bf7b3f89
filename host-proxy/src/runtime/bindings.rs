//! The host side of the `wasmesh:plugin` contract, generated from `wit/` by
//! wasmtime's `bindgen!`. Nothing outside `runtime` names these paths.

#![allow(missing_docs, reason = "generated bindings")]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    with: {
        "wasmesh:plugin/types.request": super::host::RequestRes,
        "wasmesh:plugin/types.response": super::host::ResponseRes,
    },
});

pub use exports::wasmesh::plugin::filter::HookSet;
pub use wasmesh::plugin::host as wit_host;
pub use wasmesh::plugin::types as wit;
