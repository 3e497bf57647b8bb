#!/usr/bin/env bash
# Build promtool from the published github.com/prometheus/prometheus Go module into a cache
# outside the clone (reused between runs). Prints the binary's path. The Go build cache lives
# in the cache too until a build succeeds, so a build cut short by a time limit resumes.
# Built inside the downloaded module (not `go install mod@version`), so its own go.mod, replace
# and exclude directives apply.
set -euo pipefail
VERSION=${PROMETHEUS_VERSION:-v0.316.0}
CACHE=${KVINDEX_CACHE:-$HOME/.cache/kvindex}
OUT=$CACHE/promtool-$VERSION
if [ -x "$OUT" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE"
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod GOCACHE=$CACHE/promtool-gocache GOTOOLCHAIN=local
src=$(cd "$work" && go mod download -json "github.com/prometheus/prometheus@$VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
cp -r "$src" "$work/prom" && chmod -R u+w "$work/prom"
cd "$work/prom"
rm -f go.work go.work.sum
# remove_all_sd: leave out the service-discovery plugins (cloud SDKs) that promtool does not
# need to check rules; it cuts the build from most of the module graph.
go build -trimpath -tags remove_all_sd -o "$OUT.tmp" ./cmd/promtool >&2
mv "$OUT.tmp" "$OUT"
rm -rf "$GOCACHE"
echo "$OUT"
