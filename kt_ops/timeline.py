"""A picture of one training step: when the CPU's experts (the kt ops), the GPU's kernels, the
copies between host and device and the optimizer ran, and how much of the step the GPU sat idle.

    with kt_ops.timeline.record_step(layers=48) as step:
        trainer.loss_and_backward(rows)
        trainer.optimizer_step()
    step.plot("timeline.png")
    print(step.idle_share("GPU kernels"))

It reads torch.profiler's events (CPU ops, and CUDA kernels and copies where there is a GPU),
so it costs the profiler's overhead: record a step beside the timed ones, not one of them.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch

CPU_EXPERTS, GPU_KERNELS, COPIES, OPTIMIZER = "CPU experts", "GPU kernels", "copies", "optimizer"
LANES = (CPU_EXPERTS, GPU_KERNELS, COPIES, OPTIMIZER)
_KT_OPS = {"kt::moe_sft_forward": "F", "kt::moe_sft_backward": "B"}
_STEP = "kt_ops.timeline.step"


@dataclass(frozen=True)
class Span:
    """Something that ran in ``lane`` from ``start`` to ``end`` seconds after the step began; a
    kt op's ``label`` is F or B and, where the layer count is known, its layer (``F3``), and its
    ``thread`` the calling thread's number in order of appearance (two with overlapping
    micro-batches, whose calls each include the wait for the CPU's one kt call at a time)."""

    lane: str
    start: float
    end: float
    label: str = ""
    thread: int = 0


def _union(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


@dataclass
class StepTimeline:
    """The spans of one step, which lasted ``seconds``."""

    seconds: float = 0.0
    spans: list[Span] = field(default_factory=list)

    def lane(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.lane == name]

    def busy(self, lane: str) -> float:
        """Seconds of the step in which something of ``lane`` ran (overlaps counted once)."""
        return _union([(max(s.start, 0.0), min(s.end, self.seconds)) for s in self.lane(lane)
                       if s.end > 0 and s.start < self.seconds])

    def idle_share(self, lane: str = GPU_KERNELS) -> float:
        """The share of the step in which nothing of ``lane`` ran."""
        return 1.0 - self.busy(lane) / self.seconds if self.seconds > 0 else 1.0

    def plot(self, path: str, title: str = "one training step") -> None:
        """Writes the step as a PNG: one row per lane, kt ops labelled with their layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ms = 1e3
        fig, ax = plt.subplots(figsize=(14, 3.2), dpi=110)
        colors = {CPU_EXPERTS: "#1f77b4", GPU_KERNELS: "#2ca02c", COPIES: "#ff7f0e", OPTIMIZER: "#9467bd"}
        for row, lane in enumerate(reversed(LANES)):
            spans = self.lane(lane)
            bands = 1 + max((s.thread for s in spans), default=0)  # one band per calling thread
            for band in range(bands):
                mine = [s for s in spans if s.thread == band]
                bottom, height = row + 0.4 - 0.8 * (band + 1) / bands, 0.8 / bands
                bars = [(s.start * ms, (s.end - s.start) * ms) for s in mine]
                face = ["#aec7e8" if s.label.startswith("B") else colors[lane] for s in mine]
                ax.broken_barh(bars, (bottom, height), facecolors=face or colors[lane], linewidth=0.3,
                               edgecolor="white")
                for s in mine:
                    if s.label and (s.end - s.start) > 0.012 * self.seconds:
                        ax.text((s.start + s.end) / 2 * ms, bottom + height / 2, s.label, ha="center", va="center",
                                fontsize=6)
        ax.set_yticks(range(len(LANES)))
        ax.set_yticklabels([f"{lane} ({self.busy(lane) / self.seconds:.0%})" if self.seconds else lane
                            for lane in reversed(LANES)])
        ax.set_xlim(0, self.seconds * ms)
        ax.set_xlabel("ms from the step's start (CPU experts: forward dark, backward light)")
        ax.set_title(f"{title}: {self.seconds:.3f} s, GPU idle {self.idle_share():.0%}")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def _spans(events, start_us: float, layers: int) -> list[Span]:
    calls: dict[tuple[int, str], int] = defaultdict(int)  # kt calls so far per (thread, F/B)
    threads: dict[int, int] = {}
    spans = []
    for e in sorted(events, key=lambda e: e.time_range.start):
        begin, end = (e.time_range.start - start_us) / 1e6, (e.time_range.end - start_us) / 1e6
        if e.name in _KT_OPS and e.device_type == torch.autograd.DeviceType.CPU:
            kind = _KT_OPS[e.name]
            n = calls[(e.thread, kind)]
            calls[(e.thread, kind)] += 1
            layer = "" if not layers else str(n % layers if kind == "F" else layers - 1 - n % layers)
            spans.append(Span(CPU_EXPERTS, begin, end, kind + layer, threads.setdefault(e.thread, len(threads))))
        elif e.name.startswith("Optimizer.step#"):
            spans.append(Span(OPTIMIZER, begin, end))
        elif e.device_type == torch.autograd.DeviceType.CUDA:
            spans.append(Span(COPIES if "memcpy" in e.name.lower() else GPU_KERNELS, begin, end))
    return spans


@contextlib.contextmanager
def record_step(layers: int = 0) -> Iterator[StepTimeline]:
    """Records what runs inside the block (one training step, say) into the StepTimeline it
    yields, filled when the block ends; ``layers``, the model's MoE layer count, numbers the kt
    ops by layer (forward calls in layer order, backward calls in reverse, per thread: a layer
    whose slots all went to a GPU share makes no call, and the numbers after it shift). With a
    GPU, the block's end waits for the device."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = torch.cuda.is_available()
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    timeline = StepTimeline()
    # Every thread: the micro-batch lanes of kt_ops.overlap run the model in threads of their own.
    all_threads = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with torch.profiler.profile(activities=activities, experimental_config=all_threads) as prof:
        with torch.profiler.record_function(_STEP):
            yield timeline
            if cuda:
                torch.cuda.synchronize()
    events = prof.events()
    step = next(e for e in events if e.name == _STEP)
    timeline.seconds = (step.time_range.end - step.time_range.start) / 1e6
    timeline.spans = _spans([e for e in events if e is not step], step.time_range.start, layers)
