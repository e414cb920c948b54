//! Errors of the DPDK driver.

/// A DPDK call failed. Each variant names what was being done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DpdkError {
    /// `rte_eal_init` failed.
    #[error("EAL initialisation failed ({reason}); arguments were: {args}")]
    EalInit {
        /// The arguments given to EAL.
        args: String,
        /// DPDK's error text.
        reason: String,
    },
    /// EAL was already initialised in this process.
    #[error("EAL can be initialised only once per process")]
    EalAlreadyInitialised,
    /// An argument contained a NUL byte.
    #[error("EAL argument {0:?} contains a NUL byte")]
    NulInArgument(String),
    /// No worker lcore: the first lcore runs the control plane.
    #[error("no worker lcore: give EAL at least two lcores (the first runs the control plane)")]
    NoWorkerLcore,
    /// The mbuf pool could not be created.
    #[error("cannot create mbuf pool {name:?} of {size} mbufs: {reason}")]
    Mempool {
        /// Pool name.
        name: String,
        /// Requested mbufs.
        size: u32,
        /// DPDK's error text.
        reason: String,
    },
    /// A hand-off ring between two workers could not be created.
    #[error("cannot create hand-off ring {name:?} of {size} entries: {reason}")]
    Ring {
        /// Ring name.
        name: String,
        /// Requested entries.
        size: u32,
        /// DPDK's error text.
        reason: String,
    },
    /// A configured device was not probed by EAL.
    #[error(
        "port {name:?}: device {device:?} was not found after EAL probing (check the vdev string or PCI address, and that the device is bound to a DPDK driver)"
    )]
    PortNotFound {
        /// Port name.
        name: String,
        /// Device string.
        device: String,
    },
    /// A port operation failed.
    #[error("port {name:?}: {op} failed: {reason}")]
    Port {
        /// Port name.
        name: String,
        /// What was being done.
        op: &'static str,
        /// DPDK's error text.
        reason: String,
    },
    /// A device could not join a bond port.
    #[error("port {name:?}: bond member {member:?} cannot join the bond: {reason}")]
    BondMember {
        /// Port name.
        name: String,
        /// The member's device.
        member: String,
        /// DPDK's error text.
        reason: String,
    },
    /// A port's kernel interface (the exception path) cannot be created
    /// because a network interface of that name exists.
    #[error(
        "port {port:?}: kernel interface {iface:?} already exists in this network namespace (another vipgated, or a host interface of that name); set ports.kernel_interface to another name, or to \"\" for none"
    )]
    KernelInterfaceExists {
        /// Port name.
        port: String,
        /// Interface name.
        iface: String,
    },
    /// A port's kernel interface (the exception path) could not be created.
    #[error("port {port:?}: cannot create kernel interface {iface:?}: {reason}")]
    KernelInterface {
        /// Port name.
        port: String,
        /// Interface name.
        iface: String,
        /// DPDK's error text.
        reason: String,
    },
    /// The packet-capture framework could not start.
    #[error("cannot initialise packet capture: {0}")]
    PacketCapture(String),
    /// A worker could not be launched on its lcore.
    #[error("cannot launch worker on lcore {lcore}: {reason}")]
    Launch {
        /// The lcore.
        lcore: u32,
        /// DPDK's error text.
        reason: String,
    },
    /// Workers are already running.
    #[error("the workers are already launched")]
    AlreadyLaunched,
    /// A snapshot was published before the workers were launched.
    #[error("no snapshot to replace: the workers are not launched yet")]
    NotLaunched,
    /// Some workers did not pass a quiescent state in time after a new
    /// snapshot was published. The new snapshot is in place; the old one is
    /// kept until they pass one.
    #[error(
        "workers on lcores {lcores:?} did not pass a quiescent state within {waited:?}: they may still use the previous snapshot, which is kept until they do"
    )]
    Stalled {
        /// The lcores of the stalled workers.
        lcores: Vec<u32>,
        /// How long the publication waited.
        waited: std::time::Duration,
    },
}

/// DPDK's text for an errno value (positive or negative).
pub(crate) fn strerror(errno: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local,
    // NUL-terminated string for any errno value.
    let msg = unsafe { std::ffi::CStr::from_ptr(vipgate_ffi::rte_strerror(errno.abs())) };
    format!("{} (errno {})", msg.to_string_lossy(), errno.abs())
}

/// The calling thread's `rte_errno` as text.
pub(crate) fn last_error() -> String {
    strerror(vipgate_ffi::vipgate_rte_errno())
}
