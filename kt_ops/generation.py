"""Replies from a model with kt experts: batched generation, ``kt-sft infer`` (a JSONL file of
prompts to a JSONL file of replies, resumable) and ``kt-sft chat`` (a multi-turn terminal
chat).

Generation is transformers' own ``generate`` on the patched model: prompts rendered with the
tokenizer's chat template (:func:`kt_ops.data.render_chat`), left-padded into batches, greedy
or sampled with a seed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from kt_ops import data as sft_data
from kt_ops.files import fsync_dir, replacing


class Generator:
    """Generates replies to conversations with ``model`` (its non-expert modules on
    ``device``) and ``tokenizer``: ``max_new_tokens`` per reply, greedy when ``temperature`` is
    0, else sampled at that temperature (and ``top_p``), seeded per batch by ``seed``."""

    def __init__(self, model: nn.Module, tokenizer: Any, device: torch.device, *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        if temperature < 0:
            raise ValueError(f"kt-sft: --temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"kt-sft: --top-p must be in (0, 1], got {top_p}")
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        if self.eos is None:
            raise ValueError("kt-sft: the tokenizer has no end-of-sequence token, so a reply would never end")
        config = getattr(model, "config", None)
        self.max_positions = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                                     "max_position_embeddings", None)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of ``messages`` rendered with the chat template, ending with the
        assistant's turn opening."""
        text = sft_data.render_chat(self.tokenizer, messages, True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fits(self, ids: list[int]) -> bool:
        """Whether a prompt of ``ids`` leaves room for ``max_new_tokens`` in the model's context."""
        return self.max_positions is None or len(ids) + self.max_new_tokens <= self.max_positions

    def check_prompts(self, prompts: list[sft_data.Prompt], source: str) -> None:
        """ValueError naming the prompts of ``source`` (line and id) too long for the model's
        context with ``max_new_tokens`` more, before any is generated."""
        long = [p for p in prompts if not self.fits(self.prompt_ids(p.messages))]
        if long:
            where = ", ".join(f"{source}:{p.line} (id {json.dumps(p.id)})" for p in long[:5])
            raise ValueError(f"kt-sft: {len(long)} prompts and --max-new-tokens {self.max_new_tokens} exceed the "
                             f"model's {self.max_positions} positions: {where}")

    @torch.no_grad()
    def generate(self, conversations: list[list[dict[str, str]]], *, batch_seed: int = 0,
                 streamer: Any = None) -> list[tuple[str, int]]:
        """(reply text, tokens generated) for each conversation, generated as one left-padded
        batch. ValueError names a conversation too long for the model's context."""
        prompts = [self.prompt_ids(m) for m in conversations]
        for i, ids in enumerate(prompts):
            if not self.fits(ids):
                raise ValueError(f"kt-sft: a prompt of {len(ids)} tokens and {self.max_new_tokens} new ones exceed the "
                                 f"model's {self.max_positions} positions (prompt {i + 1} of the batch)")
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        sampling = dict(do_sample=False)
        if self.temperature > 0:
            sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)
            torch.manual_seed(self.seed * 1_000_003 + batch_seed)
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=self.max_new_tokens, pad_token_id=self.pad, eos_token_id=self.eos,
                                  streamer=streamer, **sampling)
        replies = []
        for row in out[:, width:].tolist():
            n = row.index(self.eos) + 1 if self.eos in row else len(row)
            replies.append((self.tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n))
        return replies


_LINE_START = b'{"id": '  # how every line infer writes begins


def _done_ids(out_path: str, start_over: bool = False) -> list[Any]:
    """The ids ``out_path`` already answers. A last line that a kill left unfinished (the part
    after the last newline, the start of a line this command writes) is cut off, and with
    ``start_over`` every line is. ValueError for any other line that is not one of this
    command's, so no other file is ever changed."""
    if not os.path.exists(out_path):
        return []
    with open(out_path, "rb") as fh:
        lines = fh.read().split(b"\n")
    tail = lines.pop()  # empty when the file ends with a whole line
    ids = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
            rid = record.get("id") if isinstance(record, dict) else None
            if not (isinstance(record.get("prediction"), str) and isinstance(rid, (int, str))
                    and not isinstance(rid, bool)):
                raise ValueError
        except (ValueError, AttributeError):
            raise ValueError(f"kt-sft infer: {out_path}:{number} is not a line this command writes "
                             '({"id", "prediction"}); give another --out') from None
        ids.append(rid)
    if tail and not (tail.startswith(_LINE_START) or _LINE_START.startswith(tail)):
        raise ValueError(f"kt-sft infer: {out_path} does not end with a newline and its last line is not one this "
                         "command writes; give another --out")
    if start_over:
        lines, ids = [], []
    if tail or start_over:
        with replacing(out_path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"".join(line + b"\n" for line in lines))
    return ids


def infer(generator: Generator, prompts: list[sft_data.Prompt], out_path: str, *, batch_size: int = 8,
          overwrite: bool = False, source: str = "the prompts", progress: bool = True,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes one line ``{"id", "prediction"}`` to ``out_path`` for each of ``prompts`` (a
    file's, :func:`kt_ops.data.load_prompts`), in their order, a batch of
    ``batch_size`` at a time, each batch flushed to disk. Prompts whose ids ``out_path``
    already holds are skipped, so a run that was stopped continues where it was (with
    ``overwrite``, a file this command wrote starts over instead); batches keep their
    boundaries, so a greedy run stopped between batches and resumed with the same batch size
    gives the lines an uninterrupted one gives. A prompt too long for the model stops the run
    before anything is generated (the error names it in ``source``, the prompts' file).
    Returns counts and tokens/s."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"kt-sft infer: --batch-size must be >= 1, got {batch_size}")
    generator.check_prompts(prompts, source)
    done = _done_ids(out_path, start_over=overwrite)
    known = {p.id for p in prompts}
    stray = [i for i in done if i not in known]
    if stray:
        raise ValueError(f"kt-sft infer: {out_path} answers ids that the prompts do not hold ({stray[:3]}); it is "
                         "another run's output: give another --out")
    done_set = set(done)
    if done:
        log(f"kt-sft infer: {len(done_set)} of {len(prompts)} prompts already answered in {out_path}; continuing")
    tokens, seconds = 0, 0.0
    bar = tqdm(total=len(prompts), initial=len(done_set), unit="prompt", desc="infer", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        with open(out_path, "a", encoding="utf-8") as fh:
            for start in range(0, len(prompts), batch_size):
                batch = [p for p in prompts[start:start + batch_size] if p.id not in done_set]
                if not batch:
                    continue
                t0 = time.perf_counter()
                replies = generator.generate([p.messages for p in batch], batch_seed=start // batch_size)
                seconds += time.perf_counter() - t0
                tokens += sum(n for _, n in replies)
                fh.write("".join(json.dumps({"id": p.id, "prediction": text}, ensure_ascii=False) + "\n"
                                 for p, (text, _) in zip(batch, replies)))
                fh.flush()
                os.fsync(fh.fileno())
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{tokens / seconds:,.1f}")
    finally:
        bar.close()
    fsync_dir(os.path.dirname(os.path.abspath(out_path)))
    return {"prompts": len(prompts), "answered_before": len(done_set), "answered": len(prompts) - len(done_set),
            "new_tokens": tokens, "tokens_per_s": tokens / seconds if seconds else None, "out": out_path}


CHAT_HELP = "/reset starts a new conversation, /system TEXT sets the system message (/system alone clears it), /exit quits"


def chat(generator: Generator, *, system: Optional[str] = None) -> int:
    """A multi-turn chat in the terminal: each line read is the user's turn, the reply is
    streamed as it is generated. Commands: ``/reset``, ``/system TEXT``, ``/exit`` (or end of
    input). The oldest turns are dropped when the conversation outgrows the model's context;
    Ctrl-C during a reply stops it (the turn is forgotten), at the prompt it quits."""
    from transformers import TextStreamer

    print(f"kt-sft chat ({CHAT_HELP})", flush=True)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
            print("(new conversation)", flush=True)
            continue
        if line == "/system" or line.startswith("/system "):
            system = line[len("/system"):].strip() or None
            print(f"(system message {'set' if system else 'cleared'})", flush=True)
            continue
        if line.startswith("/"):
            print(f"(unknown command {line.split()[0]}: {CHAT_HELP})", flush=True)
            continue
        history.append({"role": "user", "content": line})
        head = [{"role": "system", "content": system}] if system else []
        while len(history) > 1 and not generator.fits(generator.prompt_ids(head + history)):
            del history[:2]  # the oldest exchange
        if not generator.fits(generator.prompt_ids(head + history)):
            history.pop()
            print("(that message is too long for the model's context)", flush=True)
            continue
        try:
            streamer = TextStreamer(generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
            (reply, _), = generator.generate([head + history], streamer=streamer)
        except KeyboardInterrupt:
            history.pop()
            print("\n(stopped)", flush=True)
            continue
        history.append({"role": "assistant", "content": reply})


def generate_all(generator: Generator, conversations: list[list[dict[str, str]]], batch_size: int, *,
                 progress: bool = True, desc: str = "generating") -> list[str]:
    """Replies to every conversation, ``batch_size`` at a time, with a progress bar."""
    from tqdm.auto import tqdm

    replies: list[str] = []
    with tqdm(total=len(conversations), unit="prompt", desc=desc, disable=not progress, dynamic_ncols=True,
              file=sys.stderr) as bar:
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start:start + batch_size]
            replies += [text for text, _ in generator.generate(batch, batch_seed=start // batch_size)]
            bar.update(len(batch))
    return replies
