//! The decoder's forward pass over a batch of sequences with paged KV.

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::ops::{rms_norm, silu, softmax_last_dim};
use candle_nn::rotary_emb::{rope, rope_i};

use crate::config::ModelConfig;
use crate::pool::KvPool;
use crate::q4_1::Q41Matrix;
use crate::{ModelError, Result};

/// The weight `(out, in)` of a projection.
#[derive(Debug)]
pub(crate) enum Weight {
    /// candle's quantized or float matmul.
    Candle(QMatMul),
    /// Q4_1 with kvmesh's AVX2 kernel (candle's is scalar on x86).
    Q41(Q41Matrix),
}

impl Weight {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(w) => Ok(w.forward(x)?),
            Self::Q41(w) => {
                let (n, k) = w.dims();
                let m = x.dim(0)?;
                let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                if xs.len() != m * k {
                    return Err(ModelError::Forward(format!(
                        "input of {} values for a ({n}, {k}) weight",
                        xs.len()
                    )));
                }
                Ok(Tensor::from_vec(w.matmul(&xs, m), (m, n), x.device())?)
            }
        }
    }
}

/// A projection: weight `(out, in)` and an optional bias.
#[derive(Debug)]
pub(crate) struct Linear {
    pub(crate) w: Weight,
    pub(crate) b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor,
    pub(crate) wq: Linear,
    pub(crate) wk: Linear,
    pub(crate) wv: Linear,
    pub(crate) wo: Linear,
    pub(crate) ffn_norm: Tensor,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

/// The weights of a Llama-architecture decoder. Immutable once loaded: every call gets the
/// per-sequence state (tokens, positions, block table) and the KV pool from the caller.
#[derive(Debug)]
pub struct Model {
    pub(crate) cfg: ModelConfig,
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// One sequence's share of a forward step: run `tokens` at positions `start..`, reading KV of
/// positions `0..start` from `blocks` and writing theirs there.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub blocks: &'a [u32],
    /// Logits for every token (tests) instead of only the last one.
    pub all_logits: bool,
}

impl Model {
    pub(crate) fn new(
        cfg: ModelConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
    ) -> Result<Self> {
        let device = embed.device().clone();
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let n = cfg.context_length;
        let mut freqs = Vec::with_capacity(n * half);
        for p in 0..n {
            freqs.extend(inv.iter().map(|f| p as f32 * f));
        }
        let freqs = Tensor::from_vec(freqs, (n, half), &device)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            device,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Runs one step for a batch of sequences; their tokens go through every matmul together.
    /// Returns per sequence its logits, `(rows, vocab)`: the last token's only, or every
    /// token's when `all_logits`.
    pub fn forward(&self, batch: &[SeqInput<'_>], pool: &mut KvPool) -> Result<Vec<Tensor>> {
        let cfg = &self.cfg;
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if total == 0 {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for s in batch {
            let end = s.start + s.tokens.len();
            if s.tokens.is_empty() {
                return Err(ModelError::Forward("empty sequence in batch".into()));
            }
            if end > cfg.context_length {
                return Err(ModelError::Forward(format!(
                    "position {end} beyond context {}",
                    cfg.context_length
                )));
            }
            if s.blocks.len() * pool.block_tokens() < end {
                return Err(ModelError::Forward("block table too short".into()));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::Forward(format!("token {t} out of vocabulary")));
            }
            ids.extend_from_slice(s.tokens);
            positions.extend((s.start..end).map(|p| p as u32));
        }
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let eps = cfg.rms_eps as f32;
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, eps)?;
            let q = self.rotate(&layer.wq.forward(&h)?, cfg.heads, &cos, &sin)?;
            let k = self.rotate(&layer.wk.forward(&h)?, cfg.kv_heads, &cos, &sin)?;
            // Back to token-major rows for the pool.
            let k_rows = k
                .transpose(0, 1)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let v_rows = layer.wv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let mut outs = Vec::with_capacity(batch.len());
            let mut off = 0;
            for s in batch {
                let n = s.tokens.len();
                let d = cfg.kv_dim();
                let rows = off * d..(off + n) * d;
                if !pool.write(l, s.blocks, s.start, &k_rows[rows.clone()], &v_rows[rows]) {
                    return Err(ModelError::Forward("block id outside the pool".into()));
                }
                let ctx = s.start + n;
                if !pool.gather(l, s.blocks, ctx, &mut kbuf, &mut vbuf) {
                    return Err(ModelError::Forward("block id outside the pool".into()));
                }
                let qs = q.narrow(1, off, n)?.contiguous()?;
                outs.push(self.attend(&qs, &kbuf, &vbuf, s.start, ctx)?);
                off += n;
            }
            let attn = Tensor::cat(&outs, 0)?;
            x = (x + layer.wo.forward(&attn)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, eps)?;
            let ff = (silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&ff)?)?;
        }
        // Only the rows whose logits are wanted go through the (large) output projection.
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(batch.len());
        let mut off = 0u32;
        for s in batch {
            let n = s.tokens.len() as u32;
            if s.all_logits {
                rows.extend(off..off + n);
                counts.push(n as usize);
            } else {
                rows.push(off + n - 1);
                counts.push(1);
            }
            off += n;
        }
        let rows = Tensor::new(rows.as_slice(), &self.device)?;
        let x = rms_norm(&x.index_select(&rows, 0)?, &self.norm, eps)?;
        let logits = self.lm_head.forward(&x)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut at = 0;
        for c in counts {
            out.push(logits.narrow(0, at, c)?);
            at += c;
        }
        Ok(out)
    }

    /// `(T, heads * head_dim)` -> rotary-embedded `(heads, T, head_dim)`.
    fn rotate(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let x = x
            .reshape((t, heads, self.cfg.head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        let y = if self.cfg.rope_interleaved {
            rope_i(&x, cos, sin)?
        } else {
            rope(&x, cos, sin)?
        };
        Ok(y.squeeze(0)?)
    }

    /// Causal attention of `q` `(heads, n, head_dim)` (positions `start..ctx`) over the
    /// gathered K/V rows of positions `0..ctx`. Returns `(n, heads * head_dim)`.
    fn attend(&self, q: &Tensor, k: &[f32], v: &[f32], start: usize, ctx: usize) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (kvh, hd) = (cfg.kv_heads, cfg.head_dim);
        let g = cfg.heads / kvh;
        let n = ctx - start;
        let k = Tensor::from_slice(k, (ctx, kvh, hd), &self.device)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = Tensor::from_slice(v, (ctx, kvh, hd), &self.device)?
            .transpose(0, 1)?
            .contiguous()?;
        // Query heads h = kv * g + j share kv head `kv`.
        let q = q.reshape((kvh, g * n, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if n > 1 {
            let mut mask = vec![0f32; n * ctx];
            for i in 0..n {
                for j in start + i + 1..ctx {
                    mask[i * ctx + j] = f32::NEG_INFINITY;
                }
            }
            let mask = Tensor::from_vec(mask, (n, ctx), &self.device)?;
            att = att
                .reshape((kvh, g, n, ctx))?
                .broadcast_add(&mask)?
                .reshape((kvh, g * n, ctx))?;
        }
        let att = softmax_last_dim(&att)?;
        let out = att.matmul(&v)?; // (kvh, g*n, hd)
        let out = out
            .reshape((cfg.heads, n, hd))?
            .transpose(0, 1)?
            .reshape((n, cfg.heads * hd))?;
        Ok(out)
    }
}

/// Float tensor of a weight, in f32.
pub(crate) fn f32_tensor(t: Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// The largest absolute difference between two tensors of the same shape (tests compare logits).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?
        .abs()?
        .max(D::Minus1)?
        .max_all()?
        .to_scalar::<f32>()?)
}
