#!/usr/bin/env bash
# Runs every vipgate test, as CI does.
#
#   scripts/test.sh [NEXTEST ARGS...]     e.g. scripts/test.sh -E 'test(e2e)'
#   scripts/test.sh --unit [NEXTEST ARGS...]
#
# Steps: setup.sh (packages, toolchain, hugepages); client-without-dpdk (cargo
# tree: the client's package, vipgate-controlplane, depends on neither
# vipgate-dpdk nor vipgate-ffi, so vipgatectl builds without DPDK); cargo
# build of every target in the workspace (the e2e tests run
# target/debug/vipgated);
# cargo fmt --check and cargo clippy -D warnings; cargo nextest run --workspace --no-fail-fast; a smoke run of the
# packet-rate benchmark (scripts/bench-dataplane.sh --smoke) and of the
# publication benchmark (benches/publish.rs --smoke); each fuzz target
# for 20 s (scripts/fuzz.sh --time 20; a crash fails the run); cargo test
# --doc (when the workspace has doc tests); cargo doc --workspace --no-deps
# with every rustdoc warning an error (a broken or private intra-doc link
# fails the run); then a sweep for anything the tests left behind.
#
# The tests get VIPGATE_DSR_DECAP=kernel|userspace (kernel when the kernel
# has IPIP), VIPGATE_HUGEPAGES=1|0 from setup.sh (an explicit
# VIPGATE_HUGEPAGES=0 in the environment forces --no-huge) and
# VIPGATE_TEST_RUN_ID, which marks every process and rig of this run: the
# sweep stops those processes, tears those rigs down, and removes their DPDK
# runtime directories and hugepage files. It runs on any exit, including
# SIGINT/SIGTERM. Leftovers after tests fail the run (a test must clean up
# after itself) unless VIPGATE_ALLOW_LEFTOVERS=1.
#
# --unit: the checks that need no root, for a developer's own account: cargo
# fmt --check, client-without-dpdk, cargo clippy -D warnings, and cargo
# nextest run of the tests that need neither root, hugepages nor EAL (step
# unit: the packet core's, the control plane's, the daemon's and the
# Kubernetes controller's; step
# unit-dpdk: vipgate-dpdk's unit tests). No setup.sh: the packages it
# installs (DPDK, libclang, protoc) and cargo-nextest must be there
# already. No sweep: nothing these tests start outlives them.
#
# Non-interactive (reads nothing from stdin); must run as root, except with
# --unit. Exits 0 only if every step passed.
set -euo pipefail

VG_TAG="test"
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

UNIT=0
case ${1:-} in
-h | --help)
	usage
	exit 0
	;;
--unit)
	UNIT=1
	shift
	;;
esac

if ((!UNIT)) && [[ $(id -u) -ne 0 ]]; then
	die "must run as root (it manages hugepages, network namespaces and DPDK); try: sudo $0, or without root: $0 --unit (formatting, lints and the tests that need no root)"
fi
cd "$VG_ROOT"
exec </dev/null

VIPGATE_TEST_RUN_ID=$(date +%Y%m%d%H%M%S)-$$-$RANDOM
export VIPGATE_TEST_RUN_ID
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
NEXTEST_ARGS=("$@")

STEP_NAMES=()
STEP_RESULTS=()
STEP_NOTES=()
FAILED=0
SWEPT=0
CURRENT_STEP=""

record() { # NAME RESULT NOTE
	STEP_NAMES+=("$1")
	STEP_RESULTS+=("$2")
	STEP_NOTES+=("$3")
	[[ $2 != FAIL ]] || FAILED=1
}

# step NAME CMD...: runs CMD (through run_fg, so SIGTERM reaches it) and
# records PASS or FAIL with its duration.
step() {
	local name=$1 t0 rc=0
	shift
	say "step: $name: $*"
	t0=$(now_s)
	CURRENT_STEP=$name
	run_fg "$@" || rc=$?
	CURRENT_STEP=""
	if ((rc == 0)); then
		record "$name" PASS "$(elapsed_s "$t0")s"
	else
		record "$name" FAIL "exit $rc after $(elapsed_s "$t0")s"
	fi
	return "$rc"
}

# Fails if vipgate-controlplane (the library and vipgatectl) or vipgate-k8s
# depends, with any feature, on the DPDK driver or its bindings: the clients
# must build on a machine without DPDK. Run by `step` in a new session,
# hence exported.
client_without_dpdk() {
	local tree found crate
	for crate in vipgate-controlplane vipgate-k8s; do
		printf '+ cargo tree -p %s -e normal --all-features --prefix none\n' "$crate"
		tree=$(cargo tree -p "$crate" -e normal --all-features --prefix none) || return 2
		found=$(grep -E '^vipgate-(dpdk|ffi) ' <<<"$tree" | sort -u) || true
		if [[ -n $found ]]; then
			printf '%s\n' "$found" >&2
			printf '%s depends on the DPDK crates above: it would need DPDK to build\n' "$crate" >&2
			return 1
		fi
		printf '%s depends on neither vipgate-dpdk nor vipgate-ffi\n' "$crate"
	done
}
export -f client_without_dpdk

# Processes carrying this run's VIPGATE_TEST_RUN_ID. This shell itself is
# not one: /proc/PID/environ shows the environment a process was exec'd with.
marked_pids() {
	local d pid
	for d in /proc/[0-9]*; do
		pid=${d#/proc/}
		[[ $pid = "$$" ]] && continue
		grep -qzxF "VIPGATE_TEST_RUN_ID=$VIPGATE_TEST_RUN_ID" "$d/environ" 2>/dev/null && echo "$pid"
	done
	return 0
}

# Removes what this run's tests left behind; prints each thing it finds.
# Sets LEFTOVERS to how many things it had to remove.
sweep() {
	local pids=() pid fd link prefixes=() st p cmdline
	LEFTOVERS=0
	mapfile -t pids < <(marked_pids)
	for pid in "${pids[@]}"; do
		cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-120) || continue
		[[ -n $cmdline ]] || continue
		warn "leftover process $pid: $cmdline"
		LEFTOVERS=$((LEFTOVERS + 1))
		# EAL keeps files open in its runtime directory: remember the prefix.
		for fd in /proc/"$pid"/fd/*; do
			link=$(readlink "$fd" 2>/dev/null) || continue
			if [[ $link =~ ^/(var/)?run/dpdk/([^/]+)/ ]]; then
				prefixes+=("${BASH_REMATCH[2]}")
			fi
		done
	done
	stop_pids 10 "${pids[@]}"
	for st in "$VG_RIG_STATE_ROOT"/*/owner; do
		[[ -f $st && $(<"$st") = "$VIPGATE_TEST_RUN_ID" ]] || continue
		p=$(basename -- "$(dirname -- "$st")")
		warn "leftover rig '$p'"
		LEFTOVERS=$((LEFTOVERS + 1))
		"$VG_SCRIPTS_DIR/rig.sh" down --prefix "$p" || warn "rig.sh down --prefix $p failed"
		prefixes+=("$p")
	done
	for p in "${prefixes[@]}"; do
		if [[ -d /var/run/dpdk/$p ]]; then
			warn "leftover DPDK runtime directory /var/run/dpdk/$p"
		fi
		remove_dpdk_files "$p"
		if [[ -d ${TMPDIR:-/tmp}/vipgate-$p ]]; then
			rm -rf "${TMPDIR:-/tmp}/vipgate-$p"
		fi
	done
	rmdir /var/run/dpdk 2>/dev/null || true
}

summary() {
	local i
	if ((UNIT)); then
		say "summary (run $VIPGATE_TEST_RUN_ID, --unit)"
	else
		say "summary (run $VIPGATE_TEST_RUN_ID, VIPGATE_HUGEPAGES=${VIPGATE_HUGEPAGES:-?})"
	fi
	for i in "${!STEP_NAMES[@]}"; do
		printf '    %-19s %-5s %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_NOTES[$i]}"
	done
}

on_exit() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	stop_fg
	if [[ -n $CURRENT_STEP ]]; then
		record "$CURRENT_STEP" FAIL "interrupted (exit $rc)"
	fi
	if ((!SWEPT)); then
		say "interrupted or stopped early (exit $rc): sweeping what the tests left behind"
		sweep
		if ((LEFTOVERS)); then
			record sweep WARN "$LEFTOVERS leftover(s) removed"
		else
			record sweep PASS "nothing left behind"
		fi
	fi
	summary
	if ((rc == 0 && FAILED)); then
		rc=1
	fi
	if ((rc == 0)); then
		say "PASSED"
	else
		printf '==> test: FAILED (exit %s)\n' "$rc" >&2
	fi
	exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The tests that need neither root, hugepages nor EAL: every test of the
# packet core, the control plane (its API on sockets and loopback TCP in
# temporary directories, health probes on loopback) and the daemon; and
# vipgate-dpdk's unit tests (--lib), a run of their own: its integration
# tests start EAL, as do vipgate-ffi's, and the root package's need root.
# A filter in NEXTEST ARGS narrows each run, and may leave one with no test.
UNIT_TESTS=(-p vipgate-dataplane -p vipgate-controlplane -p vipgate-daemon -p vipgate-k8s --no-tests=warn)
UNIT_DPDK_TESTS=(-p vipgate-dpdk --lib --no-tests=warn)

if ((UNIT)); then
	add_cargo_to_path
	say "unit mode (--unit): formatting, lints and the tests that need no root, as $(id -un)"
	step fmt cargo fmt --all --check || true
	step client-without-dpdk bash -c client_without_dpdk || true
	step clippy cargo clippy --workspace --all-targets -- -D warnings || true
	step unit cargo nextest run "${UNIT_TESTS[@]}" --no-fail-fast "${NEXTEST_ARGS[@]}" || true
	step unit-dpdk cargo nextest run "${UNIT_DPDK_TESTS[@]}" --no-fail-fast "${NEXTEST_ARGS[@]}" || true
	# Nothing to sweep: these tests start no vipgated, rig or EAL.
	SWEPT=1
	exit 0
fi

if [[ ${VIPGATE_SKIP_SETUP:-0} = 1 ]]; then
	say "setup skipped (VIPGATE_SKIP_SETUP=1)"
	record setup SKIP "VIPGATE_SKIP_SETUP=1"
else
	step setup "$VG_SCRIPTS_DIR/setup.sh" || exit 1
fi
load_hugepages_env
add_cargo_to_path
say "tests run with VIPGATE_HUGEPAGES=$VIPGATE_HUGEPAGES${VIPGATE_HUGEPAGES_REASON:+ ($VIPGATE_HUGEPAGES_REASON)}"

# DSR backends decapsulate IPIP with the kernel's tunl0 (the set-up
# docs/ops/dsr-backends.md describes). A kernel built without IPIP, that cannot
# load it either, has no tunl0: there the DSR end-to-end tests use
# scripts/backend.py's user-space decapsulator instead, and say so.
if [[ -z ${VIPGATE_DSR_DECAP:-} ]]; then
	if [[ -d /sys/module/ipip ]] || ip link show tunl0 >/dev/null 2>&1 ||
		{ [[ -e /proc/modules ]] && command -v modprobe >/dev/null && modprobe ipip 2>/dev/null; }; then
		VIPGATE_DSR_DECAP=kernel
	else
		VIPGATE_DSR_DECAP=userspace
		warn "this kernel has no IPIP (CONFIG_NET_IPIP) and cannot load modules: the DSR end-to-end tests decapsulate in user space (scripts/backend.py --ipip-decap); the kernel's tunl0 set-up is not exercised here"
	fi
fi
export VIPGATE_DSR_DECAP
say "DSR backends decapsulate with: $VIPGATE_DSR_DECAP (VIPGATE_DSR_DECAP)"

# Cheap, and independent of the build: the client's dependencies.
step client-without-dpdk bash -c client_without_dpdk || true

if step build cargo build --workspace --all-targets; then
	# The code as rustfmt.toml formats it, and clippy with every warning
	# an error: lints fail the run like tests do.
	step fmt cargo fmt --all --check || true
	step clippy cargo clippy --workspace --all-targets -- -D warnings || true
	# The Helm chart lints, and the plain manifests are rendered from it.
	step k8s-manifests "$VG_SCRIPTS_DIR/k8s-manifests.sh" --check || true
	step nextest cargo nextest run --workspace --no-fail-fast "${NEXTEST_ARGS[@]}" || true
	# The packet-rate benchmark is a benchmark, not a test: CI only proves
	# it still runs (a few seconds, debug build, nothing written to docs/).
	step bench-smoke "$VG_SCRIPTS_DIR/bench-dataplane.sh" --smoke || true
	# The publication benchmark, small (200 services, 50 calls of each
	# kind), debug build, against the vipgated just built: proves it runs
	# and that every change becomes visible to every worker.
	step publish-smoke cargo bench --profile dev -p vipgate --bench publish -- --smoke || true
	# The fuzz targets, briefly: an instrumented build, then 20 s each from
	# the seed corpora (the long runs are in docs/fuzzing.md).
	step fuzz "$VG_SCRIPTS_DIR/fuzz.sh" --time 20 || true
	# Doc tests: nextest does not run them.
	if grep -rqE '^[[:space:]]*//[/!][[:space:]]*```' --include='*.rs' \
		ffi dataplane controlplane tests/support 2>/dev/null; then
		step doctests cargo test --doc --workspace || true
	else
		record doctests SKIP "no doc tests in the workspace"
	fi
	# The API docs build, and every intra-doc link resolves.
	step docs env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps || true
else
	record fmt SKIP "build failed"
	record clippy SKIP "build failed"
	record k8s-manifests SKIP "build failed"
	record nextest SKIP "build failed"
	record bench-smoke SKIP "build failed"
	record publish-smoke SKIP "build failed"
	record fuzz SKIP "build failed"
	record doctests SKIP "build failed"
	record docs SKIP "build failed"
fi

say "step: sweep: looking for processes, rigs and DPDK files the tests left behind"
sweep
SWEPT=1
if ((LEFTOVERS == 0)); then
	record sweep PASS "nothing left behind"
elif [[ ${VIPGATE_ALLOW_LEFTOVERS:-0} = 1 ]]; then
	record sweep WARN "$LEFTOVERS leftover(s) removed (allowed by VIPGATE_ALLOW_LEFTOVERS=1)"
else
	record sweep FAIL "$LEFTOVERS leftover(s) removed: a test did not clean up after itself"
fi
