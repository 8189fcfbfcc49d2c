//! Loading an HF checkpoint directory: `config.json`, `tokenizer.json`,
//! `tokenizer_config.json` (chat template) and `*.safetensors` (any float type, run in f32).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::config::{Arch, ModelConfig};
use crate::llama::{Layer, Linear, Model, f32_tensor, float_weight};
use crate::template::ChatTemplate;
use crate::tokenizer::{PreTokenizer, Tokenizer};
use crate::{LoadOptions, Loaded, ModelError, Result};

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
}

#[derive(Deserialize)]
struct HfTokenizer {
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
    #[serde(default)]
    pre_tokenizer: Option<serde_json::Value>,
    model: HfBpe,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
}

#[derive(Deserialize)]
struct HfBpe {
    vocab: HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct HfTokenizerConfig {
    chat_template: Option<String>,
    bos_token: Option<serde_json::Value>,
    eos_token: Option<serde_json::Value>,
    #[serde(default)]
    add_bos_token: bool,
}

fn token_text(v: &Option<serde_json::Value>) -> Option<String> {
    match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

pub(crate) fn load(dir: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let hf: HfConfig = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    let arch = match hf.model_type.as_deref().unwrap_or("llama") {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(ModelError::Metadata(format!(
                "unsupported model_type {other}"
            )));
        }
    };
    let cfg = ModelConfig {
        arch,
        vocab_size: hf.vocab_size,
        hidden: hf.hidden_size,
        intermediate: hf.intermediate_size,
        layers: hf.num_hidden_layers,
        heads: hf.num_attention_heads,
        kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim: hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
        rms_eps: hf.rms_norm_eps,
        rope_theta: hf.rope_theta.unwrap_or(10_000.0),
        context_length: hf.max_position_embeddings,
        rope_interleaved: false,
    }
    .validate()?;
    let tc: HfTokenizerConfig = match std::fs::read(dir.join("tokenizer_config.json")) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(_) => HfTokenizerConfig::default(),
    };
    let tokenizer = tokenizer(dir, &tc, arch)?;
    let template = match &tc.chat_template {
        Some(src) => Some(ChatTemplate::new(
            src,
            &token_text(&tc.bos_token).unwrap_or_default(),
            &token_text(&tc.eos_token).unwrap_or_default(),
        )?),
        None => None,
    };
    let dev = opts.device.clone();
    let mut w: HashMap<String, Tensor> = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            w.extend(candle_core::safetensors::load(&p, &dev)?);
        }
    }
    let mut take = |name: &str| -> Result<Tensor> {
        let t = w
            .remove(name)
            .ok_or_else(|| ModelError::Metadata(format!("missing tensor {name}")))?;
        f32_tensor(t)
    };
    let embed = take("model.embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(cfg.layers);
    for i in 0..cfg.layers {
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, bias: bool| -> Result<Linear> {
            let wt = take(&format!("{p}.{name}.weight"))?;
            let b = if bias {
                Some(take(&format!("{p}.{name}.bias"))?)
            } else {
                None
            };
            Ok(Linear {
                w: float_weight(wt, opts.weights.unwrap_or(DType::F32))?,
                b,
            })
        };
        let qb = arch == Arch::Qwen2;
        let (wq, wk, wv) = (
            lin("self_attn.q_proj", qb)?,
            lin("self_attn.k_proj", qb)?,
            lin("self_attn.v_proj", qb)?,
        );
        let wo = lin("self_attn.o_proj", false)?;
        let (gate, up, down) = (
            lin("mlp.gate_proj", false)?,
            lin("mlp.up_proj", false)?,
            lin("mlp.down_proj", false)?,
        );
        layers.push(Layer {
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            wq,
            wk,
            wv,
            wo,
            ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            gate,
            up,
            down,
        });
    }
    let norm = take("model.norm.weight")?;
    let head = if hf.tie_word_embeddings {
        embed.clone()
    } else {
        take("lm_head.weight")?
    };
    let model = Model::new(
        cfg,
        embed,
        layers,
        norm,
        Linear {
            w: float_weight(head, opts.weights.unwrap_or(DType::F32))?,
            b: None,
        },
    )?;
    Ok(Loaded {
        model,
        tokenizer,
        template,
    })
}

fn tokenizer(dir: &Path, tc: &HfTokenizerConfig, arch: Arch) -> Result<Tokenizer> {
    let tj: HfTokenizer = serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json"))?)?;
    let n = tj
        .model
        .vocab
        .values()
        .chain(tj.added_tokens.iter().map(|a| &a.id))
        .max()
        .map_or(0, |&m| m as usize + 1);
    let mut tokens = vec![String::new(); n];
    let mut types = vec![1i32; n];
    for (t, &id) in &tj.model.vocab {
        tokens[id as usize] = t.clone();
    }
    for a in &tj.added_tokens {
        tokens[a.id as usize] = a.content.clone();
        types[a.id as usize] = 3;
    }
    let merges: Vec<String> = tj
        .model
        .merges
        .iter()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(a) => {
                Some(format!("{} {}", a.first()?.as_str()?, a.get(1)?.as_str()?))
            }
            _ => None,
        })
        .collect();
    let pre_json = tj.pre_tokenizer.map(|v| v.to_string()).unwrap_or_default();
    let pre = if arch == Arch::Qwen2 {
        PreTokenizer::Qwen2
    } else if pre_json.contains("\"Digits\"") {
        PreTokenizer::SmolLm
    } else if pre_json.contains("\\\\p{N}{1,3}") {
        PreTokenizer::Llama3
    } else {
        PreTokenizer::Gpt2
    };
    let id_of = |t: Option<String>| {
        t.and_then(|s| tokens.iter().position(|x| *x == s))
            .map(|i| i as u32)
    };
    let bos = id_of(token_text(&tc.bos_token));
    let eos = id_of(token_text(&tc.eos_token));
    Tokenizer::new(
        tokens.clone(),
        &types,
        &merges,
        pre,
        bos,
        eos,
        tc.add_bos_token,
    )
}
