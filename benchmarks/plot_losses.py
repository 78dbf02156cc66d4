"""Loss curves of several kt-sft runs side by side, e.g. one per experts format:

    for f in bf16 int8 int4 fp8; do kt-sft train --out runs/$f --experts-format $f; done
    python benchmarks/plot_losses.py loss_by_format.png runs/bf16 runs/int8 runs/int4 runs/fp8

Reads each run's per-step losses from its resumable checkpoint (``checkpoint/trainer_state.json``),
draws them on one log-scale plot labelled by the run directories' names, and prints, per run, the
loss at a few steps and the mean of the last 20.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def run_losses(run: str) -> list[float]:
    with open(os.path.join(run, "checkpoint", "trainer_state.json")) as f:
        return [float(v) for v in json.load(f)["losses"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("png", help="the plot to write")
    p.add_argument("runs", nargs="+", help="kt-sft --out directories")
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in args.runs:
        losses = run_losses(run)
        name = os.path.basename(os.path.normpath(run))
        ax.plot(range(1, len(losses) + 1), losses, label=name, linewidth=1)
        marks = sorted({i for i in (0, 9, 49, 99, 199, len(losses) - 1) if i < len(losses)})
        tail = losses[-20:]
        print(f"{name}: {len(losses)} steps; " + ", ".join(f"step {i + 1} {losses[i]:.3f}" for i in marks)
              + f"; mean of the last {len(tail)} {sum(tail) / len(tail):.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
