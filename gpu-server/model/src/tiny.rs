//! Random-weight Llama models: tiny ones for fast tests, and real shapes (for example
//! Llama-3.1-8B's) to measure throughput without downloading weights. Written as GGUF
//! (byte-level tokenizer, a ChatML template) and, with the same weights, as an HF safetensors
//! directory. Weights are made and quantized one tensor at a time, so writing an 8B-shaped
//! model holds the quantized file in memory, never its f32 weights.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::Result;
use crate::tokenizer::byte_alphabet;

/// Shape and seed of a random-weight model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub context_length: usize,
    /// Vocabulary size: the 256 byte tokens and [`SPECIALS`], then filler tokens `<x_N>` up to
    /// this size (at least `256 + SPECIALS.len()`), so the embedding and output projection have
    /// the real model's shape. Filler tokens are never produced by tokenizing.
    pub vocab_size: usize,
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
            vocab_size: 256 + SPECIALS.len(),
            dtype: GgmlDType::Q8_0,
            seed: 7,
        }
    }
}

impl TinySpec {
    /// The named shapes [`TinySpec::shape`] knows.
    pub const SHAPES: [&str; 3] = ["tiny", "smollm2-135m", "llama-3.1-8b"];

    /// A named shape with random weights of `dtype`: `tiny` (the test default),
    /// `smollm2-135m` (30 layers, hidden 576, 9 heads, 3 KV heads, head dim 64, vocab 49,152) or
    /// `llama-3.1-8b` (32 layers, hidden 4,096, 32 heads, 8 KV heads, head dim 128, FFN 14,336,
    /// vocab 128,256).
    pub fn shape(name: &str, dtype: GgmlDType, seed: u64) -> Option<Self> {
        let base = Self {
            dtype,
            seed,
            ..Self::default()
        };
        Some(match name {
            "tiny" => base,
            "smollm2-135m" => Self {
                layers: 30,
                hidden: 576,
                heads: 9,
                kv_heads: 3,
                intermediate: 1536,
                context_length: 8192,
                vocab_size: 49_152,
                ..base
            },
            "llama-3.1-8b" => Self {
                layers: 32,
                hidden: 4096,
                heads: 32,
                kv_heads: 8,
                intermediate: 14_336,
                context_length: 32_768,
                vocab_size: 128_256,
                ..base
            },
            _ => return None,
        })
    }

    fn vocab(&self) -> usize {
        self.vocab_size.max(256 + SPECIALS.len())
    }
}

/// The special tokens after the 256 byte tokens.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn random(rng: &mut rand::rngs::StdRng, shape: (usize, usize), scale: f32) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Makes the HF-layout weights (`(out, in)`, q/k not permuted) one tensor at a time, in a fixed
/// order from one seeded generator, and hands each to `f`.
fn weights(spec: &TinySpec, mut f: impl FnMut(&str, Tensor) -> Result<()>) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let vocab = spec.vocab();
    let hd = spec.hidden / spec.heads;
    let h = spec.hidden;
    let norm = |rng: &mut rand::rngs::StdRng| -> Result<Tensor> {
        Ok((random(rng, (1, h), 0.2)? + 1.0)?.squeeze(0)?)
    };
    f(
        "model.embed_tokens.weight",
        random(&mut rng, (vocab, h), 1.0)?,
    )?;
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}");
        let s = 1.0 / (h as f32).sqrt() * 1.7;
        let sd = 1.0 / (spec.intermediate as f32).sqrt() * 1.7;
        let projections = [
            ("self_attn.q_proj", (spec.heads * hd, h), s),
            ("self_attn.k_proj", (spec.kv_heads * hd, h), s),
            ("self_attn.v_proj", (spec.kv_heads * hd, h), s),
            ("self_attn.o_proj", (h, spec.heads * hd), s),
            ("mlp.gate_proj", (spec.intermediate, h), s),
            ("mlp.up_proj", (spec.intermediate, h), s),
            ("mlp.down_proj", (h, spec.intermediate), sd),
        ];
        for (name, shape, scale) in projections {
            f(
                &format!("{p}.{name}.weight"),
                random(&mut rng, shape, scale)?,
            )?;
        }
        f(&format!("{p}.input_layernorm.weight"), norm(&mut rng)?)?;
        f(
            &format!("{p}.post_attention_layernorm.weight"),
            norm(&mut rng)?,
        )?;
    }
    f("model.norm.weight", norm(&mut rng)?)?;
    f("lm_head.weight", random(&mut rng, (vocab, h), 0.5)?)
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

fn vocab_tokens(spec: &TinySpec) -> Vec<String> {
    let alpha = byte_alphabet();
    let mut v: Vec<String> = alpha.iter().map(|c| c.to_string()).collect();
    v.extend(SPECIALS.iter().map(|s| s.to_string()));
    let named = v.len();
    v.extend((named..spec.vocab()).map(|i| format!("<x_{i}>")));
    v
}

/// Writes the model as a GGUF file (architecture `llama`, tokenizer `gpt2` with no merges: one
/// token per byte). The file is written aside and renamed into place, so a reader of `path` (a
/// parallel test writing the same model) sees the whole of one complete file, never a half.
pub fn write_gguf(path: &Path, spec: &TinySpec) -> Result<()> {
    let mut qs: Vec<(String, QTensor)> = Vec::new();
    weights(spec, |name, t| {
        let t = match name {
            n if n.ends_with("q_proj.weight") => permute(&t, spec.heads)?,
            n if n.ends_with("k_proj.weight") => permute(&t, spec.kv_heads)?,
            _ => t,
        };
        let dtype = if t.rank() == 2 && !name.contains("embed") {
            spec.dtype
        } else {
            GgmlDType::F32
        };
        qs.push((gguf_name(name), QTensor::quantize(&t, dtype)?));
        Ok(())
    })?;
    let tokens = vocab_tokens(spec);
    let specials = 256..256 + SPECIALS.len();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if specials.contains(&i) { 3 } else { 1 }))
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
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let aside = path.with_extension(format!("{}-{n}.part", std::process::id()));
    let written = (|| -> Result<()> {
        let mut f = BufWriter::new(File::create(&aside)?);
        gguf_file::write(&mut f, &md_refs, &t_refs)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(std::fs::rename(&aside, path)?)
    })();
    if written.is_err() {
        // A failed write (a full disk under an 8B-shaped `gen-tiny`) leaves nothing behind.
        let _ = std::fs::remove_file(&aside);
    }
    written
}

/// Writes the same tiny model as an HF directory: `config.json`, `tokenizer.json`,
/// `tokenizer_config.json`, `model.safetensors` (F32).
pub fn write_safetensors_dir(dir: &Path, spec: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    weights(spec, |name, t| {
        map.insert(name.to_string(), t);
        Ok(())
    })?;
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
        "vocab_size": spec.vocab(),
        "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let vocab: serde_json::Map<String, serde_json::Value> = vocab_tokens(spec)
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

/// Builds a random-weight model of `spec`'s shape directly on `device`, never writing a file:
/// weights drawn on the device (uniform, scaled as [`write_gguf`]'s, not the same values), the
/// projections held as `weights` (F16 or F32). For throughput at real shapes on a GPU, where
/// writing and reading an 8B-shaped file would cost more than the measurement. The tokenizer
/// and template are [`write_gguf`]'s.
pub fn random_model(
    spec: &TinySpec,
    device: &Device,
    weights: candle_core::DType,
) -> Result<crate::Loaded> {
    use crate::config::{Arch, ModelConfig};
    use crate::llama::{Layer, Linear, Model, float_weight};

    let vocab = spec.vocab();
    let h = spec.hidden;
    let hd = h / spec.heads;
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: vocab,
        hidden: h,
        intermediate: spec.intermediate,
        layers: spec.layers,
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        head_dim: hd,
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        context_length: spec.context_length,
        rope_interleaved: true,
    }
    .validate()?;
    let uniform = |shape: (usize, usize), scale: f32| -> Result<Tensor> {
        Ok(Tensor::rand(-scale, scale, shape, device)?)
    };
    let lin = |shape: (usize, usize), scale: f32| -> Result<Linear> {
        Ok(Linear {
            w: float_weight(uniform(shape, scale)?, weights)?,
            b: None,
        })
    };
    let norm = || -> Result<Tensor> { Ok((uniform((1, h), 0.2)? + 1.0)?.squeeze(0)?) };
    let s = 1.0 / (h as f32).sqrt() * 1.7;
    let sd = 1.0 / (spec.intermediate as f32).sqrt() * 1.7;
    let mut layers = Vec::with_capacity(spec.layers);
    for _ in 0..spec.layers {
        layers.push(Layer {
            attn_norm: norm()?,
            wq: lin((spec.heads * hd, h), s)?,
            wk: lin((spec.kv_heads * hd, h), s)?,
            wv: lin((spec.kv_heads * hd, h), s)?,
            wo: lin((h, spec.heads * hd), s)?,
            ffn_norm: norm()?,
            gate: lin((spec.intermediate, h), s)?,
            up: lin((spec.intermediate, h), s)?,
            down: lin((h, spec.intermediate), sd)?,
        });
    }
    let model = Model::new(
        cfg,
        uniform((vocab, h), 1.0)?,
        layers,
        norm()?,
        lin((vocab, h), 0.5)?,
    )?;
    let tokens = vocab_tokens(spec);
    let specials = 256..256 + SPECIALS.len();
    let types: Vec<i32> = (0..tokens.len())
        .map(|i| if specials.contains(&i) { 3 } else { 1 })
        .collect();
    let tokenizer = crate::Tokenizer::new(
        tokens,
        &types,
        &[],
        crate::PreTokenizer::from_gguf_name("gpt-2"),
        Some(257),
        Some(258),
        false,
    )?;
    let template = crate::ChatTemplate::new(CHATML, SPECIALS[0], SPECIALS[0])?;
    Ok(crate::Loaded {
        model,
        tokenizer,
        template: Some(template),
    })
}
