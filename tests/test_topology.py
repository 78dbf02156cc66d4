"""kt_ops.topology(), pinning and the NUMA split, on this machine and on synthetic multi-node
topologies (KT_OPS_TOPOLOGY is read once per process, so those run in a subprocess)."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import kt_ops
from moe_case import make_case, run_kt

HERE = os.path.dirname(os.path.abspath(__file__))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=HERE, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)


def listed_cpus(desc: str) -> list[int]:
    """The CPUs of 'node 0 cores {0,1}, node 1 cores {2,3}'."""
    return [int(c) for part in desc.split("{")[1:] for c in part.split("}")[0].split(",")]


def test_topology_lists_cpus_this_process_may_use():
    desc = kt_ops.topology()
    assert desc.startswith("1 NUMA node:") or "NUMA nodes:" in desc
    assert "synthetic" not in desc
    cpus = listed_cpus(desc)
    assert cpus and len(set(cpus)) == len(cpus)
    assert set(cpus) <= os.sched_getaffinity(0)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_process_held_to_some_cpus_gets_only_those():
    """A taskset, or a rank's share of a host (kt_ops.distributed.use_own_cores): the kernels'
    topology, and so the pool's pinning, keeps to the CPUs the loading thread may use."""
    cpu = max(os.sched_getaffinity(0))
    out = run_python(f"""
        import os
        os.sched_setaffinity(0, {{{cpu}}})
        import kt_ops
        print(kt_ops.topology())
    """)
    assert out.returncode == 0, out.stderr
    assert listed_cpus(out.stdout) == [cpu], out.stdout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_workers_are_pinned_to_listed_cores():
    """After a parallel call the pool's worker is bound to exactly one listed core; with
    KT_OPS_PIN_THREADS=0 no thread is."""
    code = """
        import os, torch, kt_ops
        from moe_case import make_case, run_kt
        torch.set_num_threads(2)
        run_kt(make_case(64, 64, 4, 2, 64, 8))
        me = os.getpid()
        single = sorted(next(iter(os.sched_getaffinity(t))) for t in map(int, os.listdir(f"/proc/{me}/task"))
                        if t != me and len(os.sched_getaffinity(t)) == 1)
        print(kt_ops.topology()); print(single)
    """
    pinned = run_python(code)
    assert pinned.returncode == 0, pinned.stderr
    desc, single = pinned.stdout.strip().splitlines()[-2:]
    # Thread slots go round-robin over the nodes: the first worker (slot 1) has node 1 % n's
    # core 1 // n.
    nodes = [[int(c) for c in m.split(",")] for m in re.findall(r"cores \{([\d,]+)\}", desc)]
    assert json.loads(single) == [nodes[1 % len(nodes)][1 // len(nodes)]]
    unpinned = run_python(code, KT_OPS_PIN_THREADS="0")
    assert unpinned.returncode == 0, unpinned.stderr
    assert json.loads(unpinned.stdout.strip().splitlines()[-1]) == []


SYNTHETIC = "pack:2 numa:1 core:2 pu:1"


def test_synthetic_two_node_topology_splits_experts_and_matches_reference():
    result = run_python("""
        import torch, kt_ops
        from moe_case import assert_close, make_case, run_kt, run_reference
        torch.set_num_threads(4)
        case = make_case(96, 128, 6, 2, 41, 8)  # numa_nodes=0: one slice per (synthetic) node
        y, grads = run_kt(case)
        y_ref, grads_ref = run_reference(case)
        for i, (a, b) in enumerate(zip([y] + grads, [y_ref] + grads_ref)):
            assert_close(f"output {i}", a, b, torch.bfloat16)
        print(kt_ops.topology()); print(case.experts.numa_slices)
    """, KT_OPS_TOPOLOGY=SYNTHETIC)
    assert result.returncode == 0, result.stderr
    desc, slices = result.stdout.strip().splitlines()[-2:]
    assert desc == "2 NUMA nodes: node 0 cores {0,1}, node 1 cores {2,3} (synthetic)"
    assert slices == "2"


def test_bad_synthetic_topology_is_named():
    result = run_python("import kt_ops; kt_ops.topology()", KT_OPS_TOPOLOGY="numa:banana")
    assert result.returncode != 0
    assert 'KT_OPS_TOPOLOGY is not a valid hwloc synthetic topology: "numa:banana"' in result.stderr


def test_slices_change_only_the_summation_order(isa_path):
    """Two slices give the one-slice result up to fp32 reassociation of the down and dX sums."""
    one = make_case(96, 128, 6, 2, 41, 8, numa_nodes=1)
    two = make_case(96, 128, 6, 2, 41, 8, numa_nodes=2)
    assert (one.experts.numa_slices, two.experts.numa_slices) == (1, 2)
    y1, g1 = run_kt(one)
    y2, g2 = run_kt(two)
    for a, b in zip([y1] + g1, [y2] + g2):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
