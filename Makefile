# fusioncache-rs: the hybrid cache library, its operator, and their delivery.
#
#   make demo                     three nodes on the embedded (in-memory) backplane, no servers needed
#   make demo BACKPLANE=redis://HOST:PORT              one OS process per node, Redis L2 + pub/sub
#   make demo BACKPLANE=nats://HOST:PORT [L2=redis://HOST:PORT]   NATS backplane (+ Redis L2)
#   make test                     installs what tests need, then every check CI runs
#   make operator-e2e             the operator binary against the API-server double and a real redis-server
#   make features                 the library alone: no optional feature, then each transport alone
#   make msrv                     fails when a locked dependency needs a newer Rust than rust-version
#   make bench                    benchmarks, printed as tables with ratios against raw baselines
#   make bench-redis bench-nats RUNS=2 WAIT_QUIET=900   the transport benchmarks, twice, each on a quiet machine
#   make bench-peers RUNS=2 WAIT_QUIET=300   fusioncache against sisa-caching-hybrid and multi-tier-cache (not in `make bench`)
#   make coherence                N node processes under faults: stale reads, lost writes, convergence (not in CI)
#                                 COHERENCE_ARGS="--redis-url redis://… --nats-url nats://…" measures your servers
#   make crd                      regenerates manifests/crd.yaml (and the chart's copy) from the Rust types
#   make install-manifest         regenerates manifests/install.yaml from the chart

CARGO ?= cargo
BACKPLANE ?=
L2 ?=
COHERENCE_ARGS ?=
export CARGO_TERM_COLOR ?= never

.PHONY: demo test deps fmt-check clippy unit features msrv docs chart operator-e2e bench bench-engine bench-redis bench-nats bench-peers coherence crd install-manifest fuzz

demo:
	$(CARGO) run -q -p fusioncache --example demo -- $(BACKPLANE) $(L2)

# The chart tools too: the operator's namespace-scoped e2e test renders the chart with helm.
deps:
	@bash scripts/install-test-deps.sh
	@bash scripts/install-chart-tools.sh

test: deps fmt-check clippy unit features msrv docs chart

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace --no-fail-fast

# The library crate as a user with `default-features = false` builds it: with no optional feature (the core
# builds with neither transport), then with each transport alone.
features:
	$(CARGO) test -p fusioncache --no-default-features
	$(CARGO) test -p fusioncache --no-default-features --features redis
	$(CARGO) test -p fusioncache --no-default-features --features nats
	$(CARGO) test -p fusioncache --features metrics --test metrics

# Every locked dependency of a published crate builds with the rust-version it declares (checked from
# `cargo metadata`: one toolchain only here).
msrv:
	python3 scripts/msrv-check.py $(CARGO)

# The docs.rs build: all features, `--cfg docsrs` (feature labels); warnings (broken links) fail.
docs:
	RUSTDOCFLAGS="--cfg docsrs -D warnings" RUSTC_BOOTSTRAP=1 $(CARGO) doc -p fusioncache --all-features --no-deps

chart:
	bash scripts/chart-check.sh

operator-e2e: deps
	$(CARGO) test -p fusioncache-operator --test e2e --test acl_redis

bench: bench-engine bench-redis bench-nats

# The engine twice: as most users build it, then with the metrics feature on and no recorder installed.
bench-engine:
	$(CARGO) bench -p fusioncache --bench engine
	$(CARGO) bench -p fusioncache --bench engine --features metrics

# The transport benchmarks pin the server(s) and the bench to different cores (see the README); each run
# prints one markdown table. RUNS=2 runs it twice; WAIT_QUIET=SECONDS first waits (up to that long, before
# each run) for the 1-minute load average to fall to 0.8. On a shared machine, e.g.
# `make bench-redis bench-nats RUNS=2 WAIT_QUIET=900`.
RUNS ?= 1
WAIT_QUIET ?=
TRANSPORT_BENCH = ./target/release/transport-bench
.PHONY: bench-transport-build profile-e2e

bench-redis bench-nats: bench-transport-build
	@for i in $$(seq $(RUNS)); do \
	  $(TRANSPORT_BENCH) $(@:bench-%=%) $(if $(WAIT_QUIET),--wait-quiet $(WAIT_QUIET)) || exit 1; \
	done

bench-transport-build:
	$(CARGO) build --release -p fusioncache-integration-tests --bin transport-bench

# fusioncache against its closest Rust peers (sisa-caching-hybrid, multi-tier-cache), one harness, one private
# redis-server: benches/peers, a crate outside the workspace (`make test` never builds it), with its own target
# dir. RUNS and WAIT_QUIET as above; BENCH_LOCK prefixes the build and each run, e.g.
# `BENCH_LOCK="flock /tmp/bench.lock"` on a machine shared with other builds.
BENCH_LOCK ?=
PEERS_TARGET ?= target/peers

bench-peers:
	$(BENCH_LOCK) $(CARGO) build --release --manifest-path benches/peers/Cargo.toml --target-dir $(PEERS_TARGET)
	@for i in $$(seq $(RUNS)); do \
	  $(BENCH_LOCK) $(PEERS_TARGET)/release/peers-bench $(if $(WAIT_QUIET),--wait-quiet $(WAIT_QUIET)) || exit 1; \
	done

# Where the end-to-end throughput's time goes: perf (software cpu-clock event, DWARF call graphs) over the
# timed fusioncache rounds only (TRANSPORT=redis|nats); the profile stays in target/perf-e2e.data.
TRANSPORT ?= redis
profile-e2e: bench-transport-build
	rm -f target/perf-e2e.ctl && mkfifo target/perf-e2e.ctl
	TRANSPORT_BENCH_PERF_CTL=target/perf-e2e.ctl perf record -q -e cpu-clock -F 1999 \
	  --call-graph dwarf,16384 -D -1 --control fifo:target/perf-e2e.ctl -o target/perf-e2e.data \
	  $(TRANSPORT_BENCH) $(TRANSPORT) --only-e2e
	rm -f target/perf-e2e.ctl
	perf report -i target/perf-e2e.data --no-children --sort dso,sym --percent-limit 0.7 --stdio -g none \
	  2>/dev/null | grep -v '^$$' | head -60

# The coherence checker: every scenario on loopback servers (about 5 minutes), or yours with COHERENCE_ARGS.
coherence:
	$(CARGO) build --release -p fusioncache-coherence
	./target/release/fusioncache-coherence $(COHERENCE_ARGS)

# Coverage-guided fuzzing of the message decoder (needs cargo-fuzz: `cargo install cargo-fuzz`).
fuzz:
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode_message -- -max_total_time=$${FUZZ_SECONDS:-60}

crd:
	$(CARGO) run -q -p fusioncache-operator -- crd > manifests/crd.yaml
	cp manifests/crd.yaml charts/fusioncache-operator/crds/fusioncaches.fusioncache.io.yaml

install-manifest:
	bash scripts/chart-check.sh --write-install
