/*
 * vipgate's own C shims: the few DPDK facilities that are neither functions
 * nor plain data, and so cannot be bound directly from Rust.
 *
 * Every function here is declared by hand in src/lib.rs as well; keep the two
 * in step.
 */
#ifndef VIPGATE_FFI_SHIM_H
#define VIPGATE_FFI_SHIM_H

/*
 * The calling thread's rte_errno. rte_errno is a macro over a thread-local
 * variable, which Rust cannot name.
 */
int vipgate_rte_errno(void);

/* Set the calling thread's rte_errno (tests and error paths reset it to 0). */
void vipgate_rte_errno_set(int value);

#endif /* VIPGATE_FFI_SHIM_H */
