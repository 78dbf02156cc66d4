"""kt_ops.timeline: a recorded step has every kt call (numbered by layer, from each lane's
thread) and the optimizer, busy time counts overlaps once, and the picture is written."""
import matplotlib.image
import pytest
import torch

from kt_ops import timeline
from kt_ops.experts import experts_modules
from kt_ops.timeline import CPU_EXPERTS, GPU_KERNELS, OPTIMIZER, Span, StepTimeline
from kt_ops.train import TrainArgs, Trainer


def test_busy_time_counts_overlapping_spans_once_and_only_inside_the_step():
    step = StepTimeline(10.0, [Span(GPU_KERNELS, 1, 3), Span(GPU_KERNELS, 2, 4), Span(GPU_KERNELS, 6, 7),
                               Span(GPU_KERNELS, 9, 12), Span(GPU_KERNELS, -2, -1), Span(CPU_EXPERTS, 0, 10)])
    assert step.busy(GPU_KERNELS) == pytest.approx(3 + 1 + 1)
    assert step.idle_share() == pytest.approx(0.5)
    assert step.idle_share(CPU_EXPERTS) == 0
    assert StepTimeline().idle_share() == 1.0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_recorded_step_shows_every_kt_call_by_layer_and_the_optimizer(overlap, tmp_path):
    trainer = Trainer(TrainArgs(out=str(tmp_path / "unused"), steps=1, progress=False, device="cpu",
                                max_tokens_per_step=512, micro_batch_tokens=256, overlap=overlap), log=lambda m: None)
    layers = len(experts_modules(trainer.model))
    rows = next(trainer.planned_steps())
    assert len(rows) == 2
    with timeline.record_step(layers=layers) as step:
        trainer.loss_and_backward(rows)
        trainer.optimizer_step()
    calls = step.lane(CPU_EXPERTS)
    want = [f"F{i}" for i in range(layers)] + [f"B{i}" for i in reversed(range(layers))]
    for thread in {s.thread for s in calls}:
        labels = [s.label for s in sorted(calls, key=lambda s: s.start) if s.thread == thread]
        assert labels == want * (1 if overlap else 2)
    assert len({s.thread for s in calls}) == (2 if overlap else 1)
    assert all(0 <= s.start < s.end <= step.seconds for s in calls)
    assert len(step.lane(OPTIMIZER)) == 1 and step.lane(OPTIMIZER)[0].start > max(s.end for s in calls)
    if not torch.cuda.is_available():
        assert step.idle_share() == 1.0
    path = str(tmp_path / "step.png")
    step.plot(path)
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 1000
