//! The contract's prompt identity against the committed golden vectors.
//! `KVMESH_BLESS=1` rewrites `golden/expected.json` (review the diff: a change
//! there changes every deployed replica's chunk identities).

use kvmesh_plugins_sdk::golden::{GoldenExpected, GoldenRequest, compute};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

#[test]
fn golden_vectors_hold() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let requests: Vec<GoldenRequest> =
        serde_json::from_str(&std::fs::read_to_string(root.join("golden/requests.json")).unwrap())
            .unwrap();
    let computed: Vec<GoldenExpected> = requests.iter().map(compute).collect();
    let path = root.join("golden/expected.json");
    if std::env::var_os("KVMESH_BLESS").is_some() {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&computed).unwrap() + "\n",
        )
        .unwrap();
    }
    let expected: Vec<GoldenExpected> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(computed, expected);
    // The corpus exercises every outcome.
    assert!(
        expected
            .iter()
            .any(|e| e.result.as_ref().is_ok_and(|p| p.len() == 2))
    );
    assert!(expected.iter().any(|e| e.result == Err("no_model".into())));
    assert!(expected.iter().any(|e| e.result == Err("no_prompt".into())));
}

/// The chain written out by hand from the definition in chunk.rs, so the
/// golden file is anchored to the spec and not only to itself.
#[test]
fn chain_follows_the_written_definition() {
    let text = b"0123456789abcdefFEDCBA9876543210tail";
    let mut seed_input = b"kvmesh.v1\0".to_vec();
    seed_input.extend_from_slice(b"smollm2");
    let seed = xxh3_64(&seed_input);
    let h0 = xxh3_64_with_seed(&text[..16], seed);
    let h1 = xxh3_64_with_seed(&text[16..32], seed ^ h0);
    assert_eq!(
        kvmesh_plugins_sdk::chunk::chunk_hashes("smollm2", text, 16),
        vec![h0, h1]
    );
}
