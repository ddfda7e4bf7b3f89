//! wit-bindgen's bindings of the `wasmesh:plugin` world (`wit/`), for
//! `wasm32` builds. Private to the SDK: nothing outside `guest`, `host` and
//! `view` names a generated type.

#![allow(
    unsafe_code,
    reason = "wit-bindgen's generated export glue is unsafe code"
)]
#![allow(missing_docs, reason = "generated bindings")]

wit_bindgen::generate!({
    path: "../wit",
    world: "plugin",
    pub_export_macro: true,
    export_macro_name: "export_filter",
    default_bindings_module: "wasmesh_plugin_sdk::__private::bindings",
    runtime_path: "wasmesh_plugin_sdk::__private::wit_bindgen::rt",
    bitflags_path: "wasmesh_plugin_sdk::__private::wit_bindgen::rt::bitflags",
});
