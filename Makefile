# The commands anyone needs: make test, make bench, make gpu-check.
# `make test` and `make bench` set everything up on a new machine: a virtualenv in
# .venv with torch (TORCH_SPEC), then an in-place build of ln_ext._C.

PYTHON      ?= python3
VENV        ?= .venv
PY          ?= $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
DEPS        ?= numpy pytest expecttest==0.3.0 ninja setuptools wheel matplotlib tqdm scikit-learn $(MODEL_DEPS)
# The model libraries whose norms convert_layer_norm converts (tests build tiny models from
# configs; nothing is downloaded). timm needs torchvision, pinned to TORCH_SPEC's.
MODEL_DEPS  ?= transformers==5.23.0 timm==1.0.31 kernels==0.18.3 torchvision==0.29.1
# The CUDA toolkit, when this machine has one (auto-detection finds /usr/local and fails).
CUDA_HOME   ?= $(firstword $(wildcard /usr/local/cuda))
MAX_JOBS    ?= $(shell nproc)
# Without a visible GPU the CUDA kernels are built only when asked for (LN_EXT_CUDA=1, as CI
# does): nothing here would run them. Asked for, they are compiled for one arch (no
# TORCH_CUDA_ARCH_LIST: LN_EXT_ARCHS_WITHOUT_GPU, CI's sm_90): a quarter of an hour on two
# cores instead of the hour the four archs of a distributable wheel take.
LN_EXT_ARCHS_WITHOUT_GPU ?= 9.0
HAVE_GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
LN_EXT_CUDA ?= $(if $(HAVE_GPU),,0)
export CUDA_HOME MAX_JOBS LN_EXT_ARCHS_WITHOUT_GPU LN_EXT_CUDA

.PHONY: test check bench examples readme build gpu-check clean

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	touch $@

# Depends on the venv only when PY is the venv's python (not with PY=python3 on a GPU box).
build: $(if $(filter $(VENV)/%,$(PY)),$(VENV)/.ready)
	$(PY) setup.py -q build_ext --inplace

# make test: everything but the long checks (a smoke run of the device code's emulation
# included); make check: those (the full emulation and its TSan pass, the index model,
# AOTInductor deployment). CI runs both.
test: build
	$(PY) -m pytest -q -ra -m "not check" tests

check: build
	$(PY) -m pytest -q -ra -m check tests

bench: build
	$(PY) benchmarks/bench_layer_norm.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_rnn.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_norm_family.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_model_norms.py

# The two examples of the README (GPU if present, else a small CPU configuration),
# then the README's generated sections from their results and the benchmarks'.
# PYTHONPATH: the in-place build lives in this checkout, not in site-packages.
examples: build
	PYTHONPATH=$(CURDIR) $(PY) examples/transformer_dropin.py
	PYTHONPATH=$(CURDIR) $(PY) examples/ln_rnn_stability.py
	$(MAKE) readme

readme:
	$(PY) scripts/update_readme.py

# On a machine with an NVIDIA GPU: build for it, CUDA tests, compute-sanitizer,
# quick benchmarks; results under $(GPU_CHECK_OUT).
GPU_CHECK_OUT ?= gpu_out
gpu-check:
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) bash scripts/gpu_check.sh

clean:
	rm -rf build ln_ext/_C*.so
