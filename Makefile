# Entry points a new user and CI type. `make deps install test` on a fresh Debian machine
# (as root, or with sudo) installs everything, builds and runs both test suites.
PY ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JOBS ?= 2
export PATH := /usr/lib/ccache:$(PATH)
export MAX_JOBS := $(JOBS)
# ccache hits across the editable, non-editable and wheel builds, which compile the same
# sources from different build directories.
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1

# transformers 4.x (per-expert nn.Linear experts) beside the installed 5.x, for the HF tests'
# second run; with the huggingface_hub and tokenizers it needs, and a datasets that imports
# with that huggingface_hub (4.x's Trainer imports datasets wherever it is installed).
TRANSFORMERS4 := .transformers4
TRANSFORMERS4_PINS := transformers==4.57.6 huggingface_hub==0.36.0 tokenizers==0.22.1 datasets==4.0.0

# A fresh virtual environment for test-install, and what the installed package must do there.
INSTALL_VENV := build/venv-install
SMOKE := import torch, kt_ops; w = torch.randn(2, 32, 16).bfloat16(); d = torch.randn(2, 16, 32).bfloat16(); \
	e = kt_ops.pack_experts(w, w, d); x = torch.randn(3, 16).bfloat16(); ids = torch.tensor([[0], [1], [1]]); \
	y = kt_ops.moe_sft(x, ids, torch.ones(3, 1), e); assert y.shape == (3, 16); print(kt_ops.__file__, kt_ops.isa())

.PHONY: deps deps-system deps-python install test test-cpp test-cpp-sanitize test-py test-hf-v4 test-install \
	example sft bench

deps: deps-system deps-python  ## everything below

deps-system:  ## compilers, GoogleTest, hwloc
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y --no-install-recommends build-essential cmake ninja-build ccache libgtest-dev libhwloc-dev

deps-python:  ## torch (the exact CPU wheel), the HF stack and the test tools, for $(PY)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install numpy pytest hypothesis pexpect transformers peft safetensors accelerate tqdm matplotlib trl \
		compressed-tensors rouge-score sacrebleu
	$(PY) -m pip install --upgrade --no-deps --target $(TRANSFORMERS4) $(TRANSFORMERS4_PINS)

install:  ## build the extension in place against the installed torch
	$(PY) -m pip install --no-build-isolation -e .

test: test-cpp test-cpp-sanitize test-py test-hf-v4 test-install

test-cpp:  ## GoogleTest: kernel core vs scalar reference, per ISA
	cmake -S tests/cpp -B build/cpp -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cpp -j $(JOBS)
	build/cpp/kt_kernel_tests

test-cpp-sanitize:  ## the same GoogleTest binary under AddressSanitizer + UndefinedBehaviorSanitizer
	cmake -S tests/cpp -B build/cpp-sanitize -G Ninja -DCMAKE_BUILD_TYPE=Sanitize
	cmake --build build/cpp-sanitize -j $(JOBS)
	build/cpp-sanitize/kt_kernel_tests

test-py:  ## pytest: ops vs reference, opcheck, gradcheck, compile, bad input, HF models (transformers 5.x)
	$(PY) -m pytest tests -q

test-hf-v4:  ## the HF model and kt-sft tests again on transformers 4.x models (per-expert expert lists)
	PYTHONPATH=$(TRANSFORMERS4) $(PY) -m pytest tests/test_hf.py tests/test_sft.py tests/test_sft_eval.py -q

# The README's install in a fresh venv that has `wheel` and the newest setuptools (the case
# where pip once fell back to `setup.py develop`); then `pip install .` (not editable) and a
# wheel built here, installed from outside the source tree.
test-install:  ## install into a fresh venv: editable, non-editable, and from a built wheel
	rm -rf $(INSTALL_VENV) build/dist
	$(PY) -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/python -m pip install -q --upgrade setuptools wheel
	$(MAKE) --no-print-directory PY=$(CURDIR)/$(INSTALL_VENV)/bin/python deps-python install
	cd / && $(CURDIR)/$(INSTALL_VENV)/bin/python -c "$(SMOKE)"
	$(INSTALL_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps .
	cd / && $(CURDIR)/$(INSTALL_VENV)/bin/python -c "$(SMOKE)" | grep -q "$(INSTALL_VENV)/lib/"
	$(INSTALL_VENV)/bin/python -m pip wheel -q --no-build-isolation --no-deps -w build/dist .
	$(INSTALL_VENV)/bin/python -m pip install -q --force-reinstall --no-deps build/dist/kt_ops-*.whl
	cd / && $(CURDIR)/$(INSTALL_VENV)/bin/python -c "$(SMOKE)" | grep -q "$(INSTALL_VENV)/lib/"

example:  ## one forward/backward of a Qwen3-30B-A3B-shaped MoE layer
	$(PY) examples/moe_layer.py

sft:  ## the main job on its built-in default: fine-tune the tiny Qwen3-MoE (evaluated on held-out questions), evaluate it, answer a file of prompts, ask it something
	kt-sft train --out runs/default --overwrite --keep-best
	kt-sft eval --adapter runs/default
	kt-sft infer --adapter runs/default --out runs/default/predictions.jsonl --overwrite
	kt-sft generate --adapter runs/default --prompt "What is the capital of Peru?"

bench:
	$(PY) benchmarks/bench_moe.py --shape qwen3-30b-a3b --tokens 2048
