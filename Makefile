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
export NO_MKDOCS_2_WARNING := 1  # Material's notice about its successor, printed on every build

.PHONY: setup test docs demo models rollout loop byo bench pruning-seeds fewlabels fuzz faults soak loadtest lint clean deploy-rules dashboard

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
# downloads no browser of its own), Debian's prometheus (the server and promtool) for the monitoring
# and deploy tests, and podman, buildah, runc and debootstrap to build and run the gateway image
# (deploy/podman/). Those tests fail, not skip, without them.
SYSTEM_STAMP := $(VENV)/.kdserve-system
SYSTEM_PACKAGES := chromium prometheus podman buildah runc debootstrap
SYSTEM_COMMANDS := chromium prometheus promtool podman buildah runc debootstrap
$(SYSTEM_STAMP): Makefile | $(STAMP)
	for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); fi
	touch $@

setup: $(STAMP) $(LOCUST_STAMP) $(SYSTEM_STAMP)

# The layering contracts first (import-linter, [tool.importlinter] in pyproject.toml), then the suite in a
# new random order every run (pytest-randomly; SEED=N repeats the order of an earlier run), slowest 15 listed.
# TEST_WORKERS pytest-xdist workers (at least two: even on one core, half the suite's time is spent waiting
# on servers starting and subprocesses), each taking whole modules (their servers start once).
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(max(2, len(os.sched_getaffinity(0))))')
test: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict  # never --quiet: it hides the warnings strict mode counts
	@seed=$${SEED:-$$RANDOM}; echo "test order: SEED=$$seed (make test SEED=$$seed repeats it)"; \
	$(PY) -m pytest -q --durations=15 --randomly-seed=$$seed -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# The page serves as soon as the first model is trained and exported: the plain student (seed 0), the
# quickest to train (~20 s here; the teacher takes ~10x as long). Then, while the page serves, the demo's
# core (the teacher and the KD student: the A/B split moves to them once served), then the rest of the
# recipe (the seed study, the ensemble's variants, the multi-head model, pruning) train and are exported
# into the same repository, which Triton polls and the gateway follows: each card fills in when served.
# The seconds to the page, to the student and teacher and to everything served, with the CPU, go to
# benchmarks/$(RECIPE)/demo_timing.json. Stages already trained with the same settings are reused, so a
# second `make demo` serves everything at once. `make demo ONCE=1` (for scripts) trains everything first
# and exits after the demo.
DEMO_FIRST := --only student_plain
DEMO_CORE := --set 'evaluation.seeds=[0]' --set 'ensemble.variants=[]' --set ensemble.multihead.heads=0 \
  --set compression.enabled=false
# For the targets that need the demo's models: trained and exported unless they already are.
MODELS_READY := $(PY) -m training plan --recipe $(RECIPE) --out $(RUN_DIR) --exit-code >/dev/null && \
  test -f $(REPO)/manifest.json || $(MAKE) --no-print-directory models
# Trains (or reuses) and then exports, in one process: torch and the data are loaded once.
TRAIN_EXPORT := $(PY) -m training all --recipe $(RECIPE) --out $(RUN_DIR) --export $(REPO) --flavor $(FLAVOR)
demo: setup
	@started=$$(date +%s); \
	if [ -z "$(ONCE)" ] && ! $(PY) -m training plan --recipe $(RECIPE) --out $(RUN_DIR) --exit-code >/dev/null; then \
	  set -e; $(TRAIN_EXPORT) $(DEMO_FIRST); \
	  $(PY) -m loadtest demo --repo $(REPO) --then "$(TRAIN_EXPORT) $(DEMO_CORE)" \
	    --then "$(MAKE) --no-print-directory models" --rollout \
	    --started-at $$started --record benchmarks/$(RECIPE)/demo_timing.json; \
	else \
	  set -e; $(MAKE) --no-print-directory models; $(PY) -m loadtest demo --repo $(REPO) --rollout $(if $(ONCE),--once); \
	fi

# A student rollout on its own stack (two gateway replicas, Locust with feedback): benchmarks/rollout/.
# BROKEN=1: a broken student is exported mid-rollout and must be rolled back to the teacher.
rollout: setup
	$(MODELS_READY)
	$(PY) -m loadtest statistics --out benchmarks/rollout
	$(PY) -m loadtest rollout --repo $(REPO) --out benchmarks/rollout $(if $(BROKEN),--break-student)

# Everything the recipe trains (what is trained already is reused), exported into the repository; the
# run's results and export report copied to benchmarks/$(RECIPE)/, where the docs read them.
models: setup
	$(TRAIN_EXPORT)
	@cat $(RUN_DIR)/export_report.md
	mkdir -p benchmarks/$(RECIPE)
	cp $(RUN_DIR)/results.md $(RUN_DIR)/results.json $(RUN_DIR)/pareto.png $(RUN_DIR)/export_report.md benchmarks/$(RECIPE)/

# Needs the demo's repository; training and export reuse what is already there. The timing repository
# (untrained ResNet18/ResNet50 at 224x224) shows the student's speed-up where compute dominates.
bench: setup
	$(MODELS_READY)
	$(PY) -m training timing-repo --repo runs/timing-224
	$(PY) -m loadtest bench --repo $(REPO) --run $(RUN_DIR) --timing-repo runs/timing-224 --out benchmarks
	$(PY) -m loadtest capture-cost --repo $(REPO) --out benchmarks
	$(PY) -m loadtest protocols --repo $(REPO) --out benchmarks/protocols
	$(PY) -m gateway experiment-cost --repo $(REPO) --samples 1000000 --out benchmarks/experiment_read.json
	rm -rf runs/teacher-cache && $(PY) -m training teacher-cache --run $(RUN_DIR) --out runs/teacher-cache
	cp runs/teacher-cache/teacher_cache.json runs/teacher-cache/teacher_cache.md benchmarks/

# Few labels and an unlabelled transfer set, where distillation pays: trains the digits-fewlabels recipe
# (5 seeds of plain and KD students), exports it into its own repository and serves the confidence
# cascade next to its student and teacher. Results in benchmarks/fewlabels/.
FEWLABELS_RUN := runs/digits-fewlabels
fewlabels: setup
	$(PY) -m training all --recipe digits-fewlabels --out $(FEWLABELS_RUN) --export $(FEWLABELS_RUN)/repo
	mkdir -p benchmarks/fewlabels
	cp $(FEWLABELS_RUN)/results.md $(FEWLABELS_RUN)/pareto.png benchmarks/fewlabels/
	$(PY) -m loadtest cascade --repo $(FEWLABELS_RUN)/repo --out benchmarks/fewlabels

# Bring your own teacher: the demo's trained teacher written out as a state_dict and as a float NCHW ONNX graph,
# each brought back by a recipe and distilled into a student (ResNet18; MobileNetV3-small from the ONNX one),
# exported and served; accuracy, agreement, MACs, served p50 at 1 and 16 clients: benchmarks/byo/.
byo: setup
	$(MODELS_READY)
	$(PY) -m training bring-back --run $(RUN_DIR) --out runs/byo
	for recipe in runs/byo/*.yaml; do \
	  $(PY) -m training all --recipe $$recipe --out runs/byo/$$(basename $$recipe .yaml) --only student_kd \
	    --export runs/byo/$$(basename $$recipe .yaml)-repo || exit 1; \
	done
	$(PY) -m loadtest byo --work runs/byo --run $(RUN_DIR) --out benchmarks/byo

# Continuous distillation gated end to end, on the demo's models (trained when missing): upright traffic, then
# a style the models misread (italic) flagged by the drift test, captured with an honest key's labels,
# re-distilled, the offline gate, the candidate served beside the current version, the gated rollout with
# two replicas, the controller and Locust: benchmarks/loop/. POISON=1: a second key labels 30% of the
# traffic wrong (benchmarks/loop-poison/).
loop: setup
	$(MODELS_READY)
	$(PY) -m loadtest loop --run $(RUN_DIR) --repo $(REPO) $(if $(POISON),--poison --out benchmarks/loop-poison --work runs/loop-poison)

# The pruning stage again with other seeds for its recovery training, every other stage reused from the
# demo's run (copied): does compression hold beyond one draw? benchmarks/$(RECIPE)/pruning_seeds.md.
PRUNE_SEEDS ?= 1 2
pruning-seeds: setup
	$(MODELS_READY)
	for s in $(PRUNE_SEEDS); do rm -rf $(RUN_DIR)-prune-seed$$s && cp -r $(RUN_DIR) $(RUN_DIR)-prune-seed$$s && \
	  $(PY) -m training all --recipe $(RECIPE) --out $(RUN_DIR)-prune-seed$$s --set compression.seed=$$s || exit 1; done
	$(PY) -m training pruning-report --out benchmarks/$(RECIPE)/pruning_seeds.md \
	  --runs $(RUN_DIR) $(foreach s,$(PRUNE_SEEDS),$(RUN_DIR)-prune-seed$(s))

# Longer fuzzing than `make test` runs: Atheris on image decoding for FUZZ_SECONDS (findings land in
# runs/fuzz/ as crash-*/oom-*/timeout-* inputs), then Schemathesis with 10x the generated requests.
FUZZ_SECONDS ?= 600
fuzz: setup
	$(PY) tests/fuzz/fuzz_decode.py --seed runs/fuzz/corpus
	$(PY) tests/fuzz/fuzz_decode.py runs/fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=3072 -artifact_prefix=runs/fuzz/
	KDSERVE_FUZZ_EXAMPLES=5000 $(PY) -m pytest -q tests/test_api_fuzz.py

# Hostile input and faults (Triton killed, frozen; overload; SIGTERM) on the demo repository: a table.
faults: setup
	$(MODELS_READY)
	$(PY) -m loadtest faults --repo $(REPO) --out benchmarks

# Ten minutes of mixed traffic against the demo repository: memory, descriptors and latency must stay flat.
SOAK_MINUTES ?= 10
soak: setup
	$(MODELS_READY)
	$(PY) -m loadtest soak --repo $(REPO) --minutes $(SOAK_MINUTES) --out benchmarks/soak

# The Grafana dashboard's panels drawn from a real Prometheus (Debian's) scraping the gateway and Triton
# under DASHBOARD_MINUTES of mixed traffic: benchmarks/dashboard/dashboard.png and .md.
DASHBOARD_MINUTES ?= 3
dashboard: setup
	$(MODELS_READY)
	$(PY) -m loadtest dashboard --repo $(REPO) --minutes $(DASHBOARD_MINUTES) --out benchmarks/dashboard

# A 60-second A/B load test against a running demo gateway (`make demo` in another terminal).
loadtest: setup
	$(PY) -m loadtest run --host http://127.0.0.1:8080 --scenario ab --users 4 --duration 60s --out runs/loadtest-ab

# The docs site (MkDocs, Material theme) into build/site/; strict: a broken link or missing page fails.
docs: setup
	$(VENV)/bin/mkdocs build --strict

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
	find $(REPO) -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +

# The Kubernetes PrometheusRule carries the groups of deploy/monitoring/prometheus/rules.yml (the one
# source); a test fails when they differ.
deploy-rules: setup
	$(PY) -c 'from loadtest.stacks.monitoring import PROMETHEUS_RULE, prometheus_rule_manifest as m; PROMETHEUS_RULE.write_text(m())'
