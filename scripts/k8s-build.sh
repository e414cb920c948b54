#!/usr/bin/env bash
# Build, once, the control plane the Kubernetes integration tests run against:
# kube-apiserver and etcd, from Go modules, into a cache outside the repository.
#
#   scripts/k8s-build.sh
#
# Kubernetes: k8s.io/kubernetes at KUBE_VERSION (below). kubectl 1.32 is what
# the machines have; 1.33 is within kubectl's supported skew (one minor).
# k8s.io/kubernetes cannot be 'go install'ed (its go.mod replaces the k8s.io/*
# staging modules by directories), so the script writes a throwaway module
# that requires it and pins each staging module to v0.<minor>.<patch>.
#
# Datastore: etcd, built from go.etcd.io/etcd/server/v3 at the version that
# Kubernetes' own go.mod requires (its integration tests run that server), in
# the same module, so one dependency graph serves both. Not Debian's
# etcd-server: it is 3.4.23, older than the 3.5 line Kubernetes 1.33 is built
# and tested against (3.4 was not tried). Not kine over SQLite: etcd builds
# (in 2 minutes), and it is the datastore real clusters use.
#
# Output: $VIPGATE_CACHE/k8s/<KUBE_VERSION>/bin/{kube-apiserver,etcd}, and
# the Go module and build caches under $VIPGATE_CACHE/k8s/go (so a second
# build, say of another version, reuses them: 3 GiB in all). A cold build
# downloads about 700 MB of modules and took 12 minutes on 2 busy CPUs (a
# forced rebuild with warm caches, 10 s); when the binaries are there and report
# the right versions, the script says so and exits at once.
#
# Environment:
#   VIPGATE_CACHE=/var/cache/vipgate    the cache root
#   VIPGATE_GO=go                       the Go command (else /usr/local/go/bin/go)
#   VIPGATE_K8S_REBUILD=1               build even if the binaries are there
set -euo pipefail

KUBE_VERSION=v1.33.13

VG_TAG=k8s-build
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

no_arguments "$@"

CACHE=${VIPGATE_CACHE:-/var/cache/vipgate}
K8S_CACHE=$CACHE/k8s
OUT=$K8S_CACHE/$KUBE_VERSION
BIN=$OUT/bin
APISERVER=$BIN/kube-apiserver
ETCD=$BIN/etcd

# v1.33.13 -> v0.33.13, the version of the staging modules of that release.
[[ $KUBE_VERSION =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || die "KUBE_VERSION $KUBE_VERSION is not v1.<minor>.<patch>"
KUBE_MINOR=${BASH_REMATCH[1]}
STAGING_VERSION=v0.$KUBE_MINOR.${BASH_REMATCH[2]}

# The version etcd reports, written by the build next to the binaries.
ETCD_VERSION_FILE=$OUT/etcd.version

built_ok() {
	[[ -x $APISERVER && -x $ETCD && -r $ETCD_VERSION_FILE ]] || return 1
	local want_etcd
	want_etcd=$(<"$ETCD_VERSION_FILE")
	[[ $("$APISERVER" --version 2>/dev/null) == "Kubernetes $KUBE_VERSION" ]] || return 1
	"$ETCD" --version 2>/dev/null | grep -qx "etcd Version: ${want_etcd#v}" || return 1
}

if [[ -z ${VIPGATE_K8S_REBUILD:-} ]] && built_ok; then
	say "kube-apiserver $KUBE_VERSION and etcd $(<"$ETCD_VERSION_FILE") already built in $BIN"
	exit 0
fi

GO=${VIPGATE_GO:-}
if [[ -z $GO ]]; then
	if command -v go >/dev/null 2>&1; then
		GO=go
	elif [[ -x /usr/local/go/bin/go ]]; then
		GO=/usr/local/go/bin/go
	else
		die "no Go toolchain: install Go (1.24 or newer) or set VIPGATE_GO"
	fi
fi

export GOMODCACHE=$K8S_CACHE/go/mod
export GOCACHE=$K8S_CACHE/go/build
# Module cache files writable, so that 'rm -rf' of the cache just works.
export GOFLAGS=-modcacherw
export CGO_ENABLED=0
# Kubernetes 1.33 needs Go 1.24; a newer local Go builds it.
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
export GO111MODULE=on

start=$(now_s)
say "building kube-apiserver $KUBE_VERSION and etcd into $BIN ($("$GO" version))"

# The throwaway module; rewritten each time (it is small).
MOD=$OUT/module
rm -rf "$MOD"
mkdir -p "$MOD" "$BIN"
cd "$MOD"

say "fetching k8s.io/kubernetes $KUBE_VERSION's go.mod"
kube_gomod=$("$GO" mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
[[ -r $kube_gomod ]] || die "could not download k8s.io/kubernetes@$KUBE_VERSION"

# The staging modules: those its go.mod replaces by ./staging/src/... .
mapfile -t staging < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }' "$kube_gomod")
((${#staging[@]})) || die "found no staging modules in $kube_gomod"
# The etcd server its go.mod requires.
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$kube_gomod")
[[ -n $etcd_version ]] || die "k8s.io/kubernetes@$KUBE_VERSION's go.mod does not name go.etcd.io/etcd/server/v3"
say "${#staging[@]} staging modules at $STAGING_VERSION; etcd $etcd_version"

{
	printf 'module vipgate.invalid/k8s-testenv\n\ngo 1.24.0\n\n'
	printf 'require (\n\tk8s.io/kubernetes %s\n\tgo.etcd.io/etcd/server/v3 %s\n)\n\n' "$KUBE_VERSION" "$etcd_version"
	printf 'replace (\n'
	for m in "${staging[@]}"; do
		printf '\t%s => %s %s\n' "$m" "$m" "$STAGING_VERSION"
	done
	printf ')\n'
} >go.mod
# Import both main packages so that 'go mod tidy' keeps what they need.
cat >tools.go <<'EOF'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
EOF

say "resolving modules (go mod tidy; the first time downloads ~700 MB)"
t=$(now_s)
nice -n 10 "$GO" mod tidy
say "modules resolved in $(elapsed_s "$t") s"

# What Kubernetes' own build stamps (hack/lib/version.sh), so that
# 'kube-apiserver --version' and /version tell the truth.
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION"
	ldflags+=" -X $pkg.gitMajor=1 -X $pkg.gitMinor=$KUBE_MINOR"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

say "compiling etcd (nice -n 10)"
t=$(now_s)
nice -n 10 "$GO" build -trimpath -ldflags "-s -w" -o "$ETCD.tmp" go.etcd.io/etcd/server/v3
mv -f "$ETCD.tmp" "$ETCD"
say "etcd compiled in $(elapsed_s "$t") s"

say "compiling kube-apiserver (nice -n 10)"
t=$(now_s)
nice -n 10 "$GO" build -trimpath -ldflags "$ldflags" -o "$APISERVER.tmp" k8s.io/kubernetes/cmd/kube-apiserver
mv -f "$APISERVER.tmp" "$APISERVER"
say "kube-apiserver compiled in $(elapsed_s "$t") s"

printf '%s\n' "$etcd_version" >"$ETCD_VERSION_FILE"
built_ok || die "the built binaries do not report $KUBE_VERSION and etcd $etcd_version: $("$APISERVER" --version 2>&1); $("$ETCD" --version 2>&1 | head -1)"
say "built kube-apiserver $KUBE_VERSION and etcd $etcd_version in $(elapsed_s "$start") s ($(du -sh "$K8S_CACHE" | cut -f1) in $K8S_CACHE)"
