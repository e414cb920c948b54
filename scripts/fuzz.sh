#!/usr/bin/env bash
# Runs vipgate's coverage-guided fuzz targets (tests/fuzz: cargo-fuzz,
# libFuzzer).
#
#   scripts/fuzz.sh [--time S] [--sanitizer none|address] [TARGET...] [-- LIBFUZZER ARGS...]
#
# TARGETs: pipeline, config, api, flow_table (default: all, one after the
# other), each run for S seconds (default 60). What each asserts:
# docs/fuzzing.md.
#
# Steps: installs cargo-fuzz when it is missing (cargo install cargo-fuzz
# --locked, from crates.io); picks the toolchain: a rustup nightly when
# there is one, else the default (stable) toolchain with RUSTC_BOOTSTRAP=1,
# since cargo fuzz passes nightly-only flags to rustc; writes the seed
# corpora (tests/fuzz/seeds.py) into tests/fuzz/corpus/TARGET, where the
# corpus also grows (ignored by git); builds the targets (release, debug
# assertions on, no sanitizer unless --sanitizer address: the packet core is
# safe Rust, and a sanitizer halves the rate); runs each target with
# libFuzzer's -max_total_time=S and prints its last status line (execs,
# cov, ft, corpus).
#
# A crash (a failed assertion, a panic, a timeout of 10 s, more than 2 GiB)
# fails the run: the script prints the reproducer's path and the command
# that reruns it, goes on with the other targets, and exits 1. Exits 0 only
# if every target ran its time without a crash.
#
# Environment: VIPGATE_FUZZ_NICE=N runs the builds and fuzzers under nice
# -n N; VIPGATE_FUZZ_TOOLCHAIN=stable uses the stable toolchain (with
# RUSTC_BOOTSTRAP=1) even when there is a nightly.
set -euo pipefail

VG_TAG="fuzz"
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

ALL_TARGETS=(pipeline config api flow_table)
FUZZ_DIR=tests/fuzz
TIME=60
SANITIZER=none
TARGETS=()
EXTRA=()


while (($#)); do
	case $1 in
	-h | --help)
		usage
		exit 0
		;;
	--time)
		[[ ${2:-} =~ ^[0-9]+$ ]] || die "--time needs a number of seconds"
		TIME=$2
		shift 2
		;;
	--sanitizer)
		[[ ${2:-} =~ ^(none|address)$ ]] || die "--sanitizer is none or address"
		SANITIZER=$2
		shift 2
		;;
	--)
		shift
		EXTRA=("$@")
		break
		;;
	-*) die "unknown option: $1 (see scripts/fuzz.sh --help)" ;;
	*)
		[[ " ${ALL_TARGETS[*]} " = *" $1 "* ]] || die "unknown target: $1 (targets: ${ALL_TARGETS[*]})"
		TARGETS+=("$1")
		shift
		;;
	esac
done
((${#TARGETS[@]})) || TARGETS=("${ALL_TARGETS[@]}")

cd "$VG_ROOT"
exec </dev/null
add_cargo_to_path
command -v cargo >/dev/null || die "cargo is not on PATH (see README.md, Requirements)"

if ! cargo fuzz --version >/dev/null 2>&1; then
	say "installing: cargo-fuzz (cargo install cargo-fuzz --locked)"
	cargo install cargo-fuzz --locked || die "cargo install cargo-fuzz failed"
fi
say "$(cargo fuzz --version)"

# cargo fuzz passes -Z flags (sanitizer coverage options) to rustc.
TOOLCHAIN=()
if [[ ${VIPGATE_FUZZ_TOOLCHAIN:-} != stable ]] && command -v rustup >/dev/null &&
	rustup toolchain list | grep -q '^nightly'; then
	TOOLCHAIN=(+nightly)
	say "toolchain: nightly ($(rustc +nightly --version))"
else
	export RUSTC_BOOTSTRAP=1
	say "toolchain: $(rustc --version) with RUSTC_BOOTSTRAP=1"
fi

NICE=()
if [[ -n ${VIPGATE_FUZZ_NICE:-} ]]; then
	NICE=(nice -n "$VIPGATE_FUZZ_NICE")
fi

say "seeds: python3 $FUZZ_DIR/seeds.py $FUZZ_DIR/corpus"
python3 "$FUZZ_DIR/seeds.py" "$FUZZ_DIR/corpus"

BUILD=(cargo "${TOOLCHAIN[@]}" fuzz build --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" --debug-assertions)
say "build: ${BUILD[*]} ${TARGETS[*]}"
for t in "${TARGETS[@]}"; do
	"${NICE[@]}" "${BUILD[@]}" "$t"
done

LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vipgate-fuzz.XXXXXX")
cleanup() { rm -rf -- "$LOG_DIR"; }
trap cleanup EXIT

FAILED=()
REASONS=()
for t in "${TARGETS[@]}"; do
	artifacts=$FUZZ_DIR/artifacts/$t
	mkdir -p "$artifacts" "$FUZZ_DIR/corpus/$t"
	dict=()
	[[ -f $FUZZ_DIR/dicts/$t.dict ]] && dict=(-dict="$FUZZ_DIR/dicts/$t.dict")
	run=(cargo "${TOOLCHAIN[@]}" fuzz run --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" --debug-assertions
		"$t" "$FUZZ_DIR/corpus/$t" -- -max_total_time="$TIME" -timeout=10 -rss_limit_mb=2048
		-print_final_stats=1 "${dict[@]}" "${EXTRA[@]}")
	say "run: $t for ${TIME}s: ${run[*]}"
	log=$LOG_DIR/$t.log
	rc=0
	"${NICE[@]}" "${run[@]}" >"$log" 2>&1 || rc=$?
	# libFuzzer's last status line and final stats.
	grep -E '^#[0-9]+' "$log" | tail -n1 || true
	grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" || true
	if ((rc != 0)); then
		# The assertion or panic, then libFuzzer's report.
		grep -m1 -A2 'panicked at' "$log" >&2 || true
		grep -E '^(==[0-9]+== ERROR|SUMMARY|MS: )' "$log" >&2 || tail -n 40 "$log" >&2
		crash=$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -n1 | sed 's/^Test unit written to //')
		# One line on why, repeated in the summary below, so that a log
		# cut short in the middle still says it.
		why=$(grep -m1 -A1 'panicked at' "$log" | tr '\n' ' ' || true)
		[[ -n $why ]] || why=$(grep -m1 -E '^==[0-9]+== ERROR' "$log" || true)
		[[ -n $why ]] || why="exit status $rc"
		if [[ -n $crash ]]; then
			warn "$t: crash, reproducer: $crash"
			warn "rerun: ${RUSTC_BOOTSTRAP:+RUSTC_BOOTSTRAP=1 }cargo ${TOOLCHAIN[*]:+${TOOLCHAIN[*]} }fuzz run --fuzz-dir $FUZZ_DIR --sanitizer $SANITIZER --debug-assertions $t $crash"
			# A clean clone's run (CI) keeps no files: a small reproducer
			# goes into the log itself (base64 -d recreates it).
			if (($(stat -c %s "$crash") <= 4096)); then
				why+=" reproducer (base64): $(base64 -w0 "$crash")"
			fi
		else
			warn "$t: the fuzzer exited with status $rc and wrote no reproducer (output above)"
		fi
		FAILED+=("$t")
		REASONS+=("$t: $why")
	fi
done

if ((${#FAILED[@]})); then
	for r in "${REASONS[@]}"; do
		warn "$r"
	done
	warn "FAILED: ${FAILED[*]}"
	exit 1
fi
say "PASSED: ${TARGETS[*]}, ${TIME}s each, no crash"
