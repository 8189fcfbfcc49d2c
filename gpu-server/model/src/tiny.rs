//! Tiny random-weight Llama models for fast tests: written as GGUF (byte-level tokenizer, a
//! ChatML template) and, with the same weights, as an HF safetensors directory.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::Result;
use crate::tokenizer::byte_alphabet;

/// Shape and seed of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub context_length: usize,
    /// Type of the projection weights (F32, F16, Q8_0, Q4_0, Q4_1).
    pub dtype: GgmlDType,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            context_length: 2048,
            dtype: GgmlDType::Q8_0,
            seed: 7,
        }
    }
}

/// The special tokens after the 256 byte tokens.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// HF-layout weights (`(out, in)`, q/k not permuted) of a tiny model.
struct Weights {
    tensors: Vec<(String, Tensor)>,
}

fn random(rng: &mut rand::rngs::StdRng, shape: (usize, usize), scale: f32) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn weights(spec: &TinySpec) -> Result<Weights> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let vocab = 256 + SPECIALS.len();
    let hd = spec.hidden / spec.heads;
    let h = spec.hidden;
    let mut t = Vec::new();
    t.push((
        "model.embed_tokens.weight".to_string(),
        random(&mut rng, (vocab, h), 1.0)?,
    ));
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}");
        let s = 1.0 / (h as f32).sqrt() * 1.7;
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            random(&mut rng, (spec.heads * hd, h), s)?,
        ));
        t.push((
            format!("{p}.self_attn.k_proj.weight"),
            random(&mut rng, (spec.kv_heads * hd, h), s)?,
        ));
        t.push((
            format!("{p}.self_attn.v_proj.weight"),
            random(&mut rng, (spec.kv_heads * hd, h), s)?,
        ));
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            random(&mut rng, (h, spec.heads * hd), s)?,
        ));
        t.push((
            format!("{p}.mlp.gate_proj.weight"),
            random(&mut rng, (spec.intermediate, h), s)?,
        ));
        t.push((
            format!("{p}.mlp.up_proj.weight"),
            random(&mut rng, (spec.intermediate, h), s)?,
        ));
        let sd = 1.0 / (spec.intermediate as f32).sqrt() * 1.7;
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            random(&mut rng, (h, spec.intermediate), sd)?,
        ));
        t.push((
            format!("{p}.input_layernorm.weight"),
            (random(&mut rng, (1, h), 0.2)? + 1.0)?.squeeze(0)?,
        ));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            (random(&mut rng, (1, h), 0.2)? + 1.0)?.squeeze(0)?,
        ));
    }
    t.push((
        "model.norm.weight".to_string(),
        (random(&mut rng, (1, h), 0.2)? + 1.0)?.squeeze(0)?,
    ));
    t.push((
        "lm_head.weight".to_string(),
        random(&mut rng, (vocab, h), 0.5)?,
    ));
    Ok(Weights { tensors: t })
}

/// llama.cpp's q/k permutation: HF rotates halves, GGUF Llama rotates adjacent pairs.
fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    for (a, b) in map {
        if hf == a {
            return b.to_string();
        }
    }
    let rest = hf.trim_start_matches("model.layers.");
    let (i, name) = rest.split_once('.').unwrap_or(("0", rest));
    let n = match name {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        _ => "ffn_norm.weight",
    };
    format!("blk.{i}.{n}")
}

fn vocab_tokens() -> Vec<String> {
    let alpha = byte_alphabet();
    let mut v: Vec<String> = alpha.iter().map(|c| c.to_string()).collect();
    v.extend(SPECIALS.iter().map(|s| s.to_string()));
    v
}

/// Writes the tiny model as a GGUF file (architecture `llama`, tokenizer `gpt2` with no
/// merges: one token per byte).
pub fn write_gguf(path: &Path, spec: &TinySpec) -> Result<()> {
    let w = weights(spec)?;
    let mut qs: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &w.tensors {
        let t = match name.as_str() {
            n if n.ends_with("q_proj.weight") => permute(t, spec.heads)?,
            n if n.ends_with("k_proj.weight") => permute(t, spec.kv_heads)?,
            _ => t.clone(),
        };
        let dtype = if t.rank() == 2 && !name.contains("embed") {
            spec.dtype
        } else {
            GgmlDType::F32
        };
        qs.push((gguf_name(name), QTensor::quantize(&t, dtype)?));
    }
    let tokens = vocab_tokens();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < 256 { 1 } else { 3 }))
        .collect();
    let u32v = |x: usize| Value::U32(x as u32);
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("kvmesh-tiny".into())),
        ("llama.block_count", u32v(spec.layers)),
        ("llama.context_length", u32v(spec.context_length)),
        ("llama.embedding_length", u32v(spec.hidden)),
        ("llama.feed_forward_length", u32v(spec.intermediate)),
        ("llama.attention.head_count", u32v(spec.heads)),
        ("llama.attention.head_count_kv", u32v(spec.kv_heads)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(Vec::new())),
        ("tokenizer.ggml.bos_token_id", u32v(257)),
        ("tokenizer.ggml.eos_token_id", u32v(258)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", Value::String(CHATML.into())),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = BufWriter::new(File::create(path)?);
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}

/// Writes the same tiny model as an HF directory: `config.json`, `tokenizer.json`,
/// `tokenizer_config.json`, `model.safetensors` (F32).
pub fn write_safetensors_dir(dir: &Path, spec: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let w = weights(spec)?;
    let map: HashMap<String, Tensor> = w.tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.context_length,
        "vocab_size": 256 + SPECIALS.len(),
        "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let vocab: serde_json::Map<String, serde_json::Value> = vocab_tokens()
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::Value::from(i)))
        .collect();
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": 256 + i, "content": s, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "added_tokens": added,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tok)?)?;
    let tc = serde_json::json!({
        "chat_template": CHATML,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&tc)?,
    )?;
    Ok(())
}
