//! The Rust types in `src/proto/kvmesh.v1.rs` are generated from
//! `proto/kvmesh/v1/state.proto` and committed (so the wasm build needs no
//! protoc). This test regenerates them and fails when they drift; run it
//! with `KVMESH_BLESS=1` to rewrite the committed file.

use std::path::PathBuf;

#[test]
fn generated_proto_matches_committed() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = tempdir();
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    // SAFETY-free: prost-build reads PROTOC from the environment.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.out_dir(&out);
    config
        .compile_protos(
            &[root.join("proto/kvmesh/v1/state.proto")],
            &[root.join("proto")],
        )
        .expect("compile state.proto");
    let generated = std::fs::read_to_string(out.join("kvmesh.v1.rs")).expect("generated file");
    let committed_path = root.join("src/proto/kvmesh.v1.rs");
    if std::env::var_os("KVMESH_BLESS").is_some() {
        std::fs::write(&committed_path, &generated).expect("write committed file");
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == generated,
        "src/proto/kvmesh.v1.rs is stale; regenerate with KVMESH_BLESS=1 cargo test -p kvmesh-plugins-sdk --test proto"
    );
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmesh-proto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
