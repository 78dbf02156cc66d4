"""Median wall time of each phase of the kernels, from the lines KT_OPS_PROFILE=1 prints.

    KT_OPS_PROFILE=1 python benchmarks/bench_moe.py ... 2> run.prof
    python benchmarks/profile_phases.py old.prof new.prof
"""
import re
import statistics
import sys
from collections import defaultdict


def main() -> None:
    for path in sys.argv[1:]:
        per = defaultdict(list)
        with open(path) as f:
            for line in f:
                m = re.match(r"kt\.moe_sft_(\w+) T=\d+:(.*)", line)
                if not m:
                    continue
                for name, ms in re.findall(r" (\S+) ([\d.]+) ms", m.group(2)):
                    per[(m.group(1), name)].append(float(ms))
        total = defaultdict(float)
        print(path)
        for (call, name), values in per.items():
            median = statistics.median(values)
            total[call] += median
            print(f"  {call:9} {name:14} {median:7.2f} ms  (n={len(values)})")
        for call, t in total.items():
            print(f"  {call:9} {'sum':14} {t:7.2f} ms")


if __name__ == "__main__":
    main()
