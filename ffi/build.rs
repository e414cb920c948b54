//! Build script of vipgate-ffi.
//!
//! 1. Finds the system DPDK through pkg-config (`libdpdk`, shared linkage) and
//!    emits its link flags.
//! 2. Checks that libclang can be loaded, then runs bindgen over `wrapper.h`.
//! 3. Compiles, with libdpdk's own cflags, the C file of wrappers that bindgen
//!    writes for DPDK's `static inline` functions, together with `shim.c`.
//!
//! Any missing system dependency ends the build with a message naming the
//! Debian packages that provide it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use bindgen::callbacks::{IntKind, ParseCallbacks};

/// The oldest DPDK these bindings are written against (Debian bookworm's).
const DPDK_MIN_VERSION: &str = "22.11";

const DPDK_PACKAGES: &str = "apt-get install libdpdk-dev dpdk-dev pkg-config";
const CLANG_PACKAGES: &str = "apt-get install clang libclang-dev";

/// Macro prefixes whose values are built with `RTE_BIT64` (or from other
/// such macros). They are 64-bit flag words in DPDK's API, so they are given
/// the type `u64` whatever their value.
const U64_FLAG_PREFIXES: &[&str] =
    &["RTE_ETH_RX_OFFLOAD_", "RTE_ETH_TX_OFFLOAD_", "RTE_ETH_RSS_", "RTE_MBUF_F_", "RTE_ETH_DEV_CAPA_"];

/// Structs that bindgen cannot lay out: they are packed but contain a member
/// with an alignment attribute (such as `struct rte_ether_addr`), which Rust
/// refuses (`packed` may not contain `align`). They stay opaque blobs of the
/// right size. All but one are only reachable through headers vipgate does
/// not use; `port_params` (an LACP actor's or partner's system, key and
/// port, in `rte_eth_bond_8023ad_slave_info`) is read by its byte offsets,
/// which IEEE 802.1AX fixes.
const OPAQUE_TYPES: &[&str] =
    &["rte_arp_ipv4", "rte_arp_hdr", "rte_l2tpv2_combined_msg_hdr", "rte_gtp_psc_generic_hdr", "port_params"];

#[derive(Debug)]
struct FlagWidths;

impl ParseCallbacks for FlagWidths {
    fn int_macro(&self, name: &str, _value: i64) -> Option<IntKind> {
        U64_FLAG_PREFIXES.iter().any(|prefix| name.starts_with(prefix)).then_some(IntKind::U64)
    }
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let wrapper = manifest_dir.join("wrapper.h");
    let shim = manifest_dir.join("shim.c");
    for file in ["wrapper.h", "shim.h", "shim.c"] {
        println!("cargo:rerun-if-changed={}", manifest_dir.join(file).display());
    }

    let dpdk = probe_dpdk();
    let cflags = dpdk_cflags();
    ensure_libclang();
    generate_bindings(&wrapper, &cflags, &out_dir);
    compile_c(&out_dir.join("static_fns.c"), &shim, &manifest_dir, &cflags);

    // Dependents (the `links = "dpdk"` key) can read these as DEP_DPDK_*.
    println!("cargo:version={}", dpdk.version);
    if let Some(include) = dpdk.include_paths.first() {
        println!("cargo:include={}", include.display());
    }
}

/// Finds libdpdk, emits its link flags, and panics with install advice if it
/// is not there.
fn probe_dpdk() -> pkg_config::Library {
    let dpdk = pkg_config::Config::new().atleast_version(DPDK_MIN_VERSION).probe("libdpdk").unwrap_or_else(|err| {
        panic!(
            "vipgate-ffi: DPDK not found by pkg-config (libdpdk >= {DPDK_MIN_VERSION}). \
                 Install it: {DPDK_PACKAGES}\n\npkg-config said:\n{err}"
        )
    });
    // The vdev bus (rte_vdev_init, rte_vdev_uninit) is a driver library that
    // libdpdk.pc does not list for shared linkage. The linker drops it again
    // (--as-needed) from binaries that call none of its functions.
    println!("cargo:rustc-link-lib=dylib=rte_bus_vdev");
    // So is the bonding driver, whose API (rte_eth_bond_create, ...) makes
    // a port out of several devices.
    println!("cargo:rustc-link-lib=dylib=rte_net_bond");
    dpdk
}

/// libdpdk's complete cflags. The pkg-config crate keeps only the include
/// paths and defines, but the headers also need `-include rte_config.h` and
/// the `-march` they were built for (their inline functions use SSE4.2).
fn dpdk_cflags() -> Vec<String> {
    let pkg_config = env::var_os("PKG_CONFIG").unwrap_or_else(|| "pkg-config".into());
    let output = Command::new(&pkg_config)
        .args(["--cflags", "libdpdk"])
        .output()
        .unwrap_or_else(|err| panic!("vipgate-ffi: could not run pkg-config ({err}). Install it: {DPDK_PACKAGES}"));
    assert!(
        output.status.success(),
        "vipgate-ffi: `pkg-config --cflags libdpdk` failed. Install DPDK: {DPDK_PACKAGES}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("pkg-config printed non-UTF-8 cflags")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// bindgen loads libclang at run time and panics with a terse message when it
/// cannot; check first so that the error says what to install.
fn ensure_libclang() {
    println!("cargo:rerun-if-env-changed=LIBCLANG_PATH");
    if let Err(err) = clang_sys::load() {
        panic!(
            "vipgate-ffi: libclang not found; bindgen needs it to generate the DPDK bindings. \
             Install it: {CLANG_PACKAGES} (or point LIBCLANG_PATH at libclang.so)\n\n\
             clang-sys said: {err}"
        );
    }
}

fn generate_bindings(wrapper: &Path, cflags: &[String], out_dir: &Path) {
    let mut builder = bindgen::Builder::default()
        .header(wrapper.to_str().expect("wrapper.h path is not UTF-8"))
        .clang_args(cflags)
        // Experimental DPDK APIs are bound like the others; without this the
        // C wrappers of experimental inline functions warn on every build.
        .clang_arg("-DALLOW_EXPERIMENTAL_API")
        .rust_edition(bindgen::RustEdition::Edition2024)
        .rust_target(bindgen::RustTarget::stable(85, 0).expect("bindgen knows Rust 1.85"))
        .allowlist_function("rte_.*")
        .allowlist_type("(rte|RTE)_.*")
        .allowlist_var("(rte|RTE)_.*")
        // A few constants of DPDK's API predate the RTE_ prefix.
        .allowlist_var("RING_F_.*|LCORE_ID_ANY|SOCKET_ID_ANY")
        // So do the bonding driver's modes and transmit policies.
        .allowlist_var("BONDING_MODE_.*|BALANCE_XMIT_POLICY_.*")
        // Enum constants keep their C names (RTE_ETH_MQ_RX_RSS), which are
        // unique in C already.
        .prepend_enum_name(false)
        .derive_default(true)
        // DPDK's comments are not Rust doc comments: their code samples would
        // become doctests. The DPDK API reference is the documentation.
        .generate_comments(false)
        .merge_extern_blocks(true)
        .wrap_static_fns(true)
        .wrap_static_fns_path(out_dir.join("static_fns"))
        .clang_macro_fallback()
        .clang_macro_fallback_build_dir(out_dir)
        .parse_callbacks(Box::new(FlagWidths))
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for ty in OPAQUE_TYPES {
        builder = builder.opaque_type(ty);
    }

    let bindings = builder.generate().unwrap_or_else(|err| {
        panic!(
            "vipgate-ffi: bindgen failed on the DPDK headers: {err}\n\
             If a system header such as stddef.h is missing, install clang: {CLANG_PACKAGES}; \
             if a DPDK header is missing: {DPDK_PACKAGES}"
        )
    });
    bindings.write_to_file(out_dir.join("bindings.rs")).expect("could not write bindings.rs");
}

/// Compiles bindgen's wrappers of the static inline functions and vipgate's
/// shims into one static library that is bundled into this crate's rlib.
fn compile_c(static_fns: &Path, shim: &Path, manifest_dir: &Path, cflags: &[String]) {
    let mut build = cc::Build::new();
    build
        .file(static_fns)
        .file(shim)
        .include(manifest_dir)
        .define("ALLOW_EXPERIMENTAL_API", None)
        // The wrappers sit on the fast path (rx/tx burst, mbuf alloc/free):
        // optimise them in debug builds too.
        .opt_level(2)
        // bindgen repeats `const` in one wrapper's parameter (`const const
        // void *`); C99 allows that, but GCC warns.
        .flag_if_supported("-Wno-duplicate-decl-specifier");
    for flag in cflags {
        build.flag(flag);
    }
    build.compile("vipgate_ffi_c");
}
