# Entry points a new user and CI type. `make deps install test` on a fresh Debian machine
# (as root, or with sudo) installs everything, builds and runs both test suites.
PY ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JOBS ?= 2
export PATH := /usr/lib/ccache:$(PATH)
export MAX_JOBS := $(JOBS)

# transformers 4.x (per-expert nn.Linear experts) beside the installed 5.x, for the HF tests'
# second run; with the huggingface_hub and tokenizers it needs.
TRANSFORMERS4 := .transformers4
TRANSFORMERS4_PINS := transformers==4.57.6 huggingface_hub==0.36.0 tokenizers==0.22.1

.PHONY: deps install test test-cpp test-py test-hf-v4 example sft bench

deps:  ## compilers, GoogleTest, hwloc, torch (the exact CPU wheel), the HF stack and the test tools
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y --no-install-recommends build-essential cmake ninja-build ccache libgtest-dev libhwloc-dev
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install numpy pytest transformers peft safetensors accelerate tqdm matplotlib
	$(PY) -m pip install --upgrade --no-deps --target $(TRANSFORMERS4) $(TRANSFORMERS4_PINS)

install:  ## build the extension in place against the installed torch
	$(PY) -m pip install --no-build-isolation -e .

test: test-cpp test-py test-hf-v4

test-cpp:  ## GoogleTest: kernel core vs scalar reference, per ISA
	cmake -S tests/cpp -B build/cpp -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cpp -j $(JOBS)
	build/cpp/kt_kernel_tests

test-py:  ## pytest: ops vs reference, opcheck, gradcheck, compile, bad input, HF models (transformers 5.x)
	$(PY) -m pytest tests -q

test-hf-v4:  ## the HF model and kt-sft tests again on transformers 4.x models (per-expert expert lists)
	PYTHONPATH=$(TRANSFORMERS4) $(PY) -m pytest tests/test_hf.py tests/test_sft.py -q

example:  ## one forward/backward of a Qwen3-30B-A3B-shaped MoE layer
	$(PY) examples/moe_layer.py

sft:  ## the main job on its built-in default: fine-tune the tiny Qwen3-MoE, then ask it something
	kt-sft train --out runs/default --overwrite
	kt-sft generate --adapter runs/default --prompt "What is the capital of Peru?"

bench:
	$(PY) benchmarks/bench_moe.py --shape qwen3-30b-a3b --tokens 2048
