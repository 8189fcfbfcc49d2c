//! Generates the tonic stubs of `kvmesh.v1.ReplicaState` from the SDK's proto;
//! the message types themselves are the SDK's (`extern_path`), so there is one
//! Rust type per proto message in the whole workspace. protoc comes from the
//! `protoc-bin-vendored` crate: nobody needs it installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest.join("../../plugins/sdk/proto");
    let proto = proto_root.join("kvmesh/v1/state.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".kvmesh.v1", "::kvmesh_plugins_sdk::proto")
        .compile_with_config(config, &[proto], &[proto_root])?;
    Ok(())
}
