#!/usr/bin/env bash
# One batched run on the 16-core accelerator host: build from source, both test suites
# (the AMX path included), then the benchmark figures. Logs go to $OUT (or ./out).
# GoogleTest is built from sources carried in .devcarry/googletest (no package manager there):
#   mkdir -p .devcarry && cp -r /usr/src/googletest .devcarry/   # then carry ".devcarry"
# kt-kernel for bench_vs_kt_kernel.py: its cp312 wheel and gguf's in .whl/ (carry ".whl"),
#   installed with pip --no-index --no-deps --target /tmp/site and put on PYTHONPATH.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export MAX_JOBS=16 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)"; grep -o -w -E "amx_(tile|bf16)" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
gcc --version | head -1; python3 -c "import torch; print('torch', torch.__version__)"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cmake -S tests/cpp -B /tmp/kt_cpp -DKT_GTEST_SOURCE_DIR="$PWD/.devcarry/googletest" > /dev/null &&
  cmake --build /tmp/kt_cpp -j 16 > "$OUT/cpp_build.log" 2>&1 &&
  /tmp/kt_cpp/kt_kernel_tests > "$OUT/gtest.log" 2>&1; tail -3 "$OUT/gtest.log"
cmake -S tests/cpp -B /tmp/kt_cpp_sanitize -DCMAKE_BUILD_TYPE=Sanitize -DKT_GTEST_SOURCE_DIR="$PWD/.devcarry/googletest" \
    > /dev/null && cmake --build /tmp/kt_cpp_sanitize -j 16 > "$OUT/cpp_sanitize_build.log" 2>&1 &&
  /tmp/kt_cpp_sanitize/kt_kernel_tests > "$OUT/gtest_sanitize.log" 2>&1; echo "sanitizers: $(tail -1 "$OUT/gtest_sanitize.log")"
python3 -c "import kt_ops; print('kt_ops path:', kt_ops.isa())"
python3 -m pytest ${PYTEST_ARGS:-tests} -q -p no:cacheprovider > "$OUT/pytest.log" 2>&1; tail -3 "$OUT/pytest.log"
for args in "$@"; do
  echo "== bench_moe.py $args"
  python3 benchmarks/bench_moe.py $args 2>&1 | tee -a "$OUT/bench.log"
done
