//! The decoder's forward pass over a batch of sequences with paged KV.

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::ops::{rms_norm, silu, softmax_last_dim};
use candle_nn::rotary_emb::{rope, rope_i};

use crate::config::ModelConfig;
#[cfg(feature = "cuda")]
use crate::cuda::{GEMV_ROWS, Kernels};
use crate::paged::{self, Heads, PAGED_MAX_ROWS, PagedSeq};
use crate::pool::KvPool;
use crate::q4_1::{Q41Matrix, QRows};
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
    /// Bytes a matmul with this weight reads (what one decode step streams from memory).
    fn bytes(&self) -> usize {
        match self {
            Self::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            // 32 weights in 16 bytes of nibbles plus an f16 scale and minimum.
            Self::Q41(w) => w.dims().0 * w.dims().1 / 32 * 20,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(w) => Ok(w.forward(x)?),
            Self::Q41(w) => q41_product(w, &q41_input(x, w.dims().1)?, x.device()),
        }
    }
}

/// `x`, `(m, k)`, quantized for Q4_1 weights `k` wide.
fn q41_input(x: &Tensor, k: usize) -> Result<QRows> {
    let m = x.dim(0)?;
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    if xs.len() != m * k {
        return Err(ModelError::Forward(format!(
            "input of {} values for a weight {k} wide",
            xs.len()
        )));
    }
    Ok(QRows::new(&xs, m, k))
}

fn q41_product(w: &Q41Matrix, x: &QRows, device: &Device) -> Result<Tensor> {
    let y = w.matmul_quantized(x);
    let n = w.dims().0;
    Ok(Tensor::from_vec(y, (x.rows(), n), device)?)
}

/// A projection: weight `(out, in)` and an optional bias.
#[derive(Debug)]
pub(crate) struct Linear {
    pub(crate) w: Weight,
    pub(crate) b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.add_bias(self.w.forward(x)?)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `x` through each of `lins` (q, k and v; gate and up): where all are Q4_1 weights of
    /// one width, `x` is quantized once for all of them.
    fn forward_each<const N: usize>(lins: [&Self; N], x: &Tensor) -> Result<[Tensor; N]> {
        let q41: Option<Vec<&Q41Matrix>> = lins
            .iter()
            .map(|l| match &l.w {
                Weight::Q41(w) => Some(w),
                Weight::Candle(_) => None,
            })
            .collect();
        let out = match q41 {
            Some(ws) if ws.iter().all(|w| w.dims().1 == ws[0].dims().1) => {
                let q = q41_input(x, ws[0].dims().1)?;
                lins.iter()
                    .zip(ws)
                    .map(|(l, w)| l.add_bias(q41_product(w, &q, x.device())?))
                    .collect::<Result<Vec<_>>>()?
            }
            _ => lins
                .iter()
                .map(|l| l.forward(x))
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(out.try_into().unwrap_or_else(|_| unreachable!("N outputs")))
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

/// q|k|v and gate|up of one layer each in one weight, so that a GPU runs one product where it
/// ran three or two; the layer's own projections are views into them (no second copy).
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Fused {
    pub(crate) qkv: Linear,
    pub(crate) gate_up: Linear,
}

impl Fused {
    /// Fuses a layer whose projections are float tensors of one type, with biases on all of
    /// them or none; `None` otherwise (quantized weights stay as they are).
    fn new(l: &mut Layer) -> Result<Option<Self>> {
        let Some(qkv) = fuse(&mut [&mut l.wq, &mut l.wk, &mut l.wv])? else {
            return Ok(None);
        };
        let Some(gate_up) = fuse(&mut [&mut l.gate, &mut l.up])? else {
            return Ok(None);
        };
        Ok(Some(Self { qkv, gate_up }))
    }
}

/// Concatenates projections along their outputs and points each at its rows of the result.
fn fuse(parts: &mut [&mut Linear]) -> Result<Option<Linear>> {
    let mut ws = Vec::with_capacity(parts.len());
    let mut f16 = None;
    for p in parts.iter() {
        let (w, is_f16) = match &p.w {
            Weight::Candle(QMatMul::Tensor(w)) => (w, false),
            Weight::Candle(QMatMul::TensorF16(w)) => (w, true),
            _ => return Ok(None),
        };
        if *f16.get_or_insert(is_f16) != is_f16 || w.rank() != 2 {
            return Ok(None);
        }
        ws.push(w.clone());
    }
    let with_bias = parts.iter().filter(|p| p.b.is_some()).count();
    if with_bias != 0 && with_bias != parts.len() {
        return Ok(None);
    }
    let wrap = |t: Tensor| match f16 {
        Some(true) => Weight::Candle(QMatMul::TensorF16(t)),
        _ => Weight::Candle(QMatMul::Tensor(t)),
    };
    let cat = Tensor::cat(&ws, 0)?;
    drop(ws);
    let mut at = 0;
    for p in parts.iter_mut() {
        let rows = match &p.w {
            Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.dim(0)?,
            _ => unreachable!("checked above"),
        };
        p.w = wrap(cat.narrow(0, at, rows)?);
        at += rows;
    }
    let b = match with_bias {
        0 => None,
        _ => Some(Tensor::cat(
            &parts.iter().filter_map(|p| p.b.clone()).collect::<Vec<_>>(),
            0,
        )?),
    };
    Ok(Some(Linear { w: wrap(cat), b }))
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
    /// Type of the activations: F16 on a GPU when every projection is f16 (no casts around
    /// each matmul), F32 otherwise.
    act: DType,
    /// Every layer's fused projections, on a GPU with float weights (empty otherwise).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fused: Vec<Fused>,
    /// kvmesh's decode kernels, where they serve this model (a CUDA device, float weights).
    #[cfg(feature = "cuda")]
    kernels: Option<Kernels>,
    /// Whether all-decode steps use the kernels (on by default; off runs candle's ops, the
    /// baseline the benchmark compares with).
    use_kernels: std::sync::atomic::AtomicBool,
    /// Whether the q|k|v and gate|up products carry rope with the KV write and the gated unit
    /// in their kernels (on unless `KVMESH_DECODE_EPILOGUES=0`, which runs those as kernels of
    /// their own: the step before these fusions, for comparison).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    epilogues: bool,
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
        mut layers: Vec<Layer>,
        norm: Tensor,
        mut lm_head: Linear,
    ) -> Result<Self> {
        let device = embed.device().clone();
        let f16 = |l: &Linear| matches!(l.w, Weight::Candle(QMatMul::TensorF16(_)));
        let act = if !device.is_cpu()
            && f16(&lm_head)
            && layers.iter().all(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .into_iter()
                    .all(f16)
            }) {
            DType::F16
        } else {
            DType::F32
        };
        for l in &mut layers {
            l.attn_norm = l.attn_norm.to_dtype(act)?;
            l.ffn_norm = l.ffn_norm.to_dtype(act)?;
            for lin in [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                lin.b = lin.b.take().map(|b| b.to_dtype(act)).transpose()?;
            }
        }
        lm_head.b = lm_head.b.take().map(|b| b.to_dtype(act)).transpose()?;
        let mut fused = Vec::new();
        if !device.is_cpu() {
            for l in &mut layers {
                match Fused::new(l)? {
                    Some(f) => fused.push(f),
                    None => break,
                }
            }
            if fused.len() != layers.len() {
                fused.clear();
            }
        }
        // Kernels that do not load (a GPU the PTX was not built for) leave candle's ops to
        // decode: slower, never down.
        #[cfg(feature = "cuda")]
        let kernels = match &device {
            Device::Cuda(dev) if !fused.is_empty() && Kernels::serve(&cfg, act) => {
                Kernels::new(dev)
                    .inspect_err(|e| {
                        tracing::warn!("decode kernels not loaded, decoding on candle's ops: {e}")
                    })
                    .ok()
            }
            _ => None,
        };
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
        let model = Self {
            cos: freqs.cos()?.to_dtype(act)?,
            sin: freqs.sin()?.to_dtype(act)?,
            cfg,
            embed: embed.to_dtype(act)?,
            layers,
            norm: norm.to_dtype(act)?,
            lm_head,
            device,
            act,
            fused,
            #[cfg(feature = "cuda")]
            kernels,
            use_kernels: std::sync::atomic::AtomicBool::new(true),
            epilogues: std::env::var("KVMESH_DECODE_EPILOGUES").map_or(true, |v| v != "0"),
        };
        // candle's CUDA device queues work on the calling thread's stream, and the engine runs
        // the model from another thread: every weight must be in place before that.
        model.device.synchronize()?;
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of every projection and the output head: what one decode step reads at least
    /// (the HBM roofline of a step is this over the copy bandwidth).
    pub fn projection_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
            .map(|lin| lin.w.bytes())
            .sum();
        layers + self.lm_head.w.bytes()
    }

    /// Whether all-decode steps run on kvmesh's CUDA kernels (a `cuda` build, a GPU, float
    /// weights, and not turned off by [`Model::set_decode_kernels`]).
    pub fn decode_kernels(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.kernels.is_some() && self.use_kernels.load(std::sync::atomic::Ordering::Relaxed)
        }
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Turns the decode kernels off (candle's ops run every step, as before them) or back on.
    pub fn set_decode_kernels(&self, on: bool) {
        self.use_kernels
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    #[cfg(feature = "cuda")]
    fn kernels(&self) -> Option<&Kernels> {
        self.kernels.as_ref().filter(|_| self.decode_kernels())
    }

    /// A projection: kvmesh's matrix-vector kernel for a few rows on a GPU, candle otherwise.
    fn project(&self, lin: &Linear, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(k), Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w))) =
            (self.kernels(), &lin.w)
            && x.dim(0)? <= GEMV_ROWS
            && let Some(y) = k.gemv(x, w)?
        {
            return Ok(match &lin.b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        lin.forward(x)
    }

    /// Runs every projection of a decode step of `rows` sequences on zeros, as a step would
    /// (fused and on the kernels when they are on, candle's matmuls otherwise), and waits for
    /// the device: the weights' part of a step alone, for benchmarks.
    pub fn run_projections(&self, rows: usize) -> Result<()> {
        let cfg = &self.cfg;
        let zeros = |n: usize| Tensor::zeros((rows, n), self.act, &self.device);
        let h = zeros(cfg.hidden)?;
        let a = zeros(cfg.heads * cfg.head_dim)?;
        let f = zeros(cfg.intermediate)?;
        for (l, layer) in self.layers.iter().enumerate() {
            match self.fused.get(l).filter(|_| self.decode_kernels()) {
                Some(fused) => {
                    self.project(&fused.qkv, &h)?;
                    #[cfg(feature = "cuda")]
                    match self.kernels() {
                        Some(k) => self.gated(k, &fused.gate_up, &h)?,
                        None => self.project(&fused.gate_up, &h)?,
                    };
                    #[cfg(not(feature = "cuda"))]
                    self.project(&fused.gate_up, &h)?;
                }
                None => {
                    for p in [&layer.wq, &layer.wk, &layer.wv, &layer.gate, &layer.up] {
                        self.project(p, &h)?;
                    }
                }
            }
            self.project(&layer.wo, &a)?;
            self.project(&layer.down, &f)?;
        }
        self.project(&self.lm_head, &h)?;
        self.device.synchronize()?;
        Ok(())
    }

    /// `silu(gate) * up` from the fused gate|up projection: one kernel reading both halves for
    /// a few rows, else the product then the kernel that gates it.
    #[cfg(feature = "cuda")]
    fn gated(&self, k: &Kernels, gate_up: &Linear, x: &Tensor) -> Result<Tensor> {
        if let (Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)), None) =
            (&gate_up.w, &gate_up.b)
            && self.epilogues
            && x.dim(0)? <= GEMV_ROWS
            && let Some(y) = k.gemv_glu(x, w)?
        {
            return Ok(y);
        }
        k.silu_mul(&self.project(gate_up, x)?)
    }

    /// An all-decode step on the kernels: seven launches a layer for up to [`GEMV_ROWS`]
    /// sequences (see `cuda.rs`). Returns the final-normed rows, one a sequence, or gives `x`
    /// back where the kernels do not serve the batch.
    #[cfg(feature = "cuda")]
    fn decode_on_kernels(
        &self,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        plan: Option<&DevicePlan>,
        pool: &KvPool,
    ) -> Result<std::result::Result<Tensor, Tensor>> {
        let (Some(k), Some(plan), Some(rows)) = (self.kernels(), plan, pool.device_rows()) else {
            return Ok(Err(x));
        };
        let Some(dec) = &plan.decode else {
            return Ok(Err(x));
        };
        if !matches!(rows.device(), Device::Cuda(_)) {
            return Ok(Err(x));
        }
        let cfg = &self.cfg;
        let eps = cfg.rms_eps as f32;
        let mut h = rms_norm(&x, &self.layers[0].attn_norm, eps)?;
        let mut x = x;
        for (l, (layer, f)) in self.layers.iter().zip(&self.fused).enumerate() {
            let write = plan.rows.get(l)?;
            let fused = match (&f.qkv.w, &f.qkv.b) {
                (Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)), None)
                    if self.epilogues =>
                {
                    k.qkv_rope(cfg, &h, w, cos, sin, rows, &write)?
                }
                _ => None,
            };
            let q = match fused {
                Some(q) => q,
                None => k.rope_write(cfg, &self.project(&f.qkv, &h)?, cos, sin, rows, &write)?,
            };
            let attn = k.attention(cfg, &q, rows, &dec.gather.get(l)?, &dec.lens, dec.c)?;
            let o = self.project(&layer.wo, &attn)?;
            let (s, n) = k.add_rms_norm(&x, &o, &layer.ffn_norm, eps)?;
            let a = self.gated(k, &f.gate_up, &n)?;
            let d = self.project(&layer.down, &a)?;
            let next = self.layers.get(l + 1).map_or(&self.norm, |n| &n.attn_norm);
            (x, h) = k.add_rms_norm(&s, &d, next, eps)?;
        }
        Ok(Ok(h))
    }

    /// Where the weights live (a KV pool for this model goes there too).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step for a batch of sequences; their tokens go through every matmul together.
    /// Returns per sequence its logits, `(rows, vocab)` in host memory: the last token's only,
    /// or every token's when `all_logits`.
    pub fn forward(&self, batch: &[SeqInput<'_>], pool: &mut KvPool) -> Result<Vec<Tensor>> {
        if self.device.is_cpu() {
            // On the CPU each matmul, attention chunk and most candle ops of the step is a
            // parallel loop on rayon's pool. Started from outside the pool (the engine's
            // thread), every loop is handed to the pool and waited for, a futex wake and sleep
            // each, hundreds a decode step; started on a worker, it begins at once on that
            // worker. So the whole step runs on a worker: one hand-off a step.
            return rayon::scope(|_| self.step(batch, pool));
        }
        self.step(batch, pool)
    }

    fn step(&self, batch: &[SeqInput<'_>], pool: &mut KvPool) -> Result<Vec<Tensor>> {
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
        let x = self.embed.index_select(&ids, 0)?;
        let eps = cfg.rms_eps as f32;
        let plan = match pool.on_device() {
            true => Some(DevicePlan::new(batch, pool, &self.device, self.act)?),
            false => None,
        };
        // Causal masks of the sequences that run several tokens, made once for every layer;
        // none for those the host pool's paged attention serves (it masks by position).
        let masks = batch
            .iter()
            .map(|s| {
                if plan.is_none() && s.tokens.len() <= PAGED_MAX_ROWS {
                    Ok(None)
                } else {
                    causal_mask(s.start, s.tokens.len(), &self.device, self.act)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        #[cfg(feature = "cuda")]
        let x = match self.decode_on_kernels(x, &cos, &sin, plan.as_ref(), pool)? {
            Ok(normed) => return self.logits(&normed, vec![1; batch.len()]),
            Err(x) => x,
        };
        let mut x = x;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, eps)?;
            let [q, k, v_rows] = Linear::forward_each([&layer.wq, &layer.wk, &layer.wv], &h)?;
            let q = self.rotate(&q, cfg.heads, &cos, &sin)?;
            let k = self.rotate(&k, cfg.kv_heads, &cos, &sin)?;
            // Back to token-major rows for the pool.
            let k_rows = k
                .transpose(0, 1)?
                .contiguous()?
                .reshape((total, cfg.kv_dim()))?;
            let attn = match &plan {
                Some(plan) => {
                    self.attend_device(l, plan, &q, &k_rows, &v_rows, batch, pool, &masks)?
                }
                None => self.attend_host(l, &q, &k_rows, &v_rows, batch, pool, &masks)?,
            };
            x = (x + layer.wo.forward(&attn)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, eps)?;
            let [gate, up] = Linear::forward_each([&layer.gate, &layer.up], &h)?;
            let ff = (silu(&gate)? * up)?;
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
        self.logits(&x, counts)
    }

    /// The output head over final-normed rows, copied to the host and split `counts` rows a
    /// sequence.
    fn logits(&self, x: &Tensor, counts: Vec<usize>) -> Result<Vec<Tensor>> {
        let logits = self.project(&self.lm_head, x)?;
        // Sampling runs on the CPU: one copy of every row wanted, not one per sequence.
        let logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let mut out = Vec::with_capacity(counts.len());
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

    /// Writes this layer's K and V rows (`(T, kv_dim)` each, every token of the batch) into a
    /// host pool, then attends: sequences running a few tokens (decode) on the f16 blocks in
    /// place ([`crate::paged`]), longer prefill chunks one at a time over their context copied
    /// out into tensors. Returns `(T, heads * head_dim)`.
    #[allow(clippy::too_many_arguments)]
    fn attend_host(
        &self,
        layer: usize,
        q: &Tensor,
        k_rows: &Tensor,
        v_rows: &Tensor,
        batch: &[SeqInput<'_>],
        pool: &mut KvPool,
        masks: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let outside = || ModelError::Forward("block id outside the pool".into());
        let (d, width) = (cfg.kv_dim(), cfg.heads * cfg.head_dim);
        let k_rows = k_rows.flatten_all()?.to_vec1::<f32>()?;
        let v_rows = v_rows.flatten_all()?.to_vec1::<f32>()?;
        let mut paged = Vec::new();
        let mut off = 0;
        for s in batch {
            let n = s.tokens.len();
            let rows = off * d..(off + n) * d;
            if !pool.write(
                layer,
                s.blocks,
                s.start,
                &k_rows[rows.clone()],
                &v_rows[rows],
            ) {
                return Err(outside());
            }
            if n <= PAGED_MAX_ROWS {
                paged.push(PagedSeq {
                    blocks: s.blocks,
                    start: s.start,
                    n,
                    row: off,
                });
            }
            off += n;
        }
        let mut out = vec![0f32; off * width];
        if !paged.is_empty() {
            // Token-major query rows, as the kernel reads them.
            let q_rows = q
                .transpose(0, 1)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let shape = Heads {
                heads: cfg.heads,
                kv_heads: cfg.kv_heads,
                head_dim: cfg.head_dim,
            };
            if !paged::attend(pool, layer, shape, &q_rows, &paged, &mut out) {
                return Err(outside());
            }
        }
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        let mut off = 0;
        for (s, mask) in batch.iter().zip(masks) {
            let n = s.tokens.len();
            if n > PAGED_MAX_ROWS {
                let ctx = s.start + n;
                if !pool.gather(layer, s.blocks, ctx, &mut kbuf, &mut vbuf) {
                    return Err(outside());
                }
                let shape = (ctx, cfg.kv_heads, cfg.head_dim);
                let kt = Tensor::from_slice(&kbuf, shape, &self.device)?;
                let vt = Tensor::from_slice(&vbuf, shape, &self.device)?;
                let qs = q.narrow(1, off, n)?.contiguous()?;
                let o = self.attend(&qs, &kt, &vt, mask.as_ref())?;
                let o = o.flatten_all()?.to_vec1::<f32>()?;
                out[off * width..(off + n) * width].copy_from_slice(&o);
            }
            off += n;
        }
        Ok(Tensor::from_vec(out, (off, width), &self.device)?)
    }

    /// Writes this layer's K and V rows (`(T, kv_dim)` each, every token of the batch) into a
    /// GPU pool with one scatter, then attends: all-decode batches in one batched product over
    /// their padded contexts, others one sequence at a time.
    #[allow(clippy::too_many_arguments)]
    fn attend_device(
        &self,
        layer: usize,
        plan: &DevicePlan,
        q: &Tensor,
        k_rows: &Tensor,
        v_rows: &Tensor,
        batch: &[SeqInput<'_>],
        pool: &KvPool,
        masks: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (kvh, hd) = (cfg.kv_heads, cfg.head_dim);
        let rows = pool
            .device_rows()
            .ok_or_else(|| ModelError::Forward("KV pool is not on the GPU".into()))?;
        // Row numbers are those of layer 0 plus 2 * layer * block_tokens.
        let shift = |idx: &Tensor| -> Result<Tensor> {
            Ok(match layer {
                0 => idx.clone(),
                l => idx.affine(1.0, (2 * l * pool.block_tokens()) as f64)?,
            })
        };
        let src = Tensor::cat(&[k_rows, v_rows], 0)?.to_dtype(DType::F16)?;
        rows.scatter_set(&plan.write.get(layer)?, &src, 0)?;
        if let Some(Decode {
            gather, mask, c, ..
        }) = &plan.decode
        {
            let b = batch.len();
            let kv = rows
                .index_select(&gather.get(layer)?, 0)?
                .to_dtype(self.act)?;
            let split = |i: usize| -> Result<Tensor> {
                Ok(kv
                    .narrow(0, i * b * c, b * c)?
                    .reshape((b, *c, kvh, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (k, v) = (split(0)?, split(1)?);
            let g = cfg.heads / kvh;
            // q (heads, B, hd) -> (B, kvh, g, hd); query head h = kv * g + j.
            let q = q
                .reshape((kvh, g, b, hd))?
                .permute((2, 0, 1, 3))?
                .contiguous()?;
            let mut att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
            if let Some(mask) = mask {
                att = att.broadcast_add(mask)?;
            }
            let att = softmax_last_dim(&att)?;
            return Ok(att.matmul(&v)?.reshape((b, cfg.heads * hd))?);
        }
        let mut outs = Vec::with_capacity(batch.len());
        let mut off = 0;
        for ((s, gather), mask) in batch.iter().zip(&plan.per_seq).zip(masks) {
            let n = s.tokens.len();
            let ctx = s.start + n;
            let kv = rows.index_select(&shift(gather)?, 0)?.to_dtype(self.act)?;
            let k = kv.narrow(0, 0, ctx)?.reshape((ctx, kvh, hd))?;
            let v = kv.narrow(0, ctx, ctx)?.reshape((ctx, kvh, hd))?;
            let qs = q.narrow(1, off, n)?.contiguous()?;
            outs.push(self.attend(&qs, &k, &v, mask.as_ref())?);
            off += n;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Causal attention of `q` `(heads, n, head_dim)` (positions `ctx - n..ctx`) over K and V
    /// `(ctx, kv_heads, head_dim)` of positions `0..ctx`, with `mask` `(n, ctx)` when `n > 1`.
    /// Returns `(n, heads * head_dim)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (kvh, hd) = (cfg.kv_heads, cfg.head_dim);
        let g = cfg.heads / kvh;
        let (n, ctx) = (q.dim(1)?, k.dim(0)?);
        let k = k.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        // Query heads h = kv * g + j share kv head `kv`.
        let q = q.reshape((kvh, g * n, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            att = att
                .reshape((kvh, g, n, ctx))?
                .broadcast_add(mask)?
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

/// `(n, start + n)` additive mask of `n` tokens at positions `start..`: `-inf` where a token would
/// see a later one. `None` for one token, which sees everything before it.
fn causal_mask(start: usize, n: usize, device: &Device, dtype: DType) -> Result<Option<Tensor>> {
    if n <= 1 {
        return Ok(None);
    }
    let ctx = start + n;
    let mut mask = vec![0f32; n * ctx];
    for i in 0..n {
        for j in start + i + 1..ctx {
            mask[i * ctx + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Some(
        Tensor::from_vec(mask, (n, ctx), device)?.to_dtype(dtype)?,
    ))
}

/// Row numbers of one forward pass in a GPU pool (a layer's are layer 0's plus
/// `2 * layer * block_tokens`), uploaded once and spread to every layer on the device.
struct DevicePlan {
    /// `(layers, 2T, kv_dim)`: the K rows then the V rows of every token, repeated along a row
    /// (the scatter takes an index per element).
    write: Tensor,
    /// `(layers, 2T)`: the same rows once each (the decode kernels write whole rows).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    rows: Tensor,
    /// An all-decode batch's reads.
    decode: Option<Decode>,
    /// Otherwise per sequence, for layer 0: its K rows then V rows of positions `0..ctx`.
    per_seq: Vec<Tensor>,
}

/// What an all-decode batch reads of the pool.
struct Decode {
    /// `(layers, 2BC)`: the K rows then the V rows of each sequence's context padded to the
    /// longest (`C`).
    gather: Tensor,
    /// The additive mask `(B, 1, 1, C)` hiding the padding (none when every context is `C`).
    mask: Option<Tensor>,
    c: usize,
    /// `(B)`: each sequence's context length.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lens: Tensor,
}

impl DevicePlan {
    fn new(batch: &[SeqInput<'_>], pool: &KvPool, device: &Device, act: DType) -> Result<Self> {
        let bt = pool.block_tokens();
        let d = pool.kv_dim();
        let row = |s: &SeqInput<'_>, kv: usize, p: usize| -> u32 {
            pool.row(s.blocks[p / bt] as usize, 0, kv, p % bt) as u32
        };
        if let Some(&bad) = batch
            .iter()
            .flat_map(|s| s.blocks.iter())
            .find(|&&b| b as usize >= pool.num_blocks())
        {
            return Err(ModelError::Forward(format!(
                "block id {bad} outside the pool"
            )));
        }
        let mut write = Vec::new();
        for kv in 0..2 {
            for s in batch {
                for p in s.start..s.start + s.tokens.len() {
                    write.extend(std::iter::repeat_n(row(s, kv, p), d));
                }
            }
        }
        let t = write.len() / (2 * d);
        // Layer l's rows: layer 0's plus 2 * l * block_tokens, made on the device in one op.
        let layers = pool.layers();
        let shift: Vec<u32> = (0..layers).map(|l| (2 * l * bt) as u32).collect();
        let shift = Tensor::from_vec(shift, (layers, 1, 1), device)?;
        let every = |base: Tensor| -> Result<Tensor> {
            let (r, c) = base.dims2()?;
            Ok(base
                .reshape((1, r, c))?
                .broadcast_add(&shift)?
                .contiguous()?)
        };
        let rows: Vec<u32> = write.iter().step_by(d).copied().collect();
        let rows = every(Tensor::from_vec(rows, (2 * t, 1), device)?)?.squeeze(2)?;
        let write = every(Tensor::from_vec(write, (2 * t, d), device)?)?;
        let ctx = |s: &SeqInput<'_>| s.start + s.tokens.len();
        if batch.iter().all(|s| s.tokens.len() == 1) {
            let c = batch.iter().map(ctx).max().unwrap_or(1);
            let mut gather = Vec::with_capacity(2 * batch.len() * c);
            for kv in 0..2 {
                for s in batch {
                    gather.extend((0..c).map(|p| row(s, kv, if p < ctx(s) { p } else { 0 })));
                }
            }
            let mask = match batch.iter().all(|s| ctx(s) == c) {
                true => None,
                false => {
                    let mut mask = vec![0f32; batch.len() * c];
                    for (i, s) in batch.iter().enumerate() {
                        mask[i * c + ctx(s)..(i + 1) * c].fill(f32::NEG_INFINITY);
                    }
                    let mask = Tensor::from_vec(mask, (batch.len(), 1, 1, c), device)?;
                    Some(mask.to_dtype(act)?)
                }
            };
            let n = gather.len();
            let gather = every(Tensor::from_vec(gather, (1, n), device)?)?.squeeze(1)?;
            let lens: Vec<u32> = batch.iter().map(|s| ctx(s) as u32).collect();
            return Ok(Self {
                write,
                rows,
                decode: Some(Decode {
                    gather,
                    mask,
                    c,
                    lens: Tensor::new(lens.as_slice(), device)?,
                }),
                per_seq: Vec::new(),
            });
        }
        let per_seq = batch
            .iter()
            .map(|s| {
                let rows: Vec<u32> = (0..2)
                    .flat_map(|kv| (0..ctx(s)).map(move |p| (kv, p)))
                    .map(|(kv, p)| row(s, kv, p))
                    .collect();
                Tensor::new(rows.as_slice(), device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            write,
            rows,
            decode: None,
            per_seq,
        })
    }
}

/// A projection weight held as floats: `F16` runs its matmuls in f16 (the activations cast on
/// the way in and out), anything else in f32.
pub(crate) fn float_weight(t: Tensor, dtype: DType) -> Result<Weight> {
    Ok(Weight::Candle(match dtype {
        DType::F16 => QMatMul::TensorF16(t.to_dtype(DType::F16)?),
        _ => QMatMul::Tensor(t.to_dtype(DType::F32)?),
    }))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

    use super::*;
    use crate::tiny::{TinySpec, random_model};

    /// Fusing a layer's q|k|v and gate|up changes none of its projections (each becomes a view
    /// of its rows in the fused weight), and a fused product is the separate ones side by side.
    #[test]
    fn fused_projections_equal_the_separate_ones() {
        let mut m = random_model(&TinySpec::default(), &Device::Cpu, DType::F32)
            .unwrap()
            .model;
        let x = Tensor::rand(-1f32, 1f32, (3, m.cfg.hidden), &Device::Cpu).unwrap();
        let outs = |l: &Layer| -> Vec<Tensor> {
            [&l.wq, &l.wk, &l.wv, &l.gate, &l.up]
                .into_iter()
                .map(|p| p.forward(&x).unwrap())
                .collect()
        };
        let before: Vec<Vec<Tensor>> = m.layers.iter().map(outs).collect();
        let bytes = m.projection_bytes();
        for (l, before) in m.layers.iter_mut().zip(&before) {
            let f = Fused::new(l).unwrap().expect("float weights fuse");
            let after = outs(l);
            for (a, b) in after.iter().zip(before) {
                assert_eq!(max_abs_diff(a, b).unwrap(), 0.0);
            }
            let qkv = Tensor::cat(&before[..3], 1).unwrap();
            let gate_up = Tensor::cat(&before[3..], 1).unwrap();
            assert!(max_abs_diff(&f.qkv.forward(&x).unwrap(), &qkv).unwrap() < 1e-5);
            assert!(max_abs_diff(&f.gate_up.forward(&x).unwrap(), &gate_up).unwrap() < 1e-5);
        }
        // Views: the weights' bytes are counted (and held) once.
        assert_eq!(m.projection_bytes(), bytes);
    }

    /// Quantized weights are left alone.
    #[test]
    fn quantized_weights_do_not_fuse() {
        let mut m = random_model(&TinySpec::default(), &Device::Cpu, DType::F32)
            .unwrap()
            .model;
        let l = &mut m.layers[0];
        let w = match &l.wk.w {
            Weight::Candle(QMatMul::Tensor(w)) => w.clone(),
            _ => unreachable!("f32 weights"),
        };
        let q =
            candle_core::quantized::QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0)
                .unwrap();
        l.wk.w = Weight::Candle(QMatMul::QTensor(std::sync::Arc::new(q)));
        assert!(Fused::new(l).unwrap().is_none());
    }
}
