//! The physical side of the tiers: HOST memory, the DISK slabs, the copies between them and
//! the device pool (behind [`BlockCopier`], so a CUDA build can use device memory, pinned
//! host memory and async copies), and the cost model fed by those copies.
//!
//! The logical side (`kvmesh-gpu-server-kv`) decides what moves where and hands the engine an
//! ordered list of [`Move`]s; [`Tiers::apply`] carries them out before the next forward pass.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use kvmesh_gpu_server_kv::{BlockHash, BlockId, BlockManager, Move, Place, RestoredBlock, Tier};
use kvmesh_gpu_server_model::KvPool;
use kvmesh_gpu_server_model::aligned::AlignedBytes;
use serde::Serialize;

use crate::cost::{CostModel, FetchPolicy};
use crate::disk::{DiskStore, ScanReport};

/// Sizes and place of the lower tiers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierConfig {
    /// HOST slots (0 = tier off).
    pub host_blocks: usize,
    /// DISK slots (0 = tier off).
    pub disk_blocks: usize,
    /// Directory of the disk slabs; the disk tier is off without one.
    pub disk_dir: Option<PathBuf>,
    /// Identity of the model's weights, mixed into the disk layout tag: blocks written for
    /// other weights (or another block layout) are never served.
    pub model_tag: u64,
    pub fetch: FetchPolicy,
}

/// Whole-block copies between the device pool and host memory.
pub trait BlockCopier: Send + std::fmt::Debug {
    /// Copies device block `id` into `dst` (one block of bytes). False if `id` is not in the
    /// pool. A copy into memory from [`BlockCopier::host_memory`] may still be running when
    /// this returns ([`BlockCopier::sync`]).
    fn to_host(&mut self, pool: &KvPool, id: BlockId, dst: &mut [u8]) -> bool;
    /// Copies `src` (one block of bytes) into device block `id`; `src` may be reused at once.
    fn to_device(&mut self, src: &[u8], pool: &mut KvPool, id: BlockId) -> bool;
    /// Memory for the HOST tier (pinned on a GPU, so copies run without the CPU).
    fn host_memory(&mut self, bytes: usize) -> HostMemory {
        HostMemory::zeroed(bytes)
    }
    /// Before a run of copies: they must see the pool as the forward passes left it.
    fn begin(&mut self) {}
    /// After a run of copies: the next forward pass must see what they wrote.
    fn end(&mut self) {}
    /// Waits for copies into host memory still running, before the CPU reads that memory.
    fn sync(&mut self) {}
}

/// Memory of the HOST tier: on the heap, or pinned by CUDA (`cuda` builds) so that copies to
/// and from the GPU run without the CPU.
#[derive(Debug)]
pub enum HostMemory {
    Heap(AlignedBytes),
    #[cfg(feature = "cuda")]
    Pinned(crate::cuda::Pinned),
}

impl HostMemory {
    /// `len` zero bytes on the heap.
    pub fn zeroed(len: usize) -> Self {
        Self::Heap(AlignedBytes::new(len))
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Heap(b) => b,
            #[cfg(feature = "cuda")]
            Self::Pinned(p) => p.bytes(),
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::Heap(b) => b,
            #[cfg(feature = "cuda")]
            Self::Pinned(p) => p.bytes_mut(),
        }
    }
}

/// The copier for `pool`: memcpy for a host pool, CUDA streams and pinned memory for a GPU one;
/// `None` when the pool's blocks cannot be copied (then the lower tiers stay off).
fn copier_for(pool: &KvPool) -> Option<Box<dyn BlockCopier>> {
    if !pool.on_device() {
        return Some(Box::new(CpuCopier));
    }
    #[cfg(feature = "cuda")]
    match crate::cuda::CudaCopier::new(pool) {
        Ok(c) => return Some(Box::new(c)),
        Err(e) => tracing::warn!("KV tier copies on the GPU unavailable: {e}"),
    }
    None
}

/// The CPU backend: the device pool is host memory, a copy is a `memcpy`.
#[derive(Debug, Default)]
pub struct CpuCopier;

impl BlockCopier for CpuCopier {
    fn to_host(&mut self, pool: &KvPool, id: BlockId, dst: &mut [u8]) -> bool {
        match pool.block_bytes(id) {
            Some(b) if b.len() == dst.len() => {
                dst.copy_from_slice(b);
                true
            }
            _ => false,
        }
    }

    fn to_device(&mut self, src: &[u8], pool: &mut KvPool, id: BlockId) -> bool {
        match pool.block_bytes_mut(id) {
            Some(b) if b.len() == src.len() => {
                b.copy_from_slice(src);
                true
            }
            _ => false,
        }
    }
}

/// HOST tier memory: `slots` blocks of `block_bytes`, contiguous.
#[derive(Debug)]
struct HostPool {
    block_bytes: usize,
    data: HostMemory,
}

impl HostPool {
    fn slot(&self, s: u32) -> &[u8] {
        let at = s as usize * self.block_bytes;
        &self.data.bytes()[at..at + self.block_bytes]
    }
    fn slot_mut(&mut self, s: u32) -> &mut [u8] {
        let at = s as usize * self.block_bytes;
        &mut self.data.bytes_mut()[at..at + self.block_bytes]
    }
}

/// Physical counters, bytes.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct TierBytes {
    pub written: u64,
    pub read: u64,
}

/// The disk tier's state for `/metrics` and the debug endpoint.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DiskStatus {
    pub dir: Option<String>,
    pub enabled: bool,
    /// Why the disk tier is off, when it was configured but could not be used.
    pub disabled_reason: Option<String>,
    pub scan: ScanReport,
    /// Valid blocks indexed at start (warm restart).
    pub restored: u64,
    pub writes: u64,
    pub write_errors: u64,
    pub reads: u64,
    /// Of `reads`, those copied out of the slabs' mapping (every page in the page cache);
    /// the rest were `pread`s.
    pub reads_mapped: u64,
    /// Reads that found a corrupt or foreign slot (the block was dropped, not served).
    pub read_errors: u64,
    pub pending_writes: u64,
    /// Disk blocks read ahead for waiting requests.
    pub prefetched: u64,
    pub slot_bytes: u64,
}

/// HOST memory, DISK slabs, the copier and the cost model.
#[derive(Debug)]
pub(crate) struct Tiers {
    block_bytes: usize,
    host: Option<HostPool>,
    disk: Option<DiskStore>,
    copier: Box<dyn BlockCopier>,
    pub(crate) cost: CostModel,
    /// Verified disk blocks read ahead of their promotion.
    staged: HashMap<BlockHash, AlignedBytes>,
    pub(crate) bytes: [TierBytes; 3],
    pub(crate) disk_status: DiskStatus,
    scratch: AlignedBytes,
    /// Blocks staged by read-ahead (counted when they arrive).
    prefetched: u64,
    /// Block buffers kept for reuse by staging reads.
    spare: Vec<AlignedBytes>,
}

/// Read-ahead copies kept in memory at most; also the most staging buffers kept for reuse
/// (in bytes). A prefix staged at admission takes one buffer per DISK block; a fresh one costs
/// a page fault per page on first touch and is returned to the system when freed, so a cap
/// below a long prompt's block count (it was 64 buffers) made every admission past it pay
/// those faults: 3,000-token prompts (188 blocks) were fetched at 0.15 of sequential read.
const STAGED_MAX_BYTES: usize = 256 << 20;

fn ti(t: Tier) -> usize {
    match t {
        Tier::Device => 0,
        Tier::Host => 1,
        Tier::Disk => 2,
    }
}

impl Tiers {
    /// Sets up the lower tiers for `pool`; returns them with the effective slot counts and
    /// the disk blocks found valid at start. A disk tier that cannot be used is turned off
    /// with a warning (the server keeps serving on two tiers).
    pub(crate) fn new(cfg: &TierConfig, pool: &KvPool) -> (Self, usize, usize, Vec<RestoredBlock>) {
        let block_bytes = pool.block_bytes_len();
        let copier = copier_for(pool);
        let copies = copier.is_some();
        let mut copier = copier.unwrap_or_else(|| Box::new(CpuCopier));
        if !copies && (cfg.host_blocks > 0 || cfg.disk_blocks > 0) {
            tracing::warn!("HOST and DISK KV tiers off: this pool's blocks cannot be copied");
        }
        let cfg = &TierConfig {
            host_blocks: if copies { cfg.host_blocks } else { 0 },
            disk_blocks: if copies { cfg.disk_blocks } else { 0 },
            ..cfg.clone()
        };
        let host = (cfg.host_blocks > 0).then(|| HostPool {
            block_bytes,
            data: copier.host_memory(cfg.host_blocks * block_bytes),
        });
        let mut disk_status = DiskStatus {
            dir: cfg.disk_dir.as_ref().map(|d| d.display().to_string()),
            ..DiskStatus::default()
        };
        let layout = {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(b"kvmesh kv block: f16, block-major [layer][K|V][slot][kv_dim]");
            h.update(&cfg.model_tag.to_le_bytes());
            h.update(&(pool.block_tokens() as u64).to_le_bytes());
            h.update(&(block_bytes as u64).to_le_bytes());
            h.digest()
        };
        let mut found = Vec::new();
        let disk = match (&cfg.disk_dir, cfg.disk_blocks) {
            (Some(dir), n) if n > 0 => match DiskStore::open(dir, n, block_bytes, layout) {
                Ok((store, f, report)) => {
                    tracing::info!(
                        dir = %dir.display(),
                        slots = n,
                        valid = report.valid,
                        corrupt = report.corrupt,
                        foreign = report.foreign,
                        "disk KV tier ready"
                    );
                    disk_status.enabled = true;
                    disk_status.scan = report;
                    disk_status.slot_bytes = store.slot_bytes() as u64;
                    found = f;
                    Some(store)
                }
                Err(e) => {
                    tracing::warn!("disk KV tier off, serving with the other tiers: {e}");
                    disk_status.disabled_reason = Some(e.to_string());
                    None
                }
            },
            (None, n) if n > 0 => {
                let why = "no disk tier directory (--kv-disk-dir) given".to_string();
                tracing::warn!("disk KV tier off: {why}");
                disk_status.disabled_reason = Some(why);
                None
            }
            _ => None,
        };
        let host_blocks = if host.is_some() { cfg.host_blocks } else { 0 };
        let disk_blocks = if disk.is_some() { cfg.disk_blocks } else { 0 };
        let tiers = Self {
            block_bytes,
            host,
            disk,
            copier,
            cost: CostModel::new(cfg.fetch, pool.block_tokens(), block_bytes),
            staged: HashMap::new(),
            bytes: [TierBytes::default(); 3],
            disk_status,
            scratch: AlignedBytes::new(block_bytes),
            prefetched: 0,
            spare: Vec::new(),
        };
        (tiers, host_blocks, disk_blocks, found)
    }

    /// Seeds the cost model: a few host copies and disk reads of `pool`'s first block.
    pub(crate) fn calibrate(&mut self, pool: &KvPool) {
        const REPS: usize = 4;
        if let Some(host) = &mut self.host {
            for _ in 0..REPS {
                let t = Instant::now();
                self.copier.begin();
                self.copier.to_host(pool, 0, host.slot_mut(0));
                self.copier.sync();
                self.cost
                    .record_fetch(Tier::Host, t.elapsed().as_secs_f64());
                let t = Instant::now();
                self.scratch[..4096.min(self.block_bytes)]
                    .copy_from_slice(&host.slot(0)[..4096.min(self.block_bytes)]);
                if let Some(c) = self.cost.tier_mut(Tier::Host) {
                    c.latency_secs.add(t.elapsed().as_secs_f64());
                }
            }
        }
        if let Some(disk) = &mut self.disk {
            let mut img = AlignedBytes::new(disk.slot_bytes());
            for _ in 0..REPS {
                let t = Instant::now();
                if disk.read_raw(0, &mut img).is_ok() {
                    self.cost
                        .record_fetch(Tier::Disk, t.elapsed().as_secs_f64());
                }
                let t = Instant::now();
                if disk.read_raw(0, &mut img[..4096]).is_ok()
                    && let Some(c) = self.cost.tier_mut(Tier::Disk)
                {
                    c.latency_secs.add(t.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// Whether a cached block at `place` is fetched rather than recomputed: the cost model
    /// agrees and, for DISK, a verified copy has been read ahead ([`Tiers::stage`]).
    pub(crate) fn fetch(&self, place: Place, hash: BlockHash) -> bool {
        match place {
            Place::Device(_) => true,
            Place::Host(_) => self.host.is_some() && self.cost.fetch(Tier::Host),
            Place::Disk(_) => self.staged.contains_key(&hash),
        }
    }

    /// Reads and verifies the disk blocks of a prefix (`places` from
    /// [`BlockManager::locate_prefix`]) that the cost model would fetch, so that promoting
    /// them cannot fail later. A block that fails verification is dropped from the cache
    /// (never served) and the prefix ends there.
    pub(crate) fn stage(&mut self, mgr: &mut BlockManager, hashes: &[BlockHash], places: &[Place]) {
        if self.disk.is_none() || !self.cost.fetch(Tier::Disk) {
            return;
        }
        for (&h, &p) in hashes.iter().zip(places) {
            let Place::Disk(slot) = p else {
                if p.tier() == Tier::Host && !self.cost.fetch(Tier::Host) {
                    return;
                }
                continue;
            };
            if self.staged.contains_key(&h) {
                continue;
            }
            let Some(disk) = &mut self.disk else { return };
            // Recycled buffers: a fresh one costs a page fault per page on first touch.
            let mut buf = self
                .spare
                .pop()
                .unwrap_or_else(|| AlignedBytes::new(self.block_bytes));
            let t = Instant::now();
            let from_file = !disk.is_pending(slot);
            match disk.read(slot, h, &mut buf) {
                Ok(()) => {
                    if from_file {
                        self.cost
                            .record_fetch(Tier::Disk, t.elapsed().as_secs_f64());
                    }
                    self.bytes[2].read += self.block_bytes as u64;
                    self.staged.insert(h, buf);
                }
                Err(e) => {
                    tracing::warn!(slot, "disk KV block not served: {e}");
                    mgr.forget(h);
                    return;
                }
            }
        }
    }

    /// Carries out `moves` in order.
    pub(crate) fn apply(&mut self, pool: &mut KvPool, moves: Vec<Move>) {
        if moves.is_empty() {
            return;
        }
        self.copier.begin();
        for mv in moves {
            let t = Instant::now();
            let ok = match (mv.from, mv.to) {
                (Place::Device(id), Place::Host(s)) => match &mut self.host {
                    Some(h) => self.copier.to_host(pool, id, h.slot_mut(s)),
                    None => false,
                },
                (Place::Host(s), Place::Device(id)) => {
                    let ok = match &self.host {
                        Some(h) => self.copier.to_device(h.slot(s), pool, id),
                        None => false,
                    };
                    self.cost
                        .record_fetch(Tier::Host, t.elapsed().as_secs_f64());
                    ok
                }
                (Place::Device(id), Place::Disk(d)) => {
                    let ok = self.copier.to_host(pool, id, &mut self.scratch);
                    if let Some(disk) = &mut self.disk {
                        disk.write(d, mv.hash, mv.parent, &mv.chunks, &self.scratch);
                    }
                    ok
                }
                (Place::Host(s), Place::Disk(d)) => match (&self.host, &mut self.disk) {
                    (Some(h), Some(disk)) => {
                        // The block may have been demoted to HOST by a copy still running.
                        self.copier.sync();
                        disk.write(d, mv.hash, mv.parent, &mv.chunks, h.slot(s));
                        true
                    }
                    _ => false,
                },
                (Place::Disk(d), Place::Device(id)) => match self.staged.remove(&mv.hash) {
                    Some(buf) => {
                        let ok = self.copier.to_device(&buf, pool, id);
                        self.recycle(buf);
                        ok
                    }
                    None => match &mut self.disk {
                        // Not staged (demoted and promoted within one admission): the write
                        // buffer or the file has it.
                        Some(disk) => {
                            disk.read(d, mv.hash, &mut self.scratch).is_ok()
                                && self.copier.to_device(&self.scratch, pool, id)
                        }
                        None => false,
                    },
                },
                _ => false,
            };
            if !ok {
                tracing::error!(?mv.from, ?mv.to, "KV block copy failed");
            }
            let b = self.block_bytes as u64;
            self.bytes[ti(mv.from.tier())].read += b;
            self.bytes[ti(mv.to.tier())].written += b;
        }
        self.copier.end();
    }

    /// Collects finished disk writes; on a write error, turns the disk tier off (with a
    /// warning) and drops its blocks from the logical state.
    pub(crate) fn poll(&mut self, mgr: &mut BlockManager) {
        let Some(disk) = &mut self.disk else { return };
        let err = disk.poll();
        self.take_ready(mgr);
        if let Some(e) = err {
            self.shut_disk(mgr, format!("write failed: {e}"));
        }
    }

    /// Waits for queued disk writes and read-aheads (when idle; tests).
    pub(crate) fn flush(&mut self, mgr: &mut BlockManager) {
        let Some(disk) = &mut self.disk else { return };
        let err = disk.flush();
        self.take_ready(mgr);
        if let Some(e) = err {
            self.shut_disk(mgr, format!("write failed: {e}"));
        }
    }

    fn take_ready(&mut self, mgr: &BlockManager) {
        let Some(disk) = &mut self.disk else { return };
        for (h, data) in disk.take_ready() {
            if matches!(mgr.place(h), Some(Place::Disk(_))) {
                self.bytes[2].read += self.block_bytes as u64;
                self.prefetched += 1;
                self.staged.insert(h, data);
            }
        }
    }

    /// Read-ahead, in the background, of the DISK blocks of a waiting request's prefix, so
    /// that its admission finds them staged. Bounded by [`STAGED_MAX_BYTES`].
    pub(crate) fn prefetch(&mut self, hashes: &[BlockHash], places: &[Place]) {
        if !self.cost.fetch(Tier::Disk) {
            return;
        }
        let Some(disk) = &mut self.disk else { return };
        for (&h, &p) in hashes.iter().zip(places) {
            if (self.staged.len() + disk.reading()) * self.block_bytes >= STAGED_MAX_BYTES {
                return;
            }
            match p {
                Place::Disk(slot) if !self.staged.contains_key(&h) => {
                    disk.read_ahead(slot, h);
                }
                Place::Host(_) if !self.cost.fetch(Tier::Host) => return,
                _ => {}
            }
        }
    }

    fn shut_disk(&mut self, mgr: &mut BlockManager, why: String) {
        if let Some(disk) = &self.disk {
            tracing::warn!(dir = %disk.dir().display(), "disk KV tier off, serving with the other tiers: {why}");
        }
        self.disk_status.disabled_reason = Some(why);
        self.disk_status.enabled = false;
        self.update_disk_status();
        self.disk = None;
        self.staged.clear();
        mgr.disable_tier(Tier::Disk);
    }

    /// Drops read-ahead copies of blocks that are no longer on disk.
    pub(crate) fn trim_staged(&mut self, mgr: &BlockManager) {
        if !self.staged.is_empty() {
            let gone: Vec<BlockHash> = self
                .staged
                .keys()
                .copied()
                .filter(|&h| !matches!(mgr.place(h), Some(Place::Disk(_))))
                .collect();
            for h in gone {
                if let Some(buf) = self.staged.remove(&h) {
                    self.recycle(buf);
                }
            }
        }
    }

    fn recycle(&mut self, buf: AlignedBytes) {
        if (self.spare.len() + 1) * self.block_bytes <= STAGED_MAX_BYTES
            && buf.len() == self.block_bytes
        {
            self.spare.push(buf);
        }
    }

    pub(crate) fn update_disk_status(&mut self) {
        if let Some(d) = &self.disk {
            self.disk_status.writes = d.writes;
            self.disk_status.write_errors = d.write_errors;
            self.disk_status.reads = d.reads;
            self.disk_status.reads_mapped = d.mapped_reads;
            self.disk_status.read_errors = d.read_errors;
            self.disk_status.pending_writes = d.pending() as u64;
        }
        self.disk_status.prefetched = self.prefetched;
    }

    pub(crate) fn block_bytes(&self) -> usize {
        self.block_bytes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)
mod tests {
    use kvmesh_gpu_server_model::{Arch, ModelConfig};

    use super::*;

    #[test]
    fn lower_tiers_stay_off_when_the_pool_cannot_be_copied() {
        let cfg = ModelConfig {
            arch: Arch::Llama,
            vocab_size: 300,
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            rms_eps: 1e-5,
            rope_theta: 1e4,
            context_length: 256,
            rope_interleaved: true,
        };
        let tc = TierConfig {
            host_blocks: 4,
            ..TierConfig::default()
        };
        // A host pool's blocks are copied with memcpy.
        let (_, host, _, _) = Tiers::new(&tc, &KvPool::new(&cfg, 4, 16));
        assert_eq!(host, 4);
        // Tensor rows with no copier for them (on the CPU here; a GPU pool whose copy stream
        // could not be made): no HOST tier rather than copies that fail.
        let rows = KvPool::new_rows(&cfg, 4, 16, &candle_core::Device::Cpu).unwrap();
        let (tiers, host, disk, _) = Tiers::new(&tc, &rows);
        assert_eq!((host, disk), (0, 0));
        assert!(tiers.host.is_none());
    }
}
