//! Hand-off rings: how a worker passes a packet to the worker that owns its
//! flow.
//!
//! Owns: one single-producer, single-consumer `rte_ring` of mbuf pointers
//! per ordered pair of workers, and draining them when the dataplane stops.
//! Only worker `i` enqueues on ring `(i, j)` and only worker `j` dequeues
//! from it, so the rings run in DPDK's SP/SC mode (no compare-and-swap).
//! A full ring refuses the packet; the sender frees and counts it
//! (`handoff` drop). Mbufs still in a ring when the workers stop are freed
//! here and counted as taken in and dropped by the worker they were for,
//! so every mbuf comes back to the pool and every packet is accounted for.

use crate::error::{DpdkError, last_error};
use std::ffi::{CString, c_void};
use std::ptr::NonNull;
use vipgate_dataplane::counters::{DropReason, WorkerCounters};
use vipgate_ffi::rte_mbuf;

/// Entries in each hand-off ring (a power of two; one less is usable).
pub(crate) const HANDOFF_RING_SIZE: u32 = 1024;

/// One SP/SC ring of mbuf pointers.
#[derive(Debug)]
pub(crate) struct Ring {
    ptr: NonNull<vipgate_ffi::rte_ring>,
}

// SAFETY: the ring is designed to be shared between lcores; the single
// producer and single consumer are enforced by how `Handoff` hands rings
// out (one sender, one receiver per ring).
unsafe impl Send for Ring {}
// SAFETY: as above; `&Ring` is only used by the one producer or the one
// consumer, or by the main lcore after both have stopped.
unsafe impl Sync for Ring {}

impl Ring {
    pub(crate) fn create(name: &str, size: u32) -> Result<Ring, DpdkError> {
        let cname = CString::new(name).map_err(|_| DpdkError::NulInArgument(name.to_owned()))?;
        // SAFETY: EAL is initialised (the dataplane holds it); the name is a
        // valid C string; SOCKET_ID_ANY lets DPDK choose the NUMA node.
        let p = unsafe {
            vipgate_ffi::rte_ring_create(
                cname.as_ptr(),
                size,
                vipgate_ffi::SOCKET_ID_ANY,
                vipgate_ffi::RING_F_SP_ENQ | vipgate_ffi::RING_F_SC_DEQ,
            )
        };
        NonNull::new(p).map(|ptr| Ring { ptr }).ok_or_else(|| DpdkError::Ring {
            name: name.to_owned(),
            size,
            reason: last_error(),
        })
    }

    /// Enqueues as many of `mbufs` as fit; returns how many. Producer only.
    #[inline]
    pub(crate) fn enqueue(&self, mbufs: &[*mut rte_mbuf]) -> usize {
        // SAFETY: the ring is alive; only this ring's single producer calls
        // this; the pointer table holds `mbufs.len()` entries.
        unsafe {
            vipgate_ffi::rte_ring_enqueue_burst(
                self.ptr.as_ptr(),
                mbufs.as_ptr() as *const *mut c_void,
                mbufs.len() as u32,
                std::ptr::null_mut(),
            ) as usize
        }
    }

    /// Entries that can be enqueued now. Exact for the single producer:
    /// only the consumer changes it meanwhile, and only upwards.
    #[inline]
    pub(crate) fn free_count(&self) -> usize {
        // SAFETY: the ring is alive; reading its indexes has no side effect.
        unsafe { vipgate_ffi::rte_ring_free_count(self.ptr.as_ptr()) as usize }
    }

    /// Dequeues up to `out.len()` mbufs; returns how many. Consumer only.
    #[inline]
    pub(crate) fn dequeue(&self, out: &mut [*mut rte_mbuf]) -> usize {
        // SAFETY: the ring is alive; only this ring's single consumer calls
        // this; `out` has room for `out.len()` pointers.
        unsafe {
            vipgate_ffi::rte_ring_dequeue_burst(
                self.ptr.as_ptr(),
                out.as_mut_ptr() as *mut *mut c_void,
                out.len() as u32,
                std::ptr::null_mut(),
            ) as usize
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the ring is alive and nobody uses it any more: workers have
        // stopped and the ring was drained.
        unsafe { vipgate_ffi::rte_ring_free(self.ptr.as_ptr()) };
    }
}

/// The rings between `n` workers: `ring(i, j)` carries packets from worker
/// `i` to worker `j`.
#[derive(Debug)]
pub(crate) struct Handoff {
    n: usize,
    /// Row-major `n x n`; the diagonal is `None`.
    rings: Vec<Option<std::sync::Arc<Ring>>>,
}

impl Handoff {
    /// Creates the rings for `n` workers (none for one worker).
    pub(crate) fn create(n: usize) -> Result<Handoff, DpdkError> {
        let mut rings = Vec::with_capacity(n * n);
        for i in 0..n {
            for j in 0..n {
                rings.push(if i == j {
                    None
                } else {
                    Some(std::sync::Arc::new(Ring::create(&format!("vg_handoff_{i}_{j}"), HANDOFF_RING_SIZE)?))
                });
            }
        }
        Ok(Handoff { n, rings })
    }

    /// Worker `i`'s outbound rings, indexed by destination worker (`None`
    /// for itself).
    pub(crate) fn outbound(&self, i: usize) -> Vec<Option<std::sync::Arc<Ring>>> {
        (0..self.n).map(|j| self.rings[i * self.n + j].clone()).collect()
    }

    /// Worker `j`'s inbound rings.
    pub(crate) fn inbound(&self, j: usize) -> Vec<std::sync::Arc<Ring>> {
        (0..self.n).filter_map(|i| self.rings[i * self.n + j].clone()).collect()
    }

    /// Frees every mbuf left in the rings, counting each as a `handoff` drop
    /// of the worker it was addressed to. Only once the workers have
    /// stopped (the main lcore is then every ring's only user).
    pub(crate) fn drain(&self, counters: &[std::sync::Arc<WorkerCounters>]) {
        let mut buf = [std::ptr::null_mut::<rte_mbuf>(); crate::BURST];
        for (idx, ring) in self.rings.iter().enumerate() {
            let Some(ring) = ring else { continue };
            loop {
                let n = ring.dequeue(&mut buf);
                if n == 0 {
                    break;
                }
                // SAFETY: the mbufs came out of the ring, which held the only
                // reference to them.
                unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(buf.as_mut_ptr(), n as u32) };
                // The receiver took them in (`handoff_in`, matching the
                // sender's `handoff_out`) and dropped them.
                if let Some(c) = counters.get(idx % self.n) {
                    c.handoff_in.add(n as u64);
                    c.drops[DropReason::Handoff as usize].add(n as u64);
                }
            }
        }
    }
}
