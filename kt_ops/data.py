"""Instruction data for kt-sft: JSONL records -> token ids with the prompt masked -> packed rows.

Each line of the file is one JSON object in one of the common instruction formats:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- ``{"prompt": "...", "response": "..."}``
- ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional)

Every record becomes a conversation rendered with the tokenizer's chat template (a plain
``User:``/``Assistant:`` template when the tokenizer has none); the loss is taken on the
assistant turns only. Conversations are packed, whole, into rows of at most a token budget,
with position ids restarting at each conversation so attention stays inside it (transformers
builds a block-causal mask from such position ids).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from kt_ops.files import replacing

IGNORE = -100  # label of a token the loss skips (prompt tokens)
ROLES = ("system", "user", "assistant")

# Used when the tokenizer has no chat template of its own. The assistant's turn opens with a
# newline, not a space: byte-level BPE glues a space to the next word, and a prompt ending in
# a space would tokenize differently at generation time than in training.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User:\n{{ m['content'] }}\n\n"
    "{% else %}Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)


class DataError(ValueError):
    """A data file that cannot be trained on; the message names the file and the lines."""


@dataclass
class Example:
    """One tokenized conversation: ``labels[t]`` is ``input_ids[t]`` where the loss applies
    (assistant tokens), :data:`IGNORE` elsewhere; ``line``, the line of the file it was read
    from (None when it was not)."""

    input_ids: list[int]
    labels: list[int]
    line: Optional[int] = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def _check_text(value: str, where: str) -> str:
    """``value`` if it is text a tokenizer can take: JSON admits lone UTF-16 surrogates
    ("\\ud800"), which no UTF-8 text holds."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} holds a lone surrogate (\\u{ord(value[_first_surrogate(value)]):04x}), not text")
    return value


def _first_surrogate(value: str) -> int:
    return next(i for i, c in enumerate(value) if 0xD800 <= ord(c) <= 0xDFFF)


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}')
    if required and not value.strip():
        raise ValueError(f'"{key}" is empty')
    return _check_text(value, f'"{key}"')


def to_messages(record: Any) -> list[dict[str, str]]:
    """The conversation a record stands for, as chat messages; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f'messages[{i}] must be {{"role": one of {"/".join(ROLES)}, "content": string}}, '
                                 f"got {json.dumps(m)[:80]}")
            out.append({"role": m["role"], "content": _check_text(m["content"], f"messages[{i}].content")})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise ValueError("no assistant message with content (nothing to learn)")
        if out[0]["role"] == "assistant" or (out[0]["role"] == "system" and len(out) > 1 and out[1]["role"] == "assistant"):
            raise ValueError("the conversation starts with an assistant message (no prompt before it)")
        return out
    if "prompt" in record or "response" in record:
        return [{"role": "user", "content": _text(record, "prompt")},
                {"role": "assistant", "content": _text(record, "response")}]
    if "instruction" in record or "output" in record:
        instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    raise ValueError('unknown format: expected "messages", "prompt"/"response" or "instruction"/"input"/"output" '
                     f"keys, got {sorted(record)}")


def render_chat(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    """``messages`` as text through the tokenizer's chat template (or :data:`PLAIN_CHAT_TEMPLATE`),
    ending with the assistant's turn opening when ``generation_prompt``."""
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def tokenize(messages: list[dict], tokenizer: Any, max_seq_len: int) -> Example:
    """Renders ``messages`` with the chat template and labels the assistant turns' tokens (the
    turn's end-of-turn token included, so the model learns to stop); cut to ``max_seq_len``.

    Raises ValueError if the template does not render each conversation prefix as a prefix of
    the whole (the assistant spans could not be located) or nothing trainable is left.
    """
    full = render_chat(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], True)
        through = render_chat(tokenizer, messages[:i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(f"the chat template does not render the conversation up to message {i} as a "
                             "prefix of the whole conversation, so the assistant tokens cannot be located")
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_seq_len], enc["offset_mapping"][:max_seq_len]
    # A token is learnt if any of its characters is the assistant's.
    labels = [tok if any(start < hi and end > lo for lo, hi in spans) else IGNORE
              for tok, (start, end) in zip(ids, offsets)]
    labels[0] = IGNORE  # nothing precedes a conversation's first token in a packed row
    example = Example(ids, labels)
    if not example.trainable_tokens:
        raise ValueError(f"no assistant tokens within the first {max_seq_len} tokens (--max-seq-len)")
    return example


def read_jsonl(path: Union[str, os.PathLike], parse: Callable[[Any, int], Any], *,
               warn: Callable[[str], None] = print, max_reported: int = 20, strict: bool = False) -> list[Any]:
    """``parse(record, line number)`` of each non-blank line of a JSONL file, in order.

    A line that is not UTF-8 JSON, or whose record ``parse`` refuses with ValueError, is bad:
    each is reported through ``warn`` with its line number and reason (the first
    ``max_reported`` of them) and left out; with ``strict`` any bad line is a DataError naming
    them instead (where every line must give an output). DataError if the file cannot be
    read or has no usable line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    parsed, bad = [], []
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    with fh:
        # Lines are decoded one at a time, so a stray byte costs its line, not the file.
        for number, raw in enumerate(fh, 1):
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
                except ValueError as e:  # e.g. an integer of more digits than Python converts
                    raise ValueError(f"invalid JSON ({e})") from None
                except RecursionError:
                    raise ValueError("invalid JSON (nested too deeply)") from None
                parsed.append(parse(record, number))
            except ValueError as e:
                bad.append(f"{path}:{number}: {e}")
    if bad and strict:
        more = f" (and {len(bad) - max_reported} more)" if len(bad) > max_reported else ""
        raise DataError(f"{path}: {len(bad)} bad lines{more}:\n  " + "\n  ".join(bad[:max_reported]))
    for message in bad[:max_reported]:
        warn(message)
    if len(bad) > max_reported:
        warn(f"{path}: ... and {len(bad) - max_reported} more bad lines")
    if not parsed:
        raise DataError(f"{path}: no usable examples" + (f" ({len(bad)} bad lines, the first: {bad[0]})" if bad else
                                                         " (the file is empty)"))
    if bad:
        warn(f"{path}: left out {len(bad)} bad of {len(bad) + len(parsed)} lines")
    return parsed


def load_examples(path: Union[str, os.PathLike], tokenizer: Any, max_seq_len: int, *,
                  warn: Callable[[str], None] = print, max_reported: int = 20) -> list[Example]:
    """Reads and tokenizes a JSONL file of conversations (:func:`read_jsonl`: bad lines are
    reported with their line numbers and left out)."""
    def parse(record: Any, line: int) -> Example:
        example = tokenize(to_messages(record), tokenizer, max_seq_len)
        example.line = line
        return example

    return read_jsonl(path, parse, warn=warn, max_reported=max_reported)


def copy_lines(src: Union[str, os.PathLike], lines: list[int], dst: Union[str, os.PathLike]) -> None:
    """Writes lines ``lines`` (numbered from 1) of ``src``, in file order, to ``dst``, atomically."""
    wanted = set(lines)
    with replacing(os.fspath(dst)) as tmp:
        with open(src, "rb") as fh, open(tmp, "wb") as out:
            for number, raw in enumerate(fh, 1):
                if number in wanted:
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")


@dataclass
class Prompt:
    """What one record asks: its ``id`` (the record's ``"id"``, else its line number), the
    conversation up to the reply (``messages``, ending with a user turn), the reply the
    record holds as its reference (``reference``; None when it holds none) and its ``line``."""

    id: Union[int, str]
    messages: list[dict[str, str]]
    reference: Optional[str]
    line: int


# The key of each record format's reply, and a stand-in for it where a prompt has none.
_REPLY_KEYS = (("prompt", "response"), ("instruction", "output"))


def to_prompt(record: Any, line: int) -> Prompt:
    """The :class:`Prompt` of a record of any of the three formats; the reply is optional
    (a ``messages`` list ending with a user turn, a ``prompt`` without ``response``, an
    ``instruction`` without ``output``). The conversation is the one :func:`to_messages`
    makes of the record. ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    rid = record.get("id", line)
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        raise ValueError(f'"id" must be a string or an integer, got {json.dumps(rid)[:40]}')
    stand_in = {"role": "assistant", "content": "-"}
    if "messages" in record:
        messages = record["messages"]
        closing = isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant"
        if closing and (not isinstance(messages[-1].get("content"), str) or not messages[-1]["content"].strip()):
            raise ValueError("the closing assistant message must be non-empty text")
        before = messages[:-1] if closing else messages
        if not isinstance(before, list) or not before:
            raise ValueError('"messages" must hold at least one message before the reply')
        conversation = to_messages({"messages": before + [stand_in]})[:-1]
        if conversation[-1]["role"] != "user":
            raise ValueError(f'the last message before the reply must be the user\'s, got "{conversation[-1]["role"]}"')
        reference = _check_text(messages[-1]["content"], "the closing assistant message") if closing else None
        return Prompt(rid, conversation, reference, line)
    for prompt_key, reply_key in _REPLY_KEYS:
        if prompt_key in record:
            reference = _text(record, reply_key) if reply_key in record else None
            conversation = to_messages({**record, reply_key: reference or "-"})[:-1]
            return Prompt(rid, conversation, reference, line)
    raise ValueError('unknown format: expected "messages", "prompt" or "instruction" keys, got '
                     f"{sorted(record)}")


def load_prompts(path: Union[str, os.PathLike]) -> list[Prompt]:
    """The :class:`Prompt` of every line of a JSONL file, in order. Every line must give one
    (each output line answers an input line): a bad line, or an id that two lines share, is a
    DataError naming the file and the lines."""
    prompts = read_jsonl(path, to_prompt, strict=True)
    lines: dict[Union[int, str], int] = {}
    for prompt in prompts:
        if prompt.id in lines:
            raise DataError(f"{os.fspath(path)}:{prompt.line}: id {json.dumps(prompt.id)} is also line "
                            f"{lines[prompt.id]}'s")
        lines[prompt.id] = prompt.line
    return prompts


def plan_epoch(lengths: list[int], seed: int, epoch: int, tokens_per_step: int,
               tokens_per_row: Optional[int] = None) -> list[list[list[int]]]:
    """The steps of one epoch: each step a list of rows, each row a list of example indices.

    The order is a function of (seed, epoch) alone, so a resumed run replays it. Examples are
    shuffled, packed first-fit into rows of at most ``tokens_per_row`` tokens (default:
    ``tokens_per_step``), and consecutive rows are grouped into steps of at most
    ``tokens_per_step`` tokens; each row is one forward/backward (gradient accumulation when a
    step has several). Every length must fit in a row.
    """
    tokens_per_row = tokens_per_row or tokens_per_step
    if tokens_per_row > tokens_per_step:
        raise ValueError(f"tokens per row ({tokens_per_row}) exceeds tokens per step ({tokens_per_step})")
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > tokens_per_row:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than a row's {tokens_per_row}")
        # First fit over the open rows; only the last few stay open so the order stays random.
        for r in range(max(0, len(rows) - 8), len(rows)):
            if room[r] >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(tokens_per_row - lengths[i])
    steps: list[list[list[int]]] = []
    used = tokens_per_step
    for row, left in zip(rows, room):
        size = tokens_per_row - left
        if used + size > tokens_per_step:
            steps.append([])
            used = 0
        steps[-1].append(row)
        used += size
    return steps


def split_held_out(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of ``count`` examples: ``fraction`` of them (at least one)
    held out, drawn by ``seed`` alone, so a resumed run holds out the same ones. ValueError
    when nothing would be left to train on."""
    held = max(1, round(fraction * count))
    if held >= count:
        raise ValueError(f"kt-sft: --eval-fraction {fraction} of {count} examples leaves none to train on")
    order = list(range(count))
    random.Random(seed * 1_000_003 + 999_983).shuffle(order)  # not the epochs' shuffles (seed * 1_000_003 + epoch)
    return sorted(order[held:]), sorted(order[:held])


def collate(examples: list[Example], row: list[int]) -> dict[str, torch.Tensor]:
    """One packed row: ``input_ids``, ``position_ids`` (restarting at each example) and
    ``labels``, each ``[1, tokens]`` int64."""
    ids, pos, labels = [], [], []
    for i in row:
        ex = examples[i]
        ids += ex.input_ids
        labels += ex.labels
        pos += range(len(ex))
    return {k: torch.tensor([v], dtype=torch.long) for k, v in
            (("input_ids", ids), ("position_ids", pos), ("labels", labels))}
