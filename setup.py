"""Build of kt_ops: the Python package and its C++ extension kt_ops._C.

Build with `pip install --no-build-isolation -e .` next to an installed torch: the extension
compiles against that torch. Sources are small translation units so MAX_JOBS=2 builds fast;
ISA-specific kernels select their instruction set per file (no -march=native).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))

ext = CppExtension(
    name="kt_ops._C",
    sources=sources,
    include_dirs=[os.path.join(ROOT, "include"), os.path.join(ROOT, "csrc")],
    extra_compile_args={"cxx": ["-O3", "-Wall", "-Wno-unknown-pragmas"]},  # torch picks the C++ standard
    libraries=["hwloc"],  # machine topology: thread pinning and NUMA placement
)

setup(
    name="kt_ops",
    version="0.1.0",
    description="PyTorch custom ops for LoRA fine-tuning of Mixture-of-Experts models with CPU experts",
    license="Apache-2.0",
    packages=find_packages(include=["kt_ops", "kt_ops.*"]),
    package_data={"kt_ops": ["shapes.json", "default/*.json", "default/*.jsonl"]},
    entry_points={"console_scripts": ["kt-sft = kt_ops.cli:main"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "transformers>=4.57", "peft>=0.17", "safetensors", "accelerate",
                      "tqdm", "matplotlib", "rouge-score", "sacrebleu"],
    extras_require={"test": ["pytest", "hypothesis", "pexpect"]},
)
