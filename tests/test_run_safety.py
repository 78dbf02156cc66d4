"""kt-sft runs are never lost, never run code from a checkpoint and never write elsewhere than
asked: state stored as data, signals honoured until the outputs are written, atomic files
and checkpoint swaps, resume in the directory it names, data compared by content, --out
checked before the model is loaded."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import kt_ops
from kt_ops import default, run_state
from kt_ops.cli import main
from kt_ops.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

SHORT = ["--steps", "6", "--max-tokens-per-step", "512", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def train(out, *extra):
    assert main(["train", "--out", str(out), *SHORT, *extra]) == 0
    return str(out)


def adapter(out):
    return load_file(os.path.join(out, ADAPTER_WEIGHTS))


def assert_same_adapter(a, b):
    a, b = adapter(a), adapter(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def files_of(path):
    """Every file under ``path`` with its bytes."""
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(root, n), "rb") as fh:
                out[os.path.relpath(os.path.join(root, n), path)] = fh.read()
    return out


# ---------------------------------------------------------------- no code from checkpoints

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_checkpoint_is_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "evil" / "checkpoint").mkdir(parents=True)
    torch.save({"args": _Payload(marker)}, tmp_path / "evil" / "checkpoint" / "trainer_state.pt")
    code, _, err = run(["train", "--resume", str(tmp_path / "evil")], capsys)
    assert not marker.exists()
    assert code == 2 and "never unpickles files" in err and "Traceback" not in err


def test_no_code_of_the_project_unpickles_or_evaluates():
    unsafe = re.compile(r"torch\.load\(|pickle\.loads?\(|yaml\.load\(|(?<![\w.])(eval|exec)\(|weights_only\s*=\s*False")
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the source tree
    for folder in ("kt_ops", "benchmarks", "examples"):
        for dirpath, _, names in os.walk(os.path.join(top, folder)):
            for n in names:
                if n.endswith(".py"):
                    with open(os.path.join(dirpath, n)) as fh:
                        found = unsafe.search(fh.read())
                    assert found is None, f"{os.path.join(dirpath, n)}: {found.group(0)}"


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: (d / "trainer_state.json").write_text("{not json"), "trainer_state.json is not valid JSON"),
    (lambda d: (d / "trainer_state.json").write_text("[1, 2]"), "is not a kt-sft trainer state of format 2"),
    (lambda d: _edit_state(d, step="three"), '"step" is missing or of the wrong type'),
    (lambda d: _edit_state(d, args={**_state(d)["args"], "rank": "16"}), "the saved setting 'rank' is \"16\""),
    (lambda d: _edit_state(d, optimizer={"state": {}}), '"optimizer" must hold "state" and "param_groups"'),
    (lambda d: (d / "trainer_state.safetensors").write_bytes(b"\x00" * 5), "trainer_state.safetensors is not a "
                                                                          "readable safetensors file"),
    (lambda d: _drop_tensor(d, "rng.torch"), "tensor rng.torch is missing"),
    (lambda d: _shrink_moment(d), "has shape"),
])
def test_a_checkpoint_that_does_not_parse_is_a_clear_error(corrupt, message, tmp_path, capsys):
    out = train(tmp_path / "run", "--stop-after", "2")
    capsys.readouterr()
    corrupt(tmp_path / "run" / "checkpoint")
    code, _, err = run(["train", "--resume", out], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def _state(d):
    return json.loads((d / "trainer_state.json").read_text())


def _edit_state(d, **fields):
    (d / "trainer_state.json").write_text(json.dumps({**_state(d), **fields}))


def _drop_tensor(d, key):
    tensors = load_file(d / "trainer_state.safetensors")
    del tensors[key]
    save_file(tensors, d / "trainer_state.safetensors")


def _shrink_moment(d):
    tensors = load_file(d / "trainer_state.safetensors")
    key = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[key] = tensors[key].flatten()[:1].contiguous()
    save_file(tensors, d / "trainer_state.safetensors")


# ---------------------------------------------------------------- signals and atomic writes

class Killed(BaseException):
    """Stands for the process being killed at that point: nothing catches it."""


_SIGTERM_WHILE_WRITING = """
import os, signal, sys
from kt_ops import train
from kt_ops.cli import main

real = train.Trainer.finish

def finish(self, completed):
    if completed:  # a SIGTERM arrives as the final outputs start being written
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, completed)

train.Trainer.finish = finish
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_the_final_outputs_are_written_loses_nothing(tmp_path, cache_home):
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_WHILE_WRITING, "train", "--out", out, *SHORT],
                          capture_output=True, text=True, env={**os.environ, "XDG_CACHE_HOME": cache_home})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exiting once the outputs being written are complete" in proc.stderr
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "metrics.json", "loss.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert json.load(open(os.path.join(out, "metrics.json")))["completed"]
    assert run_state.is_complete(os.path.join(out, "checkpoint"))
    assert json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))["step"] == 6


def test_a_kill_between_the_checkpoint_renames_resumes_to_the_same_result(tmp_path, capsys, monkeypatch):
    straight = train(tmp_path / "straight")
    out = train(tmp_path / "run", "--stop-after", "2")
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if dst.endswith("checkpoint.old"):
            raise Killed  # the process dies before the new checkpoint is renamed in

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        main(["train", "--resume", out, "--stop-after", "2", "--no-progress"])
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(out, "checkpoint"))  # the window a plain swap leaves
    assert main(["train", "--resume", out, "--no-progress"]) == 0
    capsys.readouterr()
    assert not any(os.path.exists(os.path.join(out, "checkpoint" + s)) for s in (".tmp", ".old"))
    assert_same_adapter(straight, out)


def test_a_kill_while_the_adapter_is_written_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    import peft.peft_model
    import safetensors.torch

    model = kt_ops.load_model(default.model_dir(), 4, 8, progress=False)
    first = tmp_path / "adapter"
    kt_ops.save_adapter(model, first)
    before = files_of(first)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    real_save = safetensors.torch.save_file

    def dying_save(tensors, path, metadata=None):
        real_save(dict(list(tensors.items())[:1]), path, metadata)  # part of the file is on disk
        raise Killed

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", dying_save)  # PEFT's save_pretrained's own reference
    with pytest.raises(Killed):
        kt_ops.save_adapter(model, first)
    with pytest.raises(Killed):
        kt_ops.save_adapter(model, tmp_path / "fresh")
    assert files_of(first) == before  # nothing half-written, no temporary files left
    assert os.listdir(tmp_path / "fresh") == []  # no config without its tensors


def test_overwrite_leaves_nothing_of_the_old_run_to_resume(tmp_path, capsys, monkeypatch):
    out = train(tmp_path / "run")
    from kt_ops.train import Trainer

    def killed(self, rows):
        raise Killed  # the new run dies in its first step, before any checkpoint of its own

    monkeypatch.setattr(Trainer, "loss_and_backward", killed)
    with pytest.raises(Killed):
        main(["train", "--out", out, "--steps", "2", "--overwrite", "--no-progress"])
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(out, ADAPTER_CONFIG))
    code, _, err = run(["train", "--resume", out], capsys)
    assert code == 2 and "no checkpoint in" in err


# ---------------------------------------------------------------- resume where pointed, data by content

def test_resume_writes_into_the_directory_it_is_given(tmp_path, capsys, monkeypatch):
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    train("run", "--stop-after", "3")  # a relative --out
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    original = files_of(tmp_path / "a" / "run")
    monkeypatch.chdir(tmp_path / "c")
    assert main(["train", "--resume", "../b/run", "--no-progress"]) == 0
    capsys.readouterr()
    assert json.load(open(tmp_path / "b" / "run" / "metrics.json"))["steps"] == 6
    assert files_of(tmp_path / "a" / "run") == original
    assert os.listdir(tmp_path / "c") == []
    code, _, err = run(["train", "--resume", str(tmp_path / "b" / "run"), "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "--out names another directory" in err


def test_resume_compares_the_data_by_content(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    shutil.copy(default.DATA, data)
    out = train(tmp_path / "run", "--data", str(data), "--stop-after", "2")
    capsys.readouterr()
    moved = tmp_path / "moved.jsonl"
    os.rename(data, moved)
    assert main(["train", "--resume", out, "--data", str(moved), "--stop-after", "1", "--no-progress"]) == 0
    with open(moved, "a") as fh:
        fh.write(json.dumps({"prompt": "One more?", "response": "Yes."}) + "\n")
    code, _, err = run(["train", "--resume", out, "--data", str(moved)], capsys)
    assert code == 2 and "has changed since the run started" in err and "--allow-changed-data" in err
    assert main(["train", "--resume", out, "--data", str(moved), "--allow-changed-data", "--no-progress"]) == 0
    assert "resuming on its new contents" in capsys.readouterr().err


# ---------------------------------------------------------------- --out checked first

def test_an_unwritable_out_is_refused_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kt_ops.weights.load_model", no_loading)
    code, _, err = run(["train", "--out", "/dev/null/x"], capsys)
    assert code == 2 and "cannot create --out /dev/null/x: /dev/null is not a directory" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user whom permissions do not stop (root)")
        code, _, err = run(["train", "--out", str(locked / "run")], capsys)
        assert code == 2 and "is not writable" in err
    finally:
        locked.chmod(0o700)


def test_an_out_without_room_for_the_outputs_is_refused_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kt_ops.weights.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30 - 4096, 4096))
    code, _, err = run(["train", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "has 0.00 GiB free; the outputs need about" in err
    assert not (tmp_path / "run").exists()
