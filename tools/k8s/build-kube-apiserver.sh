#!/usr/bin/env bash
# Build kube-apiserver from the published k8s.io/kubernetes Go module into a cache outside the
# clone (reused between runs), then drop the Go build cache. Prints the binary's path.
# The module zip has no staging/ tree, so each staging replace points at the published module.
set -euo pipefail
VERSION=${KUBE_VERSION:-v1.34.4}
CACHE=${KVINDEX_CACHE:-$HOME/.cache/kvindex}
OUT=$CACHE/kube-apiserver-$VERSION
if [ -x "$OUT" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE"
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod GOCACHE=$work/gocache GOTOOLCHAIN=local
src=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
cp -r "$src" "$work/k8s" && chmod -R u+w "$work/k8s"
cd "$work/k8s"
rm -f go.work go.work.sum
staging=${VERSION/#v1./v0.}
sed -i -E "s#^(\s*k8s.io/[a-z0-9-]+) => ./staging/src/k8s.io/[a-z0-9-]+#\1 => \1 $staging#" go.mod
go build -trimpath -o "$OUT.tmp" ./cmd/kube-apiserver >&2
mv "$OUT.tmp" "$OUT"
echo "$OUT"
