"""Two micro-batches in flight (kt_ops.overlap): the same losses and gradients as one row at a
time, errors of a lane reach the caller, randomness turns it off, and the flag's defaults."""
import threading

import pytest
import torch
from torch import nn

from kt_ops.cli import build_parser, train_args
from kt_ops.overlap import Lanes, uses_randomness
from kt_ops.train import TrainArgs, Trainer
from moe_case import assert_close

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


def step(tmp_path, rows, **kw):
    trainer = Trainer(TrainArgs(out=str(tmp_path / "unused"), steps=1, dtype="float32", progress=False,
                                target_modules=ATTENTION, **kw), log=lambda m: None)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B everywhere, so every LoRA tensor gets a gradient
        for p in trainer.params:
            p.add_(torch.randn_like(p) * 0.01)
    loss, tokens = trainer.loss_and_backward(rows)
    return trainer, loss, tokens, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_rows_in_flight_give_the_sequential_gradients_bit_for_bit(device, checkpointing, tmp_path):
    rows = [[0, 1], [2, 3, 4]]
    trainer, loss, tokens, grads = step(tmp_path, rows, device=device, overlap=True, grad_checkpointing=checkpointing)
    assert trainer.lanes is not None
    _, loss_seq, tokens_seq, grads_seq = step(tmp_path, rows, device=device, overlap=False,
                                              grad_checkpointing=checkpointing)
    assert (loss, tokens) == (loss_seq, tokens_seq)
    assert grads.keys() == grads_seq.keys()
    for name, g in grads_seq.items():
        assert g.abs().sum() > 0, name
        assert torch.equal(grads[name], g), name


@pytest.mark.parametrize("device", DEVICES)
def test_four_rows_in_flight_agree_with_the_sequential_step(device, tmp_path):
    rows = [[0], [1, 2], [3], [4, 5]]
    _, loss, tokens, grads = step(tmp_path, rows, device=device, overlap=True)
    _, loss_seq, tokens_seq, grads_seq = step(tmp_path, rows, device=device, overlap=False)
    assert tokens == tokens_seq
    assert abs(loss - loss_seq) < 1e-6 * loss_seq
    for name, g in grads_seq.items():
        assert_close(name, grads[name], g, torch.float32)  # the sums' order may differ


def test_a_lanes_error_reaches_the_caller_and_stops_the_other_lane():
    ran = []

    def work(i):
        ran.append(i)
        if i == 1:
            raise ValueError("row 1 is bad")
        return i

    with pytest.raises(ValueError, match="row 1 is bad"):
        Lanes(torch.device("cpu"), nn.Linear(1, 1)).run(work, list(range(8)))
    assert 7 not in ran or 5 not in ran  # lane 1 stopped at its first row


def test_lanes_return_results_in_item_order_from_two_threads():
    names = {}

    def work(i):
        names[i] = threading.current_thread().name
        return i * i

    assert Lanes(torch.device("cpu"), nn.Linear(1, 1)).run(work, list(range(5))) == [0, 1, 4, 9, 16]
    assert names[0] == names[2] == names[4] != names[1] == names[3]


def test_dropout_turns_overlap_off_with_a_warning(tmp_path):
    assert uses_randomness(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))) is None
    assert "p=0.1" in uses_randomness(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    trainer = Trainer(TrainArgs(out=str(tmp_path / "unused"), steps=1, progress=False, device="cpu"),
                      log=lambda m: None)
    assert trainer._lanes(True) is not None
    trainer.model.add_module("dropout_for_test", nn.Dropout(0.2))
    warnings = []
    trainer.log = warnings.append
    assert trainer._lanes(True) is None
    assert "dropout_for_test" in warnings[0] and "one at a time" in warnings[0]


@pytest.mark.parametrize("argv, expected", [([], None), (["--overlap"], True), (["--no-overlap"], False)])
def test_overlap_flag(argv, expected, tmp_path):
    ns = build_parser().parse_args(["train", "--out", str(tmp_path / "run"), *argv])
    assert train_args(ns).overlap is expected


def test_overlap_defaults_to_on_with_a_gpu_only(tmp_path):
    trainer = Trainer(TrainArgs(out=str(tmp_path / "unused"), steps=1, progress=False, device="cpu"),
                      log=lambda m: None)
    assert trainer.lanes is None
