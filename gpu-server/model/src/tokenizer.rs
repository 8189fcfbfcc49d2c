//! GPT-2 style byte-level BPE, built from GGUF metadata (`tokenizer.ggml.*`) or an HF
//! `tokenizer.json`. It follows llama.cpp's procedure: special tokens are matched literally
//! first, the rest is split by the pre-tokenizer's regexes, each piece is mapped to the GPT-2
//! byte alphabet and merged by rank.

use std::collections::HashMap;

use fancy_regex::Regex;

use crate::{ModelError, Result};

/// How text is split before BPE (GGUF `tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regex.
    Gpt2,
    /// Every digit alone, then GPT-2's regex (SmolLM, StarCoder).
    SmolLm,
    /// Llama 3's regex (numbers in runs of up to three).
    Llama3,
    /// Qwen2's regex (single digits).
    Qwen2,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenizer {
    pub fn from_gguf_name(name: &str) -> Self {
        match name {
            "smollm" | "starcoder" | "codeshell" => Self::SmolLm,
            "llama3" | "llama-bpe" | "llama-v3" => Self::Llama3,
            "qwen2" | "deepseek-llm" => Self::Qwen2,
            _ => Self::Gpt2,
        }
    }

    fn regexes(self) -> Result<Vec<Regex>> {
        let srcs: &[&str] = match self {
            Self::Gpt2 => &[GPT2],
            Self::SmolLm => &[r"\p{N}", GPT2],
            Self::Llama3 => &[LLAMA3],
            Self::Qwen2 => &[QWEN2],
        };
        srcs.iter()
            .map(|s| Regex::new(s).map_err(|e| ModelError::Tokenizer(e.to_string())))
            .collect()
    }
}

/// A byte-level BPE tokenizer.
#[derive(Debug)]
pub struct Tokenizer {
    /// Token strings in the GPT-2 byte alphabet (specials as their literal text).
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    ranks: HashMap<(String, String), u32>,
    /// Special tokens matched literally in input, longest first.
    specials: Vec<(String, u32)>,
    special_ids: Vec<bool>,
    regexes: Vec<Regex>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end generation (EOS, `<|endoftext|>`, `<|im_end|>`, `<|eot_id|>`...).
    pub stop_ids: Vec<u32>,
}

/// GPT-2's reversible map from bytes to printable characters.
pub(crate) fn byte_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        out[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('?');
            n += 1;
            c
        };
    }
    out
}

impl Tokenizer {
    /// `token_types` follows GGUF (1 normal, 3 control, 4 user defined, ...); control and
    /// user-defined tokens are matched literally in input text.
    pub fn new(
        tokens: Vec<String>,
        token_types: &[i32],
        merges: &[String],
        pre: PreTokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self> {
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut ranks = HashMap::with_capacity(merges.len());
        for (r, m) in merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else {
                return Err(ModelError::Tokenizer(format!("bad merge {m:?}")));
            };
            ranks.insert((a.to_string(), b.to_string()), r as u32);
        }
        let mut specials = Vec::new();
        let mut special_ids = vec![false; tokens.len()];
        for (i, t) in tokens.iter().enumerate() {
            if matches!(token_types.get(i), Some(3) | Some(4)) && !t.is_empty() {
                specials.push((t.clone(), i as u32));
                special_ids[i] = true;
            }
        }
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let byte_to_char = byte_alphabet();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for name in [
            "<|endoftext|>",
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ] {
            if let Some(&id) = ids.get(name)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        Ok(Self {
            tokens,
            ids,
            ranks,
            specials,
            special_ids,
            regexes: pre.regexes()?,
            byte_to_char,
            char_to_byte,
            bos,
            eos,
            add_bos,
            stop_ids,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Token ids of `text` (special tokens recognised), with BOS if the model wants it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .encode_with_ends(text)?
            .into_iter()
            .map(|(t, _)| t)
            .collect())
    }

    /// Token ids with, for each, the byte offset in `text` just past its last byte (BOS has
    /// offset 0).
    pub fn encode_with_ends(&self, text: &str) -> Result<Vec<(u32, usize)>> {
        let mut out = Vec::new();
        if self.add_bos
            && let Some(b) = self.bos
        {
            out.push((b, 0));
        }
        let mut pos = 0;
        while pos < text.len() {
            // The next special token at or after pos.
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| {
                    text[pos..]
                        .find(s.as_str())
                        .map(|i| (pos + i, s.len(), *id))
                })
                .min_by_key(|&(i, len, _)| (i, std::cmp::Reverse(len)));
            let end = next.map_or(text.len(), |(i, _, _)| i);
            self.encode_plain(&text[pos..end], pos, &mut out)?;
            match next {
                Some((i, len, id)) => {
                    out.push((id, i + len));
                    pos = i + len;
                }
                None => pos = end,
            }
        }
        Ok(out)
    }

    fn encode_plain(&self, text: &str, base: usize, out: &mut Vec<(u32, usize)>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        // Split by each regex in turn; unmatched stretches stay pieces of their own.
        let mut pieces: Vec<(usize, usize)> = vec![(0, text.len())];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len());
            for &(s, e) in &pieces {
                let piece = &text[s..e];
                let mut last = 0;
                for m in re.find_iter(piece) {
                    let m = m.map_err(|e| ModelError::Tokenizer(e.to_string()))?;
                    if m.start() > last {
                        next.push((s + last, s + m.start()));
                    }
                    if m.end() > m.start() {
                        next.push((s + m.start(), s + m.end()));
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push((s + last, e));
                }
            }
            pieces = next;
        }
        for (s, e) in pieces {
            self.bpe(&text.as_bytes()[s..e], base + s, out)?;
        }
        Ok(())
    }

    fn bpe(&self, bytes: &[u8], base: usize, out: &mut Vec<(u32, usize)>) -> Result<()> {
        let mut parts: Vec<String> = bytes
            .iter()
            .map(|&b| self.byte_to_char[b as usize].to_string())
            .collect();
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts[i] = merged;
            parts.remove(i + 1);
        }
        let mut end = base;
        for p in parts {
            end += p.chars().count();
            let id = match self.ids.get(&p) {
                Some(&id) => id,
                None => {
                    return Err(ModelError::Tokenizer(format!(
                        "piece {p:?} not in vocabulary"
                    )));
                }
            };
            out.push((id, end));
        }
        Ok(())
    }

    /// The bytes a token stands for (special tokens as their literal text, unknown ids empty).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        if self.special_ids[id as usize] {
            return t.as_bytes().to_vec();
        }
        t.chars()
            .map(|c| self.char_to_byte.get(&c).copied().unwrap_or(b'?'))
            .collect()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.get(id as usize).copied().unwrap_or(false)
    }

    /// Text of `ids`, special tokens skipped, invalid UTF-8 replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if !self.is_special(id) {
                bytes.extend(self.token_bytes(id));
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
