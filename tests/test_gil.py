"""The kt ops release Python's GIL while they compute, so another Python thread (one that
launches a GPU's work for another micro-batch, say) runs meanwhile."""
import sys
import threading
import time

import torch

import kt_ops
from kt_ops.shapes import MoeShape
from kt_ops.testing import random_layer

SHAPE = MoeShape("gil", hidden=1024, intermediate=512, experts=16, top_k=4, shared_experts=0, moe_layers=1, arch="test")


def test_python_runs_while_a_kt_op_computes():
    layer = random_layer(SHAPE, tokens=1024)
    call = lambda: kt_ops.moe_sft(layer.x, layer.topk_ids, layer.topk_weights, layer.experts,  # noqa: E731
                                  layer.lora, layer.lora_scaling)
    call()  # warm: the pool's threads and scratch exist before the measured call
    window = {}

    def worker():
        window["start"] = time.perf_counter()
        call()
        window["end"] = time.perf_counter()

    ticks = []
    thread = threading.Thread(target=worker)
    thread.start()
    while thread.is_alive():
        ticks.append(time.perf_counter())
    thread.join()
    # Holding the GIL, the op would let this thread run only around its own edges (one switch
    # interval each side); released, it runs all along.
    edge = 2 * sys.getswitchinterval()
    inside = [t for t in ticks if window["start"] + edge < t < window["end"] - edge]
    assert window["end"] - window["start"] > 4 * edge, "the op ended too soon to tell"
    assert len(inside) > 100, (len(inside), window)
