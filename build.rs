//! Compiles the KMS protos with protox (a pure-Rust protobuf compiler) so that a plain
//! `cargo build` works on a machine without `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/v2.proto", "proto/v1beta1.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
