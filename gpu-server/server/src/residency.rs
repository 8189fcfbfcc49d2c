//! From a request's canonical prompt (the SDK's text identity) to the prompt tokens that hold
//! each text chunk's last byte, so the engine can say which chunks a token block makes
//! resident.
//!
//! The mapping, conservatively (a chunk is never claimed before the tokens that hold its bytes
//! are cached):
//! - completions: the canonical prompt is the prompt text itself and is tokenized as is, so a
//!   canonical byte offset is a byte offset of the tokenized text;
//! - chat: each message's canonical bytes are `role, separator, content, terminator`. The
//!   content is located in the text the chat template rendered (searching forward from the end
//!   of the previous message's content); a content byte maps to its rendered byte, a role or
//!   separator byte to the first content byte of its message, a terminator byte to the first
//!   rendered byte after the content (the template's end-of-message marker). If a message's
//!   content is not found verbatim (a template that rewrites content), its bytes and every
//!   later byte map to the last prompt token.
//!
//! A rendered byte maps to the token whose bytes contain it.

use kvmesh_gpu_server_engine::ChunkEnd;

use kvmesh_plugins_sdk::{chunk, prompt};

/// One chat message's text, as the canonical prompt and the template both see it.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// The canonical bytes of a chat, as the SDK renders them.
pub fn chat_canonical(messages: &[Message<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        prompt::render_message(m.role, m.content, &mut out);
    }
    out
}

/// The canonical bytes of a chat and, per canonical byte, its rendered byte offset.
fn chat_map(messages: &[Message<'_>], rendered: &str) -> (Vec<u8>, Vec<usize>) {
    let mut canonical = Vec::new();
    let mut map = Vec::new();
    let mut cursor = 0;
    let last = rendered.len().saturating_sub(1);
    let mut lost = false;
    for m in messages {
        let start = canonical.len();
        prompt::render_message(m.role, m.content, &mut canonical);
        let bytes = &canonical[start..];
        let content_at = start + m.role.len() + 1;
        let found = if lost {
            None
        } else {
            rendered[cursor..].find(m.content).map(|i| cursor + i)
        };
        let layout_ok = bytes.len() == m.role.len() + m.content.len() + 2
            && &canonical[content_at..content_at + m.content.len()] == m.content.as_bytes();
        match found {
            Some(r0) if layout_ok => {
                let r_end = (r0 + m.content.len()).min(last);
                for o in start..canonical.len() {
                    let r = if o < content_at {
                        r0
                    } else if o < content_at + m.content.len() {
                        r0 + (o - content_at)
                    } else {
                        r_end
                    };
                    map.push(r.min(last));
                }
                cursor = r0 + m.content.len();
            }
            _ => {
                lost = true;
                map.extend(std::iter::repeat_n(last, canonical.len() - start));
            }
        }
    }
    (canonical, map)
}

/// Chunk ends of a chat request. `token_ends[i]` is the rendered byte offset just past token
/// `i` (from the tokenizer).
pub fn chat_chunks(
    model: &str,
    chunk_bytes: u32,
    messages: &[Message<'_>],
    rendered: &str,
    token_ends: &[usize],
) -> Vec<ChunkEnd> {
    let (canonical, map) = chat_map(messages, rendered);
    ends(model, chunk_bytes, &canonical, token_ends, |o| map[o])
}

/// Chunk ends of a completions request: the prompt is its own canonical form.
pub fn completion_chunks(
    model: &str,
    chunk_bytes: u32,
    prompt: &str,
    token_ends: &[usize],
) -> Vec<ChunkEnd> {
    ends(model, chunk_bytes, prompt.as_bytes(), token_ends, |o| o)
}

fn ends(
    model: &str,
    chunk_bytes: u32,
    canonical: &[u8],
    token_ends: &[usize],
    to_rendered: impl Fn(usize) -> usize,
) -> Vec<ChunkEnd> {
    let hashes = chunk::chunk_hashes(model, canonical, chunk_bytes);
    let mut out = Vec::with_capacity(hashes.len());
    for (i, hash) in hashes.into_iter().enumerate() {
        let last_byte = (i + 1) * chunk_bytes as usize - 1;
        let r = to_rendered(last_byte);
        // The first token whose end lies past byte r holds it.
        let token = token_ends.partition_point(|&e| e <= r);
        if token >= token_ends.len() {
            break;
        }
        out.push(ChunkEnd { hash, token });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_offsets_map_to_the_token_holding_the_byte() {
        // Tokens of 1 byte each except token 2 (bytes 2..6).
        let text = "ab".to_string() + &"x".repeat(600);
        let mut ends_v = vec![1, 2, 6];
        ends_v.extend(7..=text.len());
        let got = completion_chunks("m", 4, &text, &ends_v);
        let want = chunk::chunk_hashes("m", text.as_bytes(), 4);
        assert_eq!(got.len(), want.len());
        // Chunk 0 ends at byte 3, inside token 2; chunk 1 ends at byte 7 -> token 4 (bytes 7..8)
        assert_eq!(got[0].token, 2);
        assert_eq!(got[1].token, 4);
        assert!(got.iter().zip(&want).all(|(g, &h)| g.hash == h));
    }

    #[test]
    fn chat_bytes_map_into_the_rendered_template() {
        let msgs = [
            Message {
                role: "user",
                content: "hello world",
            },
            Message {
                role: "assistant",
                content: "hi",
            },
        ];
        let rendered = "<s>user: hello world</s><s>assistant: hi</s><s>assistant:";
        let (canonical, map) = chat_map(&msgs, rendered);
        assert_eq!(canonical.len(), map.len());
        // 'h' of hello (canonical offset 5) -> rendered offset of "hello".
        assert_eq!(map[5], rendered.find("hello").unwrap());
        // The role bytes map to the start of the content, never earlier.
        assert_eq!(map[0], rendered.find("hello").unwrap());
        // The terminator maps past the content.
        assert_eq!(map[16], rendered.find("hello").unwrap() + 11);
        // Every mapping is monotone.
        assert!(map.windows(2).all(|w| w[0] <= w[1]));
    }
}
