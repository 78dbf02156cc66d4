#!/usr/bin/env bash
# Same-call A/B of two source trees on one layer: runs benchmarks/bench_moe.py of each tree on
# its own build in ABBA order (old new new old ...: neither always runs first, which on the
# accelerator hosts alone made a 4-9% difference), with KT_OPS_PROFILE, then prints each run's
# line, the sorted totals and the median phase times.
#   benchmarks/ab_layer.sh OLD_TREE NEW_TREE [pairs] [bench_moe.py arguments...]
# Both trees must be built in place (python setup.py build_ext --inplace).
set -u
old=$1 new=$2 pairs=${3:-4}; shift $(( $# < 3 ? $# : 3 ))
args=${*:---tokens 4096 --ref-repeats 0 --repeats 4}
tmp=$(mktemp -d)
run() {  # tree label
  KT_OPS_PROFILE=1 PYTHONPATH=$1 python3 "$1/benchmarks/bench_moe.py" $args > "$tmp/$2.out" 2>> "$tmp/$2.prof"
  echo "$2 $(grep '^kt_ops' "$tmp/$2.out")" | tee -a "$tmp/lines"
}
for ((i = 0; i < pairs; ++i)); do
  if ((i % 2 == 0)); then run "$old" old; run "$new" new; else run "$new" new; run "$old" old; fi
done
for v in old new; do echo "$v total s: $(grep "^$v" "$tmp/lines" | awk '{print $5}' | sort -n | tr '\n' ' ')"; done
python3 "$(dirname "$0")/profile_phases.py" "$tmp/old.prof" "$tmp/new.prof"
