//! Compiles vipgate's gRPC API (`proto/vipgate/v1/*.proto`) into Rust: the
//! message types with prost, the `Gateway` server and client with tonic.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The API files, relative to the proto root.
const PROTOS: &[&str] = &["vipgate/v1/gateway.proto", "vipgate/v1/services.proto"];

/// serde for the messages whose JSON form in `vipgatectl --json` (and in
/// its apply files) is exactly their fields, with the same names in the
/// same order: vipgatectl prints and reads these as they are
/// (`src/bin/vipgatectl/json.rs`). The others keep a mirror there.
const SERDE_TYPES: &[(&str, &str)] = &[
    ("WorkerSnapshot", SERIALIZE),
    ("MempoolStats", SERIALIZE),
    ("PortStats", SERIALIZE),
    ("Change", SERIALIZE),
    ("MutationResponse", SERIALIZE),
    // Output only; an apply file's "stats" are read and ignored.
    ("TrafficStats", "#[derive(::serde::Serialize, ::serde::Deserialize)]\n#[serde(default, deny_unknown_fields)]"),
    ("NewFlowLimit", "#[derive(::serde::Serialize, ::serde::Deserialize)]\n#[serde(deny_unknown_fields)]"),
];

/// The derive of a message vipgatectl only prints.
const SERIALIZE: &str = "#[derive(::serde::Serialize)]";

/// serde attributes of single fields: what an apply file may leave out,
/// and what the output leaves out when unset.
const SERDE_FIELDS: &[(&str, &str)] = &[
    ("NewFlowLimit.burst", "#[serde(default)]"),
    ("NewFlowLimit.prefix_len", "#[serde(default, skip_serializing_if = \"Option::is_none\")]"),
];

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-env-changed=PROTOC");

    check_protoc();

    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let mut builder = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // prost's codec with INVALID_ARGUMENT for a request that does not
        // decode (src/api/codec.rs).
        .codec_path("crate::api::codec::Codec");
    for (message, attribute) in SERDE_TYPES {
        builder = builder.type_attribute(format!(".vipgate.v1.{message}"), attribute);
    }
    for (field, attribute) in SERDE_FIELDS {
        builder = builder.field_attribute(format!(".vipgate.v1.{field}"), attribute);
    }
    if let Err(e) = builder.compile_protos(&files, std::slice::from_ref(&root)) {
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
