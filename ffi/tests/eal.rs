//! End-to-end check of the bindings against a live EAL: init, mempool, mbufs
//! through the static inline wrappers, a ring, an lcore launch, and a
//! `net_null` port that is configured, started, sent to, received from,
//! stopped and closed; then `rte_eal_cleanup`.
//!
//! EAL can be initialised once per process, so this file holds one test
//! (nextest runs it in a process of its own; so does `cargo test`, one
//! process per test file). It needs root: EAL opens /var/run/dpdk and pins
//! threads. It runs without hugepages (`--no-huge`) and without PCI.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};

use vipgate_ffi::*;

const NB_MBUFS: c_uint = 511;
const MEMPOOL_CACHE: c_uint = 32;
const NB_DESC: u16 = 64;
const BURST: usize = 8;

/// Removes EAL's runtime directory for our file prefix when the test ends,
/// whether it passes or panics.
struct RuntimeDir(PathBuf);

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => eprintln!("could not remove {}: {err}", self.0.display()),
        }
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "vipgate-ffi's EAL test must run as root (EAL needs /var/run/dpdk and CPU pinning); \
         it is not skipped on purpose. Run it as root, e.g. `sudo -E cargo nextest run -p vipgate-ffi`."
    );
}

/// The CPUs this process may run on, so that EAL's lcores map onto CPUs it
/// is allowed to pin to.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; an all-zero set is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    assert_eq!(rc, 0, "sched_getaffinity: {}", std::io::Error::last_os_error());
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE and `set` was filled in above.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

fn errno_text() -> String {
    let errno = vipgate_rte_errno();
    // SAFETY: rte_strerror accepts any value and returns a NUL-terminated
    // string that stays valid until the next call on this thread.
    let text = unsafe { CStr::from_ptr(rte_strerror(errno)) };
    format!("rte_errno {errno}: {}", text.to_string_lossy())
}

/// Worker body for `rte_eal_remote_launch`: reports its lcore id.
unsafe extern "C" fn report_lcore(arg: *mut c_void) -> c_int {
    // SAFETY: the launcher passes a pointer to an AtomicU32 that outlives the
    // launch (it waits for this lcore before returning).
    let seen = unsafe { &*arg.cast::<AtomicU32>() };
    // SAFETY: called on an EAL lcore.
    seen.store(unsafe { rte_lcore_id() }, Ordering::SeqCst);
    42
}

#[test]
fn eal_mempool_ring_lcores_and_null_port() {
    require_root();

    let prefix = format!("vgffi{}", std::process::id());
    let _runtime_dir = RuntimeDir(PathBuf::from("/var/run/dpdk").join(&prefix));

    // Lcore 0 is the main lcore; lcore 1 a worker when a second CPU exists.
    let cpus = allowed_cpus();
    let lcores = match cpus.as_slice() {
        [] => panic!("no allowed CPU"),
        [only] => format!("0@{only}"),
        [first, second, ..] => format!("0@{first},1@{second}"),
    };
    let args: Vec<CString> = [
        "vipgate-ffi-test",
        "--no-huge",
        "-m",
        "256",
        "--no-pci",
        "--vdev=net_null0",
        &format!("--file-prefix={prefix}"),
        &format!("--lcores={lcores}"),
        "--log-level=warning",
    ]
    .into_iter()
    .map(|arg| CString::new(arg).expect("no NUL in EAL arguments"))
    .collect();
    // EAL may reorder argv, so it gets its own array of pointers; `args`
    // keeps the strings alive until after rte_eal_cleanup.
    let mut argv: Vec<*mut c_char> = args.iter().map(|arg| arg.as_ptr().cast_mut()).collect();
    let argc = c_int::try_from(argv.len()).expect("few arguments");

    // SAFETY: argv holds argc valid NUL-terminated strings; this is the one
    // rte_eal_init of this process.
    let parsed = unsafe { rte_eal_init(argc, argv.as_mut_ptr()) };
    assert!(parsed >= 0, "rte_eal_init failed: {}", errno_text());

    // SAFETY: for every call below, EAL is initialised and this is its
    // main lcore; every pointer passed is either valid for the call or
    // checked non-null first, as each comment says.
    unsafe {
        assert_eq!(rte_lcore_id(), 0, "main lcore id");
        let workers = if cpus.len() >= 2 { 1 } else { 0 };
        assert_eq!(rte_lcore_count(), 1 + workers);
        assert_eq!(rte_eth_dev_count_avail(), 1, "exactly net_null0");

        check_clock();
        let pool = check_mempool();
        check_ring(pool);
        if workers == 1 {
            check_remote_launch();
        } else {
            eprintln!("note: one CPU only, rte_eal_remote_launch not exercised");
        }
        check_vdev_hotplug();
        check_null_port(pool);

        rte_mempool_free(pool);
        assert_eq!(rte_eal_cleanup(), 0, "rte_eal_cleanup: {}", errno_text());
    }
    drop(args);
}

/// TSC helpers, pause and prefetch: all static inline in C.
unsafe fn check_clock() {
    // SAFETY: EAL is up (rte_get_tsc_hz reads the calibrated frequency).
    unsafe {
        assert!(rte_get_tsc_hz() > 0);
        let before = rte_rdtsc();
        for _ in 0..100 {
            rte_pause();
        }
        assert!(rte_rdtsc() > before, "TSC did not advance");
        let line = [0u64; 8];
        rte_prefetch0(line.as_ptr().cast());
    }
}

/// Creates the test pool and cycles mbufs through every alloc/free flavour;
/// the pool is empty of in-use mbufs at the end.
unsafe fn check_mempool() -> *mut rte_mempool {
    let name = c"vgffi_pool";
    // SAFETY: EAL is up; `name` is NUL-terminated; pool pointers are checked
    // before use and the mbufs come from that pool.
    unsafe {
        let socket = c_int::try_from(rte_socket_id()).expect("socket id fits c_int");
        let data_room = u16::try_from(RTE_MBUF_DEFAULT_BUF_SIZE).expect("fits u16");
        let pool = rte_pktmbuf_pool_create(name.as_ptr(), NB_MBUFS, MEMPOOL_CACHE, 0, data_room, socket);
        assert!(!pool.is_null(), "rte_pktmbuf_pool_create: {}", errno_text());
        assert_eq!(rte_mempool_in_use_count(pool), 0);
        assert_eq!(rte_mempool_avail_count(pool), NB_MBUFS);

        // A second pool of the same name fails with EEXIST in rte_errno.
        vipgate_rte_errno_set(0);
        let dup = rte_pktmbuf_pool_create(name.as_ptr(), 63, 0, 0, data_room, socket);
        assert!(dup.is_null());
        assert_eq!(vipgate_rte_errno(), libc::EEXIST, "{}", errno_text());

        // One by one.
        let mut mbufs = [ptr::null_mut::<rte_mbuf>(); BURST];
        for slot in &mut mbufs {
            *slot = rte_pktmbuf_alloc(pool);
            assert!(!slot.is_null(), "rte_pktmbuf_alloc: pool empty");
        }
        assert_eq!(rte_mempool_in_use_count(pool), BURST as c_uint);
        let m = mbufs[0];
        let headroom = u16::try_from(RTE_PKTMBUF_HEADROOM).expect("fits u16");
        assert_eq!((*m).data_off, headroom);
        assert_eq!(vipgate_ffi::pktmbuf_mtod(m), (*m).buf_addr.cast::<u8>().add(usize::from(headroom)));
        pktmbuf_mtod(m).write_bytes(0xab, 64);
        for m in &mbufs[1..] {
            rte_pktmbuf_free(*m);
        }
        // rte_pktmbuf_alloc leaves the mbuf in the state raw_free requires
        // (refcnt 1, one segment, no next).
        rte_mbuf_raw_free(m);
        assert_eq!(rte_mempool_in_use_count(pool), 0);

        // In bulk.
        assert_eq!(rte_pktmbuf_alloc_bulk(pool, mbufs.as_mut_ptr(), BURST as c_uint), 0);
        assert_eq!(rte_mempool_in_use_count(pool), BURST as c_uint);
        rte_pktmbuf_free_bulk(mbufs.as_mut_ptr(), BURST as c_uint);
        assert_eq!(rte_mempool_in_use_count(pool), 0);
        pool
    }
}

/// An SPSC ring of mbuf pointers, as workers use to hand packets over.
unsafe fn check_ring(pool: *mut rte_mempool) {
    // SAFETY: EAL is up; the ring and mbufs are checked non-null; the object
    // tables are BURST long.
    unsafe {
        let socket = c_int::try_from(rte_socket_id()).expect("socket id fits c_int");
        let ring = rte_ring_create(c"vgffi_ring".as_ptr(), 64, socket, RING_F_SP_ENQ | RING_F_SC_DEQ);
        assert!(!ring.is_null(), "rte_ring_create: {}", errno_text());

        let mut mbufs = [ptr::null_mut::<rte_mbuf>(); BURST];
        assert_eq!(rte_pktmbuf_alloc_bulk(pool, mbufs.as_mut_ptr(), BURST as c_uint), 0);
        let objs: Vec<*mut c_void> = mbufs.iter().map(|m| m.cast()).collect();
        let enq = rte_ring_enqueue_burst(ring, objs.as_ptr(), BURST as c_uint, ptr::null_mut());
        assert_eq!(enq, BURST as c_uint);
        assert_eq!(rte_ring_count(ring), BURST as c_uint);

        let mut out = [ptr::null_mut::<c_void>(); BURST];
        let deq = rte_ring_dequeue_burst(ring, out.as_mut_ptr(), BURST as c_uint, ptr::null_mut());
        assert_eq!(deq, BURST as c_uint);
        assert_eq!(out.as_slice(), objs.as_slice(), "ring is FIFO");
        assert_eq!(rte_ring_count(ring), 0);

        rte_pktmbuf_free_bulk(out.as_mut_ptr().cast(), BURST as c_uint);
        rte_ring_free(ring);
        assert_eq!(rte_mempool_in_use_count(pool), 0);
    }
}

/// Runs a function on worker lcore 1 and collects its return value.
unsafe fn check_remote_launch() {
    let seen = AtomicU32::new(u32::MAX);
    // SAFETY: EAL is up with lcore 1 as its only worker; `seen` outlives the
    // launch because both waits below return only once the worker is done.
    unsafe {
        let worker = rte_get_next_lcore(u32::MAX, 1, 0);
        assert_eq!(worker, 1, "first worker lcore");
        assert_eq!(rte_get_next_lcore(worker, 1, 0), RTE_MAX_LCORE, "only one worker");
        let arg = (&raw const seen).cast_mut().cast::<c_void>();
        assert_eq!(rte_eal_remote_launch(Some(report_lcore), arg, worker), 0);
        assert_eq!(rte_eal_wait_lcore(worker), 42, "worker's return value");
        rte_eal_mp_wait_lcore();
    }
    assert_eq!(seen.load(Ordering::SeqCst), 1, "worker ran on lcore 1");
}

/// Adds and removes a second null port at run time (`librte_bus_vdev` is
/// linked by this crate, outside libdpdk.pc).
unsafe fn check_vdev_hotplug() {
    // SAFETY: EAL is up; the names are NUL-terminated.
    unsafe {
        assert_eq!(rte_vdev_init(c"net_null1".as_ptr(), c"".as_ptr()), 0);
        assert_eq!(rte_eth_dev_count_avail(), 2);
        let mut port = u16::MAX;
        assert_eq!(rte_eth_dev_get_port_by_name(c"net_null1".as_ptr(), &raw mut port), 0);
        assert_eq!(rte_vdev_uninit(c"net_null1".as_ptr()), 0);
        assert_eq!(rte_eth_dev_count_avail(), 1);
    }
}

/// Configures `net_null0` with one rx and one tx queue, sends a burst into it
/// (`net_null` frees what it transmits), receives a burst from it (`net_null`
/// makes packets from the rx queue's pool), then stops and closes it.
unsafe fn check_null_port(pool: *mut rte_mempool) {
    // SAFETY: EAL is up, `pool` is a valid pktmbuf pool, every out-pointer
    // is a live local, and mbuf pointers are checked non-null before use.
    unsafe {
        let mut port = u16::MAX;
        assert_eq!(rte_eth_dev_get_port_by_name(c"net_null0".as_ptr(), &raw mut port), 0);
        let socket = rte_eth_dev_socket_id(port);
        // SOCKET_ID_ANY (-1) goes to the queue setup functions as unsigned.
        let socket = c_uint::try_from(socket).unwrap_or(c_uint::MAX);

        let mut info = rte_eth_dev_info::default();
        assert_eq!(rte_eth_dev_info_get(port, &raw mut info), 0);
        assert!(info.max_rx_queues >= 1 && info.max_tx_queues >= 1);

        let conf = rte_eth_conf::default();
        assert_eq!(rte_eth_dev_configure(port, 1, 1, &raw const conf), 0, "{}", errno_text());
        assert_eq!(rte_eth_rx_queue_setup(port, 0, NB_DESC, socket, ptr::null(), pool), 0);
        assert_eq!(rte_eth_tx_queue_setup(port, 0, NB_DESC, socket, ptr::null()), 0);
        assert_eq!(rte_eth_dev_start(port), 0);

        let mut mac = rte_ether_addr::default();
        assert_eq!(rte_eth_macaddr_get(port, &raw mut mac), 0);

        // Transmit: 64-byte frames; net_null frees them.
        let mut tx = [ptr::null_mut::<rte_mbuf>(); BURST];
        assert_eq!(rte_pktmbuf_alloc_bulk(pool, tx.as_mut_ptr(), BURST as c_uint), 0);
        for &m in &tx {
            let frame = pktmbuf_mtod(m);
            frame.write_bytes(0xff, 6);
            frame.add(6).copy_from_nonoverlapping(mac.addr_bytes.as_ptr(), 6);
            frame.add(12).write_bytes(0, 52);
            (*m).data_len = 64;
            (*m).pkt_len = 64;
        }
        let sent = rte_eth_tx_burst(port, 0, tx.as_mut_ptr(), BURST as u16);
        assert_eq!(usize::from(sent), BURST, "net_null takes every packet");
        assert_eq!(rte_mempool_in_use_count(pool), 0, "net_null freed what it sent");

        // Receive: net_null fills the whole burst.
        let mut rx = [ptr::null_mut::<rte_mbuf>(); BURST];
        let got = rte_eth_rx_burst(port, 0, rx.as_mut_ptr(), BURST as u16);
        assert_eq!(usize::from(got), BURST);
        for &m in &rx[..usize::from(got)] {
            assert!(!m.is_null());
            assert!((*m).pkt_len > 0);
            rte_prefetch0(pktmbuf_mtod(m).cast_const().cast());
        }
        rte_pktmbuf_free_bulk(rx.as_mut_ptr(), c_uint::from(got));
        assert_eq!(rte_mempool_in_use_count(pool), 0);

        let mut stats = rte_eth_stats::default();
        assert_eq!(rte_eth_stats_get(port, &raw mut stats), 0);
        assert_eq!(stats.opackets, BURST as u64);
        assert_eq!(stats.ipackets, BURST as u64);

        assert_eq!(rte_eth_dev_stop(port), 0);
        assert_eq!(rte_eth_dev_close(port), 0);
        assert_eq!(rte_eth_dev_count_avail(), 0);
    }
}
