//! KV tier copies on a GPU: the HOST tier in pinned memory, block copies on a stream of their
//! own, ordered against the forward pass's stream with events rather than by waiting on the CPU.
//!
//! Demotions (device to HOST) are queued and left running; the CPU waits for them only before
//! it reads HOST memory itself (a write to the DISK tier, [`BlockCopier::sync`]). Promotions
//! (HOST or staged DISK blocks to the device) are queued too, and the forward stream waits for
//! them on the GPU ([`BlockCopier::end`]), so a step never stalls the CPU on a copy.
#![allow(unsafe_code)] // raw async copies between the pool's device memory and pinned memory

use std::sync::Arc;

use cudarc::driver::{CudaStream, DriverError, PinnedHostSlice, result};
use kvmesh_gpu_server_kv::BlockId;
use kvmesh_gpu_server_model::KvPool;

use crate::tiers::{BlockCopier, HostMemory};

/// Pinned host memory, zeroed, with its address taken once.
#[derive(Debug)]
pub struct Pinned {
    ptr: *mut u8,
    len: usize,
    _slice: PinnedHostSlice<u8>,
}

// SAFETY: the allocation is owned by `_slice` (itself Send) and reached only through `&self`
// or `&mut self`.
unsafe impl Send for Pinned {}

impl Pinned {
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is the live, zeroed allocation of `_slice`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

#[derive(Debug)]
pub struct CudaCopier {
    copy: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    /// Address ranges of the pinned allocations this copier made.
    pinned: Vec<(usize, usize)>,
    /// Device-to-host copies queued and not yet waited for.
    in_flight: bool,
}

impl CudaCopier {
    /// A copier for `pool` (in GPU memory), with a new stream for its copies.
    pub fn new(pool: &KvPool) -> Result<Self, String> {
        let b = pool
            .device_block(0)
            .ok_or("the KV pool is not in GPU memory (or has no blocks)")?;
        let copy = b
            .stream
            .context()
            .new_stream()
            .map_err(|e| format!("copy stream: {e}"))?;
        Ok(Self {
            copy,
            compute: b.stream,
            pinned: Vec::new(),
            in_flight: false,
        })
    }

    fn is_pinned(&self, p: *const u8, len: usize) -> bool {
        let p = p as usize;
        self.pinned
            .iter()
            .any(|&(at, n)| p >= at && p + len <= at + n)
    }

    fn check(&self, what: &str, r: Result<(), DriverError>) -> bool {
        if let Err(e) = &r {
            tracing::error!("KV block {what} failed: {e}");
        }
        r.is_ok()
    }
}

impl BlockCopier for CudaCopier {
    fn to_host(&mut self, pool: &KvPool, id: BlockId, dst: &mut [u8]) -> bool {
        let Some(b) = pool.device_block(id) else {
            return false;
        };
        if b.bytes != dst.len() {
            return false;
        }
        let pinned = self.is_pinned(dst.as_ptr(), dst.len());
        let r = self.copy.context().bind_to_thread().and_then(|()| {
            // SAFETY: `b.ptr` is `b.bytes` of the pool's live allocation and `dst` as long; the
            // copy stream waited for the forward stream (`begin`). A pinned `dst` is HOST tier
            // memory that nothing reads before `sync`; a pageable one is copied synchronously.
            unsafe { result::memcpy_dtoh_async(dst, b.ptr, self.copy.cu_stream()) }
        });
        if pinned {
            self.in_flight = true;
        } else if r.is_ok() {
            return self.check("copy to host", self.copy.synchronize());
        }
        self.check("copy to host", r)
    }

    fn to_device(&mut self, src: &[u8], pool: &mut KvPool, id: BlockId) -> bool {
        let Some(b) = pool.device_block(id) else {
            return false;
        };
        if b.bytes != src.len() {
            return false;
        }
        let r = self.copy.context().bind_to_thread().and_then(|()| {
            // SAFETY: as in `to_host`. A pageable `src` is staged by the driver before the call
            // returns, so the caller may reuse it; a pinned one is HOST tier memory that is only
            // rewritten by later copies on this same stream.
            unsafe { result::memcpy_htod_async(b.ptr, src, self.copy.cu_stream()) }
        });
        self.check("copy to device", r)
    }

    fn host_memory(&mut self, bytes: usize) -> HostMemory {
        // Plain pinned memory (not write-combined: the CPU reads it for DISK writes).
        // SAFETY: zeroed below before any use.
        match unsafe { self.copy.context().alloc_pinned_with_flags::<u8>(bytes, 0) } {
            Ok(mut p) => match p.as_mut_ptr() {
                Ok(ptr) => {
                    // SAFETY: `ptr` is `bytes` long and owned by `p`, which `Pinned` keeps.
                    unsafe { std::ptr::write_bytes(ptr, 0, bytes) };
                    self.pinned.push((ptr as usize, bytes));
                    HostMemory::Pinned(Pinned {
                        ptr,
                        len: bytes,
                        _slice: p,
                    })
                }
                Err(e) => {
                    tracing::warn!("pinned HOST tier memory unusable ({e}); using pageable memory");
                    HostMemory::zeroed(bytes)
                }
            },
            Err(e) => {
                tracing::warn!(
                    "pinned HOST tier memory not allocated ({e}); using pageable memory"
                );
                HostMemory::zeroed(bytes)
            }
        }
    }

    fn begin(&mut self) {
        // Copies out of the pool see every KV row the forward passes queued so far.
        let r = self.copy.join(&self.compute);
        self.check("copy stream wait", r);
    }

    fn end(&mut self) {
        // The next forward pass sees every block copied in.
        let r = self.compute.join(&self.copy);
        self.check("forward stream wait", r);
    }

    fn sync(&mut self) {
        if self.in_flight {
            let r = self.copy.synchronize();
            self.check("copy stream sync", r);
            self.in_flight = false;
        }
    }
}
