# Entry points. `make demo` and `make test` install what they need themselves (scripts/bootstrap.sh).
VENV := .venv
PY   := $(VENV)/bin/python

.PHONY: bootstrap venv test test-k8s test-ha demo lint bench-xo bench-attach bench-scale bench-migration bench-stream load soak proto

bootstrap:           ## Debian packages (when missing) + .venv + editable install
	@bash scripts/bootstrap.sh

venv:                ## .venv + editable install only
	@bash scripts/bootstrap.sh --venv-only

test: bootstrap      ## lint (ruff, mypy --strict), then all of tests/; e.g. make test PYTEST_ARGS="tests/unit -q"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-k8s: bootstrap  ## the real kube-apiserver and CSI sidecars drive the driver (docs/deploy.md "Tested with")
	$(VENV)/bin/pytest tests/k8s -m k8s $(PYTEST_ARGS)

test-ha: bootstrap   ## HA brokers (part of make test): a RabbitMQ cluster and Redis Sentinel, a node of each killed mid-migration
	$(VENV)/bin/pytest tests/ha -m ha $(PYTEST_ARGS)

demo: bootstrap
	$(PY) -m dev.demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench-xo: bootstrap
	$(PY) -m bench.xo_client $(BENCH_ARGS)

bench-attach: bootstrap
	$(PY) -m bench.attach $(BENCH_ARGS)

bench-scale: bootstrap  ## bench-attach on a generated XO of real size (2,000 VMs, 10,000 VDIs) under 200 events/s
	$(PY) -m bench.attach --scale $(BENCH_ARGS)

bench-migration: bootstrap
	$(PY) -m bench.migration $(BENCH_ARGS)

load: bootstrap         ## load held: 1,000 volumes, 16 migrator processes, 500 concurrent migrating attaches
	$(PY) -m bench.load $(BENCH_ARGS)

bench-stream: bootstrap  ## disk content through XO REST export/import (root: real data mode)
	$(PY) -m bench.stream $(BENCH_ARGS)

soak: bootstrap      ## e.g. make soak DURATION=15m SEED=1
	$(PY) -m dev.soak --duration $(or $(DURATION),2m) --seed $(or $(SEED),1) $(SOAK_ARGS)

proto: venv
	bash scripts/gen_proto.sh
