# lightning_distill: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEACHER_BANK ?= runs/teacher/prototypes.pt
ARGS ?=
BENCH ?= experiments/benchmarks/phantom.yaml
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: help install test test-all test-slow test-portable train-teacher train-student bank-example train-transfer compare-run train-baseline train-sikd train-cmedl train-chaos benchmark bench-routes bench-headroom bench-headroom-0.5 bench-chaos-headroom bench-chaos bench-cmedl bench-speed bench-scale method-figures reliability-figure sweep agent sweep-local test-notebooks clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'
	@echo "  Extra overrides for the train targets: make train-student ARGS='data.train_fraction=0.25 seed=1'"
	@echo "  With output_dir in ARGS, also set STUDENT_DIR / BASELINE_DIR (the table of train-student and train-baseline reads them)"

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch and torchvision pinned together: PyPI's torchvision only imports beside the matching torch
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its test tools (first use only)

test: $(STAMP) ## run the fast test suite (slow tests deselected)
	$(BIN)/python -m pytest -m "not slow" -q

test-notebooks: $(STAMP) ## execute every notebook in notebooks/ (also part of make test)
	$(BIN)/python -m pytest -q tests/test_notebooks.py

test-all: $(STAMP) ## run every test, slow ones included
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) ## run only the slow tests (CI runs them after `make test`)
	$(BIN)/python -m pytest -m slow -q

# The tests that compare floats of two computations, again under other accumulation orders on this machine
# (docs/development.md, "Comparing floats"): MKL's AVX2 code path on one thread (MKL's reproducibility mode
# fixes that path whatever the CPU) and its SSE2-level path; each would catch a bitwise comparison that holds
# only on the CPU a test was written on. MKL_CBWR is ignored where torch has no MKL (e.g. aarch64).
PORTABLE_TESTS ?= tests/bank tests/losses tests/methods \
	tests/data/test_data.py tests/data/test_nifti.py tests/data/test_preprocess.py tests/data/test_sampling.py \
	tests/data/test_spatial_augment.py tests/data/test_transfer.py tests/lab/test_bank_inspect.py \
	tests/test_callbacks.py tests/test_devices.py tests/test_metrics.py tests/test_modules.py tests/test_teach.py
PORTABLE_ENVS ?= "MKL_CBWR=AVX2 OMP_NUM_THREADS=1" "MKL_CBWR=COMPATIBLE"

test-portable: $(STAMP) ## the float-comparing tests under other BLAS kernels and thread counts (what another CPU would do)
	@for e in $(PORTABLE_ENVS); do echo "== $$e"; env $$e $(BIN)/python -m pytest -m "not slow" -q $(PORTABLE_TESTS) || exit 1; done

train-teacher: $(STAMP) ## pretrain the 3D teacher on phantom volumes and export its prototype bank
	$(BIN)/lightning-distill fit experiments/teacher.yaml $(ARGS)

$(TEACHER_BANK): | $(STAMP)
	$(BIN)/lightning-distill fit experiments/teacher.yaml

TEACHER_CKPT ?= runs/teacher/checkpoints/best.ckpt
STUDENT_DIR ?= runs/student
BASELINE_DIR ?= runs/baseline
# the student beside the 3D teacher scored on the student's own test slices (and the baseline, once trained)
COMPARE = if [ -f $(TEACHER_CKPT) ] && [ -f $(STUDENT_DIR)/results.json ]; then \
	  $(BIN)/lightning-distill compare $(STUDENT_DIR) --teacher $(TEACHER_CKPT) \
	  $$([ -f $(BASELINE_DIR)/results.json ] && echo --baseline $(BASELINE_DIR)); \
	else echo "(no comparison: needs $(TEACHER_CKPT) and $(STUDENT_DIR)/results.json)"; fi

train-student: $(STAMP) $(TEACHER_BANK) ## train the distilled 2D student (pretrains the teacher first), then print it beside the teacher
	$(BIN)/lightning-distill fit experiments/student.yaml distill.prototypes=$(TEACHER_BANK) $(ARGS)
	@$(COMPARE)

BANK_VOLUMES ?= runs/unlabelled_ct
bank-example: $(STAMP) $(TEACHER_BANK) ## a bank from the trained 3D teacher over 100 unlabelled phantom volumes, then a student with it (docs/bank.md)
	[ -d $(BANK_VOLUMES) ] || $(BIN)/lightning-distill phantom experiments/teacher.yaml $(BANK_VOLUMES) data.phantom.seed=5 data.num_subjects=100
	$(BIN)/lightning-distill bank build experiments/bank.yaml data.root=$(BANK_VOLUMES) overwrite=true $(ARGS)
	$(MAKE) train-student TEACHER_BANK=runs/bank/prototypes.pt STUDENT_DIR=runs/student-bank ARGS="output_dir=runs/student-bank"

TEACH_DIR ?= runs/teach
TRANSFER_DIR ?= runs/transfer
train-transfer: $(STAMP) $(TEACHER_BANK) ## the 3D teacher labels slices of its volumes (teach), a 2D student learns from them beside its own; prints it beside the baseline and the teacher (docs/methods.md)
	[ -f $(TEACH_DIR)/dataset.json ] || $(BIN)/lightning-distill teach experiments/teach.yaml output=$(TEACH_DIR)
	$(BIN)/lightning-distill fit experiments/transfer.yaml transfer.slices=$(TEACH_DIR) output_dir=$(TRANSFER_DIR) $(ARGS)
	[ -f $(BASELINE_DIR)/results.json ] || $(BIN)/lightning-distill fit experiments/baseline.yaml output_dir=$(BASELINE_DIR)
	@$(MAKE) --no-print-directory compare-run STUDENT_DIR=$(TRANSFER_DIR)

compare-run: $(STAMP) ## print STUDENT_DIR beside the 3D teacher and BASELINE_DIR on the student's test slices
	@$(COMPARE)

train-baseline: $(STAMP) ## train the plain 2D model (the student with lambda = 0); with a student, print all three
	$(BIN)/lightning-distill fit experiments/baseline.yaml $(ARGS)
	@$(COMPARE)

SIKD_TEACHER ?= runs/sikd_teacher/checkpoints/best.ckpt

$(SIKD_TEACHER): | $(STAMP)
	$(BIN)/lightning-distill fit experiments/sikd_teacher.yaml

train-sikd: $(STAMP) $(SIKD_TEACHER) ## SIKD on the phantom: teacher on class-mean slices (first use), then the student
	$(BIN)/lightning-distill fit experiments/sikd.yaml distill.teacher=$(SIKD_TEACHER) $(ARGS)

train-cmedl: $(STAMP) ## CMEDL on the phantom: CT student, MRI teacher on pseudo-MRI, translator, all at once (~10 min)
	$(BIN)/lightning-distill fit experiments/cmedl.yaml $(ARGS)

clean: ## remove run outputs (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache

train-chaos: $(STAMP) ## the real-MRI experiment on CHAOS T2 (needs CHAOS_DIR or ../shared/data/chaos_t2_mr; ~30 min)
	experiments/chaos/run.sh

benchmark: $(STAMP) ## run/resume the benchmark grid of BENCH (default phantom: the main routes, ~43 min on 2 cores) -> docs/benchmarks/<name>.md
	$(BIN)/lightning-distill benchmark $(BENCH) $(ARGS)

bench-routes: $(STAMP) ## every route and control on the phantom (extends make benchmark's grid and reuses its runs; ~70 min more) -> docs/benchmarks/phantom-routes.md
	$(BIN)/lightning-distill benchmark experiments/benchmarks/phantom_routes.yaml $(ARGS)

# the CHAOS targets stop with a clear message when the data is not there
CHAOS_DATA_CHECK = test -f "$${CHAOS_DIR:-../shared/data/chaos_t2_mr}/dataset.json" || { echo "CHAOS data not found at $${CHAOS_DIR:-../shared/data/chaos_t2_mr} (relative to this folder): set CHAOS_DIR to the dataset folder" >&2; exit 2; }

bench-headroom: $(STAMP) ## the plain 2D model on 10..1,000 subjects and the 3D teacher on the same slices: headroom and ceiling (~30 min) -> docs/benchmarks/headroom.md
	$(BIN)/lightning-distill benchmark experiments/benchmarks/headroom.yaml $(ARGS)

bench-headroom-0.5: $(STAMP) ## the same learning curve on phantom version 0.5 (learnable single-slice cues), its own 3D teacher (~30 min) -> docs/benchmarks/headroom-0.5.md
	$(BIN)/lightning-distill benchmark experiments/benchmarks/headroom_0.5.yaml $(ARGS)

bench-chaos-headroom: $(STAMP) ## the plain 2D model on 2, 4 and 8 CHAOS patients' slices and the 3D teacher on the same slices (needs the data, see train-chaos) -> docs/benchmarks/chaos-headroom.md
	@$(CHAOS_DATA_CHECK)
	$(BIN)/lightning-distill benchmark experiments/benchmarks/chaos_headroom.yaml $(ARGS)

bench-chaos: $(STAMP) ## the routes of make benchmark on CHAOS T2 MRI, 3 seeds (needs the data, see train-chaos) -> docs/benchmarks/chaos.md
	@$(CHAOS_DATA_CHECK)
	$(BIN)/lightning-distill benchmark experiments/benchmarks/chaos.yaml $(ARGS)

SWEEP ?= experiments/sweeps/student.yaml
SWEEP_ID ?=

sweep: $(STAMP) ## create a W&B sweep from SWEEP on your configured W&B server (prints its id)
	WANDB_MODE=online $(BIN)/wandb sweep $(SWEEP)

agent: $(STAMP) ## run a W&B agent for SWEEP_ID=entity/project/id (trials log online to the server)
	@test -n "$(SWEEP_ID)" || { echo "usage: make agent SWEEP_ID=entity/project/sweep_id (from make sweep)"; exit 2; }
	PATH="$(abspath $(BIN)):$$PATH" WANDB_MODE=online $(BIN)/wandb agent $(SWEEP_ID)

sweep-local: $(STAMP) ## run COUNT trials of SWEEP here without a W&B server -> runs/sweeps/<name>/results.md
	$(BIN)/lightning-distill sweep --local $(SWEEP) --count $(or $(COUNT),4) $(ARGS)

bench-cmedl: $(STAMP) ## CMEDL vs the plain CT model on the two-modality phantom (~25 min) -> docs/benchmarks/cmedl.md
	$(BIN)/lightning-distill benchmark experiments/benchmarks/cmedl.yaml $(ARGS)

bench-scale: $(STAMP) ## 1,000 phantom volumes opened lazily vs eagerly (first batch, peak memory), bank throughput cold/warm, 1 and 2 processes, teach throughput (~30 min) -> docs/performance.md
	$(BIN)/python experiments/bench_scale.py --out docs/performance.md $(ARGS)

bench-speed: $(STAMP) ## step-time ratios of the distillation methods, loader throughput, peak memory (~3 min) -> docs/performance.md
	$(BIN)/python experiments/bench_speed.py --out docs/performance.md $(ARGS)

METHOD_RUNS ?= runs/method

method-figures: $(STAMP) $(TEACHER_BANK) ## what each prototype-DIST geometry sees and does: 4 students on the teacher's bank (~15 min) -> docs/geometry.md
	@for g in baseline prob logprob offdiag; do \
	  if [ -f $(METHOD_RUNS)/$$g/results.json ]; then echo "$(METHOD_RUNS)/$$g: done"; continue; fi; \
	  if [ $$g = baseline ]; then extra="distill.weight=0"; else extra="distill.geometry=$$g"; fi; \
	  $(BIN)/lightning-distill fit experiments/student.yaml distill.prototypes=$(TEACHER_BANK) $$extra \
	    output_dir=$(METHOD_RUNS)/$$g trainer.enable_progress_bar=false $(ARGS) || exit 1; \
	done
	$(BIN)/python experiments/method_figures.py --teacher $(dir $(TEACHER_BANK)) --out docs/geometry.md \
	  --students $(METHOD_RUNS)/baseline $(METHOD_RUNS)/prob $(METHOD_RUNS)/logprob $(METHOD_RUNS)/offdiag

reliability-figure: $(STAMP) ## resume and DDP training curves of docs/reliability.md (~2 min) -> docs/img/reliability.png
	$(BIN)/python experiments/reliability_figure.py
