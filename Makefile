# One entry per whole job. `make demo` and `make test` are the README's set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdserve-installed
# Locust in its own virtualenv: nvidia-pytriton pins tritonclient[http] (geventhttpclient<=2.0.2),
# Locust needs geventhttpclient>=2.3. Separate environments also keep the generator apart from the server.
LOCUST_VENV ?= .venv-locust
LOCUST_STAMP := $(LOCUST_VENV)/.kdserve-installed
RECIPE ?= digits
RUN_DIR ?= runs/$(RECIPE)
REPO ?= model_repository
FLAVOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo bench loadtest lint clean

# Idempotent: reinstalls only when pyproject.toml changed. torch/torchvision are installed first
# and by pip on purpose: pip takes the pinned wheels from this machine's disk (uv/poetry download ~3 GB).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 'numpy<2'
	$(PY) -m pip install -q -e '.[train,serve,loadtest,dev]'
	touch $@

$(LOCUST_STAMP): pyproject.toml
	test -x $(LOCUST_VENV)/bin/python || $(PYTHON) -m venv $(LOCUST_VENV)
	$(LOCUST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCUST_VENV)/bin/python -m pip install -q -e '.[locust]'
	touch $@

# System packages the tests use: Debian's chromium for the browser test (Playwright drives it; it
# downloads no browser of its own). The test fails, not skips, without it.
SYSTEM_STAMP := $(VENV)/.kdserve-system
$(SYSTEM_STAMP): | $(STAMP)
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }
	touch $@

setup: $(STAMP) $(LOCUST_STAMP) $(SYSTEM_STAMP)

test: setup
	$(PY) -m pytest -q

# Train (stages already trained with the same settings are reused), export and check the repository,
# then start Triton + the gateway and classify held-out digits over HTTP. It keeps serving until
# Ctrl-C; `make demo ONCE=1` exits after the demo (for scripts).
demo: setup
	$(PY) -m training all --recipe $(RECIPE) --out $(RUN_DIR)
	$(PY) -m training export --run $(RUN_DIR) --repo $(REPO) --flavor $(FLAVOR)
	@cat $(RUN_DIR)/export_report.md
	$(PY) -m gateway demo --repo $(REPO) --recipe $(RECIPE) $(if $(ONCE),--once)

# Needs the demo's repository; training and export reuse what is already there. The timing repository
# (untrained ResNet18/ResNet50 at 224x224) shows the student's speed-up where compute dominates.
bench: setup
	test -f $(REPO)/manifest.json || $(MAKE) demo ONCE=1
	$(PY) -m training timing-repo --repo runs/timing-224
	$(PY) -m loadtest bench --repo $(REPO) --timing-repo runs/timing-224 --out benchmarks

# A 60-second A/B load test against a running demo gateway (`make demo` in another terminal).
loadtest: setup
	$(PY) -m loadtest run --host http://127.0.0.1:8080 --scenario ab --users 4 --duration 60s --out runs/loadtest-ab

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
	find $(REPO) -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +
