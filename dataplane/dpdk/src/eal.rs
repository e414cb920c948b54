//! The Environment Abstraction Layer: initialised once per process.

use crate::error::{DpdkError, last_error};
use std::ffi::{CString, c_char};
use std::sync::atomic::{AtomicBool, Ordering};

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Proof that EAL is initialised; cleans it up when dropped. The thread that
/// called [`Eal::init`] is the main lcore.
#[derive(Debug)]
pub struct Eal {
    /// `--file-prefix`: names this process's hugepage files.
    file_prefix: String,
    /// EAL's runtime directory (`/var/run/dpdk/<prefix>` for root).
    runtime_dir: Option<std::path::PathBuf>,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Eal {
    /// Initialises EAL with `args` (without the program name).
    pub fn init<S: AsRef<str>>(args: &[S]) -> Result<Eal, DpdkError> {
        if INITIALISED.swap(true, Ordering::SeqCst) {
            return Err(DpdkError::EalAlreadyInitialised);
        }
        let mut owned = vec![CString::new("vipgated").expect("no NUL")];
        for a in args {
            let a = a.as_ref();
            owned.push(CString::new(a).map_err(|_| DpdkError::NulInArgument(a.to_owned()))?);
        }
        // rte_eal_init may permute argv; keep the strings alive in `owned`
        // and hand it a separate pointer array.
        let mut argv: Vec<*mut c_char> = owned.iter().map(|s| s.as_ptr() as *mut c_char).collect();
        // SAFETY: argv holds argc valid NUL-terminated strings that outlive
        // the call; EAL only reads and reorders the pointers.
        let rc = unsafe { vipgate_ffi::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
        if rc < 0 {
            let joined: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
            // EAL does not set rte_errno on every failure; its own log lines
            // (printed just before) then carry the reason.
            let reason = match vipgate_ffi::vipgate_rte_errno() {
                0 => "see EAL's messages above".to_owned(),
                _ => last_error(),
            };
            return Err(DpdkError::EalInit { args: joined.join(" "), reason });
        }
        let file_prefix = args
            .iter()
            .map(AsRef::as_ref)
            .skip_while(|a| *a != "--file-prefix")
            .nth(1)
            .or_else(|| args.iter().map(AsRef::as_ref).find_map(|a| a.strip_prefix("--file-prefix=")))
            .unwrap_or("rte")
            .to_owned();
        // SAFETY: EAL is initialised; the result is a static NUL-terminated
        // string or NULL.
        let dir = unsafe { vipgate_ffi::rte_eal_get_runtime_dir() };
        let runtime_dir = (!dir.is_null())
            // SAFETY: non-NULL, NUL-terminated, owned by EAL for the process's life.
            .then(|| std::path::PathBuf::from(unsafe { std::ffi::CStr::from_ptr(dir) }.to_string_lossy().into_owned()));
        Ok(Eal { file_prefix, runtime_dir, _not_send: std::marker::PhantomData })
    }

    /// Worker lcores (every enabled lcore but the main one), in order.
    pub fn worker_lcores(&self) -> Vec<u32> {
        let mut out = Vec::new();
        // SAFETY: EAL is initialised; iterating lcores has no side effects.
        let mut lc = unsafe { vipgate_ffi::rte_get_next_lcore(u32::MAX, 1, 0) };
        while lc < vipgate_ffi::RTE_MAX_LCORE {
            out.push(lc);
            // SAFETY: as above.
            lc = unsafe { vipgate_ffi::rte_get_next_lcore(lc, 1, 0) };
        }
        out
    }

    /// Lets `dpdk-dumpcap` capture on this process's ports (it attaches as a
    /// secondary process; capture callbacks are installed only while a
    /// capture runs).
    pub fn init_packet_capture(&self) -> Result<(), DpdkError> {
        // SAFETY: EAL is initialised and this is the primary process.
        if unsafe { vipgate_ffi::rte_pdump_init() } != 0 {
            return Err(DpdkError::PacketCapture(last_error()));
        }
        Ok(())
    }

    /// The main lcore's id.
    pub fn main_lcore(&self) -> u32 {
        // SAFETY: EAL is initialised.
        unsafe { vipgate_ffi::rte_get_main_lcore() }
    }

    /// TSC ticks per second.
    pub fn tsc_hz(&self) -> u64 {
        // SAFETY: EAL is initialised (it calibrates the TSC).
        unsafe { vipgate_ffi::rte_get_tsc_hz() }
    }

    /// The DPDK version string.
    pub fn version() -> String {
        // SAFETY: rte_version returns a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(vipgate_ffi::rte_version()) }.to_string_lossy().into_owned()
    }
}

impl Drop for Eal {
    fn drop(&mut self) {
        // SAFETY: called once, after every DPDK object owned by the process
        // was released (owners borrow `Eal` or are dropped first).
        unsafe { vipgate_ffi::rte_eal_cleanup() };
        // rte_eal_cleanup unmaps the memory but leaves this process's
        // hugepage files and runtime directory behind; a gateway that stops
        // cleanly removes them. (After a crash, EAL reclaims the files of
        // the same prefix at the next start.)
        for dir in hugetlbfs_mounts() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            let ours = format!("{}map_", self.file_prefix);
            for e in entries.flatten() {
                // Exactly `<prefix>map_<n>`: never another prefix's files.
                let name = e.file_name();
                let name = name.to_string_lossy();
                let ours =
                    name.strip_prefix(&ours).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                if ours {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if let Some(dir) = &self.runtime_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Mount points of hugetlbfs file systems.
fn hugetlbfs_mounts() -> Vec<std::path::PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "hugetlbfs").then(|| std::path::PathBuf::from(mnt))
        })
        .collect()
}
