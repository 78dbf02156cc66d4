"""Several ranks on one host (torchrun, gloo, CPU): the packed experts exist once (every rank maps
the same shared-memory file; one rank packs), DDP and FSDP2 over a model with kt experts give
the one-process gradients of the combined batch, an error loading the experts reaches every
rank, and kt-sft under torchrun trains as one process does, resumes, and fails fast when a rank
dies."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import kt_ops
from moe_case import assert_close

pytest.importorskip("transformers.integrations.moe", reason="transformers 4.x has no experts interface")

HERE = os.path.dirname(os.path.abspath(__file__))
# The ranks import this checkout's kt_ops and the tests' helpers, as the tests here do.
PYTHONPATH = os.pathsep.join([HERE, os.path.dirname(HERE)])
WORKER = os.path.join(HERE, "distributed_worker.py")
RANKS = 2


def torchrun(*args, timeout=600, env=None, **kw) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (a free port of its own)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})}, **kw)


def run_worker(tmp_path, mode, checkpoint=None):
    done = torchrun(WORKER, mode, str(tmp_path), *([str(checkpoint)] if checkpoint else []))
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(RANKS)]
    tensors = [load_file(tmp_path / f"rank{r}.safetensors") if (tmp_path / f"rank{r}.safetensors").exists() else {}
               for r in range(RANKS)]
    return results, tensors


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ddp_and_fsdp2_give_the_one_process_gradients_with_the_experts_once_on_the_host(mode, tmp_path, monkeypatch):
    import distributed_worker

    results, tensors = run_worker(tmp_path, mode)
    assert all("error" not in r for r in results), results
    # One copy: both ranks compute with the same shared-memory file, unlinked once mapped.
    maps = [r["mapping"] for r in results]
    assert maps[0]["inode"] == maps[1]["inode"] and all(m["shared"] for m in maps)
    assert all("kt_ops-" in m["path"] and m["path"].endswith("(deleted)") for m in maps)
    assert results[0]["shared_bytes"] > 0
    # Each rank on cores of its own, which the kernels' topology (and so their pool) reports.
    assert not set(results[0]["cpus"]) & set(results[1]["cpus"])
    for r in results:
        listed = {int(c) for c in r["topology"].rpartition("{")[2].rstrip("}").split(",")}
        assert listed and listed <= set(r["cpus"]), r["topology"]
    # The one-process reference: both rows at once.
    monkeypatch.setenv("KT_OPS_MAX_ISA", "avx2")
    model = distributed_worker.tiny_kt_model()
    rows = distributed_worker.ROWS[:RANKS]
    model(input_ids=rows, labels=rows).loss.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for got in tensors:
        assert got.keys() == want.keys()
        for name, g in want.items():
            assert_close(name, got[name], g, torch.float32)
    if mode == "ddp":  # per layer: two stand-ins and the LoRA of two PEFT wrappers
        assert results[0]["ignored"] == 6 * len(model.get_base_model().model.layers)


def test_load_model_packs_the_experts_once_per_host(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    results, tensors = run_worker(out, "load", checkpoint)
    assert all("error" not in r for r in results), results
    layers = len(results[0]["mappings"])
    assert [r["packed_layers"] for r in results] == [layers, 0]
    for a, b in zip(*(r["mappings"] for r in results)):
        assert a["inode"] == b["inode"] and a["shared"] and b["shared"]
    want = kt_ops.load_experts(checkpoint, progress=False)
    for i, layer in enumerate(sorted(want)):
        for j, t in enumerate(want[layer].tensors):
            assert torch.equal(tensors[0][f"{i}.{j}"], t) and torch.equal(tensors[1][f"{i}.{j}"], t)
    assert results[0]["logits_sum"] == results[1]["logits_sum"]


def test_an_error_loading_the_experts_reaches_every_rank(checkpoint, tmp_path):
    from safetensors.torch import save_file

    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, checkpoint / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    results, _ = run_worker(out, "load", checkpoint)
    assert "missing key model.layers.1.mlp.experts.3.up_proj.weight" in results[0]["error"]
    assert results[1]["error"].startswith("KeyError") and "experts.3.up_proj" in results[1]["error"]
    assert "local rank 0, which makes them for this host" in results[1]["error"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_hosts(*args, ranks_per_host=1, timeout=600):
    """``args`` under torchrun as a job of two hosts of ``ranks_per_host`` ranks each, both on
    this machine (two agents meeting at one rendezvous); returns the two agents' results."""
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
               str(ranks_per_host), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", *args]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    try:
        return [subprocess.CompletedProcess(command, a.wait(timeout), *a.communicate()) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()


@pytest.mark.parametrize("ranks_per_host", [1, 2])
def test_experts_spread_over_two_hosts_give_the_one_process_gradients(ranks_per_host, checkpoint, tmp_path,
                                                                      monkeypatch):
    """Each host holds half of every layer's experts (once, shared by its ranks); tokens cross to
    their experts' host and back. Against one process with every expert, on the same rows."""
    out = tmp_path / "out"
    out.mkdir()
    for done in two_hosts(WORKER, "sharded", str(out), str(checkpoint), ranks_per_host=ranks_per_host):
        assert done.returncode == 0, done.stderr[-3000:]
    ranks = 2 * ranks_per_host
    results = [json.load(open(out / f"rank{r}.json")) for r in range(ranks)]
    assert all("error" not in r for r in results), results
    import distributed_worker

    monkeypatch.setenv("KT_OPS_MAX_ISA", "avx2")
    torch.manual_seed(0)
    model = kt_ops.load_model(checkpoint, config=kt_ops.ExpertLoraConfig(4, 8, target_modules=("o_proj",)),
                              dtype=torch.float32, progress=False)
    total = len(next(iter(kt_ops.load_experts(checkpoint, progress=False).values())).gate_up[0])
    assert all(r["held"] == [total // 2] * len(r["held"]) for r in results)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    rows = distributed_worker.ROWS[:ranks]
    model(input_ids=rows, labels=rows).loss.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for r in range(ranks):
        got = load_file(out / f"rank{r}.safetensors")
        assert got.keys() == want.keys()
        for name, g in want.items():
            assert_close(name, got[name], g, torch.float32)


def test_the_experts_lora_is_held_once_per_host_and_each_rank_steps_a_share(tmp_path):
    results, tensors = run_worker(tmp_path, "trainer")
    assert all("error" not in r for r in results), results
    stepped = [set(r["stepped"]) for r in results]
    everything = set(range(len(tensors[0])))
    assert stepped[0] and stepped[1] and not stepped[0] & stepped[1] and stepped[0] | stepped[1] == everything
    assert [set(r["with_state"]) for r in results] == stepped  # optimizer state only for its share
    maps = [r["lora_mapping"] for r in results]
    assert maps[0]["inode"] == maps[1]["inode"] and all(m["shared"] for m in maps)
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


# ---------------------------------------------------------------- kt-sft under torchrun

TRAIN = ["-m", "kt_ops", "train", "--steps", "4", "--max-tokens-per-step", "512", "--micro-batch-tokens", "256",
         "--device", "cpu", "--no-progress"]


def kt_sft(out, *extra, ranks=True):
    if ranks:
        return torchrun(*TRAIN, "--out", str(out), *extra)
    return subprocess.run([sys.executable, *TRAIN, "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": PYTHONPATH})


def adapters_equal(a, b):
    ta, tb = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys()
    for k in ta:
        # Two ranks' shares sum exactly as one process adds the two rows: a + b either way.
        assert torch.equal(ta[k], tb[k]), k


def test_kt_sft_under_torchrun_trains_as_one_process_and_resumes(tmp_path):
    one, two, halves = tmp_path / "one", tmp_path / "two", tmp_path / "halves"
    done = kt_sft(one, ranks=False)
    assert done.returncode == 0, done.stderr[-3000:]
    done = kt_sft(two)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"completed": true') == 1  # rank 0 speaks for the job
    adapters_equal(one, two)
    m1, m2 = (json.load(open(d / "metrics.json")) for d in (one, two))
    assert (m2["ranks"], m2["loss_last"], m2["tokens"]) == (2, m1["loss_last"], m1["tokens"])

    done = kt_sft(halves, "--stop-after", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(halves, tmp_path / "halves_alone")
    done = torchrun("-m", "kt_ops", "train", "--resume", str(halves), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    adapters_equal(two, halves)
    # The checkpoint holds every share of the optimizer state: one process resumes it as well.
    done = subprocess.run([sys.executable, "-m", "kt_ops", "train", "--resume", str(tmp_path / "halves_alone"),
                           "--no-progress"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert done.returncode == 0, done.stderr[-3000:]
    adapters_equal(two, tmp_path / "halves_alone")


def test_kt_sft_under_torchrun_with_checkpointing_and_accumulation_trains_as_one_process(tmp_path):
    """Activation checkpointing (non-reentrant, the experts' state kept outside it) and four
    rows a step, two per rank (accumulated under DDP's no_sync, summed on the last). The ranks
    add the rows' gradients in another order than one process, so the runs agree to rounding:
    the losses, as in the test of two hosts below."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--grad-checkpointing", "--micro-batch-tokens", "128", "--dtype", "float32"]
    done = kt_sft(one, *extra, ranks=False)
    assert done.returncode == 0, done.stderr[-3000:]
    done = kt_sft(two, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    m1, m2 = (json.load(open(d / "metrics.json")) for d in (one, two))
    assert m2["loss_first"] == pytest.approx(m1["loss_first"], rel=1e-5)
    for key in ("loss_last", "eval_loss_last"):
        assert m2[key] == pytest.approx(m1[key], rel=2e-3), key


def test_kt_sft_with_experts_spread_over_two_hosts_trains_as_one_process(tmp_path):
    """The gradients agree to fp32 rounding (the test above); after a few AdamW steps, which
    move every weight by about the learning rate whatever its gradient's size, the losses agree
    to that rounding's effect. Rows of at most 170 tokens make steps of three or more rows, which
    two ranks cannot share evenly: one runs a row weighted 0, every forward being an exchange."""
    one, two = tmp_path / "one", tmp_path / "two"
    rows = ["--micro-batch-tokens", "170", "--dtype", "float32"]
    done = kt_sft(one, *rows, ranks=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for done in two_hosts(*TRAIN, "--out", str(two), *rows, "--shard-experts"):
        assert done.returncode == 0, done.stderr[-3000:]
    m1, m2 = (json.load(open(d / "metrics.json")) for d in (one, two))
    assert m2["ranks"] == 2 and m2["tokens"] == m1["tokens"]
    for key in ("loss_first", "loss_last", "eval_loss_last"):
        assert m2[key] == pytest.approx(m1[key], rel=2e-3), key
    # Before any step: the same function, a token's parts from the two hosts summed in another order.
    assert m2["loss_first"] == pytest.approx(m1["loss_first"], rel=1e-4)


def test_a_rank_that_dies_takes_the_job_down(tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(RANKS), *TRAIN[:3], "--out", str(out), "--steps", "400",
                            "--max-tokens-per-step", "512", "--micro-batch-tokens", "256", "--device", "cpu",
                            "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": PYTHONPATH})
    try:
        victim = None
        deadline = time.time() + 300
        while victim is None and time.time() < deadline:
            time.sleep(1)
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                    cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:
                    continue
                if b"LOCAL_RANK=1" in environ and b"kt_ops" in cmdline and str(out).encode() in cmdline:
                    victim = int(pid)
        assert victim is not None, "rank 1 never started"
        time.sleep(15)  # into training
        killed = time.time()
        os.kill(victim, signal.SIGKILL)
        _, err = job.communicate(timeout=240)
        assert job.returncode != 0
        assert time.time() - killed < 60  # down, not hung (about a second here)
        assert "local_rank: 1" in err and "SIGKILL" in err, err[-2000:]  # torchrun names the rank that died
    finally:
        if job.poll() is None:
            job.kill()
