"""``kt-sft``: LoRA fine-tuning of a Hugging Face MoE model with the routed experts on the CPU.

    kt-sft train --out DIR                       # the built-in default: tiny Qwen3-MoE, small dataset
    kt-sft train --model DIR --data FILE.jsonl --out DIR [options]
    kt-sft train --resume DIR                    # continue an interrupted run
    kt-sft eval --model DIR --adapter DIR --data FILE.jsonl
    kt-sft infer --model DIR --adapter DIR --data prompts.jsonl --out preds.jsonl
    kt-sft chat --model DIR --adapter DIR
    kt-sft generate --model DIR --adapter DIR --prompt TEXT
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from typing import Optional

EXIT_ERROR = 2  # bad arguments or unusable input, as argparse exits


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _size(text: str) -> int:
    from kt_ops.gpu_share import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _modules(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. q_proj,k_proj,v_proj,o_proj")
    return names


def build_parser() -> argparse.ArgumentParser:
    from kt_ops.api import experts_formats

    parser = argparse.ArgumentParser(
        prog="kt-sft", description="LoRA fine-tuning of Mixture-of-Experts models: routed experts frozen in CPU "
        "memory and computed by torch.ops.kt (Intel AMX), everything else on the GPU when there is one.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,infer,chat,generate}")

    # Defaults are None here so that explicitly given flags can be told apart (they override
    # the built-in default's settings and are checked against a resumed checkpoint's).
    t = sub.add_parser("train", help="fine-tune: writes a PEFT adapter, metrics, a loss curve and a checkpoint",
                       description="Fine-tunes LoRA on every routed expert's gate/up/down (and on --target-modules), "
                       "and the routers. Without --model it trains the built-in tiny Qwen3-MoE model on the "
                       "built-in dataset. Writes to --out: adapter_model.safetensors + adapter_config.json "
                       "(PEFT format), metrics.json, loss.png and checkpoint/ (for --resume); with held-out data, "
                       "its loss in metrics.json and loss.png, and with --keep-best the best adapter in best/.")
    t.add_argument("--out", help="output directory (required unless --resume gives it)")
    t.add_argument("--model", help="Hugging Face checkpoint directory: config.json, safetensors, tokenizer "
                   "(default: the built-in tiny Qwen3-MoE)")
    t.add_argument("--data", help="JSONL: {\"messages\": [...]}, {\"prompt\", \"response\"} or "
                   "{\"instruction\", \"input\", \"output\"} per line (default with the built-in model: its dataset)")
    e = t.add_mutually_exclusive_group()
    e.add_argument("--eval-data", help="JSONL of held-out conversations (the formats of --data): their loss and "
                   "perplexity every --eval-every steps and at the end (default with the built-in model: its "
                   "held-out questions)")
    e.add_argument("--eval-fraction", type=float,
                   help="hold out this share of --data instead (e.g. 0.05; a split fixed by --seed)")
    t.add_argument("--eval-every", type=_positive(int), help="steps between evaluations (default: a tenth of the run)")
    t.add_argument("--keep-best", action="store_true", default=None,
                   help="also keep the adapter of the lowest held-out loss in OUT/best")
    t.add_argument("--rank", type=_positive(int), help="LoRA rank (default 16)")
    t.add_argument("--alpha", type=_positive(float), help="LoRA alpha (default 32)")
    t.add_argument("--lr", type=_positive(float), help="peak learning rate (default 2e-4; 1e-3 for the built-in model)")
    n = t.add_mutually_exclusive_group()
    n.add_argument("--epochs", type=_positive(int), help="passes over the data (default 1)")
    n.add_argument("--steps", type=_positive(int), help="optimizer steps (the data repeats as needed)")
    t.add_argument("--max-tokens-per-step", type=_positive(int),
                   help="token budget of one optimizer step; conversations are packed up to it (default 4096)")
    t.add_argument("--micro-batch-tokens", type=_positive(int),
                   help="tokens per forward/backward; smaller than the step budget means gradient accumulation "
                   "(default: the step budget)")
    t.add_argument("--max-seq-len", type=_positive(int), help="conversations are cut to this many tokens "
                   "(default 2048)")
    t.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward (less memory, about 30%% more time)")
    t.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="keep two micro-batches in flight, one's experts on the CPU while the GPU runs the other's "
                   "attention and routers (default: on when the model is on a GPU; needs >= 2 micro-batches per step)")
    t.add_argument("--gpu-experts-budget", type=_size,
                   help="hold the most-routed experts (counted over the first step's batches) on the GPU within "
                   "this much GPU memory, e.g. 16GiB, and compute their tokens there while the CPU computes the "
                   "rest (default 0: every expert on the CPU)")
    t.add_argument("--shard-experts", action="store_true", default=None,
                   help="under torchrun across several hosts: each host holds only its share of every layer's experts "
                   "(by id; for models whose experts do not fit one host), and tokens cross to their experts' host")
    t.add_argument("--target-modules", type=_modules,
                   help="also put PEFT LoRA on these modules, e.g. q_proj,k_proj,v_proj,o_proj")
    t.add_argument("--seed", type=int, help="seed for LoRA init and data order (default 0)")
    t.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 10%% of the steps, at most 10)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    t.add_argument("--device", help="device of the non-expert modules: auto (cuda if available), cpu, cuda, cuda:1")
    t.add_argument("--dtype", choices=["bfloat16", "float32"], help="dtype of the non-expert weights (default bfloat16)")
    t.add_argument("--experts-format", choices=experts_formats(),
                   help="weight format of the frozen experts in memory: bf16, int8 (one scale per output channel, "
                   "about half the memory), int4 (one scale per 32 elements of each row, about 0.28 of the memory) "
                   "or fp8 (e4m3, one scale per 128x128 block, about half), or w8a8 (int8 weights, computed with int8 "
                   "activations: AMX-INT8's products); made layer by layer as loaded (default: "
                   "the checkpoint's own: fp8 or int4 for fp8 or compressed-tensors int4 experts, else bf16)")
    t.add_argument("--save-every", type=int, help="also write the resumable checkpoint every N steps")
    t.add_argument("--stop-after", type=_positive(int),
                   help="stop after this many steps of this run, with a checkpoint to --resume from")
    t.add_argument("--resume", help="continue the run whose output directory (or checkpoint/) this is, writing "
                   "there; its settings are reused")
    t.add_argument("--allow-changed-data", action="store_true", default=None,
                   help="with --resume: continue although the data file's contents changed since the run started")
    t.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in --out (by default that is an error)")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")
    t.set_defaults(func=_train)

    def model_flags(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
        p.add_argument("--model", help="Hugging Face checkpoint directory (default: the built-in tiny Qwen3-MoE)")
        p.add_argument("--adapter", required=adapter_required,
                       help="adapter directory written by kt-sft train or PEFT" + ("" if adapter_required else
                                                                                   " (default: none, the base model)"))
        p.add_argument("--device", default="auto", help="device of the non-expert modules: auto, cpu, cuda, ...")
        p.add_argument("--experts-format", choices=experts_formats(),
                       help="weight format of the experts in memory (default: the checkpoint's own)")

    def sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
        p.add_argument("--max-new-tokens", type=_positive(int), default=max_new_tokens)
        p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share when sampling (default 1)")
        p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")

    v = sub.add_parser("eval", help="held-out loss, perplexity and generation metrics, with and without an adapter",
                       description="Loss and perplexity (assistant tokens) of the conversations in --data for the "
                       "base model and with --adapter (one model: the adapter is loaded into it after the base "
                       "is measured), and exact match, ROUGE-L (rouge-score) and BLEU (sacrebleu) of greedy "
                       "replies to each record's last prompt against the reply it holds. Writes eval.json.")
    model_flags(v, adapter_required=True)
    v.add_argument("--data", help="JSONL of conversations, the formats of kt-sft train --data (default with the "
                   "built-in model: its held-out questions)")
    v.add_argument("--out", help="where to write the results (default: ADAPTER/eval.json)")
    v.add_argument("--max-new-tokens", type=_positive(int), default=64)
    v.add_argument("--batch-size", type=_positive(int), default=8, help="replies generated at once (default 8)")
    v.add_argument("--no-generate", dest="generate", action="store_false", help="loss and perplexity only")
    v.add_argument("--max-seq-len", type=_positive(int), default=2048)
    v.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    v.set_defaults(func=_eval)

    i = sub.add_parser("infer", help="batch generation: one reply per line of a JSONL file of prompts",
                       description="Writes {\"id\", \"prediction\"} to --out for every record of --data: "
                       "{\"messages\": [...]} (ending with a user turn, or with an assistant reply, which is left "
                       "out), {\"prompt\"} or {\"instruction\", \"input\"}, with an optional \"id\" (default: "
                       "the line number). Lines go out a batch at a time; run it again with the same --out to "
                       "continue after a stop (ids already there are skipped).")
    model_flags(i)
    i.add_argument("--data", help="JSONL of prompts (default with the built-in model: its held-out questions)")
    i.add_argument("--out", required=True, help="JSONL of replies, appended to and resumed")
    i.add_argument("--overwrite", action="store_true",
                   help="start over: empty --out (a file this command wrote) instead of continuing it")
    sampling_flags(i, 64)
    i.add_argument("--batch-size", type=_positive(int), default=8, help="prompts generated at once (default 8)")
    i.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    i.set_defaults(func=_infer)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal",
                       description="Chats with the model (with --adapter) through the tokenizer's chat template, "
                       "streaming the replies. /reset starts a new conversation, /system TEXT sets the system "
                       "message, /exit (or Ctrl-D) quits.")
    model_flags(c)
    c.add_argument("--system", help="system message to start with")
    sampling_flags(c, 128)
    c.set_defaults(func=_chat)

    g = sub.add_parser("generate", help="one reply to one prompt",
                       description="Loads the model (experts on the CPU), the adapter, and prints the reply to "
                       "--prompt rendered with the tokenizer's chat template.")
    model_flags(g)
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--system", help="an optional system message")
    sampling_flags(g, 64)
    g.set_defaults(func=_generate)
    return parser


def train_args(ns: argparse.Namespace):
    """TrainArgs from parsed flags: explicit flags over a resumed run's settings, or over the
    built-in default's and the library defaults."""
    from kt_ops import default
    from kt_ops.run_state import find_checkpoint
    from kt_ops.train import TrainArgs, saved_args

    explicit = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)
                if getattr(ns, f.name, None) is not None}
    if ns.resume:
        base = saved_args(ns.resume)
        # The directory given to --resume is the output directory, wherever the run began.
        base.update(stop_after=None, resume=None, overwrite=False, allow_changed_data=False, progress=True,
                    out=find_checkpoint(ns.resume)[0])
    else:
        base = {}
        if ns.model is None:
            base.update(default.TRAIN_DEFAULTS)
            if ns.data is None and ns.eval_data is None and ns.eval_fraction is None:
                base["eval_data"] = default.EVAL_DATA
        if ns.epochs is None and ns.steps is None and "epochs" not in base:
            base["epochs"] = 1
        if ns.steps is not None:
            base.pop("epochs", None)
    merged = {**base, **explicit}
    if not merged.get("out"):
        raise ValueError("kt-sft train: --out is required")
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in merged.items() if k in known})


def _train(ns: argparse.Namespace) -> int:
    from kt_ops.train import Interrupted, Trainer, reuse_freed_memory

    args = train_args(ns)
    reuse_freed_memory()
    trainer = Trainer(args, log=lambda m: print(m, file=sys.stderr))
    say = trainer.log  # rank 0 speaks for a job of several ranks
    ranks = f", {trainer.ranks.world} ranks" if trainer.ranks is not None else ""
    say(f"kt-sft: {len(trainer.examples)} examples, {trainer.total_steps} steps of <= {args.max_tokens_per_step} "
        f"tokens, model on {trainer.device} (experts on the CPU){ranks}, writing to {args.out}")
    try:
        metrics = trainer.train()
    except Interrupted as e:
        trainer.close()
        say(f"kt-sft: stopped at step {trainer.step}; resume with: kt-sft train --resume {args.out}")
        return 128 + e.signum
    trainer.close()
    if trainer.is_main:
        print(json.dumps(metrics, indent=2))
    if not metrics["completed"]:
        say(f"kt-sft: stopped at step {trainer.step} of {trainer.total_steps}; resume with: kt-sft train --resume "
            f"{args.out}")
    return 0


def _generator(ns: argparse.Namespace):
    """The model of ``--model`` with ``--adapter`` (none: fresh LoRA, which leaves the model
    unchanged) and a :class:`~kt_ops.generation.Generator` of the sampling flags."""
    import transformers

    from kt_ops import default
    from kt_ops.generation import Generator
    from kt_ops.train import resolve_device
    from kt_ops.weights import load_model

    model_dir = ns.model or default.model_dir()
    device = resolve_device(ns.device)
    model = load_model(model_dir, adapter=ns.adapter, device=device, experts_format=ns.experts_format,
                       progress=getattr(ns, "progress", True))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return Generator(model, tokenizer, device, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                     top_p=ns.top_p, seed=ns.seed)


def _default_data(ns: argparse.Namespace, command: str) -> str:
    from kt_ops import default

    if ns.data:
        return ns.data
    if ns.model is None:
        return default.EVAL_DATA
    raise ValueError(f"kt-sft {command}: --data is required with --model")


def _eval(ns: argparse.Namespace) -> int:
    from kt_ops import default
    from kt_ops.evaluate import evaluate_adapter, format_table
    from kt_ops.files import write_json
    from kt_ops.train import resolve_device

    data = _default_data(ns, "eval")
    result = evaluate_adapter(ns.model or default.model_dir(), ns.adapter, data, device=resolve_device(ns.device),
                              max_seq_len=ns.max_seq_len, generate=ns.generate, max_new_tokens=ns.max_new_tokens,
                              batch_size=ns.batch_size, experts_format=ns.experts_format, progress=ns.progress,
                              log=lambda m: print(m, file=sys.stderr))
    out = ns.out or os.path.join(ns.adapter, "eval.json")
    write_json(out, result)
    print(format_table(result))
    print(f"kt-sft eval: {result['examples']} examples of {data}; written to {out}", file=sys.stderr)
    return 0


def _infer(ns: argparse.Namespace) -> int:
    from kt_ops.data import load_prompts
    from kt_ops.generation import infer

    data = _default_data(ns, "infer")
    prompts = load_prompts(data)  # a bad file stops here, before the model is loaded
    if os.path.exists(ns.out) and os.path.samefile(ns.out, data):
        raise ValueError(f"kt-sft infer: --out {ns.out} is the --data file")
    summary = infer(_generator(ns), prompts, ns.out, batch_size=ns.batch_size, overwrite=ns.overwrite, source=data,
                    progress=ns.progress, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(summary, indent=2))
    return 0


def _chat(ns: argparse.Namespace) -> int:
    from kt_ops.generation import chat

    return chat(_generator(ns), system=ns.system)


def _generate(ns: argparse.Namespace) -> int:
    messages = ([{"role": "system", "content": ns.system}] if ns.system else []) + [{"role": "user", "content": ns.prompt}]
    (reply, _), = _generator(ns).generate([messages])
    print(reply)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``kt-sft`` and ``python -m kt_ops``; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    import warnings

    from kt_ops.data import DataError

    # transformers 5 deprecation noise that PEFT triggers on every LoRA model; not the user's to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    try:
        return ns.func(ns)
    # OSError: a file that cannot be read or written (a full disk, say); what was written is
    # whole, and the run resumes from its last checkpoint.
    except (ValueError, DataError, KeyError, FloatingPointError, OSError) as e:
        print(f"kt-sft {ns.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
