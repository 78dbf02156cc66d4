import os
import shutil

import pytest
import torch

import kt_ops
from moe_case import ALL_ISAS

# torch.library.opcheck runs all of its checks on every kt op (tests/test_opcheck.py) but for:
OPCHECK_EXEMPT = {
    # isa() takes and returns no tensors: schema, fake-tensor and autograd checks have
    # nothing to look at. tests/test_isa.py tests it directly.
    "kt::isa": "no tensor arguments or results",
    "kt::topology": "no tensor arguments or results (tests/test_topology.py tests it)",
    "kt::weight_formats": "no tensor arguments or results (tests/test_packing.py tests it)",
}


@pytest.fixture
def checkpoint(tmp_path):
    """The built-in tiny Qwen3-MoE (per-expert tensors) copied to a directory of its own."""
    from kt_ops import default

    path = tmp_path / "model"
    shutil.copytree(default.model_dir(), path)
    return path


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """The built-in model is written under a throwaway cache directory, not the user's."""
    path = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = path
    yield path
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(params=ALL_ISAS)
def isa_path(request, monkeypatch):
    """Runs the test once per kernel path this CPU has, selected through KT_OPS_MAX_ISA."""
    monkeypatch.setenv("KT_OPS_MAX_ISA", request.param)
    if kt_ops.isa() != request.param:
        pytest.skip(f"this CPU has no {request.param} path (best: {kt_ops.isa()})")
    return request.param


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
