"""Two micro-batches in flight: while one lane's routed experts compute on the CPU (the kt ops
release the GIL), the other lane's attention, routers and shared experts run on the GPU.

A lane is a Python thread with a CUDA stream of its own, so a lane's host/device copies wait
only for its own kernels. The kt ops run one call at a time (the CPU pool takes one job), which
makes the lanes take turns on the CPU while the GPU works for whichever lane is not there.
PEFT's ``target_parameters`` LoRA parametrizes the experts' weights for the length of each
forward (it registers and removes a parametrization, swapping the module's class, under
torch's module-global parametrization cache), so forwards through such modules take one lock:
they would wait for the CPU's one kt call at a time anyway.
Gradients accumulate into ``.grad`` as in one thread (autograd's accumulation is locked per
parameter); with two rows the sum is the sequential one bit for bit (a + b = b + a), with more
the order of the additions can differ by rounding.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")
R = TypeVar("R")

LANES = 2


def uses_randomness(model: nn.Module) -> Optional[str]:
    """What in ``model`` draws random numbers in training (a dropout with p > 0), or None.
    Lanes draw from the one generator in an order that depends on timing, so such a model's
    steps would not repeat: the trainer runs them one row at a time instead."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name} (p={module.p:g})"
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout"):
        value = getattr(config, key, 0.0)
        if isinstance(value, (int, float)) and value > 0:
            return f"config.{key}={value:g}"
    return None


def _parametrized_per_forward(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.layer import ParamWrapper

    return [m for m in model.modules() if isinstance(m, ParamWrapper)]


class Lanes:
    """Runs ``work(item)`` for a sequence of items, item i in lane i % 2, and returns the
    results in item order. ``model``'s modules that PEFT parametrizes per forward run one
    forward at a time. The streams persist across calls (the caching allocator keeps blocks
    per stream)."""

    def __init__(self, device: torch.device, model: nn.Module):
        self.device = device
        lock = threading.RLock()  # re-entered by the PEFT wrappers nested around one experts module

        def enter(*_) -> None:  # a pre-hook's return value would replace the module's inputs
            lock.acquire()

        def leave(*_) -> None:
            lock.release()

        for module in _parametrized_per_forward(model):
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave, always_call=True)
        self.streams = ([torch.cuda.Stream(device) for _ in range(LANES)] if device.type == "cuda" else [None] * LANES)

    def run(self, work: Callable[[T], R], items: Sequence[T]) -> list[R]:
        results: list[Optional[R]] = [None] * len(items)
        errors: list[BaseException] = []
        threads_of_caller = torch.get_num_threads()
        main_stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

        def lane(index: int) -> None:
            torch.set_num_threads(threads_of_caller)  # a new thread starts with OpenMP's default
            stream = self.streams[index]
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    if stream is not None:
                        stream.wait_stream(main_stream)  # the optimizer's last update is in
                    for i in range(index, len(items), LANES):
                        if errors:
                            return
                        results[i] = work(items[i])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=lane, args=(i,), name=f"kt-lane-{i}", daemon=True)
                   for i in range(min(LANES, len(items)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if main_stream is not None:
            for stream in self.streams:
                main_stream.wait_stream(stream)  # the optimizer reads the lanes' gradients
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]

