"""LoRA fine-tuning of an MoE model end to end: what ``kt-sft train`` runs.

A thin loop over the library: :func:`kt_ops.load_model` (experts streamed into packed CPU
memory, the rest on ``device``, LoRA on the experts and optionally other modules as one PEFT
adapter), :mod:`kt_ops.data` for the packed rows, AdamW, :mod:`kt_ops.evaluate` for the
held-out loss, and :func:`kt_ops.save_adapter` for the adapter. A step is
a group of rows (one forward/backward each: gradient accumulation) of at most
``max_tokens_per_step`` tokens; the loss is the mean over the step's assistant tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from kt_ops import data as sft_data
from kt_ops import distributed, gpu_share, run_state
from kt_ops.files import replacing, write_json
from kt_ops.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from kt_ops.evaluate import base_model, heldout_loss, summed_loss
from kt_ops.experts import experts_modules, held_packed_experts, packed_experts_in
from kt_ops.models.surgery import ExpertLoraConfig
from kt_ops.overlap import Lanes, uses_randomness
from kt_ops.run_state import CHECKPOINT, CheckpointError

BEST = "best"  # folder of the adapter of the lowest held-out loss (--keep-best)
HELD_OUT = "heldout.jsonl"  # the records --eval-fraction held out of --data, for kt-sft eval

@dataclass
class TrainArgs:
    """What ``kt-sft train`` takes; see ``kt-sft train --help`` for each."""

    out: str
    model: Optional[str] = None  # None: the built-in default (kt_ops.default)
    data: Optional[str] = None
    eval_data: Optional[str] = None  # held-out conversations to evaluate on
    eval_fraction: float = 0.0  # or this share of --data held out (a seeded split)
    eval_every: Optional[int] = None  # None: about ten evaluations over the run
    keep_best: bool = False  # also keep the adapter of the lowest held-out loss in <out>/best
    rank: int = 16
    alpha: float = 32.0
    lr: float = 2e-4
    epochs: Optional[int] = None
    steps: Optional[int] = None
    max_tokens_per_step: int = 4096
    micro_batch_tokens: Optional[int] = None
    max_seq_len: int = 2048
    grad_checkpointing: bool = False
    overlap: Optional[bool] = None  # two micro-batches in flight (kt_ops.overlap); None: on with a GPU
    gpu_experts_budget: int = 0  # bytes of GPU memory for a share of the experts (kt_ops.gpu_share)
    shard_experts: bool = False  # each host of a job holds its share of the experts (kt_ops.expert_parallel)
    target_modules: list[str] = field(default_factory=list)
    seed: int = 0
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    device: str = "auto"
    dtype: str = "bfloat16"
    experts_format: Optional[str] = None  # None: the checkpoint's own (checkpoint_experts_format)
    save_every: int = 0
    stop_after: Optional[int] = None
    resume: Optional[str] = None
    overwrite: bool = False
    allow_changed_data: bool = False
    progress: bool = True

    # Arguments that fix what a run computes: a resumed run must have the same ones. The model
    # and the data are compared by content (Trainer.fingerprints), not by path.
    IDENTITY = ("rank", "alpha", "lr", "epochs", "steps", "max_tokens_per_step",
                "micro_batch_tokens", "max_seq_len", "target_modules", "seed", "warmup_steps", "weight_decay",
                "max_grad_norm", "dtype", "experts_format", "eval_fraction", "keep_best", "gpu_experts_budget")


class _RowLoss(nn.Module):
    """The summed loss of a packed row (:func:`kt_ops.evaluate.summed_loss`) as a module's
    forward: what DistributedDataParallel wraps, since it syncs only what its own forward ran."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(self.model, batch)


class Interrupted(Exception):
    """Raised by :meth:`Trainer.train` after saving a checkpoint on SIGINT / SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when a GPU is there, else cpu; anything else as torch.device takes it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _MasterWeights:
    """fp32 copies of trainable low-precision parameters (a bf16 model's routers), which the
    optimizer updates and copies back: AdamW steps applied to bf16 values mostly round away."""

    def __init__(self, params: list[nn.Parameter]):
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True)) for p in params if p.dtype != torch.float32]
        self.masters = {id(p): m for p, m in self.pairs}

    def optimized(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        return [self.masters.get(id(p), p) for p in params]

    def grads_to_masters(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)

    def state_dict(self) -> list[torch.Tensor]:
        return [m.detach().cpu() for _, m in self.pairs]

    @torch.no_grad()
    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.pairs):
            raise ValueError(f"kt-sft: checkpoint has {len(state)} master weights, the model {len(self.pairs)}")
        for (_, m), s in zip(self.pairs, state):
            m.copy_(s)
        self.masters_to_params()


def reuse_freed_memory() -> bool:
    """Make the C library keep freed memory in the process for reuse instead of unmapping it.

    A training step allocates and frees gigabytes in large tensors (the experts' saved
    activations, the LoRA gradients). glibc serves each block over 32 MiB with its own mmap
    and unmaps it when freed, so the kernel page-faults and zeroes the same gigabytes again
    every step. With mmap off and trimming off, freed blocks are reused: a Qwen3-30B-A3B step
    on the 16-core host took 10% less time. The setting is process-wide, so the kt-sft command
    and the benchmarks call this, not the library. Returns False where the C library has no
    glibc ``mallopt`` (nothing changes then).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))  # -1: never trim


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    """One fine-tuning run: model, data plan, optimizer and schedule, checkpoints, outputs."""

    def __init__(self, args: TrainArgs, log=print, *, model: Optional[nn.Module] = None,
                 examples: Optional[list[sft_data.Example]] = None):
        """``model`` (what :func:`kt_ops.patch_model` returns, with the LoRA of ``args``) and
        ``examples`` replace loading them from ``args.model`` and ``args.data``: benchmarks
        build models too large to write as checkpoints."""
        import transformers

        from kt_ops import default
        from kt_ops.weights import load_model

        self.args, self.log = args, log
        if not args.resume and not args.overwrite and any(
                os.path.exists(os.path.join(args.out, f)) for f in (CHECKPOINT, "adapter_model.safetensors")):
            raise ValueError(f"kt-sft: {args.out} already holds a run; continue it with --resume {args.out}, or "
                             "choose another --out (--overwrite replaces it)")
        if model is None and args.model is None:
            args.model = default.model_dir()
            args.data = args.data or default.DATA
        if args.data is None and examples is None:
            raise ValueError("kt-sft: --data is required with --model")
        if (args.epochs is None) == (args.steps is None):
            raise ValueError("kt-sft: give one of --epochs and --steps")
        if (args.epochs or args.steps or 0) < 1:
            raise ValueError("kt-sft: --epochs / --steps must be >= 1")
        self.tokens_per_row = args.micro_batch_tokens or args.max_tokens_per_step
        if self.tokens_per_row > args.max_tokens_per_step:
            raise ValueError(f"kt-sft: --micro-batch-tokens ({self.tokens_per_row}) exceeds --max-tokens-per-step "
                             f"({args.max_tokens_per_step})")
        # Paths are kept absolute: a resumed run may start from another working directory.
        args.out = os.path.abspath(args.out)
        args.model = args.model and os.path.abspath(args.model)
        args.data = args.data and os.path.abspath(args.data)
        _check_writable(args.out)
        args.eval_data = args.eval_data and os.path.abspath(args.eval_data)
        for path in (args.data, args.eval_data):
            if path is not None and not os.path.isfile(path):
                raise sft_data.DataError(f"{path}: no such file")
        if args.eval_data and args.eval_fraction:
            raise ValueError("kt-sft: give one of --eval-data and --eval-fraction")
        if not 0 <= args.eval_fraction < 1:
            raise ValueError(f"kt-sft: --eval-fraction must be in [0, 1), got {args.eval_fraction}")
        if args.eval_every is not None and args.eval_every < 1:
            raise ValueError(f"kt-sft: --eval-every must be >= 1, got {args.eval_every}")
        if args.keep_best and not (args.eval_data or args.eval_fraction):
            raise ValueError("kt-sft: --keep-best needs held-out data (--eval-data or --eval-fraction)")
        resumed = self._read_checkpoint(args.resume) if args.resume else None
        self.fingerprints = {"model": args.model and _model_fingerprint(args.model),
                             "data": args.data and _file_sha256(args.data),
                             "eval_data": args.eval_data and _file_sha256(args.eval_data)}
        if resumed is not None:
            self._check_same_run(*resumed)
        if args.shard_experts and args.gpu_experts_budget:
            raise ValueError("kt-sft: --gpu-experts-budget and --shard-experts do not go together (a share of the "
                             "experts on the GPU needs every expert on the host)")
        _seed_everything(args.seed)
        # Under torchrun: this rank's GPU and cores, before the first kt op (kt_ops.distributed).
        self.ranks, self.device = distributed.join_job(resolve_device(args.device))
        if self.ranks is not None and not self.ranks.main:
            log = self.log = lambda m: None  # rank 0 speaks for the job
        max_len = min(args.max_seq_len, self.tokens_per_row)
        warn = lambda m: log(f"warning: {m}")  # noqa: E731
        tokenizer = (transformers.AutoTokenizer.from_pretrained(args.model)
                     if examples is None or args.eval_data else None)
        if examples is None:
            examples = sft_data.load_examples(args.data, tokenizer, max_len, warn=warn)
        self.eval_examples: list[sft_data.Example] = []
        if args.eval_fraction:
            train, held_out = sft_data.split_held_out(len(examples), args.eval_fraction, args.seed)
            examples, self.eval_examples = [examples[i] for i in train], [examples[i] for i in held_out]
        elif args.eval_data:
            self.eval_examples = sft_data.load_examples(args.eval_data, tokenizer, max_len, warn=warn)
        self.examples = examples
        self.lengths = [len(e) for e in self.examples]
        self.total_steps = args.steps or sum(len(self._plan(e)) for e in range(args.epochs))
        self.eval_every = args.eval_every or max(1, self.total_steps // 10)
        if model is None and args.model is not None:  # sized from the checkpoint it will load
            _check_room(args.out, args.model, args.rank, resumed is not None)

        if model is None:
            lora = ExpertLoraConfig(args.rank, args.alpha, target_modules=tuple(args.target_modules))
            model = load_model(args.model, config=lora, dtype=getattr(torch, args.dtype), device=self.device,
                               experts_format=args.experts_format, progress=args.progress and self.is_main,
                               shard_experts=args.shard_experts)
        elif args.shard_experts:
            raise ValueError("kt-sft: --shard-experts spreads the experts over hosts as they are loaded: give --model")
        elif self.ranks is not None:
            distributed.share_packed_experts(model)  # load_model shares them by itself
        if args.grad_checkpointing:
            # Non-reentrant, as transformers 5.x's default (4.x defaults to reentrant, which with frozen
            # embeddings sees no input that needs a gradient and drops the backward).
            base = base_model(model)
            if hasattr(base, "activation_checkpointing_enable"):  # the newer name (the older one is deprecated)
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = model
        self.gpu_experts = self._share_experts(resumed[1] if resumed is not None else None)
        if self.ranks is not None:  # DDP, which leaves them out, broadcasts the rest from rank 0
            distributed.broadcast_expert_lora(model, group=self.ranks.cpu_group)
        self.row_loss = self._row_loss(model)
        self.lanes = self._lanes(args.overlap)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = _MasterWeights(self.params)
        # Several ranks on a host: the experts' LoRA once per host, each rank stepping its share.
        self.expert_lora = (distributed.HostExpertLora(model)
                            if self.ranks is not None and distributed.host_group() is not None else None)
        optimized = self.master.optimized(self.params)
        self.stepped = [i for i, p in enumerate(optimized) if self.expert_lora is None or self.expert_lora.steps(p)]
        # fused: one kernel per device and dtype; the experts' LoRA (hundreds of millions of
        # fp32 values on a large model) is updated in CPU memory.
        self.optimizer = torch.optim.AdamW([optimized[i] for i in self.stepped], lr=args.lr,
                                           weight_decay=args.weight_decay, fused=True)
        warmup = args.warmup_steps if args.warmup_steps is not None else min(10, self.total_steps // 10)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_cosine(warmup, self.total_steps))
        self.step = 0
        self.losses: list[float] = []
        self.evals: list[dict[str, Any]] = []  # {"step", "eval_loss", "eval_perplexity"}, in step order
        self.tokens = 0
        self.train_seconds = 0.0
        if resumed is not None:
            self._load_checkpoint(*resumed)
        elif args.overwrite and self.is_main:
            _clear_previous_run(args.out)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files: the only one, or rank 0 of a job."""
        return self.ranks is None or self.ranks.main

    def _row_loss(self, model: nn.Module) -> nn.Module:
        """What computes a row's summed loss: the model itself, or in a job of several ranks a
        DistributedDataParallel over it, which sums the gradients of the modules outside the
        experts over the ranks (the experts' LoRA is summed by kt_ops.distributed, beside
        the packed experts it is left out of DDP with)."""
        row_loss = _RowLoss(model)
        if self.ranks is None:
            return row_loss
        from torch.nn.parallel import DistributedDataParallel

        distributed.ignore_experts_in_ddp(row_loss)
        return DistributedDataParallel(row_loss, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        return sft_data.plan_epoch(self.lengths, self.args.seed, epoch, self.args.max_tokens_per_step,
                                   self.tokens_per_row)

    def planned_steps(self, start: int = 0) -> Iterator[list[list[int]]]:
        """The rows of each step from step ``start`` on (epochs repeat in ``--steps`` mode)."""
        step, epoch = 0, 0
        while step < self.total_steps:
            for rows in self._plan(epoch):
                if step >= start:
                    yield rows
                step += 1
                if step >= self.total_steps:
                    return
            epoch += 1

    def _share_experts(self, resumed_state: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """With --gpu-experts-budget, holds the most-routed experts on the device (a resumed run:
        the ones its checkpoint names; else counted over the first step's rows, forward only)
        and returns what metrics.json records of them."""
        budget = self.args.gpu_experts_budget
        if budget < 0:
            raise ValueError(f"kt-sft: --gpu-experts-budget must be >= 0 bytes, got {budget}")
        if not budget:
            return None
        if self.device.type != "cuda":
            self.log(f"warning: --gpu-experts-budget on {self.device}: the share is computed by PyTorch on the "
                     "same CPU as the kt kernels (a check of the split, not a speed-up)")
        dtype = getattr(torch, self.args.dtype)
        counts = None
        if resumed_state is not None and "gpu_experts" in resumed_state:
            selection = _read_selection(resumed_state["gpu_experts"])
        else:
            rows = next(self.planned_steps(0))
            with gpu_share.count_routing(self.model) as routing, torch.no_grad():
                for row in self.ranks.mine(rows) if self.ranks is not None else rows:
                    batch = sft_data.collate(self.examples, row)
                    self.model(input_ids=batch["input_ids"].to(self.device))
            counts = routing.counts
            if self.ranks is not None:  # every rank holds the same experts, counted over the whole step
                for c in counts.values():
                    self.ranks.sum_(c)
            selection = gpu_share.choose_gpu_experts(self.model, budget, counts, dtype)
        held = gpu_share.share_experts(self.model, selection, self.device, dtype,
                                       progress=self.args.progress and self.is_main)
        shared = sum(len(ids) for ids in selection.values())
        total = sum(held_packed_experts(m).num_experts for m in experts_modules(self.model).values())
        record = {"experts": shared, "of": total, "bytes": held, "budget_bytes": budget, "selection": selection}
        line = f"kt-sft: {shared} of {total} experts ({gpu_share.format_size(held)}) held on {self.device}"
        if counts is not None:
            routed = sum(int(c.sum()) for c in counts.values())
            covered = sum(int(counts[name][ids].sum()) for name, ids in selection.items())
            record["routed_share"] = round(covered / routed, 4) if routed else None
            if routed:
                line += f", {covered / routed:.1%} of the first step's routing slots"
        self.log(line)
        return record

    def _lanes(self, overlap: Optional[bool]) -> Optional[Lanes]:
        if overlap is None:
            overlap = self.device.type == "cuda" and self.ranks is None
        if not overlap:
            return None
        if self.ranks is not None:
            self.log("warning: --overlap is off in a job of several ranks (DDP runs one backward at a time)")
            return None
        random_part = uses_randomness(self.model)
        if random_part is not None:
            self.log(f"warning: {random_part} draws random numbers in training; the micro-batches run one at a "
                     "time (no --overlap) so that a run repeats")
            return None
        return Lanes(self.device, self.model)

    def loss_and_backward(self, rows: list[list[int]]) -> tuple[float, int]:
        """Forward and backward of one step's rows; returns (mean loss over the step's
        assistant tokens, tokens in the step). Gradients accumulate into ``.grad``. With
        overlap, two rows are in flight at a time (:class:`kt_ops.overlap.Lanes`). In a job of
        several ranks each rank takes every world-th row and the gradients are summed over the
        ranks."""
        batches = [sft_data.collate(self.examples, row) for row in rows]
        label_count = sum(int((b["labels"][0, 1:] != sft_data.IGNORE).sum()) for b in batches)
        tokens = sum(b["input_ids"].shape[1] for b in batches)
        # DDP averages over the ranks: each rank's share of the sum is scaled up to cancel it.
        world = self.ranks.world if self.ranks is not None else 1
        mine = self.ranks.mine(batches) if self.ranks is not None else batches
        weights = [world] * len(mine)
        # A rank left without a row runs one weighted 0, to take part in DDP's sums; with the
        # experts spread over hosts every forward is an exchange, so every rank runs as many.
        rows_each = -(-len(batches) // world) if self.args.shard_experts else 1
        pad = max(rows_each - len(mine), 0)
        mine, weights = mine + batches[:1] * pad, weights + [0] * pad

        def row_loss(b: dict[str, torch.Tensor], weight: int = 1, last: bool = True) -> float:
            b = {k: v.to(self.device) for k, v in b.items()}
            sync = contextlib.nullcontext() if last or self.ranks is None else self.row_loss.no_sync()
            with sync:
                loss = self.row_loss(b) / label_count
                (loss * weight).backward()
            return loss.item() if weight else 0.0

        if self.lanes is not None and len(mine) > 1:
            losses = self.lanes.run(row_loss, mine)
        else:
            losses = [row_loss(b, w, last=i == len(mine) - 1) for i, (b, w) in enumerate(zip(mine, weights))]
        total = 0.0
        for loss in losses:  # summed in row order, whatever order the rows ran in
            total += loss
        if self.ranks is not None:
            distributed.sync_expert_gradients(self.model, group=self.ranks.cpu_group)
            total = self.ranks.sum([total])[0]
        return total, tokens

    def optimizer_step(self) -> None:
        self.master.grads_to_masters()
        masters = self.master.optimized(self.params)
        if self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(masters, self.args.max_grad_norm)
        self.optimizer.step()
        if self.expert_lora is not None:
            self.expert_lora.after_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        self.master.masters_to_params()

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state_dict as one optimizer over every trained tensor would give it
        (the checkpoint's form, whatever the ranks): with the experts' LoRA stepped in shares,
        each share's state gathered from its rank (a collective of the host's ranks)."""
        local = self.optimizer.state_dict()
        if self.expert_lora is None:
            return local
        state = {self.stepped[i]: v for i, v in local["state"].items()}
        optimized = self.master.optimized(self.params)
        position = {id(p): i for i, p in enumerate(optimized)}
        lora = self.expert_lora.params
        shares = self.expert_lora.gather_state({k: state[position[id(p)]] for k, p in enumerate(lora)
                                                if position[id(p)] in state})
        state.update({position[id(lora[k])]: v for k, v in shares.items()})
        group = {k: v for k, v in local["param_groups"][0].items() if k != "params"}
        return {"state": dict(sorted(state.items())), "param_groups": [{**group, "params": list(range(len(optimized)))}]}

    def _local_optimizer_state(self, full: dict[str, Any]) -> dict[str, Any]:
        """The part of a checkpoint's optimizer state (:meth:`_optimizer_state`'s form) that this
        rank's optimizer holds."""
        if self.expert_lora is None:
            return full
        local = {i: full["state"][g] for i, g in enumerate(self.stepped) if g in full["state"]}
        group = {k: v for k, v in full["param_groups"][0].items() if k != "params"}
        return {"state": local, "param_groups": [{**group, "params": list(range(len(self.stepped)))}]}

    def train(self) -> dict[str, Any]:
        """Runs to the last step (or ``stop_after`` steps of this run), writing the outputs;
        returns the metrics. On SIGINT/SIGTERM it finishes the step, saves a checkpoint and
        raises :class:`Interrupted`."""
        args = self.args
        stop_at = self.total_steps if args.stop_after is None else min(self.total_steps, self.step + args.stop_after)
        signals = _SignalFlag(self.log)
        bar = _bar(self.total_steps, self.step, args.progress and self.is_main)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # The signal handlers stay until every output is written: a SIGTERM while they are
        # being written is recorded, not obeyed at once.
        try:
            try:
                if self.eval_examples and not self.evals:
                    self.evaluate(bar)  # the starting point: the model with the fresh adapter
                for rows in self.planned_steps(self.step):
                    if self.step >= stop_at:
                        break
                    t0 = time.perf_counter()
                    loss, tokens = self.loss_and_backward(rows)
                    if not math.isfinite(loss):  # keep the last good state, resumable
                        for p in self.params:
                            p.grad = None
                        signals.finishing = True
                        self.finish(completed=False)
                        raise FloatingPointError(f"kt-sft: loss is {loss} at step {self.step + 1}; stopped with the "
                                                 f"state after step {self.step} saved (lower --lr?)")
                    self.optimizer_step()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.train_seconds += time.perf_counter() - t0
                    self.step += 1
                    self.tokens += tokens
                    self.losses.append(loss)
                    bar.update(1)
                    bar.set_postfix(self._postfix(loss))
                    if self.eval_examples and (self.step % self.eval_every == 0 or self.step == self.total_steps):
                        self.evaluate(bar)
                    signum = self._agreed_signal(signals.signum)
                    if signum is not None:
                        signals.finishing = True
                        self.finish(completed=False)
                        raise Interrupted(signum)
                    if args.save_every and self.step % args.save_every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
            finally:
                bar.close()
            signals.finishing = True
            return self.finish(completed=self.step >= self.total_steps)
        finally:
            signals.restore()

    def close(self) -> None:
        """Leaves the job's process group, in a job of several ranks whose training ended on
        every rank (finished, or stopped by a signal they agreed on); after an error, a rank
        leaves it to the process's end (a barrier could meet another rank's collective)."""
        if self.ranks is not None and torch.distributed.is_initialized():
            # DDP's reducer goes first: released last, with the process group, its gloo threads
            # would wait for the interpreter lock its release holds.
            torch.distributed.barrier()
            self.row_loss = None
            gc.collect()
            torch.distributed.destroy_process_group()

    def _agreed_signal(self, signum: Optional[int]) -> Optional[int]:
        """The signal to stop on after this step: this process's, or in a job of several ranks
        the largest any rank got (all ranks stop at the same step)."""
        if self.ranks is None:
            return signum
        agreed = self.ranks.largest(signum or 0)
        return None if agreed == 0 else signum or agreed

    def _postfix(self, loss: float) -> dict[str, str]:
        postfix = {"loss": f"{loss:.4f}", "tok_s": f"{self.tokens / self.train_seconds:,.0f}"}
        if self.evals:
            postfix["eval_loss"] = f"{self.evals[-1]['eval_loss']:.4f}"
        return postfix

    @property
    def best_eval(self) -> Optional[dict[str, Any]]:
        """The evaluation of the lowest held-out loss so far (the earliest of equal ones)."""
        return min(self.evals, key=lambda e: e["eval_loss"]) if self.evals else None

    def evaluate(self, bar=None) -> dict[str, Any]:
        """The held-out loss and perplexity at this step, recorded in ``self.evals`` (and shown
        in the progress line); with ``keep_best``, a new lowest loss writes the adapter to
        ``<out>/best``."""
        result = heldout_loss(self.model, self.eval_examples, self.tokens_per_row, self.device)
        record = {"step": self.step, "eval_loss": result.loss, "eval_perplexity": result.perplexity}
        self.evals.append(record)
        if self.args.keep_best and self.best_eval is record and self.is_main:
            save_adapter(self.model, os.path.join(self.args.out, BEST))
        if bar is not None:
            bar.set_postfix(self._postfix(self.losses[-1]) if self.losses else {"eval_loss": f"{result.loss:.4f}"})
        return record

    def metrics(self, completed: bool) -> dict[str, Any]:
        m = {"completed": completed, "steps": self.step, "total_steps": self.total_steps,
             "loss_first": self.losses[0] if self.losses else None,
             "loss_last": self.losses[-1] if self.losses else None,
             "tokens": self.tokens, "train_seconds": round(self.train_seconds, 3),
             "tokens_per_s": self.tokens / self.train_seconds if self.train_seconds else None,
             "peak_rss_gib": round(_peak_rss_gib(), 3), "device": str(self.device),
             "examples": len(self.examples), "model": self.args.model, "data": self.args.data,
             "experts_format": sorted({p.experts_format for p in packed_experts_in(self.model)}),
             "ranks": self.ranks.world if self.ranks is not None else 1}
        if self.eval_examples:
            m.update(eval=self.evals, eval_examples=len(self.eval_examples),
                     eval_loss_last=self.evals[-1]["eval_loss"] if self.evals else None)
            if self.args.keep_best and self.evals:
                m["best"] = {"step": self.best_eval["step"], "eval_loss": self.best_eval["eval_loss"],
                             "adapter": os.path.join(self.args.out, BEST)}
        if self.gpu_experts is not None:
            m["gpu_experts"] = {k: v for k, v in self.gpu_experts.items() if k != "selection"}
        if self.device.type == "cuda":
            m["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return m

    def finish(self, completed: bool) -> dict[str, Any]:
        """Writes the adapter, metrics.json, loss.png (with --eval-fraction, the held-out
        records as heldout.jsonl) and the resumable checkpoint, each file whole (a kill leaves
        the previous version of each). In a job of several ranks, rank 0 writes them."""
        metrics = self.metrics(completed)
        if not self.is_main:
            self.save_checkpoint()  # its share of the optimizer state, to rank 0
            return metrics
        out = self.args.out
        os.makedirs(out, exist_ok=True)
        save_adapter(self.model, out)
        write_json(os.path.join(out, "metrics.json"), metrics)
        with replacing(os.path.join(out, "loss.png")) as tmp:
            _plot_losses(self.losses, self.evals, tmp)
        if self.args.eval_fraction and all(e.line is not None for e in self.eval_examples):
            sft_data.copy_lines(self.args.data, [e.line for e in self.eval_examples], os.path.join(out, HELD_OUT))
        self.save_checkpoint()
        return metrics

    def save_checkpoint(self) -> None:
        """Adapter + optimizer + schedule + step + RNG state in ``<out>/checkpoint`` as data
        (JSON and safetensors), replaced atomically (see :mod:`kt_ops.run_state`); by rank 0
        alone in a job of several ranks (every rank holds the same state, but for the shares of the
        experts' LoRA each steps: every rank calls this, and sends its share)."""
        full_state = self._optimizer_state()
        if not self.is_main:
            return
        optimizer, tensors = run_state.optimizer_to_data(full_state)
        rng, rng_tensors = run_state.rng_to_data()
        tensors.update(rng_tensors)
        tensors.update({f"master.{i}": t for i, t in enumerate(self.master.state_dict())})
        state = {"step": self.step, "losses": self.losses, "evals": self.evals, "tokens": self.tokens,
                 "train_seconds": self.train_seconds, "optimizer": optimizer,
                 "scheduler": self.scheduler.state_dict(), "rng": rng, "args": dataclasses.asdict(self.args),
                 "fingerprints": self.fingerprints}
        if self.gpu_experts is not None:
            state["gpu_experts"] = self.gpu_experts["selection"]
        run_state.write_checkpoint(self.args.out, lambda path: save_adapter(self.model, path), state, tensors)

    def _read_checkpoint(self, path: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
        """(checkpoint directory, state, tensors) of ``--resume path``, which names this run's
        output directory (or its checkpoint/)."""
        out, checkpoint = run_state.find_checkpoint(path)
        if out != self.args.out:
            raise ValueError(f"kt-sft: --resume {path} continues the run in {out}; --out names another directory "
                             f"({self.args.out})")
        state, tensors = run_state.read_state(checkpoint)
        return checkpoint, state, tensors

    def _check_same_run(self, checkpoint: str, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        where = os.path.join(checkpoint, run_state.STATE_JSON)
        check_resumable(run_state.field(state, "args", dict, where), self.args)
        saved = run_state.field(state, "fingerprints", dict, where)
        if saved.get("eval_data") != self.fingerprints["eval_data"]:
            raise ValueError("kt-sft: cannot resume: the run started without --eval-data" if not saved.get("eval_data")
                             else f"kt-sft: cannot resume: {self.args.eval_data} is not the held-out data the run "
                             "started with (its SHA-256 differs)")
        if saved.get("model") != self.fingerprints["model"]:
            raise ValueError(f"kt-sft: cannot resume: the model in {self.args.model} is not the one the run started "
                             "with (its config.json or weight files differ)")
        if saved.get("data") != self.fingerprints["data"]:
            if not self.args.allow_changed_data:
                raise ValueError(f"kt-sft: cannot resume: {self.args.data} has changed since the run started (its "
                                 "SHA-256 differs); --allow-changed-data resumes on the new contents")
            self.log(f"kt-sft: warning: {self.args.data} has changed since the run started; resuming on its new "
                     "contents (--allow-changed-data)")

    def _load_checkpoint(self, checkpoint: str, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        where = os.path.join(checkpoint, run_state.STATE_JSON)
        step = run_state.field(state, "step", int, where)
        losses = run_state.field(state, "losses", list, where)
        tokens = run_state.field(state, "tokens", int, where)
        seconds = run_state.field(state, "train_seconds", (int, float), where)
        if not (0 <= step <= self.total_steps and len(losses) == step
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses)):
            raise CheckpointError(f"kt-sft: {where}: step {step} with {len(losses)} losses does not fit a run of "
                                  f"{self.total_steps} steps")
        masters = [run_state.tensor(tensors, f"master.{i}", where) for i in range(len(self.master.pairs))]
        optimizer = run_state.optimizer_from_data(run_state.field(state, "optimizer", dict, where), tensors,
                                                  self.master.optimized(self.params), where)
        scheduler = run_state.field(state, "scheduler", dict, where)
        try:
            loaded = load_adapter(self.model, checkpoint)
            if loaded is not self.model:
                raise ValueError(f"kt-sft: the checkpoint in {checkpoint} has LoRA on modules outside --target-modules")
            self.optimizer.load_state_dict(self._local_optimizer_state(optimizer))
            self.scheduler.load_state_dict(scheduler)
            self.master.load_state_dict(masters)
        except (KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"kt-sft: {checkpoint} does not fit this run ({type(e).__name__}: {e})") from None
        if self.expert_lora is not None:
            self.expert_lora.after_step()  # every rank wrote the same values into the shared LoRA
        run_state.rng_from_data(run_state.field(state, "rng", dict, where), tensors, where)
        self.evals = _read_evals(state.get("evals", []), step, where)
        self.step, self.losses, self.tokens, self.train_seconds = step, [float(v) for v in losses], tokens, float(seconds)
        self.log(f"kt-sft: resumed from {checkpoint} at step {self.step} of {self.total_steps}")


def _read_selection(selection: Any) -> dict[str, list[int]]:
    """A checkpoint's GPU share, checked for form (share_experts checks it against the model)."""
    if not (isinstance(selection, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in v)
            for k, v in selection.items())):
        raise CheckpointError("kt-sft: the checkpoint's \"gpu_experts\" is not {module path: [expert ids]}")
    return selection


def _read_evals(evals: Any, step: int, where: str) -> list[dict[str, Any]]:
    """A checkpoint's evaluations, checked: records of steps up to ``step``, in order."""
    ok = isinstance(evals, list) and all(
        isinstance(e, dict) and set(e) == {"step", "eval_loss", "eval_perplexity"}
        and isinstance(e["step"], int) and not isinstance(e["step"], bool) and 0 <= e["step"] <= step
        and all(isinstance(e[k], (int, float)) and not isinstance(e[k], bool) for k in ("eval_loss", "eval_perplexity"))
        for e in evals) and [e["step"] for e in evals] == sorted(e["step"] for e in evals)
    if not ok:
        raise CheckpointError(f"kt-sft: {where}: \"evals\" is not a list of held-out losses of steps 0..{step}")
    return [{"step": e["step"], "eval_loss": float(e["eval_loss"]), "eval_perplexity": float(e["eval_perplexity"])}
            for e in evals]


def saved_args(path: str) -> dict[str, Any]:
    """The arguments of the run whose output directory (or checkpoint/) ``path`` is, each of
    its TrainArgs type (CheckpointError naming the first that is not)."""
    _, checkpoint = run_state.find_checkpoint(path)
    state, _ = run_state.read_state(checkpoint)
    where = os.path.join(checkpoint, run_state.STATE_JSON)
    saved = run_state.field(state, "args", dict, where)
    kinds = {"int": int, "float": (int, float), "str": str, "bool": bool}
    fields = [f for f in dataclasses.fields(TrainArgs) if f.name in saved]
    for f in fields:
        optional = f.type.startswith("Optional[")
        value, kind = saved[f.name], f.type[len("Optional["):-1] if optional else f.type
        ok = (value is None and optional) or (
            kind == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value)) or (
            kind in kinds and isinstance(value, kinds[kind]) and (kind == "bool") == isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"kt-sft: {where}: the saved setting {f.name!r} is {json.dumps(value)[:60]}, not "
                                  f"a {f.type}")
    return {f.name: saved[f.name] for f in fields}


def check_resumable(saved: dict[str, Any], args: TrainArgs) -> None:
    """ValueError naming each argument that differs from the checkpoint's run (a setting the
    checkpoint's kt-sft did not have yet ran at its default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}
    diff = [f"--{k.replace('_', '-')} {saved.get(k, defaults[k])!r} -> {getattr(args, k)!r}"
            for k in TrainArgs.IDENTITY if saved.get(k, defaults[k]) != getattr(args, k)]
    if diff:
        raise ValueError("kt-sft: cannot resume with different settings: " + "; ".join(diff))


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_fingerprint(model_dir: str) -> str:
    """Identity of a checkpoint directory without reading its weights: config.json's bytes and
    the names and sizes of its weight files."""
    digest = hashlib.sha256()
    config = os.path.join(model_dir, "config.json")
    if os.path.isfile(config):
        with open(config, "rb") as fh:
            digest.update(fh.read())
    for name in sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []:
        if name.endswith((".safetensors", ".safetensors.index.json")):
            digest.update(f"{name}:{os.path.getsize(os.path.join(model_dir, name))};".encode())
    return digest.hexdigest()


def _clear_previous_run(out: str) -> None:
    """--overwrite: the files of the run that was in ``out`` go once this one is ready to
    start, so that nothing of it passes for this run's (a kill before this run's first
    checkpoint would otherwise leave the old run there to --resume)."""
    run_state.remove_checkpoint(out)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "metrics.json", "loss.png", HELD_OUT):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, BEST), ignore_errors=True)


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_writable(out: str) -> None:
    """ValueError unless ``out`` is a directory this process can write, or one it can create
    (nothing is created here: a run that stops on bad data leaves no directory behind)."""
    if os.path.isdir(out):
        probe = os.path.join(out, f".kt-sft-write-test-{os.getpid()}")
        try:
            with open(probe, "w") as fh:
                fh.write("ok")
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"kt-sft: cannot write to --out {out}: {e.strerror or e}") from None
        return
    parent = _existing_ancestor(out)
    if not os.path.isdir(parent):
        raise ValueError(f"kt-sft: cannot create --out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"kt-sft: cannot create --out {out}: {parent} is not writable")


def _check_room(out: str, model_dir: str, rank: int, resuming: bool) -> None:
    """ValueError if ``out``'s file system has too little room for the outputs: the adapter,
    the checkpoint (adapter, two Adam moments) and, while it is replaced, its predecessor."""
    from kt_ops.weights import empty_model, expert_shapes

    lora = sum(e * rank * 3 * (h + i) * 4 for e, h, i in expert_shapes(empty_model(model_dir, "kt-sft")).values())
    # adapter, best/ (--keep-best), and a checkpoint (adapter, two Adam moments) twice while it
    # is replaced; a resumed run's checkpoint and best/ hold their room already
    need = lora * (4 if resuming else 8) + (64 << 20)
    free = shutil.disk_usage(_existing_ancestor(out)).free
    if free < need:
        raise ValueError(f"kt-sft: --out {out} has {free / 2**30:.2f} GiB free; the outputs need about "
                         f"{need / 2**30:.2f} GiB (adapter, best adapter, checkpoint and the checkpoint it replaces)")


def _warmup_cosine(warmup: int, total: int):
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% of the peak."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class _SignalFlag:
    """The first SIGINT/SIGTERM is recorded (the run saves at the end of the step); a second
    SIGINT interrupts at once."""

    def __init__(self, log):
        self.signum: Optional[int] = None
        self.finishing = False  # the outputs are being written
        self.log = log
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        if self.finishing:
            self.log(f"\nkt-sft: got {name}; exiting once the outputs being written are complete")
        else:
            self.log(f"\nkt-sft: got {name}; saving a checkpoint after this step (Ctrl-C again to abort without "
                     "saving)")

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="training", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


def _plot_losses(losses: list[float], evals: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2, label="training")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", ms=3, lw=1.2, label="held-out")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("kt-sft training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
