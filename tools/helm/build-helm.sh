#!/usr/bin/env bash
# Build helm from its Go module into a cache outside the clone (reused between runs), then drop
# the Go build cache. Prints the binary's path.
set -euo pipefail
VERSION=${HELM_VERSION:-v4.3.2}
CACHE=${KVINDEX_CACHE:-$HOME/.cache/kvindex}
OUT=$CACHE/helm-$VERSION
if [ -x "$OUT" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE"
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod GOCACHE=$work/gocache GOBIN=$work/bin GOTOOLCHAIN=local
major=${VERSION%%.*}
go install -trimpath "helm.sh/helm/$major/cmd/helm@$VERSION" >&2
mv "$work/bin/helm" "$OUT"
echo "$OUT"
