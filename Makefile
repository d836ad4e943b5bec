# Two entry points for a fresh machine: `make demo` and `make test`; both run `make setup` first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := demo
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test lint bench allen-env clean

setup: $(VENV)/.installed

# torch is installed first and pinned, so nothing pulls a multi-GB CUDA build on a CPU machine
# constraints.txt pins every package to versions tested together, so a fresh install resolves the same way.
# (2.13.0 is the CPU wheel on disk here; on a GPU machine pip takes the CUDA build of the same release).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	rm -rf $(DEMO)
	$(PY) -m ingest synth --out $(DEMO)/nwb --sessions 8 --seed 0 --regions VISp,VISl
	$(PY) -m ingest run --src $(DEMO)/nwb --out $(DEMO)/store --workers 2
	$(PY) -m shards ls $(DEMO)/store
	$(PY) -m shards verify $(DEMO)/store
	$(PY) -m shards mix $(DEMO)/store --mix ephys=0.5,ophys=0.5 --batch-size 16 --batches 20 --world-size 2
	$(PY) -m trainer.train --shards $(DEMO)/store --mix ephys=0.5,ophys=0.5 --out $(DEMO)/run --workers 2 \
		--preset small --epochs 25 --log-every 100 --model-override=likelihood_readout=true
	$(PY) bench/vs_ideal.py --run $(DEMO)/run --store $(DEMO)/store --truth $(DEMO)/nwb --split valid
# the papers' experiment in small: pretrain on EPhys fractions 0 (OPhys only), 0.5 and 1 (EPhys only) x 2 seeds,
# finetune on one held-out session per area and modality, print the table (docs/sweeps.md)
	$(PY) -m trainer.tune --ratios 0,0.5,1 --seeds 0,1 --shards $(DEMO)/store --out $(DEMO)/sweep --held-out 1 \
		--pretrain-steps 600 --finetune-epochs 10 --unfreeze-epoch 2 --workers 0 --concurrent 2

test: setup
	$(PY) -m pytest -q tests

# the code checks: ruff's lint rules (pyproject.toml [tool.ruff]; why the formatter is not a gate is
# said there), then the layer contracts (import-linter, [tool.importlinter]): a new back-edge or import
# cycle fails here
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/ingest.py

# allensdk pins numpy<1.24 and pynwb 2.8: it gets an environment of its own, used only to download.
allen-env: .venv-allen/.installed
.venv-allen/.installed:
	$(PYTHON) -m venv .venv-allen
	.venv-allen/bin/pip install -q allensdk==2.16.2 "hdmf<4" "statsmodels<0.15"
	touch $@

clean:
	rm -rf $(DEMO) .pytest_cache
