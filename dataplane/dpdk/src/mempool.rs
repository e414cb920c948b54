//! The packet-buffer (mbuf) pool, and how large its mbufs are.
//!
//! Every frame lives in one mbuf: the pipeline reads only an mbuf's first
//! segment, so the pool's mbufs are sized for the largest frame a port can
//! carry ([`frame_room`]) and ports are never set up to scatter a frame
//! over several.

use crate::error::{DpdkError, last_error};
use std::ffi::CString;
use std::ptr::NonNull;

/// Bytes of a frame beyond its IP packet (the MTU) that an mbuf must hold
/// after its headroom: the Ethernet header (14), one VLAN tag (4, for
/// tagged ports), and DSR's outer IPv4 header (20). The pipeline prepends
/// that header into the headroom, so this is a margin: a frame never
/// depends on the driver's headroom to fit.
pub(crate) const FRAME_OVERHEAD: u32 = 14 + 4 + 20;

/// The room after the headroom of DPDK's default mbuf (2048 bytes).
pub(crate) const DEFAULT_FRAME_ROOM: u32 = vipgate_ffi::RTE_MBUF_DEFAULT_DATAROOM;

/// Room for the frame an mbuf needs after its headroom so that a port with
/// MTU `mtu` receives each frame whole: DPDK's default 2048 bytes while
/// `mtu` + [`FRAME_OVERHEAD`] fits in it (any MTU up to 2010, so a
/// 1500-byte configuration keeps today's pool), otherwise that sum rounded
/// up to a whole KiB (drivers program receive buffers in units of up to
/// 1 KiB): 9216 for MTU 9000.
pub(crate) fn frame_room(mtu: u16) -> u32 {
    let frame = u32::from(mtu) + FRAME_OVERHEAD;
    if frame <= DEFAULT_FRAME_ROOM { DEFAULT_FRAME_ROOM } else { frame.div_ceil(1024) * 1024 }
}

/// The data room (headroom included, as `rte_pktmbuf_pool_create` takes
/// it) of mbufs for ports whose largest MTU is `mtu`.
pub(crate) fn data_room(mtu: u16) -> u16 {
    // At most 65535 + 38 rounded up, plus 128: fits u16 for every MTU up
    // to 65000; vipgate's MTUs stop at 9000.
    u16::try_from(vipgate_ffi::RTE_PKTMBUF_HEADROOM + frame_room(mtu)).unwrap_or(u16::MAX)
}

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
    /// Creates a pool of `size` mbufs with a per-lcore cache of `cache`,
    /// each with `data_room` bytes of buffer, headroom included (see
    /// `data_room`).
    pub fn create(name: &str, size: u32, cache: u32, data_room: u16) -> Result<Mempool, DpdkError> {
        let cname = CString::new(name).map_err(|_| DpdkError::NulInArgument(name.to_owned()))?;
        // SAFETY: EAL is initialised (the caller holds an `Eal`); the name is
        // a valid C string; SOCKET_ID_ANY lets DPDK choose the NUMA node.
        let p = unsafe {
            vipgate_ffi::rte_pktmbuf_pool_create(cname.as_ptr(), size, cache, 0, data_room, vipgate_ffi::SOCKET_ID_ANY)
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

    /// Bytes of buffer per mbuf, headroom included.
    pub fn data_room(&self) -> u16 {
        // SAFETY: the pool is alive and is an mbuf pool (made by
        // rte_pktmbuf_pool_create), whose private area holds the data room.
        unsafe { vipgate_ffi::rte_pktmbuf_data_room_size(self.ptr.as_ptr()) }
    }

    /// Bytes each mbuf takes in memory: the mempool's element (mbuf header,
    /// data room) and its per-object header.
    pub fn bytes_per_mbuf(&self) -> u32 {
        // SAFETY: the pool is alive; these sizes are immutable after creation.
        unsafe { (*self.ptr.as_ptr()).elt_size + (*self.ptr.as_ptr()).header_size }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbufs_grow_only_for_mtus_whose_frames_do_not_fit_the_default() {
        // Every MTU up to 2010 keeps DPDK's default mbuf (2048 + 128).
        for mtu in [576, 1500, 2000, 2010] {
            assert_eq!(frame_room(mtu), 2048, "mtu {mtu}");
            assert_eq!(data_room(mtu), vipgate_ffi::RTE_MBUF_DEFAULT_BUF_SIZE as u16, "mtu {mtu}");
        }
        assert_eq!(frame_room(2011), 3072);
        assert_eq!(frame_room(4000), 4096);
        assert_eq!(frame_room(9000), 9216);
        assert_eq!(data_room(9000), 9216 + 128);
        // Always room for the largest frame: MTU, Ethernet, a VLAN tag and
        // DSR's outer header.
        for mtu in 576..=9000u16 {
            assert!(frame_room(mtu) >= u32::from(mtu) + 14 + 4 + 20, "mtu {mtu}");
        }
    }
}
