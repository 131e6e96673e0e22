# Two entry points on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install peer-servers serve test lint typecheck pytest bench-core bench-large bench-http bench-azure bench-client bench-cluster bench-seek bench-follow bench-peers readme-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,azure,bench]'
	touch $(STAMP)

# Azurite (the Azure Storage emulator) and Etsy's StatsD daemon, which the tests run
# against, pinned in package-lock.json.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(STAMP)

# The first start saves the new admin as your default profile, for the CLI and the client.
serve: $(STAMP)
	$(BIN)/messagevault serve --save-profile default

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

# Redis and NATS for tests/test_bench_peers.py, from Debian's packages. Best effort: where
# apt-get cannot have them (no root, no mirror), those few tests skip and name what is missing.
peer-servers: $(STAMP)
	-$(BIN)/python benchmarks/peers.py --install-servers

# podman (with runc: crun refuses some hosts' cgroups) and a python3 base image made from
# Debian's packages, for tests/test_deploy.py's image test (it skips without them). Best
# effort, like peer-servers: it needs root and Debian's mirror, not Docker Hub.
.PHONY: container-engine
container-engine:
	-command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || apt-get install -y podman runc debootstrap
	-command -v podman >/dev/null && sh deploy/base-image.sh

# Debian's Chromium, which Playwright drives in the browser tests (tests/browser.py;
# `playwright install`'s own builds cannot be fetched here). Best effort, like
# peer-servers: it needs root and Debian's mirror; without it those tests skip and
# say why, unless CI is set, where they fail.
.PHONY: browser
browser:
	-command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# Two workers (pytest-xdist): most of the suite's time is subprocesses, servers and
# Azurite waiting, not CPU, so two run in about half the time on two cores. Each
# worker starts its own Azurite and StatsD daemon on free ports.
pytest: $(STAMP) node_modules/.installed peer-servers container-engine browser
	$(BIN)/python -m pytest -n 2 --durations=25

test: lint typecheck pytest

# The core log in process, then large values (also alone: make bench-large).
bench-core: $(STAMP)
	$(BIN)/python benchmarks/core.py
	$(BIN)/python benchmarks/large_values.py

# 1 MiB, 16 MiB and 256 MiB values, compressed and not, against raw file I/O in the same run.
bench-large: $(STAMP)
	$(BIN)/python benchmarks/large_values.py

bench-http: $(STAMP)
	$(BIN)/python benchmarks/http.py

bench-client: $(STAMP)
	$(BIN)/python benchmarks/client.py

bench-azure: $(STAMP) node_modules/.installed
	$(BIN)/python benchmarks/azure.py

# 1, 2 and 3 server nodes on one storage (files, then Azurite): ingest and failover time.
bench-cluster: $(STAMP) node_modules/.installed
	$(BIN)/python benchmarks/cluster.py

# Seeks by sequence and time over 10M messages, index against header walk, and append
# latency with the index on and off; files, then Azurite. Built streams are cached
# (~/.cache/messagevault-bench-seek, about 1.3 GB): later runs skip the build.
bench-seek: $(STAMP) node_modules/.installed
	$(BIN)/python benchmarks/seek.py

# What idle followers cost storage on Azurite: direct followers polling every 0.1 s
# against backing off, and 1 against 100 followers through a server; then how soon each
# sees the first message after a minute idle. About 3.5 minutes (3 runs).
bench-follow: $(STAMP) node_modules/.installed
	$(BIN)/python benchmarks/follow.py

# The Durable Streams conformance suite against URL (a server's root; serve MessageVault
# with --allow-anonymous all:write), or against the Node reference server without URL.
# ARGS=--compare runs the reference beside URL and lists what it passes that URL fails.
.PHONY: ds-conformance
ds-conformance: $(STAMP) node_modules/.installed
	$(BIN)/python benchmarks/ds_conformance.py $(URL) $(ARGS)

# Redis Streams and NATS JetStream against MessageVault, same workloads; apt-get installs
# redis-server and nats-server if they are missing. The peers' Python clients: the bench extra.
bench-peers: $(STAMP) node_modules/.installed
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/peers.py

# README's "Against the peers" table, from the newest benchmarks/results/peers-*.md.
readme-peers: $(STAMP)
	$(BIN)/python benchmarks/peers.py --readme

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
