//! How the control plane's threads ask the kernel's scheduler to let them
//! in quickly on a CPU they share with a busy worker.
//!
//! A worker never sleeps: it polls. When the control plane shares its CPU
//! (on a small machine, or by configuration), every time one of its
//! threads wakes (an API request, an fsync completed, a timer), it must
//! wait until the scheduler takes the CPU from the worker. Linux's EEVDF
//! scheduler (6.6 and later) lets the running task finish its slice first
//! (3 ms by default), so a change that wakes its threads a few times took
//! milliseconds for each wake-up. Since Linux 6.12 a task may ask for a
//! shorter slice (`sched_setattr`, `SCHED_OTHER` with `sched_runtime`):
//! its deadline comes sooner, so it preempts the worker when it wakes.
//! Older kernels ignore the request.
//!
//! The slice sets how soon a thread gets its turn, not its share of the
//! CPU: that is its weight, its nice value. With equal weights a change
//! the control plane computes on a CPU a worker polls gets half of it, and
//! takes twice as long as its work. The control plane's threads therefore
//! also ask for a lower nice value than the workers' ([`request_nice`],
//! `[eal] control_plane_nice`, -10 by default: about 90 % of a shared CPU
//! while they have work). That costs the worker no more cycles in all: a
//! change is a fixed amount of work, which the worker loses to it either
//! way; the priority only decides that the change, and every caller
//! waiting for it, does not wait for the worker. Between changes the
//! control plane sleeps and the worker has the whole CPU.

use std::time::Duration;

/// The slice the control plane's threads ask for: the shortest Linux
/// grants is 0.1 ms.
pub const CONTROL_PLANE_SLICE: Duration = Duration::from_micros(100);

/// `struct sched_attr` of `sched_setattr(2)` (its first version, 48 bytes,
/// which every kernel since 3.14 takes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// Asks for `slice` as the calling thread's scheduler slice, keeping its
/// policy (`SCHED_OTHER`) and nice value. The kernel clamps the slice to
/// what it allows; one before 6.12 ignores it. An error is the system
/// call's.
pub fn request_slice(slice: Duration) -> std::io::Result<()> {
    let mut attr = current()?;
    attr.size = size_of::<SchedAttr>() as u32;
    attr.sched_policy = libc::SCHED_OTHER as u32;
    attr.sched_flags = 0;
    attr.sched_priority = 0;
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    attr.sched_deadline = 0;
    attr.sched_period = 0;
    set(&attr)
}

/// Lets the calling thread run on every CPU. A thread inherits the
/// affinity of the one that starts it: one started by a worker, or by the
/// main lcore once EAL has pinned it, would otherwise be confined to that
/// lcore's single CPU, which a worker keeps busy. Best effort: the kernel
/// keeps the CPUs that exist and the process may use, and an error leaves
/// the mask as it was.
pub fn unpin_current_thread() {
    // SAFETY: cpu_set_t is plain data, valid when zeroed; CPU_SET writes
    // inside it (every index is below CPU_SETSIZE); sched_setaffinity(0, ..)
    // changes only this thread's mask, and the kernel keeps the CPUs that
    // exist and are allowed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Asks for nice value `nice` (-20 to 19; lower is a larger share of a
/// CPU) for the calling thread alone, keeping its policy and slice. A
/// value below the thread's current one needs `CAP_SYS_NICE` (or an
/// `RLIMIT_NICE` that allows it): without it the error is the system
/// call's, `EPERM`, and the thread keeps its nice value. Threads the
/// calling one starts later inherit the value.
pub fn request_nice(nice: i32) -> std::io::Result<()> {
    let mut attr = current()?;
    attr.size = size_of::<SchedAttr>() as u32;
    attr.sched_nice = nice;
    set(&attr)
}

/// The calling thread's nice value.
pub fn current_nice() -> std::io::Result<i32> {
    Ok(current()?.sched_nice)
}

/// The calling thread's scheduler slice as the kernel reports it: the one
/// asked for with [`request_slice`] (clamped), or 0 when none was.
pub fn current_slice() -> std::io::Result<Duration> {
    Ok(Duration::from_nanos(current()?.sched_runtime))
}

/// Applies `attr` (its `size` set) to the calling thread.
fn set(attr: &SchedAttr) -> std::io::Result<()> {
    // SAFETY: sched_setattr(2) on the calling thread (pid 0) reads `size`
    // bytes of `attr`, a live, initialised struct of that size.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, attr as *const SchedAttr, 0u32) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn current() -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr(2) on the calling thread writes at most `size`
    // bytes (the third argument) into `attr`, which has that many.
    let rc = unsafe {
        libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, size_of::<SchedAttr>() as u32, 0u32)
    };
    if rc == 0 { Ok(attr) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True if the running kernel is 6.12 or later (custom slices).
    fn has_custom_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (6, 12)
    }

    #[test]
    fn a_thread_gets_the_slice_it_asks_for_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            let nice_before = current().expect("sched_getattr").sched_nice;
            request_slice(CONTROL_PLANE_SLICE).expect("sched_setattr");
            let after = current().expect("sched_getattr");
            assert_eq!(after.sched_nice, nice_before);
            assert_eq!(after.sched_policy, libc::SCHED_OTHER as u32);
            if has_custom_slices() {
                assert_eq!(current_slice().unwrap(), CONTROL_PLANE_SLICE);
            }
            // A longer one than the kernel grants is clamped, not refused.
            request_slice(Duration::from_secs(10)).expect("sched_setattr");
            if has_custom_slices() {
                let s = current_slice().unwrap();
                assert!(s > CONTROL_PLANE_SLICE && s < Duration::from_secs(10), "{s:?}");
            }
        })
        .join()
        .expect("the test thread");
    }

    /// Raising a nice value needs no privilege; lowering one needs
    /// CAP_SYS_NICE, which root has (vipgated runs as root): as root the
    /// thread gets the lower value, otherwise the kernel's EPERM.
    #[test]
    fn a_thread_gets_the_nice_value_it_asks_for_and_keeps_its_slice() {
        use std::os::unix::fs::MetadataExt;
        let root = std::fs::metadata("/proc/self").expect("/proc/self").uid() == 0;
        let main_nice = current_nice().expect("sched_getattr");
        std::thread::spawn(move || {
            request_slice(CONTROL_PLANE_SLICE).expect("sched_setattr");
            let slice = current_slice().unwrap();
            let lower = main_nice - 7;
            match request_nice(lower) {
                Ok(()) => {
                    assert!(root, "an unprivileged thread lowered its nice value");
                    assert_eq!(current_nice().unwrap(), lower);
                }
                Err(e) => {
                    assert!(!root, "root could not lower its nice value: {e}");
                    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
                    assert_eq!(current_nice().unwrap(), main_nice, "a refused request changes nothing");
                }
            }
            let higher = main_nice + 3;
            request_nice(higher).expect("sched_setattr");
            assert_eq!(current_nice().unwrap(), higher);
            assert_eq!(current_slice().unwrap(), slice, "the slice is kept");
            assert_eq!(current().unwrap().sched_policy, libc::SCHED_OTHER as u32);
            // A thread started now inherits it.
            let child = std::thread::spawn(|| current_nice().unwrap()).join().unwrap();
            assert_eq!(child, higher);
            // Out of range: clamped by the kernel to 19, not refused.
            request_nice(40).expect("sched_setattr");
            assert_eq!(current_nice().unwrap(), 19);
        })
        .join()
        .expect("the test thread");
        // Only the thread that asked changed.
        assert_eq!(current_nice().unwrap(), main_nice);
    }
}
