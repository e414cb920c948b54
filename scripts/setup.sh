#!/usr/bin/env bash
# Prepare a Debian bookworm machine to build, test and demo vipgate.
#
#   scripts/setup.sh
#
# Idempotent: every step checks first and only acts when something is
# missing. It must run as root. It:
#   1. installs the missing Debian packages (apt-get update once, only if
#      something is missing);
#   2. checks the Rust toolchain (cargo must be there; it installs
#      cargo-nextest from crates.io when missing, and rustfmt and clippy
#      with rustup);
#   2b. creates the Python venv the gRPC client test uses (tests/python_client.rs):
#      $VIPGATE_PYTHON_VENV with pinned grpcio, grpcio-tools, protobuf from
#      PyPI: Debian's python3-grpc-tools 1.14 bundles protoc 3.6, which
#      rejects the proto3 'optional' fields of proto/vipgate/v1/services.proto;
#   3. checks /dev/net/tun and network namespaces (the test rig needs both);
#   4. mounts hugetlbfs on /dev/hugepages and reserves 2 MiB hugepages;
#   4b. builds kube-apiserver and etcd for the Kubernetes tests once, into
#      a cache outside the repository (scripts/k8s-build.sh: 12 minutes
#      cold, then under a second);
#   5. writes its hugepage decision to /run/vipgate/hugepages.env:
#        VIPGATE_HUGEPAGES=1   DPDK runs on hugepages
#        VIPGATE_HUGEPAGES=0   not enough hugepages: DPDK runs with --no-huge
#      and prints VIPGATE_HUGEPAGES=<0|1> as the last line of its output.
#
# Environment:
#   VIPGATE_HUGEPAGES=0                 skip hugepages, decide --no-huge
#   VIPGATE_HUGEPAGES_TARGET=512        2 MiB pages to have reserved in total
#   VIPGATE_HUGEPAGES_MIN_FREE=256      free pages needed to decide "1"
#   VIPGATE_SKIP_PACKAGES=1             do not check or install packages
#                                       (Debian packages and the Python venv)
#   VIPGATE_SKIP_K8S=1                  do not build kube-apiserver and etcd
#   VIPGATE_PYTHON_VENV=/opt/vipgate/python  the venv of the Python gRPC client
set -euo pipefail

VG_TAG=setup
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

PACKAGES=(
	# DPDK 22.11 (Debian) and the PMDs the daemon, the rig and the benches use.
	dpdk dpdk-dev libdpdk-dev
	librte-net-tap23 librte-net-null23 librte-net-pcap23 librte-net-ring23 librte-mempool-ring23
	# Building: the linker, bindgen (clang/libclang), pkg-config, protoc.
	build-essential clang libclang-dev pkg-config protobuf-compiler ca-certificates
	# The rig and the demo: ip/netns, setsid/mount, curl, socat, backends.
	iproute2 util-linux procps curl socat python3
	# The exception-path tests: the gateway's kernel pings through it.
	iputils-ping
	# traceroute through the gateway (tests/e2e.rs): TCP SYN probes (-T).
	traceroute
	# Jumbo frames over veths (tests/jumbo.rs): offloads off, so that every
	# frame on the wire is a real, checksummed frame of at most the MTU.
	ethtool
	# The Python gRPC client test: the venv setup.sh creates (pip from PyPI).
	python3-venv
	# Route announcement tests (tests/announce.rs): the routing daemons, which
	# the tests run in their own namespaces with their own sockets, on
	# docs/examples' configurations (a system instance does not interfere).
	frr bird2
	# Benchmarks: callgrind instruction counts and the report's plot.
	valgrind python3-matplotlib
)

# The Python gRPC client test's toolchain, pinned (pip, into PY_VENV).
# Debian bookworm's python3-grpc-tools 1.14.1 cannot compile services.proto
# (its protoc 3.6 predates proto3 'optional'), hence PyPI.
PY_VENV=${VIPGATE_PYTHON_VENV:-/opt/vipgate/python}
PY_REQUIREMENTS=(grpcio==1.68.1 grpcio-tools==1.68.1 protobuf==5.29.6)

HP_TARGET=${VIPGATE_HUGEPAGES_TARGET:-512}
HP_MIN_FREE=${VIPGATE_HUGEPAGES_MIN_FREE:-256}
HP_SYS=/sys/kernel/mm/hugepages/hugepages-2048kB
HP_MOUNT=/dev/hugepages

no_arguments "$@"

require_root

# --- 1. Debian packages ------------------------------------------------------
install_packages() {
	local missing=() p
	if [[ ${VIPGATE_SKIP_PACKAGES:-0} = 1 ]]; then
		say "packages: skipped (VIPGATE_SKIP_PACKAGES=1)"
		return
	fi
	command -v dpkg-query >/dev/null || die "dpkg-query not found: this script targets Debian bookworm"
	for p in "${PACKAGES[@]}"; do
		if [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null) != ii* ]]; then
			missing+=("$p")
		fi
	done
	if ((${#missing[@]} == 0)); then
		say "packages: all ${#PACKAGES[@]} present"
		return
	fi
	say "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q </dev/null || die "apt-get update failed"
	apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null ||
		die "apt-get install failed for: ${missing[*]}"
}

# --- 2. Rust toolchain -------------------------------------------------------
check_rust() {
	local need have
	add_cargo_to_path
	if ! command -v cargo >/dev/null 2>&1; then
		die "cargo not found. Install Rust for root first (https://rustup.rs: curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y) and make sure cargo is on PATH, then run this again."
	fi
	need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$VG_ROOT/Cargo.toml" | head -n1)
	have=$(rustc --version | awk '{print $2}')
	say "rust: $(cargo --version) / rustc $have${need:+ (workspace needs >= $need)}"
	if [[ -n $need ]] && [[ $(printf '%s\n%s\n' "$need" "${have%%-*}" | sort -V | head -n1) != "$need" ]]; then
		die "rustc $have is older than the workspace's rust-version $need: run 'rustup update stable'"
	fi
	if cargo nextest --version >/dev/null 2>&1; then
		say "rust: $(cargo nextest --version 2>/dev/null | head -n1)"
	else
		say "installing: cargo-nextest (cargo install cargo-nextest --locked)"
		cargo install cargo-nextest --locked </dev/null || die "cargo install cargo-nextest failed"
	fi
	# scripts/test.sh checks formatting and lints.
	local component
	for component in rustfmt clippy; do
		if cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
			say "rust: $(cargo "${component/rustfmt/fmt}" --version 2>/dev/null | head -n1)"
		elif command -v rustup >/dev/null 2>&1; then
			say "installing: $component (rustup component add $component)"
			rustup component add "$component" </dev/null || die "rustup component add $component failed"
		else
			die "cargo ${component/rustfmt/fmt} is missing and there is no rustup to add it: install the $component component of the toolchain"
		fi
	done
}

# --- 2b. Python venv for the gRPC client test -------------------------------
python_venv_ok() {
	local want have
	[[ -x $PY_VENV/bin/python3 ]] || return 1
	for want in "${PY_REQUIREMENTS[@]}"; do
		have=$("$PY_VENV/bin/python3" -m pip show --disable-pip-version-check "${want%%==*}" 2>/dev/null | sed -n 's/^Version: //p')
		[[ $have = "${want#*==}" ]] || return 1
	done
	"$PY_VENV/bin/python3" -c 'import grpc, grpc_tools.protoc, google.protobuf' 2>/dev/null
}

setup_python_venv() {
	if [[ ${VIPGATE_SKIP_PACKAGES:-0} = 1 ]]; then
		say "python venv: skipped (VIPGATE_SKIP_PACKAGES=1)"
		return
	fi
	if python_venv_ok; then
		say "python venv: $PY_VENV has ${PY_REQUIREMENTS[*]}"
		return
	fi
	if [[ ! -x $PY_VENV/bin/python3 ]]; then
		say "python venv: creating $PY_VENV (/usr/bin/python3 -m venv)"
		/usr/bin/python3 -m venv "$PY_VENV" || die "cannot create the venv $PY_VENV (is python3-venv installed?)"
	fi
	say "installing (pip, into $PY_VENV): ${PY_REQUIREMENTS[*]}"
	"$PY_VENV/bin/python3" -m pip install -q --disable-pip-version-check "${PY_REQUIREMENTS[@]}" </dev/null ||
		die "pip install failed for: ${PY_REQUIREMENTS[*]} (into $PY_VENV)"
	python_venv_ok || die "$PY_VENV still lacks a working ${PY_REQUIREMENTS[*]}"
}

# --- 3. Kernel features the rig needs ---------------------------------------
check_kernel() {
	local probe
	if [[ ! -c /dev/net/tun ]]; then
		say "kernel: /dev/net/tun missing, loading the tun module"
		modprobe tun 2>/dev/null || true
		[[ -c /dev/net/tun ]] || die "/dev/net/tun is missing and 'modprobe tun' did not create it: net_tap needs it"
	fi
	probe=vgsetup$$
	if ! ip netns add "$probe" 2>/dev/null; then
		die "cannot create network namespaces ('ip netns add' failed): the test rig needs them"
	fi
	ip netns del "$probe"
	say "kernel: /dev/net/tun and network namespaces available"
	if pkg-config --exists libdpdk 2>/dev/null; then
		say "dpdk: libdpdk $(pkg-config --modversion libdpdk) ($(command -v dpdk-testpmd || echo 'no dpdk-testpmd'))"
	else
		die "pkg-config cannot find libdpdk (is libdpdk-dev installed?)"
	fi
}

# --- 4. Hugepages ------------------------------------------------------------
HP_DECISION=0
HP_REASON=""

hugepages_mounted() {
	awk -v m="$HP_MOUNT" '$2 == m && $3 == "hugetlbfs" { found = 1 } END { exit !found }' /proc/mounts
}

setup_hugepages() {
	local total free
	if [[ ${VIPGATE_HUGEPAGES:-} = 0 ]]; then
		HP_REASON="disabled by VIPGATE_HUGEPAGES=0"
		say "hugepages: $HP_REASON; DPDK will run with --no-huge"
		return
	fi
	if [[ ! -d $HP_SYS ]]; then
		HP_REASON="the kernel has no 2 MiB hugepages ($HP_SYS missing)"
		say "hugepages: $HP_REASON; falling back to --no-huge"
		return
	fi
	if hugepages_mounted; then
		say "hugepages: hugetlbfs already mounted on $HP_MOUNT"
	else
		say "hugepages: mounting hugetlbfs on $HP_MOUNT"
		mkdir -p "$HP_MOUNT"
		if ! mount -t hugetlbfs -o pagesize=2M nodev "$HP_MOUNT"; then
			HP_REASON="cannot mount hugetlbfs on $HP_MOUNT"
			say "hugepages: $HP_REASON; falling back to --no-huge"
			return
		fi
	fi
	total=$(<"$HP_SYS/nr_hugepages")
	if ((total >= HP_TARGET)); then
		say "hugepages: $total x 2 MiB already reserved (target $HP_TARGET)"
	else
		say "hugepages: reserving $HP_TARGET x 2 MiB (had $total)"
		if ! echo "$HP_TARGET" >"$HP_SYS/nr_hugepages" 2>/dev/null; then
			warn "cannot write $HP_SYS/nr_hugepages (read-only /sys? container?)"
		fi
		total=$(<"$HP_SYS/nr_hugepages")
		((total >= HP_TARGET)) || warn "the kernel reserved only $total of $HP_TARGET pages (memory fragmented or short)"
	fi
	free=$(<"$HP_SYS/free_hugepages")
	say "hugepages: $free free of $total reserved (need $HP_MIN_FREE free)"
	if ((free >= HP_MIN_FREE)); then
		HP_DECISION=1
		HP_REASON="$free free 2 MiB pages on $HP_MOUNT"
	else
		HP_REASON="only $free free 2 MiB pages (need $HP_MIN_FREE)"
		say "hugepages: $HP_REASON; falling back to --no-huge"
	fi
}

write_env() {
	local total=0 free=0 tmp
	if [[ -d $HP_SYS ]]; then
		total=$(<"$HP_SYS/nr_hugepages")
		free=$(<"$HP_SYS/free_hugepages")
	fi
	mkdir -p "$VG_ENV_DIR"
	tmp=$(mktemp "$VG_ENV_DIR/.hugepages.env.XXXXXX")
	cat >"$tmp" <<EOF
# Written by scripts/setup.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); sourced by demo.sh and test.sh.
# VIPGATE_HUGEPAGES=1: run DPDK on hugepages; 0: run it with --no-huge.
VIPGATE_HUGEPAGES=$HP_DECISION
VIPGATE_HUGEPAGES_REASON='${HP_REASON//\'/}'
VIPGATE_HUGEPAGES_MOUNT=$HP_MOUNT
VIPGATE_HUGEPAGES_TOTAL=$total
VIPGATE_HUGEPAGES_FREE=$free
EOF
	mv -f "$tmp" "$VG_HUGEPAGES_ENV"
	say "hugepages: decision VIPGATE_HUGEPAGES=$HP_DECISION ($HP_REASON), written to $VG_HUGEPAGES_ENV"
}

install_packages
check_rust
setup_python_venv
check_kernel
setup_hugepages
if [[ ${VIPGATE_SKIP_K8S:-0} = 1 ]]; then
	say "kubernetes test binaries: skipped (VIPGATE_SKIP_K8S=1)"
else
	"$VG_SCRIPTS_DIR/k8s-build.sh" || die "scripts/k8s-build.sh failed: the Kubernetes tests need kube-apiserver and etcd"
fi
write_env
say "done"
echo "VIPGATE_HUGEPAGES=$HP_DECISION"
