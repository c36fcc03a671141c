//! Compiles the KMS protos with protox (a pure-Rust protobuf compiler) so that a plain
//! `cargo build` works on a machine without `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kms = ["proto/v2.proto", "proto/v1beta1.proto"];
    let etcd = ["proto/etcd.proto"];
    for proto in kms.iter().chain(&etcd) {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile(kms, ["proto"])?)?;
    // localkms is only ever an etcd client.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(protox::compile(etcd, ["proto"])?)?;
    Ok(())
}
