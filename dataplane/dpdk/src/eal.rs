//! The Environment Abstraction Layer: initialised once per process.

use crate::error::{DpdkError, last_error};
use std::ffi::{CString, c_char};
use std::sync::atomic::{AtomicBool, Ordering};

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Proof that EAL is initialised; cleans it up when dropped. The thread that
/// called [`Eal::init`] is the main lcore.
#[derive(Debug)]
pub struct Eal {
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
            return Err(DpdkError::EalInit { args: joined.join(" "), reason: last_error() });
        }
        Ok(Eal { _not_send: std::marker::PhantomData })
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
    }
}
