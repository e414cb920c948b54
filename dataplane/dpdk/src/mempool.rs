//! The packet-buffer (mbuf) pool.

use crate::error::{DpdkError, last_error};
use std::ffi::CString;
use std::ptr::NonNull;

/// An mbuf pool. Freed when dropped; everything allocated from it must be
/// back by then (ports stopped and closed, workers finished).
#[derive(Debug)]
pub struct Mempool {
    ptr: NonNull<vipgate_ffi::rte_mempool>,
    name: String,
}

// SAFETY: an rte_mempool is designed for concurrent use from many lcores;
// the handle is only a pointer to it.
unsafe impl Send for Mempool {}
// SAFETY: as above; the read-only queries used through &self are thread-safe.
unsafe impl Sync for Mempool {}

impl Mempool {
    /// Creates a pool of `size` mbufs with a per-lcore cache of `cache`.
    pub fn create(name: &str, size: u32, cache: u32) -> Result<Mempool, DpdkError> {
        let cname = CString::new(name).map_err(|_| DpdkError::NulInArgument(name.to_owned()))?;
        // SAFETY: EAL is initialised (the caller holds an `Eal`); the name is
        // a valid C string; SOCKET_ID_ANY lets DPDK choose the NUMA node.
        let p = unsafe {
            vipgate_ffi::rte_pktmbuf_pool_create(
                cname.as_ptr(),
                size,
                cache,
                0,
                vipgate_ffi::RTE_MBUF_DEFAULT_BUF_SIZE as u16,
                vipgate_ffi::SOCKET_ID_ANY,
            )
        };
        NonNull::new(p).map(|ptr| Mempool { ptr, name: name.to_owned() }).ok_or_else(|| DpdkError::Mempool {
            name: name.to_owned(),
            size,
            reason: last_error(),
        })
    }

    /// Raw pointer for DPDK calls.
    pub fn as_ptr(&self) -> *mut vipgate_ffi::rte_mempool {
        self.ptr.as_ptr()
    }

    /// Pool name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Total mbufs.
    pub fn size(&self) -> u32 {
        // SAFETY: the pool is alive; `size` is immutable after creation.
        unsafe { (*self.ptr.as_ptr()).size }
    }

    /// Mbufs currently allocated. Mbufs parked in per-lcore caches count as
    /// available, as DPDK counts them.
    pub fn in_use(&self) -> u32 {
        // SAFETY: the pool is alive; this is a read-only, thread-safe query.
        unsafe { vipgate_ffi::rte_mempool_in_use_count(self.ptr.as_ptr()) as u32 }
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        // SAFETY: the pool is alive and nothing refers to it any more: ports
        // are closed and workers have finished before the pool is dropped.
        unsafe { vipgate_ffi::rte_mempool_free(self.ptr.as_ptr()) };
    }
}
