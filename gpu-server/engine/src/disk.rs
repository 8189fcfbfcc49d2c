//! The DISK tier's storage: preallocated slab files of fixed-size slots, one block per slot,
//! each with a header (block hash, parent, text chunks, write order, layout tag) and one
//! checksum over header and payload (XXH3 of the header's fields, the chunk list and the
//! payload's own XXH3). Writes go to a background thread, so the engine never
//! waits for the disk when it demotes; until a write is done its buffer serves reads.
//! On start the slabs are scanned: valid slots of the same layout are handed back for warm
//! restart, torn or corrupt ones are counted and left free.
//!
//! Reads: each slab is also mapped read-only. A slot whose pages are all in the page cache
//! (one `mincore`) is copied out of the mapping and hashed in the same pass
//! ([`copy_xxh3`]: each 32 bytes loaded once, stored and hashed), where `pread` plus a hash
//! takes two passes over the block; the writer maps a slot's pages right after writing it
//! (`MADV_POPULATE_READ`), so a promotion's read does not fault them in. A slot not fully in
//! the page cache is read with `pread`, which turns an I/O error into an error and not a
//! `SIGBUS`. (A page reclaimed between the check and the copy is read back by the fault; only
//! an I/O error on that re-read would raise `SIGBUS`.)

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use crate::xxh3::{copy_xxh3, xxh3};
use kvmesh_gpu_server_kv::{BlockHash, RestoredBlock};
use kvmesh_gpu_server_model::aligned::AlignedBytes;
use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};
use serde::Serialize;

/// The slab format. `KVMSLAB1` (before the payload got its own hash in the checksum) and any
/// other version are another format: left free, counted as foreign.
const MAGIC: &[u8; 8] = b"KVMSLAB2";
const MAGIC_FAMILY: &[u8; 7] = b"KVMSLAB";
/// Header bytes; the payload starts page-aligned after it.
pub(crate) const HEADER: usize = 4096;
/// Chunk hashes a header holds at most (a 16-token block ends few 256-byte chunks).
const MAX_CHUNKS: usize = 64;
const PAGE: usize = 4096;
/// Slab files are cut at about this size.
const FILE_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DiskError {
    #[error("disk tier directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("slab file {0}: {1}")]
    Slab(PathBuf, std::io::Error),
    #[error("the disk tier needs {need} bytes but only {free} are free")]
    Full { need: u64, free: u64 },
    #[error("cannot start the disk writer thread: {0}")]
    Thread(std::io::Error),
}

/// What the start-up scan found.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ScanReport {
    pub valid: u64,
    /// Torn or corrupt slots (bad checksum, bad header): dropped.
    pub corrupt: u64,
    /// Slots written for another model or block layout: dropped.
    pub foreign: u64,
}

/// Why a read did not give the block.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ReadError {
    #[error("io: {0}")]
    Io(String),
    #[error("slot {0} does not hold a valid copy of the block")]
    Invalid(u32),
}

enum Job {
    Write {
        slot: u32,
        seq: u64,
        buf: Arc<AlignedBytes>,
    },
    /// Read-ahead of a block for a waiting request.
    Read { slot: u32, hash: BlockHash },
}

enum Done {
    Written {
        slot: u32,
        seq: u64,
        result: Result<(), String>,
    },
    /// The block's payload if the slot held it intact.
    Read {
        hash: BlockHash,
        data: Option<AlignedBytes>,
        mapped: bool,
    },
}

/// The slabs and their writer.
#[derive(Debug)]
pub(crate) struct DiskStore {
    dir: PathBuf,
    slots: usize,
    slot_bytes: usize,
    payload: usize,
    per_file: usize,
    slabs: Vec<Arc<Slab>>,
    layout: u64,
    tx: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    /// Slot -> (write generation, hash, slot image) while the write is in flight.
    pending: HashMap<u32, (u64, BlockHash, Arc<AlignedBytes>)>,
    /// Read-aheads asked for and not answered yet.
    reading: HashSet<BlockHash>,
    /// Read-aheads answered: verified payloads.
    ready: Vec<(BlockHash, AlignedBytes)>,
    seq: u64,
    pub(crate) writes: u64,
    pub(crate) write_errors: u64,
    pub(crate) reads: u64,
    /// Of `reads`, those served from the mapping (every page in the page cache).
    pub(crate) mapped_reads: u64,
    pub(crate) read_errors: u64,
}

/// One slab file and, where the kernel allows it, a read-only shared mapping of all of it.
#[derive(Debug)]
struct Slab {
    file: File,
    map: Option<Mmap>,
}

#[allow(unsafe_code)] // the mapping, `mincore`, and dropping the mapping's pages (benchmarks)
impl Slab {
    fn new(file: File) -> Self {
        // SAFETY: the mapping is read-only and only ever read through raw-pointer copies
        // (`read_mapped`), never borrowed as a slice that outlives a copy; what a copy sees is
        // checked against the slot's checksum. The file is ours (preallocated, never truncated
        // while open). A mapping that fails leaves every read on `pread`.
        let map = unsafe { MmapOptions::new().map(&file) }.ok();
        Self { file, map }
    }

    /// Maps the pages of `len` bytes at `off` into this process (they were just written, so
    /// they are in the page cache): a later read of them then takes no page fault. Best
    /// effort: a kernel without `MADV_POPULATE_READ` (before 5.14) leaves faults to the read.
    fn populate(&self, off: u64, len: usize) {
        if let Some(m) = &self.map
            && off as usize + len <= m.len()
        {
            let _ = m.advise_range(Advice::PopulateRead, off as usize, len);
        }
    }

    /// Where `len` bytes at `off` start in the mapping, if every page of them is in the page
    /// cache: reading them then cannot fault on the disk.
    fn resident(&self, off: u64, len: usize) -> Option<*const u8> {
        let m = self.map.as_ref()?;
        let off = off as usize;
        if !off.is_multiple_of(PAGE) || off + len > m.len() {
            return None;
        }
        let pages = len.div_ceil(PAGE);
        let mut vec = vec![0u8; pages];
        // SAFETY: `off` is page-aligned and `off + len` lies inside the mapping, whose base is
        // page-aligned; `vec` has one byte per page of the range.
        let start = unsafe { m.as_ptr().add(off) };
        let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
        (rc == 0 && vec.iter().all(|&v| v & 1 == 1)).then_some(start)
    }

    /// Unmaps this process's pages of the slab and drops them from the page cache
    /// (benchmarks: the next reads come from the disk).
    fn evict(&self) -> std::io::Result<()> {
        if let Some(m) = &self.map {
            // SAFETY: a shared read-only file mapping: MADV_DONTNEED only drops this process's
            // page-table entries; the next access maps the file's pages again.
            unsafe { m.unchecked_advise(UncheckedAdvice::DontNeed) }?;
        }
        evict_page_cache(&self.file)
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}
impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Done")
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl DiskStore {
    /// Opens (creating and preallocating as needed) `slots` slots of `payload` bytes under
    /// `dir` and scans them. Fails if the directory cannot be used or the space cannot be
    /// reserved.
    pub(crate) fn open(
        dir: &Path,
        slots: usize,
        payload: usize,
        layout: u64,
    ) -> Result<(Self, Vec<RestoredBlock>, ScanReport), DiskError> {
        std::fs::create_dir_all(dir).map_err(|e| DiskError::Dir(dir.to_path_buf(), e))?;
        let slot_bytes = HEADER + round_up(payload, PAGE);
        let per_file = (FILE_BYTES / slot_bytes).max(1);
        // A disk that cannot hold the whole tier is refused up front (files already there
        // count as space of ours).
        let need = (slots * slot_bytes) as u64;
        let have_files: u64 = std::fs::read_dir(dir)
            .map_err(|e| DiskError::Dir(dir.to_path_buf(), e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("slab-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        let st =
            rustix::fs::statvfs(dir).map_err(|e| DiskError::Dir(dir.to_path_buf(), e.into()))?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if need > free.saturating_add(have_files) {
            return Err(DiskError::Full { need, free });
        }
        let mut slabs = Vec::new();
        let mut left = slots;
        let mut i = 0;
        while left > 0 {
            let n = left.min(per_file);
            let path = slab_path(dir, i);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| DiskError::Slab(path.clone(), e))?;
            let len = (n * slot_bytes) as u64;
            // Reserve the space now: a disk that cannot hold the tier fails here, not later.
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len)
                .map_err(|e| DiskError::Slab(path.clone(), e.into()))?;
            slabs.push(Arc::new(Slab::new(f)));
            left -= n;
            i += 1;
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel::<Done>();
        let writer_slabs = slabs.clone();
        std::thread::Builder::new()
            .name("kvmesh-kv-disk".into())
            .spawn(move || {
                for job in rx {
                    let done = match job {
                        Job::Write { slot, seq, buf } => {
                            let (s, off) = locate(&writer_slabs, per_file, slot_bytes, slot);
                            let result = s.file.write_all_at(&buf, off).map_err(|e| e.to_string());
                            if result.is_ok() {
                                s.populate(off, buf.len());
                            }
                            Done::Written { slot, seq, result }
                        }
                        Job::Read { slot, hash } => {
                            let (s, off) = locate(&writer_slabs, per_file, slot_bytes, slot);
                            let mut data = AlignedBytes::new(payload);
                            let read = read_slot(s, off, layout, hash, &mut data);
                            Done::Read {
                                hash,
                                mapped: read.as_ref().is_ok_and(|&m| m),
                                data: read.is_ok().then_some(data),
                            }
                        }
                    };
                    if done_tx.send(done).is_err() {
                        return;
                    }
                }
            })
            .map_err(DiskError::Thread)?;
        let mut store = Self {
            dir: dir.to_path_buf(),
            slots,
            slot_bytes,
            payload,
            per_file,
            slabs,
            layout,
            tx: Some(tx),
            done,
            pending: HashMap::new(),
            reading: HashSet::new(),
            ready: Vec::new(),
            seq: 0,
            writes: 0,
            write_errors: 0,
            reads: 0,
            mapped_reads: 0,
            read_errors: 0,
        };
        let (found, report) = store.scan();
        store.seq = found.iter().map(|b| b.written).max().unwrap_or(0);
        Ok((store, found, report))
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    fn at(&self, slot: u32) -> (&Slab, u64) {
        locate(&self.slabs, self.per_file, self.slot_bytes, slot)
    }

    fn scan(&mut self) -> (Vec<RestoredBlock>, ScanReport) {
        let mut found = Vec::new();
        let mut report = ScanReport::default();
        let mut buf = AlignedBytes::new(self.slot_bytes);
        for slot in 0..self.slots as u32 {
            let (s, off) = self.at(slot);
            let f = &s.file;
            // The header first: a slot never written (all zero) costs one page.
            if f.read_exact_at(&mut buf[..HEADER], off).is_err() {
                report.corrupt += 1;
                continue;
            }
            if buf[..HEADER].iter().all(|&b| b == 0) {
                continue; // never written
            }
            if f.read_exact_at(&mut buf[HEADER..], off + HEADER as u64)
                .is_err()
            {
                report.corrupt += 1;
                continue;
            }
            match parse(&buf, self.payload, self.layout) {
                Ok(b) => {
                    report.valid += 1;
                    // Just read, so in the page cache: map it for the reads that promote it.
                    s.populate(off, self.slot_bytes);
                    found.push(RestoredBlock { slot, ..b });
                }
                Err(Bad::Foreign) => report.foreign += 1,
                Err(Bad::Corrupt) => report.corrupt += 1,
            }
        }
        (found, report)
    }

    /// Queues a write of `data` (one block) into `slot`.
    pub(crate) fn write(
        &mut self,
        slot: u32,
        hash: BlockHash,
        parent: Option<BlockHash>,
        chunks: &[u64],
        data: &[u8],
    ) {
        self.seq += 1;
        let buf = Arc::new(image(
            self.slot_bytes,
            self.layout,
            hash,
            parent,
            chunks,
            self.seq,
            data,
        ));
        self.pending.insert(slot, (self.seq, hash, buf.clone()));
        self.writes += 1;
        if let Some(tx) = &self.tx
            && tx
                .send(Job::Write {
                    slot,
                    seq: self.seq,
                    buf,
                })
                .is_ok()
        {
            return;
        }
        self.write_errors += 1;
    }

    /// Collects finished writes; returns the first error, if any (the tier should be shut).
    pub(crate) fn poll(&mut self) -> Option<String> {
        let mut err = None;
        while let Ok(d) = self.done.try_recv() {
            self.settle(d, &mut err);
        }
        err
    }

    fn settle(&mut self, d: Done, err: &mut Option<String>) {
        match d {
            Done::Written { slot, seq, result } => {
                if self.pending.get(&slot).is_some_and(|p| p.0 == seq) {
                    self.pending.remove(&slot);
                }
                if let Err(e) = result {
                    self.write_errors += 1;
                    err.get_or_insert(e);
                }
            }
            Done::Read { hash, data, mapped } => {
                self.reading.remove(&hash);
                self.reads += 1;
                self.mapped_reads += u64::from(mapped);
                // A read-ahead that found something else is only dropped: the slot may have
                // been reused meanwhile; the read at admission is the one that decides.
                if let Some(d) = data {
                    self.ready.push((hash, d));
                }
            }
        }
    }

    /// Blocks until every queued write and read-ahead is done (tests and shutdown).
    pub(crate) fn flush(&mut self) -> Option<String> {
        let mut err = None;
        while !self.pending.is_empty() || !self.reading.is_empty() {
            match self.done.recv() {
                Ok(d) => self.settle(d, &mut err),
                Err(_) => break,
            }
        }
        err
    }

    /// Asks the background thread to read `slot` (holding `hash`) ahead of its promotion.
    /// Returns false if nothing was asked (in flight already, or being written: the write
    /// buffer serves it).
    pub(crate) fn read_ahead(&mut self, slot: u32, hash: BlockHash) -> bool {
        if self.pending.contains_key(&slot) || self.reading.contains(&hash) {
            return false;
        }
        let Some(tx) = &self.tx else { return false };
        if tx.send(Job::Read { slot, hash }).is_err() {
            return false;
        }
        self.reading.insert(hash);
        true
    }

    /// Read-aheads in flight.
    pub(crate) fn reading(&self) -> usize {
        self.reading.len()
    }

    /// Verified payloads of finished read-aheads.
    pub(crate) fn take_ready(&mut self) -> Vec<(BlockHash, AlignedBytes)> {
        std::mem::take(&mut self.ready)
    }

    /// Reads `slot` into `out` (one block), checking it holds `hash` intact: from the write
    /// buffer while the write is in flight, else from the file.
    pub(crate) fn read(
        &mut self,
        slot: u32,
        hash: BlockHash,
        out: &mut [u8],
    ) -> Result<(), ReadError> {
        self.read_via(slot, hash, out, true)
    }

    /// [`read`](Self::read); `map`: false keeps it on `pread` (the probe's comparison).
    fn read_via(
        &mut self,
        slot: u32,
        hash: BlockHash,
        out: &mut [u8],
        map: bool,
    ) -> Result<(), ReadError> {
        if let Some((_, h, buf)) = self.pending.get(&slot) {
            if *h != hash {
                return Err(ReadError::Invalid(slot));
            }
            out.copy_from_slice(&buf[HEADER..HEADER + self.payload]);
            return Ok(());
        }
        self.reads += 1;
        if out.len() != self.payload {
            return Err(ReadError::Invalid(slot));
        }
        let (s, off) = self.at(slot);
        let r = if map {
            read_slot(s, off, self.layout, hash, out)
        } else {
            read_file(&s.file, off, self.layout, hash, out).map(|()| false)
        };
        match r {
            Ok(true) => self.mapped_reads += 1,
            Ok(false) => {}
            Err(_) => self.read_errors += 1,
        }
        r.map(|_| ()).map_err(|e| match e {
            SlotError::Io(e) => ReadError::Io(e.to_string()),
            SlotError::Invalid => ReadError::Invalid(slot),
        })
    }

    /// Whether a write into `slot` is still in flight.
    pub(crate) fn is_pending(&self, slot: u32) -> bool {
        self.pending.contains_key(&slot)
    }

    /// Reads the first `buf.len()` bytes of `slot` as they are on disk (calibration).
    pub(crate) fn read_raw(&self, slot: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let (s, off) = self.at(slot);
        s.file.read_exact_at(buf, off)
    }

    /// Bytes of one slot on disk (header plus page-rounded payload).
    pub(crate) fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.tx = None; // the writer drains its queue and ends
    }
}

/// The disk tier's read path on its own, for benchmarks: a tier of about `bytes` of
/// `payload`-byte slots is filled once (through the writer thread, as demotions are); each
/// [`pass`](Self::pass) reads and verifies every slot through the path a promotion takes
/// ([`DiskStore::read`]: the copy out of the mapping or the `pread`s, the checksum over header
/// and payload) into a ring of recycled block buffers. The slab files are removed when the
/// probe is dropped.
#[derive(Debug)]
pub struct DiskReadProbe {
    store: DiskStore,
    slots: u32,
    ring: Vec<AlignedBytes>,
}

impl DiskReadProbe {
    pub fn new(dir: &Path, payload: usize, bytes: usize) -> Result<Self, String> {
        let slots = (bytes / (HEADER + round_up(payload, PAGE))).max(1) as u32;
        let (mut store, _, _) =
            DiskStore::open(dir, slots as usize, payload, 1).map_err(|e| e.to_string())?;
        let mut data = vec![0u8; payload];
        for slot in 0..slots {
            data.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i as u32 ^ slot.wrapping_mul(2_654_435_761)) as u8);
            store.write(slot, u64::from(slot) + 1, None, &[], &data);
        }
        if let Some(e) = store.flush() {
            return Err(e);
        }
        // As many buffers as a 256-token prefix has blocks: staging recycles its buffers.
        let ring = (0..16).map(|_| AlignedBytes::new(payload)).collect();
        Ok(Self { store, slots, ring })
    }

    /// Reads every slot once; returns payload bytes/s and the share of slots read from the
    /// mapping (the rest by `pread`). `cold`: the slabs' pages are first dropped from the
    /// page cache (and this process's page tables), so the reads come from the disk. `map`:
    /// false reads every slot with `pread`, the path a slot not in the page cache takes.
    pub fn pass(&mut self, cold: bool, map: bool) -> Result<(f64, f64), String> {
        if cold {
            for s in &self.store.slabs {
                s.evict().map_err(|e| e.to_string())?;
            }
        }
        let ring = self.ring.len();
        let mapped = self.store.mapped_reads;
        let t = std::time::Instant::now();
        for slot in 0..self.slots {
            let buf = &mut self.ring[slot as usize % ring];
            self.store
                .read_via(slot, u64::from(slot) + 1, buf, map)
                .map_err(|e| e.to_string())?;
        }
        let bw = (self.slots as usize * self.store.payload) as f64 / t.elapsed().as_secs_f64();
        let share = (self.store.mapped_reads - mapped) as f64 / f64::from(self.slots);
        Ok((bw, share))
    }
}

impl Drop for DiskReadProbe {
    fn drop(&mut self) {
        for i in 0..self.store.slabs.len() {
            let _ = std::fs::remove_file(slab_path(&self.store.dir, i));
        }
    }
}

/// Writes `f`'s dirty pages and drops its pages from the page cache (benchmarks: the next
/// reads come from the disk).
pub fn evict_page_cache(f: &File) -> std::io::Result<()> {
    f.sync_data()?;
    rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

fn slab_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("slab-{i:04}.kv"))
}

fn locate(slabs: &[Arc<Slab>], per_file: usize, slot_bytes: usize, slot: u32) -> (&Slab, u64) {
    let s = slot as usize;
    (&slabs[s / per_file], ((s % per_file) * slot_bytes) as u64)
}

enum Bad {
    Foreign,
    Corrupt,
}

/// A slot's checksum: XXH3-64 over the header's fields, the chunk list and the payload's
/// own XXH3-64 (little-endian). The payload's hash is taken on its own so that a read can
/// compute it while it copies the payload ([`copy_xxh3`]); it covers every payload byte.
fn checksum(fields: &[u8], chunks: &[u8], payload_xxh3: u64) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(fields);
    h.update(chunks);
    h.update(&payload_xxh3.to_le_bytes());
    h.digest()
}

/// Whether `head` (checked by [`check_header`]) holds the checksum of its fields, its chunk
/// list and a payload that hashed to `payload_xxh3`.
fn sums_to(head: &[u8], payload_xxh3: u64) -> bool {
    let n = chunk_count(head);
    checksum(&head[..56], &head[64..64 + 8 * n], payload_xxh3) == u64_at(head, 56)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The on-disk image of one slot.
fn image(
    slot_bytes: usize,
    layout: u64,
    hash: BlockHash,
    parent: Option<BlockHash>,
    chunks: &[u64],
    written: u64,
    data: &[u8],
) -> AlignedBytes {
    let mut buf = AlignedBytes::new(slot_bytes);
    let chunks = &chunks[..chunks.len().min(MAX_CHUNKS)];
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&layout.to_le_bytes());
    buf[16..24].copy_from_slice(&hash.to_le_bytes());
    buf[24..32].copy_from_slice(&parent.unwrap_or(0).to_le_bytes());
    buf[32] = u8::from(parent.is_some());
    buf[36..40].copy_from_slice(&(chunks.len() as u32).to_le_bytes());
    buf[40..48].copy_from_slice(&written.to_le_bytes());
    buf[48..56].copy_from_slice(&(data.len() as u64).to_le_bytes());
    for (i, c) in chunks.iter().enumerate() {
        buf[64 + 8 * i..72 + 8 * i].copy_from_slice(&c.to_le_bytes());
    }
    // SAFETY: `data` is readable for its length and apart from the new buffer.
    #[allow(unsafe_code)]
    let payload = unsafe { copy_xxh3(data.as_ptr(), &mut buf[HEADER..HEADER + data.len()]) };
    let sum = checksum(&buf[..56], &buf[64..64 + 8 * chunks.len()], payload);
    buf[56..64].copy_from_slice(&sum.to_le_bytes());
    buf
}

/// Checks a whole slot image: the header, then a `payload`-byte body.
fn parse(buf: &[u8], payload: usize, layout: u64) -> Result<RestoredBlock, Bad> {
    if buf.len() < HEADER + payload {
        return Err(Bad::Corrupt);
    }
    let (head, body) = (&buf[..HEADER], &buf[HEADER..HEADER + payload]);
    check_header(head, payload, layout)?;
    if !sums_to(head, xxh3(body)) {
        return Err(Bad::Corrupt);
    }
    Ok(RestoredBlock {
        slot: 0,
        hash: u64_at(head, 16),
        parent: (head[32] == 1).then(|| u64_at(head, 24)),
        chunks: (0..chunk_count(head))
            .map(|i| u64_at(head, 64 + 8 * i))
            .collect(),
        written: u64_at(head, 40),
    })
}

/// How many text-chunk hashes a header lists.
fn chunk_count(head: &[u8]) -> usize {
    u32::from_le_bytes([head[36], head[37], head[38], head[39]]) as usize
}

enum SlotError {
    Io(std::io::Error),
    Invalid,
}

/// Reads the slot at `off` of `slab` into `out` (its payload), checking it holds `hash`
/// intact; returns whether it was read from the mapping. The header comes first, so a slot
/// that holds another block is refused before its payload is read.
#[allow(unsafe_code)] // calls `read_mapped` on a range `resident` checked
fn read_slot(
    slab: &Slab,
    off: u64,
    layout: u64,
    hash: BlockHash,
    out: &mut [u8],
) -> Result<bool, SlotError> {
    match slab.resident(off, HEADER + out.len()) {
        // SAFETY: `resident` checked that the slot's bytes lie in the live mapping.
        Some(src) => unsafe { read_mapped(src, layout, hash, out) }.map(|()| true),
        None => read_file(&slab.file, off, layout, hash, out).map(|()| false),
    }
}

/// The slot from the page cache through the mapping: the payload is copied and hashed in one
/// pass ([`copy_xxh3`]). (With `pread` the kernel does the copy, so the hash needs a second
/// pass over the block; reading and hashing in 16 or 64 KiB `pread`s measured slower than one
/// `pread` and one hash.)
///
/// # Safety
/// `src` must point at `HEADER + out.len()` readable bytes of a live mapping.
#[allow(unsafe_code)] // copies out of the mapping through raw pointers
unsafe fn read_mapped(
    src: *const u8,
    layout: u64,
    hash: BlockHash,
    out: &mut [u8],
) -> Result<(), SlotError> {
    let mut head = [0u8; HEADER];
    // SAFETY: the caller's range starts with the header; the copies read, never borrow, the
    // mapped bytes, and what they give is checked against the checksum below.
    unsafe { std::ptr::copy_nonoverlapping(src, head.as_mut_ptr(), HEADER) };
    expect_header(&head, out.len(), layout, hash)?;
    // SAFETY: the payload follows the header inside the caller's range.
    let payload = unsafe { copy_xxh3(src.add(HEADER), out) };
    if !sums_to(&head, payload) {
        return Err(SlotError::Invalid);
    }
    Ok(())
}

/// The slot with two `pread`s (header, then payload straight into `out`) and one hash.
fn read_file(
    f: &File,
    off: u64,
    layout: u64,
    hash: BlockHash,
    out: &mut [u8],
) -> Result<(), SlotError> {
    let mut head = [0u8; HEADER];
    f.read_exact_at(&mut head, off).map_err(SlotError::Io)?;
    expect_header(&head, out.len(), layout, hash)?;
    f.read_exact_at(out, off + HEADER as u64)
        .map_err(SlotError::Io)?;
    if !sums_to(&head, xxh3(out)) {
        return Err(SlotError::Invalid);
    }
    Ok(())
}

/// [`check_header`] for a read that expects block `hash`.
fn expect_header(
    head: &[u8],
    body_len: usize,
    layout: u64,
    hash: BlockHash,
) -> Result<(), SlotError> {
    check_header(head, body_len, layout)
        .ok()
        .filter(|_| u64_at(head, 16) == hash)
        .ok_or(SlotError::Invalid)
}

/// Checks a slot's header for a `body_len`-byte payload of this layout (the checksum is
/// checked with the payload, [`sums_to`]).
fn check_header(buf: &[u8], body_len: usize, layout: u64) -> Result<(), Bad> {
    if &buf[0..8] != MAGIC {
        return Err(if buf[..7] == MAGIC_FAMILY[..] {
            Bad::Foreign
        } else {
            Bad::Corrupt
        });
    }
    if u64_at(buf, 8) != layout {
        return Err(Bad::Foreign);
    }
    let n = chunk_count(buf);
    let len = u64_at(buf, 48) as usize;
    if n > MAX_CHUNKS || len != body_len {
        return Err(Bad::Corrupt);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_probe_verifies_every_slot_warm_and_cold_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = DiskReadProbe::new(dir.path(), 8192, 10 * (HEADER + 8192)).unwrap();
        assert_eq!(probe.slots, 10);
        for (cold, map) in [(false, true), (false, false), (true, true)] {
            let (bw, mapped) = probe.pass(cold, map).expect("every slot verifies");
            assert!(bw.is_finite() && bw > 0.0, "{bw}");
            if !cold {
                // Written moments ago through the writer thread: every slot is in the page
                // cache, so every read takes the mapped path unless told not to.
                assert_eq!(mapped, if map { 1.0 } else { 0.0 });
            }
        }
        assert_eq!(probe.store.reads, 30);
        drop(probe);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "slabs removed"
        );
    }

    #[test]
    fn the_checksum_is_xxh3_of_fields_chunks_and_the_payloads_xxh3() {
        // Plain XXH3 at both levels, computed here with another implementation: a slab's
        // checksum never depends on this crate's fused copy-and-hash.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let img = image(
            HEADER + 100_000,
            77,
            0xabc,
            Some(0xdef),
            &[4, 5, 6],
            9,
            &data,
        );
        let payload = xxhash_rust::xxh3::xxh3_64(&data);
        let whole = [&img[..56], &img[64..64 + 24], &payload.to_le_bytes()].concat();
        assert_eq!(u64_at(&img, 56), xxhash_rust::xxh3::xxh3_64(&whole));
        assert!(parse(&img, 100_000, 77).is_ok());
        // A slot of the previous format (same family, another version) is foreign: left free
        // and counted apart from torn or corrupt slots.
        let mut old = img.clone();
        old[..8].copy_from_slice(b"KVMSLAB1");
        assert!(matches!(parse(&old, 100_000, 77), Err(Bad::Foreign)));
    }

    #[test]
    fn a_slot_read_verifies_and_catches_a_flip_anywhere_mapped_or_not() {
        // A block-sized payload, its slot not at the file's start.
        let payload = 368_640;
        let slot = HEADER + round_up(payload, PAGE);
        let data: Vec<u8> = (0..payload as u32).map(|i| (i * 31 % 251) as u8).collect();
        let img = image(slot, 77, 0xabc, None, &[5, 6], 9, &data);
        for mapped in [true, false] {
            let f = tempfile::tempfile().unwrap();
            let off = slot as u64;
            f.write_all_at(&img, off).unwrap();
            let s = if mapped {
                Slab::new(f)
            } else {
                Slab { file: f, map: None }
            };
            let mut out = vec![0u8; payload];
            // Just written: in the page cache, so the mapped slab copies out of its mapping.
            assert_eq!(read_slot(&s, off, 77, 0xabc, &mut out).ok(), Some(mapped));
            assert_eq!(out, data);
            for (hash, layout) in [(0xabd, 77), (0xabc, 78)] {
                assert!(matches!(
                    read_slot(&s, off, layout, hash, &mut out),
                    Err(SlotError::Invalid)
                ));
            }
            for at in [0, 4095, 4096, 16_383, 16_384, 200_007, payload - 1] {
                let pos = off + (HEADER + at) as u64;
                let mut b = [0u8];
                s.file.read_exact_at(&mut b, pos).unwrap();
                s.file.write_all_at(&[b[0] ^ 0x40], pos).unwrap();
                assert!(
                    matches!(
                        read_slot(&s, off, 77, 0xabc, &mut out),
                        Err(SlotError::Invalid)
                    ),
                    "flip at payload byte {at} not caught (mapped: {mapped})"
                );
                s.file.write_all_at(&b, pos).unwrap();
            }
            assert_eq!(read_slot(&s, off, 77, 0xabc, &mut out).ok(), Some(mapped));
            // A slot past the file's end is an I/O error, not a valid block.
            assert!(matches!(
                read_slot(&s, 8 * off, 77, 0xabc, &mut out),
                Err(SlotError::Io(_))
            ));
        }
    }

    #[test]
    fn a_slot_image_round_trips_and_any_flipped_byte_is_caught() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 31 % 251) as u8).collect();
        let img = image(HEADER + 8192, 77, 0xabc, Some(0xdef), &[1, 2, 3], 9, &data);
        let b = parse(&img, 8192, 77).ok().expect("valid");
        assert_eq!(
            (b.hash, b.parent, b.chunks, b.written),
            (0xabc, Some(0xdef), vec![1, 2, 3], 9)
        );
        assert!(matches!(parse(&img, 8192, 78), Err(Bad::Foreign)));
        for at in [0usize, 20, 33, 70, HEADER, HEADER + 4000, HEADER + 8191] {
            let mut bad = img.clone();
            bad[at] ^= 0x40;
            assert!(
                matches!(parse(&bad, 8192, 77), Err(Bad::Corrupt)),
                "flip at {at} not caught"
            );
        }
        // A torn write: the new header over an old payload.
        let old = image(HEADER + 8192, 77, 0x111, None, &[], 3, &vec![7u8; 8192]);
        let mut torn = img.clone();
        torn[HEADER + 4096..].copy_from_slice(&old[HEADER + 4096..]);
        assert!(matches!(parse(&torn, 8192, 77), Err(Bad::Corrupt)));
    }
}
