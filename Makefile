# agentwatch — `make run` and `make test` set up whatever is missing first.
PY        := /usr/bin/python3
VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup host observability test-deps venv run test test-unit test-kernel lint bench bench-quick bench-tools clean install

setup: host venv

host:
	@bash packaging/setup-host.sh

observability:
	@bash packaging/setup-observability.sh >/dev/null

test-deps:
	@bash packaging/setup-test.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

run: setup
	$(VENV)/bin/agentwatch run $(ARGS)

lint: venv
	$(VENV)/bin/ruff check monitor tests bench dashboards
	$(VENV)/bin/mypy monitor tests/support

test: setup observability test-deps lint
	$(VPY) -m pytest tests -ra $(PYTEST_ARGS)

test-unit: venv
	$(VPY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-kernel: setup
	$(VPY) -m pytest tests/kernel -ra $(PYTEST_ARGS)

# Benchmarks (docs/benchmarks.md). Not part of `make test`; bench-tools installs auditd and
# bpftrace, the tools bench/run.py compares agentwatch with (a column is left out, with a
# note, if one cannot be installed).
bench-tools:
	-@bash packaging/setup-bench.sh

bench: setup bench-tools
	$(VPY) bench/run.py $(ARGS)
	$(VPY) bench/kill_latency.py --scrape-threads 4
	$(VPY) bench/scale.py
	$(VPY) bench/footprint.py
	$(VPY) bench/scrape.py
	$(VPY) bench/hotpath.py
	$(VPY) bench/identity.py
	$(VPY) bench/sshconfig.py

bench-quick: setup bench-tools
	$(VPY) bench/run.py --quick $(ARGS)
	$(VPY) bench/kill_latency.py --quick --scrape-threads 4
	$(VPY) bench/scale.py --quick
	$(VPY) bench/footprint.py --quick
	$(VPY) bench/scrape.py --agents 10 --children 50 --scrapes 10
	$(VPY) bench/hotpath.py --records 50000 --rounds 3
	$(VPY) bench/identity.py --rounds 5
	$(VPY) bench/sshconfig.py --execs 500 --rounds 3

install: setup
	@bash packaging/install.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
