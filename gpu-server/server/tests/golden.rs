//! The server's own request parsing gives the SDK's canonical bytes and chunk hashes for every
//! golden vector it accepts, so the chunks it reports are the ones the router computes.

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

use kvmesh_gpu_server_server::api::{chat_messages, prompt_text};
use kvmesh_gpu_server_server::residency::{Message, chat_canonical};
use kvmesh_plugins_sdk::chunk::chunk_hashes;
use kvmesh_plugins_sdk::golden::vectors;

#[test]
fn canonical_bytes_and_hashes_match_the_sdk_golden_vectors() {
    let mut checked = 0;
    for (req, want) in vectors() {
        let Ok(prompts) = &want.result else { continue };
        let model = req.body["model"].as_str().unwrap_or_default();
        let canonical = if req.path.starts_with("/v1/chat") {
            let Ok(msgs) = chat_messages(&req.body.get("messages").cloned()) else {
                continue; // the server refuses it (e.g. an image part); nothing to report
            };
            let view: Vec<Message<'_>> = msgs
                .iter()
                .map(|(r, c)| Message {
                    role: r,
                    content: c,
                })
                .collect();
            chat_canonical(&view)
        } else {
            match prompt_text(&req.body.get("prompt").cloned()) {
                Ok(p) => p.into_bytes(),
                Err(_) => continue, // prompt arrays of several strings are refused
            }
        };
        assert_eq!(prompts.len(), 1, "{}", req.name);
        assert_eq!(
            String::from_utf8_lossy(&canonical),
            prompts[0].canonical,
            "{}",
            req.name
        );
        let hashes: Vec<String> = chunk_hashes(model, &canonical, req.chunk_bytes)
            .iter()
            .map(|h| format!("{h:016x}"))
            .collect();
        assert_eq!(hashes, prompts[0].hashes, "{}", req.name);
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} golden cases checked");
}
