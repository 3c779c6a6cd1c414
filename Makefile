# One entry point per job. `make setup` then `make test` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# inside the container the project is installed system-wide
HARNESS ?= $(if $(wildcard $(BIN)/harness),$(BIN)/harness,harness)

# smoke: the whole pipeline on CPU in minutes, on synthetic data, in its own folder (a width-16 network;
# the 100-shot probes are the 50-shot code with other lists, so smoke runs full and 50-shot only)
SMOKE   ?= results/smoke
SMOKE_ENV = HARNESS_REGISTRY=sqlite:///$(SMOKE)/registry.db HARNESS_GENERATED_SPLITS=$(SMOKE)/splits

# reproduce: where the real data comes from (--download, or --from /path/cifar-100-python)
DATA_SOURCE ?= --download
SPLITS_FROM ?=
EPOCHS  ?=

.PHONY: setup test test-slow smoke reproduce reproduce-inside report bench clean

setup:  ## create .venv with the pinned versions (constraints.txt) and the project, editable
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'

test:   ## the test suite (CPU only, about 3 minutes on 2 cores); full-size variants are `make test-slow`
	$(BIN)/python -m pytest -q -m "not slow"

test-slow:  ## the full-size (paper-width ResNet-18) variants of the fast tests
	$(BIN)/python -m pytest -q -m slow

smoke:  ## data -> splits -> train (every method, 2 epochs) -> eval -> report, on CPU, synthetic data, a few minutes
	rm -rf $(SMOKE)
	$(SMOKE_ENV) $(HARNESS) data prepare --root $(SMOKE)/data --synthetic --per-class 60 --test-per-class 5
	$(SMOKE_ENV) $(HARNESS) splits make smoke --data-root $(SMOKE)/data --max-per-class 8 --ratio 4 \
		--full-per-class 60 --shots 50
	$(SMOKE_ENV) $(HARNESS) run --splits smoke --epochs 2 --batch-size 32 --width 16 --probe-family smoke \
		--shots full,50 --probe-epochs 20 --devices cpu --data-root $(SMOKE)/data --checkpoint-dir $(SMOKE)/checkpoints
	$(SMOKE_ENV) $(HARNESS) report --data-root $(SMOKE)/data --plots $(SMOKE)/plots
	$(SMOKE_ENV) $(HARNESS) report --format markdown --out $(SMOKE)/report.md
	$(SMOKE_ENV) $(HARNESS) report --format html --data-root $(SMOKE)/data --out $(SMOKE)/report.html
	@echo "smoke: tables in $(SMOKE)/report.md, the page in $(SMOKE)/report.html, plots in $(SMOKE)/plots"

reproduce:  ## on a GPU host: build the container and run the paper's whole matrix inside it
	mkdir -p data results checkpoints splits/paper   # else the engine creates them owned by root
	HARNESS_UID=$$(id -u) HARNESS_GID=$$(id -g) HARNESS_GIT_REV=$$(git rev-parse HEAD 2>/dev/null) docker compose build
	docker compose run --rm harness make reproduce-inside DATA_SOURCE="$(DATA_SOURCE)" EPOCHS="$(EPOCHS)"

reproduce-inside:  ## what `reproduce` runs in the container: data, splits, 4 methods x 5 splits, eval, report
	$(HARNESS) data info --root data > /dev/null 2>&1 || $(HARNESS) data prepare --root data $(DATA_SOURCE)
	$(if $(SPLITS_FROM),$(HARNESS) splits import $(SPLITS_FROM),$(HARNESS) splits fetch)
	$(HARNESS) splits verify
	$(HARNESS) run --methods simclr,sdclr,bcl-i,bcl-d --splits 1-5 --seeds 10 $(if $(EPOCHS),--epochs $(EPOCHS))
	$(HARNESS) report --plots results/plots
	$(HARNESS) report --format markdown --out results/report.md
	$(HARNESS) report --format html --out results/report.html
	$(HARNESS) report --format csv --out results/report.csv

report: ## the paper's tables from the registry, plus plots in results/plots
	$(HARNESS) report --plots results/plots

bench:  ## speed per method vs the compute limit and the authors' code, time per phase (JSON in results/bench/)
	$(HARNESS) bench --profile --json results/bench/latest.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(SMOKE)
