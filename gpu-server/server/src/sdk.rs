//! The SDK functions this server uses for prompt identity.
//!
//! TEMPORARY: a stand-in with the SDK's signatures (`kvmesh_plugins_sdk::prompt::render_message`,
//! `kvmesh_plugins_sdk::chunk::chunk_hashes`) until the contract crate's Rust API lands on
//! main; it is replaced by re-exports of the SDK then.

/// Appends one chat message's canonical bytes: role, separator, text, terminator.
pub fn render_message(role: &str, text: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(role.as_bytes());
    out.push(0x1f);
    out.extend_from_slice(text.as_bytes());
    out.push(0x1e);
}

/// Hash chain over the full `chunk_bytes`-sized chunks of `canonical`, seeded by the model.
pub fn chunk_hashes(model: &str, canonical: &[u8], chunk_bytes: u32) -> Vec<u64> {
    let seed = xxhash_rust::xxh3::xxh3_64(model.as_bytes());
    let mut prev = seed;
    canonical
        .chunks_exact(chunk_bytes.max(1) as usize)
        .map(|c| {
            prev = xxhash_rust::xxh3::xxh3_64_with_seed(c, prev ^ seed);
            prev
        })
        .collect()
}
