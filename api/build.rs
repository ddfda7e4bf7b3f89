//! Compile the control API's protobuf with protox (pure Rust, so no `protoc`
//! is needed) and generate its prost types and tonic clients and servers.

fn main() {
    let proto = "proto/wasmesh/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("compiling the control API's protobuf");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(
        out.join("control_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .unwrap();
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generating the control API's code");
}
