//! Compiles vipgate's gRPC API (`proto/vipgate/v1/*.proto`) into Rust: the
//! message types with prost, the `Gateway` server and client with tonic.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The API files, relative to the proto root.
const PROTOS: &[&str] = &["vipgate/v1/gateway.proto", "vipgate/v1/services.proto"];

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-env-changed=PROTOC");

    check_protoc();

    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    if let Err(e) = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // prost's codec with INVALID_ARGUMENT for a request that does not
        // decode (src/api/codec.rs).
        .codec_path("crate::api::codec::Codec")
        .compile_protos(&files, std::slice::from_ref(&root))
    {
        panic!("compiling {}: {e}", PROTOS.join(", "));
    }
}

/// Fails the build with the fix when `protoc` cannot run. prost-build only
/// says it could not find the compiler; the operator needs the package name.
fn check_protoc() {
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    match Command::new(&protoc).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{} --version failed ({}): {}",
            protoc.to_string_lossy(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run the protobuf compiler `{}`: {e}. \
             Install it with `apt-get install protobuf-compiler` (Debian/Ubuntu), \
             or set PROTOC to its path.",
            protoc.to_string_lossy()
        ),
    }
}
