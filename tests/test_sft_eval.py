"""kt-sft beyond training, on the built-in default trained once: held-out evaluation during
training (and --keep-best, --eval-fraction), ``kt-sft eval``, ``kt-sft infer`` (one line per
input, resumable) and ``kt-sft chat`` in a pseudo-terminal; generation metrics against the
libraries' own."""
import json
import os
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from kt_ops import data as sft_data
from kt_ops import default
from kt_ops.default import make_assets
from kt_ops.cli import main
from kt_ops.evaluate import generation_metrics
from kt_ops.generation import Generator, chat
from kt_ops.train import TrainArgs, Trainer, check_resumable

QUESTION, ANSWER = "What is the capital of Peru?", "Lima"


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's main job: ``kt-sft train`` on the built-in default (its held-out questions
    evaluated along the way), with --keep-best."""
    out = str(tmp_path_factory.mktemp("default") / "run")
    assert main(["train", "--out", out, "--keep-best", "--no-progress"]) == 0
    with open(os.path.join(out, "metrics.json")) as fh:
        return out, json.load(fh)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------- evaluation during training

def test_held_out_loss_falls_during_training_and_the_best_adapter_is_kept(default_run):
    out, metrics = default_run
    evals = metrics["eval"]
    steps = [e["step"] for e in evals]
    assert steps[0] == 0 and steps[-1] == metrics["total_steps"] and steps == sorted(set(steps))
    assert metrics["eval_examples"] == sum(1 for line in open(default.EVAL_DATA) if line.strip())
    best = min(evals, key=lambda e: e["eval_loss"])
    assert best["eval_loss"] < evals[0]["eval_loss"] / 2, evals
    # The built-in default overfits its training set: held-out loss rises again after its
    # lowest, so best/ is not the final adapter.
    assert 0 < best["step"] < metrics["total_steps"] and evals[-1]["eval_loss"] > best["eval_loss"]
    for e in evals:
        assert e["eval_perplexity"] == pytest.approx(2.718281828459045 ** e["eval_loss"], rel=1e-9)
    assert metrics["best"] == {"step": best["step"], "eval_loss": best["eval_loss"],
                               "adapter": os.path.join(out, "best")}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(os.path.join(out, "best")))


def test_the_best_adapter_is_the_one_of_the_lowest_held_out_loss(default_run, tmp_path, capsys):
    out, metrics = default_run
    code, printed, _ = run(["eval", "--adapter", os.path.join(out, "best"), "--no-generate", "--no-progress",
                            "--out", str(tmp_path / "eval.json")], capsys)
    assert code == 0
    result = json.load(open(tmp_path / "eval.json"))
    # (to bf16 attention's rounding: eval packs the records into rows of its own length)
    assert result["adapter"]["loss"] == pytest.approx(metrics["best"]["eval_loss"], rel=1e-3)
    assert "exact_match" not in result["adapter"] and "loss" in printed


def test_eval_fraction_holds_out_a_seeded_split_that_resume_keeps(tmp_path, capsys):
    def trainer(seed, out="unused"):
        return Trainer(TrainArgs(out=str(tmp_path / out), steps=4, eval_fraction=0.1, seed=seed, progress=False,
                                 max_tokens_per_step=512, device="cpu"), log=lambda m: None)

    a, b, c = trainer(0), trainer(0), trainer(1)
    count = sum(1 for line in open(default.DATA) if line.strip())
    assert len(a.eval_examples) == round(0.1 * count) and len(a.examples) + len(a.eval_examples) == count
    ids = lambda t: [tuple(e.input_ids) for e in t.eval_examples]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert not set(ids(a)) & {tuple(e.input_ids) for e in a.examples}

    flags = ["--steps", "4", "--max-tokens-per-step", "512", "--eval-fraction", "0.1", "--eval-every", "2",
             "--no-progress"]
    straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
    assert main(["train", "--out", straight, *flags]) == 0
    assert main(["train", "--out", halves, "--stop-after", "3", *flags]) == 0
    assert main(["train", "--resume", halves, "--no-progress"]) == 0
    capsys.readouterr()
    ma, mb = (json.load(open(os.path.join(d, "metrics.json"))) for d in (straight, halves))
    assert [e["step"] for e in ma["eval"]] == [0, 2, 4]
    assert ma["eval"] == mb["eval"] and ma["eval_examples"] == mb["eval_examples"]

    # The held-out records are written out, the lines of --data the run did not train on, and
    # kt-sft eval measures them to the run's last held-out loss.
    held = open(os.path.join(straight, "heldout.jsonl")).read().splitlines()
    data_lines = [line for line in open(default.DATA).read().splitlines() if line.strip()]
    assert len(held) == ma["eval_examples"] and set(held) <= set(data_lines)
    assert open(os.path.join(halves, "heldout.jsonl")).read().splitlines() == held
    code, _, _ = run(["eval", "--adapter", straight, "--data", os.path.join(straight, "heldout.jsonl"),
                      "--no-generate", "--no-progress"], capsys)
    assert code == 0
    measured = json.load(open(os.path.join(straight, "eval.json")))["adapter"]["loss"]
    # (to bf16 attention's rounding: eval packs the records into rows of its own length)
    assert measured == pytest.approx(ma["eval"][-1]["eval_loss"], rel=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1)"),
    (["--model", "{model}", "--data", "{data}", "--keep-best"], "--keep-best needs held-out data"),
    (["--eval-data", "/nonexistent/held-out.jsonl"], "/nonexistent/held-out.jsonl: no such file"),
])
def test_bad_evaluation_flags_are_named(argv, message, tmp_path, capsys):
    argv = [a.format(model=default.model_dir(), data=default.DATA) for a in argv]
    code, _, err = run(["train", "--out", str(tmp_path / "run"), "--steps", "1", *argv], capsys)
    assert code == 2 and message in err, err


def test_eval_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--eval-every must be >= 1, got 0"):
        Trainer(TrainArgs(out=str(tmp_path / "run"), steps=1, eval_data=default.EVAL_DATA, eval_every=0,
                          progress=False), log=lambda m: None)


def test_resume_refuses_held_out_data_the_run_did_not_start_with(tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = ["--model", default.model_dir(), "--data", default.DATA, "--steps", "2", "--no-progress"]
    assert main(["train", "--out", out, "--stop-after", "1", *flags]) == 0
    code, _, err = run(["train", "--resume", out, "--eval-data", default.EVAL_DATA], capsys)
    assert code == 2 and "the run started without --eval-data" in err, err


def test_eval_data_and_eval_fraction_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--eval-data", default.EVAL_DATA, "--eval-fraction", "0.1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_checkpoint_from_before_held_out_evaluation_resumes():
    """A run saved by a kt-sft without the evaluation settings ran with their defaults."""
    args = TrainArgs(out="unused", steps=4)
    saved = {k: getattr(args, k) for k in TrainArgs.IDENTITY if k not in ("eval_fraction", "keep_best")}
    check_resumable(saved, args)
    with pytest.raises(ValueError, match="--keep-best False -> True"):
        check_resumable(saved, TrainArgs(out="unused", steps=4, keep_best=True))


# ---------------------------------------------------------------- kt-sft eval

def test_eval_shows_the_adapter_beating_the_base_model_on_held_out_data(default_run, capsys):
    out, _ = default_run
    code, printed, _ = run(["eval", "--adapter", out, "--no-progress"], capsys)
    assert code == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    base, tuned = result["base"], result["adapter"]
    assert tuned["loss"] < base["loss"] / 2 and tuned["perplexity"] < base["perplexity"]
    assert tuned["rouge_l"] > base["rouge_l"] and tuned["bleu"] > base["bleu"]
    assert result["examples"] == tuned["count"] == base["count"] == sum(1 for line in open(default.EVAL_DATA) if line.strip())
    assert all(s["reference"] and isinstance(s["prediction"], str) for s in tuned["samples"])
    lines = printed.splitlines()
    assert lines[0].split() == ["loss", "perplexity", "exact_match", "rouge_l", "bleu"]
    assert [line.split()[0] for line in lines[1:]] == ["base", "adapter"]


def test_eval_leaves_out_records_without_a_reply_naming_them(default_run, tmp_path, capsys):
    out, _ = default_run
    data = write_jsonl(tmp_path / "held.jsonl", [{"prompt": QUESTION, "response": "The capital of Peru is Lima."},
                                                  {"messages": [{"role": "user", "content": QUESTION}]}])
    code, _, err = run(["eval", "--adapter", out, "--data", data, "--out", str(tmp_path / "e.json"), "--no-progress"],
                       capsys)
    assert code == 0 and "held.jsonl:2: the conversation ends with a user turn" in err, err
    assert json.load(open(tmp_path / "e.json"))["adapter"]["count"] == 1


def test_generation_metrics_equal_the_libraries_on_a_fixed_example():
    predictions = ["The capital of Peru is Lima.", "the cat sat", "A dog says woof."]
    references = ["The capital of Peru is Lima.", "the cat sat down", "A cow says moo."]
    m = generation_metrics(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["rouge_l"] == pytest.approx(sum(scorer.score(r, p)["rougeL"].fmeasure
                                             for p, r in zip(predictions, references)) / 3)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    # By hand: the second pair's longest common subsequence is 3 words of 3 and of 4 (F1 6/7),
    # the third's "a says" 2 of 4 and 4 (ROUGE's tokenizer drops the full stops).
    assert m["rouge_l"] == pytest.approx((1 + 6 / 7 + 1 / 2) / 3)
    assert generation_metrics([references[0]], [references[0]])["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        generation_metrics(["a", "b"], ["a"])


# ---------------------------------------------------------------- kt-sft infer

def prompts_file(tmp_path):
    records = [{"id": f"q{i}", **json.loads(line)} for i, line in enumerate(open(default.EVAL_DATA)) if line.strip()]
    records[:4] = [{"id": "peru", "prompt": QUESTION}, {"instruction": "Write the word backwards.", "input": "river"},
                   {"messages": [{"role": "user", "content": "What is the plural of mouse?"}]},
                   {"id": 7, "messages": [{"role": "system", "content": make_assets.SYSTEM},
                                          {"role": "user", "content": "Count from 3 to 6."}]}]
    return write_jsonl(tmp_path / "prompts.jsonl", records), records


def read_predictions(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_infer_writes_one_line_per_input_and_resumes(default_run, tmp_path, capsys):
    out, _ = default_run
    data, records = prompts_file(tmp_path)
    whole = str(tmp_path / "whole.jsonl")
    argv = ["infer", "--adapter", out, "--data", data, "--batch-size", "4", "--no-progress"]
    code, printed, _ = run(argv + ["--out", whole], capsys)
    assert code == 0 and json.loads(printed)["answered"] == len(records)
    preds = read_predictions(whole)
    assert [p["id"] for p in preds] == [r.get("id", i + 1) for i, r in enumerate(records)]  # line numbers from 1
    assert ANSWER in preds[0]["prediction"]
    assert all(isinstance(p["prediction"], str) for p in preds)

    # A run stopped after two batches, killed while writing the third: the lines it wrote
    # stay as they are (marked here), the cut line goes, the rest is answered as before.
    resumed = tmp_path / "resumed.jsonl"
    kept = [dict(p, prediction="KEPT " + p["prediction"]) for p in preds[:8]]
    resumed.write_text("".join(json.dumps(p) + "\n" for p in kept) + '{"id": "q8", "predic')
    code, printed, err = run(argv + ["--out", str(resumed)], capsys)
    summary = json.loads(printed)
    assert code == 0 and (summary["answered_before"], summary["answered"]) == (8, len(records) - 8)
    assert f"8 of {len(records)} prompts already answered" in err
    assert read_predictions(resumed) == kept + preds[8:]
    assert main(argv + ["--out", str(resumed), "--overwrite"]) == 0
    assert read_predictions(resumed) == preds  # started over

    # Killed a few bytes into a line: those bytes go too.
    resumed.write_text("".join(json.dumps(p) + "\n" for p in preds[:4]) + '{"i')
    assert main(argv + ["--out", str(resumed)]) == 0
    assert read_predictions(resumed) == preds
    capsys.readouterr()


def test_infer_leaves_a_file_it_did_not_write_alone(default_run, tmp_path, capsys):
    out, _ = default_run
    data, _ = prompts_file(tmp_path)
    for name, text in [("notes.jsonl", "my notes\n"), ("other.jsonl", '{"id": "elsewhere", "prediction": "x"}\n'),
                       ("tail.jsonl", "no newline at the end"), ("ids.jsonl", '{"id": [1], "prediction": "x"}\n')]:
        path = tmp_path / name
        path.write_text(text)
        # --overwrite replaces a file of this command's lines, whoever's (other.jsonl), and only that.
        for overwrite in ([], ["--overwrite"]) if name != "other.jsonl" else ([],):
            code, _, err = run(["infer", "--adapter", out, "--data", data, "--out", str(path), "--no-progress",
                                *overwrite], capsys)
            assert code == 2 and "give another --out" in err, err
            assert path.read_text() == text
    code, _, err = run(["infer", "--adapter", out, "--data", data, "--out", data, "--overwrite"], capsys)
    assert code == 2 and "is the --data file" in err
    assert open(data).read().count("\n") == 33


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a"}', '{"id": 1, "prompt": "b"}'], "prompts.jsonl:2: id 1 is also line 1's"),
    (['{"prompt": "a"}', "{oops"], "prompts.jsonl:2: invalid JSON"),
    (['{"messages": [{"role": "assistant", "content": "hi"}]}'], "prompts.jsonl:1: \"messages\" must hold"),
    (['{"id": [1], "prompt": "a"}'], "prompts.jsonl:1: \"id\" must be a string or an integer"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}'],
     "prompts.jsonl:1: the last message before the reply must be the user's"),
])
def test_bad_prompt_files_name_the_line_before_the_model_loads(lines, message, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", lines)
    code, _, err = run(["infer", "--data", data, "--out", str(tmp_path / "p.jsonl")], capsys)
    assert code == 2 and message in err, err
    assert not os.path.exists(tmp_path / "p.jsonl")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--max-new-tokens", "1020"], "exceed the model's 1024 positions: "),
])
def test_bad_sampling_flags_and_over_long_prompts_stop_before_generating(flags, message, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": QUESTION}])
    out = tmp_path / "p.jsonl"
    code, _, err = run(["infer", "--data", data, "--out", str(out), "--no-progress", *flags], capsys)
    assert code == 2 and message in err, err
    if "positions" in message:
        assert 'prompts.jsonl:1 (id "a")' in err
    assert not out.exists() or out.read_text() == ""


def test_a_prompt_keeps_the_conversation_before_its_reply():
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                           {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                           {"role": "assistant", "content": "a2"}]}
    prompt = sft_data.to_prompt(record, 5)
    assert prompt.id == 5 and prompt.reference == "a2" and prompt.messages == record["messages"][:4]
    assert sft_data.to_prompt({"id": "x", "prompt": "p"}, 1).reference is None


# ---------------------------------------------------------------- kt-sft chat

class Recorder(Generator):
    """A Generator that records the conversations it is asked to answer, and answers "reply N"."""

    def __init__(self, max_positions):
        self.asked, self.max_positions, self.max_new_tokens, self.tokenizer = [], max_positions, 4, None

    def prompt_ids(self, messages):
        return [0] * sum(len(m["content"].split()) + 1 for m in messages)

    def generate(self, conversations, **kw):
        self.asked.append(conversations[0])
        return [(f"reply {len(self.asked)}", 1)]


def test_chat_keeps_the_conversation_and_obeys_its_commands(monkeypatch, capsys):
    lines = iter(["hello there", "and again", "/system be brief", "third", "/reset", "fresh",
                  "/system", "one two three four five six seven eight nine ten eleven twelve", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    recorder = Recorder(max_positions=16)
    assert chat(recorder, system="be kind") == 0
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    reply = lambda n: {"role": "assistant", "content": f"reply {n}"}  # noqa: E731
    kind, brief = {"role": "system", "content": "be kind"}, {"role": "system", "content": "be brief"}
    assert recorder.asked[:4] == [
        [kind, user("hello there")],
        [kind, user("hello there"), reply(1), user("and again")],
        # the oldest exchange is dropped to fit the 16 positions
        [brief, user("and again"), reply(2), user("third")],
        [brief, user("fresh")],  # after /reset
    ]
    assert len(recorder.asked) == 4  # the twelve words do not fit even alone
    out = capsys.readouterr().out
    assert "(new conversation)" in out and "(system message set)" in out and "(system message cleared)" in out
    assert "too long for the model's context" in out


def test_chat_in_a_pseudo_terminal(default_run, capsys):
    pexpect = pytest.importorskip("pexpect")
    out, _ = default_run
    chat = pexpect.spawn(sys.executable, ["-m", "kt_ops", "chat", "--adapter", out, "--device", "cpu"],
                         encoding="utf-8", timeout=180, env={**os.environ, "TQDM_DISABLE": "1"})

    def say(line):
        chat.sendline(line)
        chat.expect(">>> ")
        return chat.before.replace("\r", "").split("\n", 1)[1].strip()  # what came after the echoed line

    chat.expect(">>> ")
    assert ANSWER in say(QUESTION)
    follow_up = "What is the plural of mouse?"
    say(follow_up)  # in the conversation about Peru
    assert say("/reset") == "(new conversation)"
    fresh = say(follow_up)
    assert say("/system Answer in one short sentence.") == "(system message set)"
    assert say("/nonsense").startswith("(unknown command /nonsense")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    # After /reset the question is answered as in a conversation of its own.
    assert main(["generate", "--adapter", out, "--prompt", follow_up, "--device", "cpu", "--max-new-tokens", "128"]) == 0
    assert capsys.readouterr().out.strip() == fresh
