//! Loading a GGUF file: the config and tokenizer from its metadata, the weights as candle
//! `QMatMul`s (quantized types stay quantized; F16/F32 become float tensors), Q4_1 on kvmesh's
//! AVX2 kernel where the CPU has one.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QMatMul, QTensor};

use crate::config::{Arch, ModelConfig};
use crate::llama::{Layer, Linear, Model, Weight, f32_tensor, float_weight};
use crate::q4_1::Q41Matrix;
use crate::template::ChatTemplate;
use crate::tokenizer::{PreTokenizer, Tokenizer};
use crate::{LoadOptions, Loaded, ModelError, Result};

struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0
            .get(key)
            .ok_or_else(|| ModelError::Metadata(format!("missing {key}")))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
            .map_err(|e| ModelError::Metadata(format!("{key}: {e}")))?;
        Ok(n as usize)
    }
    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v
                .to_f32()
                .map_err(|e| ModelError::Metadata(format!("{key}: {e}"))),
        }
    }
    fn str(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let v = self
            .get(key)?
            .to_vec()
            .map_err(|e| ModelError::Metadata(e.to_string()))?;
        v.iter()
            .map(|x| {
                x.to_string()
                    .cloned()
                    .map_err(|e| ModelError::Metadata(e.to_string()))
            })
            .collect()
    }
}

/// The matmul for a GGUF weight: dequantized when `opts.weights` asks for a float type;
/// otherwise kvmesh's AVX2 kernel for Q4_1 where this CPU has AVX2, FMA and F16C and
/// `opts.fast_q4_1` allows it (candle's Q4_1 matmul is scalar code on x86), candle's otherwise.
fn weight(t: Arc<QTensor>, opts: &LoadOptions) -> Result<Weight> {
    if let Some(dtype) = opts.weights {
        return float_weight(t.dequantize(&t.device())?, dtype);
    }
    if opts.fast_q4_1
        && opts.device.is_cpu()
        && let Some(m) = Q41Matrix::from_qtensor(&t)?
    {
        return Ok(Weight::Q41(m));
    }
    Ok(Weight::Candle(QMatMul::from_arc(t)?))
}

pub(crate) fn load(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let mut file = File::open(path)?;
    let content = Content::read(&mut file)?;
    let meta = Meta(&content.metadata);
    let cfg = config(&meta)?;
    let tokenizer = tokenizer(&meta)?;
    let template = match meta.str("tokenizer.chat_template") {
        Some(src) => {
            let tok = |id: Option<u32>| {
                id.map(|i| String::from_utf8_lossy(&tokenizer.token_bytes(i)).into_owned())
                    .unwrap_or_default()
            };
            Some(ChatTemplate::new(
                src,
                &tok(tokenizer.bos),
                &tok(tokenizer.eos),
            )?)
        }
        None => None,
    };
    let dev = opts.device.clone();
    let mut qt = |name: &str| -> Result<QTensor> { Ok(content.tensor(&mut file, name, &dev)?) };
    let embed_q = Arc::new(qt("token_embd.weight")?);
    let embed = f32_tensor(embed_q.dequantize(&dev)?)?;
    let mut layers = Vec::with_capacity(cfg.layers);
    let has = |name: &str| content.tensor_infos.contains_key(name);
    for i in 0..cfg.layers {
        let p = format!("blk.{i}");
        let mut lin = |name: &str| -> Result<Linear> {
            let w = weight(Arc::new(qt(&format!("{p}.{name}.weight"))?), opts)?;
            let bias = format!("{p}.{name}.bias");
            let b = if has(&bias) {
                Some(f32_tensor(qt(&bias)?.dequantize(&dev)?)?)
            } else {
                None
            };
            Ok(Linear { w, b })
        };
        let (wq, wk, wv, wo) = (
            lin("attn_q")?,
            lin("attn_k")?,
            lin("attn_v")?,
            lin("attn_output")?,
        );
        let (gate, up, down) = (lin("ffn_gate")?, lin("ffn_up")?, lin("ffn_down")?);
        let attn_norm = f32_tensor(qt(&format!("{p}.attn_norm.weight"))?.dequantize(&dev)?)?;
        let ffn_norm = f32_tensor(qt(&format!("{p}.ffn_norm.weight"))?.dequantize(&dev)?)?;
        layers.push(Layer {
            attn_norm,
            wq,
            wk,
            wv,
            wo,
            ffn_norm,
            gate,
            up,
            down,
        });
    }
    let norm = f32_tensor(qt("output_norm.weight")?.dequantize(&dev)?)?;
    let lm_head = if has("output.weight") {
        weight(Arc::new(qt("output.weight")?), opts)?
    } else {
        weight(embed_q, opts)?
    };
    let model = Model::new(
        cfg,
        embed,
        layers,
        norm,
        Linear {
            w: lm_head,
            b: None,
        },
    )?;
    Ok(Loaded {
        model,
        tokenizer,
        template,
    })
}

fn config(meta: &Meta<'_>) -> Result<ModelConfig> {
    let arch_name = meta
        .str("general.architecture")
        .unwrap_or("llama")
        .to_string();
    let arch = match arch_name.as_str() {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(ModelError::Metadata(format!(
                "unsupported architecture {other}"
            )));
        }
    };
    let a = |k: &str| format!("{arch_name}.{k}");
    let hidden = meta.usize(&a("embedding_length"))?;
    let heads = meta.usize(&a("attention.head_count"))?;
    let kv_heads = meta.usize(&a("attention.head_count_kv")).unwrap_or(heads);
    let head_dim = meta
        .usize(&a("attention.key_length"))
        .unwrap_or(hidden / heads.max(1));
    let vocab_size = match meta.usize(&a("vocab_size")) {
        Ok(n) => n,
        Err(_) => meta.strings("tokenizer.ggml.tokens")?.len(),
    };
    ModelConfig {
        arch,
        vocab_size,
        hidden,
        intermediate: meta.usize(&a("feed_forward_length"))?,
        layers: meta.usize(&a("block_count"))?,
        heads,
        kv_heads,
        head_dim,
        rms_eps: f64::from(meta.f32_or(&a("attention.layer_norm_rms_epsilon"), 1e-5)?),
        rope_theta: meta.f32_or(&a("rope.freq_base"), 10_000.0)?,
        context_length: meta.usize(&a("context_length"))?,
        rope_interleaved: arch == Arch::Llama,
    }
    .validate()
}

fn tokenizer(meta: &Meta<'_>) -> Result<Tokenizer> {
    let model = meta.str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(ModelError::Metadata(format!(
            "tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
        )));
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match meta.0.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| ModelError::Metadata(e.to_string()))?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let merges = meta.strings("tokenizer.ggml.merges").unwrap_or_default();
    let pre = PreTokenizer::from_gguf_name(meta.str("tokenizer.ggml.pre").unwrap_or("default"));
    let id = |k: &str| meta.usize(k).ok().map(|x| x as u32);
    let add_bos = meta
        .0
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    Tokenizer::new(
        tokens,
        &types,
        &merges,
        pre,
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
        add_bos,
    )
}
