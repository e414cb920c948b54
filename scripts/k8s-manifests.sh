#!/usr/bin/env bash
# Renders the vipgate-k8s Helm chart into plain manifests, or checks that the
# committed ones are current.
#
#   scripts/k8s-manifests.sh           # writes controlplane/k8s/deploy/vipgate-k8s.yaml
#   scripts/k8s-manifests.sh --check   # helm lint, and fails if that file is stale
#
# The chart: controlplane/k8s/chart/vipgate-k8s. Its CRDs are generated
# (vipgate-k8s crds; a unit test of vipgate-k8s checks that the chart's copy
# is current). Helm is built once from its Go module (helm.sh/helm/v4 at
# HELM_VERSION, below) into $VIPGATE_CACHE/helm/<version>/ (2 to 5 minutes
# cold; the Go caches are shared with scripts/k8s-build.sh), since the
# machines have Go but no Helm package.
#
# Environment:
#   VIPGATE_CACHE=/var/cache/vipgate    the cache root
#   VIPGATE_GO=go                       the Go command (else /usr/local/go/bin/go)
set -euo pipefail

HELM_VERSION=v4.3.2

VG_TAG=k8s-manifests
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

CHECK=0
case ${1:-} in
"") ;;
--check) CHECK=1 ;;
-h | --help)
	usage
	exit 0
	;;
*) die "unknown argument: $1 (see scripts/k8s-manifests.sh --help)" ;;
esac

CACHE=${VIPGATE_CACHE:-/var/cache/vipgate}
HELM=$CACHE/helm/$HELM_VERSION/helm
CHART=$VG_ROOT/controlplane/k8s/chart/vipgate-k8s
OUT=$VG_ROOT/controlplane/k8s/deploy/vipgate-k8s.yaml

if [[ -x $HELM ]] && "$HELM" version --short 2>/dev/null | grep -q "^${HELM_VERSION%.*}"; then
	say "helm: $HELM"
else
	GO=${VIPGATE_GO:-}
	if [[ -z $GO ]]; then
		if command -v go >/dev/null; then GO=go; elif [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go; fi
	fi
	[[ -n $GO ]] || die "no Go toolchain to build helm: install Go or set VIPGATE_GO"
	say "building helm $HELM_VERSION from its Go module into $(dirname "$HELM") (once)"
	mkdir -p "$(dirname "$HELM")"
	GOMODCACHE=$CACHE/k8s/go/mod GOCACHE=$CACHE/k8s/go/build GOBIN=$(dirname "$HELM") \
		"$GO" install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" || die "go install helm failed"
fi

render() {
	echo "# Rendered from controlplane/k8s/chart/vipgate-k8s by scripts/k8s-manifests.sh; do not edit."
	echo "# Set the cluster's name (CHANGE-ME below) and the image before applying."
	"$HELM" template vipgate-k8s "$CHART" --namespace vipgate-system --include-crds --set clusterName=CHANGE-ME
}

if ((CHECK)); then
	say "helm lint $CHART"
	"$HELM" lint "$CHART" --set clusterName=ci
	if ! diff -u "$OUT" <(render); then
		die "$OUT is stale: run scripts/k8s-manifests.sh"
	fi
	say "$OUT is current"
else
	mkdir -p "$(dirname "$OUT")"
	render >"$OUT"
	say "wrote $OUT"
fi
