"""The one training loop (pretraining, Sheared-LLaMA mask learning, retraining): DeepSpeed ZeRO, exact token budget, resume, preemption.

A component: stages call `fit()` on every rank with the Objective they train. The data order is a
pure function of (seed, ranges, budget, step), and checkpoints carry the step, so a resumed run
continues on exactly the sequences the interrupted one would have seen next. Saving, verifying and
safely loading checkpoints is checkpoints.py's job.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .errors import PrunectlError
from .schema import Strict


# DeepSpeed keys prunectl derives from the recipe (-> where to set them), and those `train.deepspeed` may set.
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / (train.micro_batch x ranks)",
    "gradient_clipping": "optimizer.grad_clip", "optimizer": "optimizer", "scheduler": "optimizer (warmup, decay)",
    "bf16": "train.precision", "fp16": "train.precision",
}
DEEPSPEED_TUNABLE = ("zero_optimization", "communication_data_type", "aio")


class OptimizerConfig(Strict):
    """AdamW with linear warmup then cosine decay to min_lr_ratio x peak (the paper's Lingua recipe)."""

    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas={list(betas)}: each must be in [0, 1)")
        return betas


class TrainConfig(Strict):
    tokens: int = Field(gt=0, description="token budget; the run stops after floor(tokens / (global_batch x seq_len)) steps")
    prefix_tokens: int | None = Field(
        None, gt=0, description="stop after this many tokens on the full budget's LR schedule (LR-sweep prefix runs)")
    data_ranges: list[str] = Field(default_factory=lambda: ["pretrain"], min_length=1)
    range_tokens: dict[str, int] = Field(
        default_factory=dict, description="use only the first N tokens of a range (S_total: what the parent and retrain read)")
    seq_len: int = Field(256, ge=2)
    global_batch: int = Field(16, ge=1, description="sequences per optimizer step, over all ranks")
    micro_batch: int = Field(16, ge=1, description="sequences per forward pass on one rank")
    zero_stage: int = Field(2, ge=0, le=3)
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="recompute decoder layers in backward: every one (full) or every second (selective)")
    loss_chunk_tokens: int = Field(
        2048, ge=0, description="tokens per chunk of LM head + cross-entropy (no [tokens x vocab] logits); 0: all at once")
    compile: bool = Field(False, description="torch.compile each decoder layer (GPU)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    checkpoint_every: int = Field(100, ge=0, description="steps between checkpoints; 0: only on preemption")
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(100, ge=0, description="steps between held-out evaluations; 0: only at the end")
    eval_range: str = "validation"
    eval_tokens: int = Field(65_536, ge=2)
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    allow_epochs: bool = Field(False, description="let the budget exceed what the ranges hold (repeat the data); "
                                                  "otherwise such a run is refused at submission")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="merged over the generated DeepSpeed config: zero_optimization (offload, "
        "bucket sizes, hpZ, stage3_* thresholds), communication_data_type, aio")

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed(cls, extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            if key in DEEPSPEED_OWNED:
                raise ValueError(f"{key} is set by prunectl from {DEEPSPEED_OWNED[key]}; set that instead")
            if key not in DEEPSPEED_TUNABLE:
                raise ValueError(f"{key} is not a key prunectl passes to DeepSpeed; it passes {', '.join(DEEPSPEED_TUNABLE)}")
        zero = extra.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError(f"zero_optimization must be a mapping (got {zero!r})")
        if "stage" in zero:
            raise ValueError("zero_optimization.stage is set by prunectl from train.zero_stage; set that instead")
        if zero:  # DeepSpeed's own model of the section: unknown or removed keys, wrong types
            from pydantic import ValidationError
            from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

            try:
                DeepSpeedZeroConfig(**zero)
            except ValidationError as err:
                import deepspeed

                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                message = (f"not a key of DeepSpeed {deepspeed.__version__}'s zero_optimization"
                           if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, "))
                raise ValueError(f"zero_optimization.{where}: {message}") from None
        return extra

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch={self.global_batch} must be a multiple of micro_batch={self.micro_batch}")
        step = self.global_batch * self.seq_len
        for key in ("tokens", "prefix_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < step:
                raise ValueError(f"{key}={getattr(self, key)} is less than one optimizer step "
                                 f"(global_batch x seq_len = {step}); raise it")
        unknown = [name for name in self.range_tokens if name not in self.data_ranges]
        if unknown:
            raise ValueError(f"range_tokens names {', '.join(unknown)}, not in data_ranges {self.data_ranges}")
        if self.prefix_tokens is not None and self.prefix_tokens > self.tokens:
            raise ValueError(f"prefix_tokens={self.prefix_tokens} exceeds the budget tokens={self.tokens}")
        return self

    def reads(self, holds: dict[str, int]) -> tuple[dict[str, int], float]:
        """The tokens the full budget reads from each range, given the tokens each range holds, and the
        epochs over them (> 1: the data repeats). Sequences are whole seq_len chunks, filled in range order."""
        chunks = {name: min(holds[name], self.range_tokens.get(name, holds[name])) // self.seq_len
                  for name in self.data_ranges}
        need, total = self.steps * self.global_batch, sum(chunks.values())
        read, left = {}, min(need, total)  # past one epoch every chunk is read (again)
        for name, n in chunks.items():
            read[name] = min(n, left) * self.seq_len
            left -= min(n, left)
        return read, (need / total if total else math.inf)

    def budget_problem(self, run: str, data: str, holds: dict[str, int], estimated: bool = False) -> str | None:
        """One line when the full budget needs more tokens than the ranges hold (and repeating is not allowed)."""
        read, epochs = self.reads(holds)
        if epochs <= 1 or self.allow_epochs:
            return None
        have = sum(min(holds[n], self.range_tokens.get(n, holds[n])) for n in self.data_ranges)
        return (f"train.tokens: {run} trains on {self.tokens:,} tokens but range {'+'.join(self.data_ranges)} of {data} "
                f"holds {'about ' if estimated else ''}{have:,} ({epochs:.2f} epochs); prepare more data, lower "
                "train.tokens, or set train.allow_epochs=true to repeat it")

    def bf16(self, on_gpu: bool) -> bool:
        """Whether the run trains in bf16: `precision`, with auto meaning bf16 on a GPU and fp32 on a CPU."""
        return self.precision == "bf16" or (self.precision == "auto" and on_gpu)

    @property
    def steps(self) -> int:
        """Optimizer steps of the full budget (the LR schedule's length)."""
        return self.tokens // (self.global_batch * self.seq_len)

    @property
    def run_steps(self) -> int:
        """Steps this run trains: the full budget, or its prefix."""
        return (self.prefix_tokens or self.tokens) // (self.global_batch * self.seq_len)


def lr_factor(step: int, total: int, opt: OptimizerConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based) of `total`."""
    warmup = int(round(opt.warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(train: TrainConfig, opt: OptimizerConfig, world: int, bf16: bool, fused: bool = False) -> dict[str, Any]:
    per_step = train.micro_batch * world
    if train.global_batch % per_step:
        raise PrunectlError(
            f"train.global_batch={train.global_batch} is not a multiple of micro_batch x ranks = {per_step}"
        )
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.global_batch // per_step,
        "gradient_clipping": opt.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                # DeepSpeed reads this flag from params only. torch's AdamW keeps its whole state in
                # the checkpoint (a resumed run ends bit-identical), needs no op build, same maths on CPU and GPU.
                "torch_adam": True,
                **({"fused": True} if fused else {}),  # one kernel for every parameter on a GPU
            },
        },
        "zero_optimization": {"stage": train.zero_stage, **train.deepspeed.get("zero_optimization", {})},
        **{k: v for k, v in train.deepspeed.items() if k != "zero_optimization"},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Reporter:
    """Rank 0's metrics.jsonl plus a live view: a rich bar on a terminal, plain lines in a log."""

    def __init__(self, path: Path, resume_step: int, total_steps: int, tokens_per_step: int) -> None:
        from .metrics import MetricsLog

        self.metrics = MetricsLog(path, keep_through=resume_step)
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.progress = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=resume_step, info="")
            self.progress.start()

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], info=text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.metrics.close()


class Diverged(PrunectlError):
    """The loss left the finite numbers: the run fails instead of publishing (an LR sweep's prefix run
    records the LR as diverged instead)."""

    def __init__(self, name: str, value: float, step: int) -> None:
        super().__init__(f"train: the {name} is {value} at step {step}; lower optimizer.lr (or raise warmup) "
                         "and run again")
        self.step = step


def _finite(name: str, value: float, step: int) -> float:
    """The value is all-reduced, so every rank raises together."""
    if not math.isfinite(value):
        raise Diverged(name, value, step)
    return value


class Objective:
    """What one training run optimises. Pretraining: next-token loss of a freshly initialised Llama.

    Other stages (Sheared-LLaMA mask learning, retraining, scratch twins) subclass it and reuse the
    loop unchanged.
    """

    def __init__(self, model_config=None) -> None:
        self.model_config = model_config

    def build(self, tokenizer, vocab_size: int, seed: int, zero3: dict[str, Any] | None = None):
        """The LlamaForCausalLM to train; with `zero3` (the run's DeepSpeed config) made in ZeRO-3 partitions."""
        from . import model as models

        hf_config = models.llama_config(
            self.model_config, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        return models.build(hf_config, seed, zero3)

    def root(self, built, cfg: TrainConfig):
        """The module DeepSpeed trains: the LlamaForCausalLM `build` made, behind the chunked next-token loss."""
        from .loss import CausalLM

        return CausalLM(built, cfg.loss_chunk_tokens)

    def parameters(self, module) -> Any:
        return [p for p in module.parameters() if p.requires_grad]  # not ZeRO-3's frozen mask parameters

    def loss(self, engine, x, step: int):
        """(loss to minimise, {name: term} logged as window means; `loss` is the next-token loss)."""
        loss = engine(x)
        return loss, {"loss": loss}

    def metrics(self, module) -> dict[str, Any]:
        return {}

    def language_model(self, module):
        """The LlamaForCausalLM inside the root module, for held-out loss and saving."""
        return module.lm

    def final_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The root's full state dict as `finish` and final/ read it (the LlamaForCausalLM's names)."""
        from .loss import language_model_state

        return language_model_state(state)

    def finish(self, state: dict[str, Any], final: Path) -> dict[str, Any]:
        """Rank 0, before the model is saved into `final` (staging): checks, extra files, summary entries."""
        return {}


@dataclass
class Fitted:
    """What fit() hands back to its stage: the trained module (rank 0 holds a full state dict)."""

    rank: int
    module: Any
    state: dict[str, Any] | None
    tokenizer: Any
    summary: dict[str, Any]
    barrier: Any


def fit(run, cfg: TrainConfig, opt: OptimizerConfig, objective: Objective, data_ref: str,
        workdir: Path | None = None) -> Fitted:
    """The loop every training stage shares: resume, exact token budget, checkpoints, preemption.

    Checkpoints and metrics.jsonl go to `workdir` (default: the run directory). The calling stage owns
    the run's lifecycle (running, failed, complete); fit records what it reads and where it resumed."""
    from . import checkpoints, distributed

    env = distributed.init()
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from . import model as models
    from . import store
    from .data import SequencePlan, TokenStream, batch, validation_starts
    from .loss import checkpoint_layers, next_token_loss

    run_dir = Path(workdir or run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = run.manifest()
    stop = distributed.StopRequest()
    data_run = store.resolve(run.root, data_ref)
    stream = TokenStream(data_run.dir)
    tokenizer = getattr(objective, "tokenizer", None) or AutoTokenizer.from_pretrained(data_run.dir / "tokenizer")

    device = env.device
    use_bf16 = cfg.bf16(device.type == "cuda")
    tokens_per_step = cfg.global_batch * cfg.seq_len
    schedule_steps, total_steps = cfg.steps, cfg.run_steps  # equal unless this is a sweep's prefix run
    ranges = [stream.range(r).first(cfg.range_tokens.get(r)) for r in cfg.data_ranges]
    plan = SequencePlan(ranges, cfg.seq_len, total_steps * cfg.global_batch, cfg.seed)
    val_starts = validation_starts(stream, cfg.eval_range, cfg.seq_len, cfg.eval_tokens)

    ds_config = deepspeed_config(cfg, opt, env.world, use_bf16, fused=device.type == "cuda")
    # ZeRO-3: the model is made (or loaded) straight into partitions; no rank ever holds all of it
    built = objective.build(tokenizer, stream.vocab_size, cfg.seed, ds_config if cfg.zero_stage == 3 else None)
    net = objective.root(built, cfg)
    lm = objective.language_model(net)
    counts = models.parameter_counts(lm)
    checkpoint_layers(lm, cfg.activation_checkpointing)
    if cfg.compile:
        for layer in lm.model.layers:
            layer.compile()
    distributed.allow_tf32(device)
    engine, _, _, scheduler = deepspeed.initialize(
        model=net,
        model_parameters=objective.parameters(net),
        config=ds_config,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, schedule_steps, opt)),
    )

    ckpt_dir = run_dir / "checkpoints"
    resumed = checkpoints.resume(engine, ckpt_dir, env)  # on any number of ranks: converted when it changed
    step, note = resumed.step, checkpoints.note(resumed, env.world)

    if env.writer:
        if note:
            print(note, flush=True)  # the log keeps it: completion replaces the manifest's note
        run.update(
            note=note,
            resumed_from=[*manifest.resumed_from, step] if step else manifest.resumed_from,
            resumed_world=[*manifest.resumed_world, (step, resumed.saved_world, env.world)] if step
            else manifest.resumed_world,
            data=store.DataUse(
                data=data_run.ref,
                ranges=cfg.data_ranges,
                seq_len=cfg.seq_len,
                sequences=plan.sequences,
                tokens=plan.sequences * cfg.seq_len,
                budget_tokens=cfg.prefix_tokens or cfg.tokens,
                epochs=plan.epochs,
                seed=cfg.seed,
                intervals=[store.TokenInterval(range=r.name, start=r.start, end=r.end) for r in plan.intervals()],
            ),
            summary={"parameters": counts, "steps": total_steps, "world_size": env.world},
        )
    reporter = Reporter(run_dir / "metrics.jsonl", step, total_steps, tokens_per_step) if env.rank == 0 else None

    per_rank = cfg.global_batch // env.world
    micro_steps = per_rank // cfg.micro_batch

    def held_out_loss() -> float:
        engine.eval()
        mine = val_starts[env.rank :: env.world]
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(0, len(mine), cfg.micro_batch):
                x = torch.from_numpy(batch(stream, mine[i : i + cfg.micro_batch], cfg.seq_len)).to(device)
                loss = next_token_loss(objective.language_model(engine.module), x, cfg.loss_chunk_tokens).double()
                n = x.shape[0] * (cfg.seq_len - 1)
                total += torch.stack([loss * n, torch.tensor(float(n), dtype=torch.float64, device=device)])
        if env.world > 1:
            dist.all_reduce(total)
        engine.train()
        return float(total[0] / total[1])

    saved = step  # the step of the newest checkpoint: a stop right after a save does not rewrite it in place

    def save_checkpoint() -> None:
        nonlocal saved
        checkpoints.save(engine, ckpt_dir, step, step * tokens_per_step, cfg.keep_checkpoints, env)
        saved = step

    engine.train()
    window: dict[str, float] = {}
    window_steps, window_start = 0, time.perf_counter()
    val_loss = train_loss = None
    while step < total_steps:
        first = step * cfg.global_batch + env.rank * per_rank
        starts = plan.starts(first, per_rank)
        # The step's micro-batches, copied to the device up front (from pinned memory on a GPU, without waiting).
        xs = [torch.from_numpy(batch(stream, starts[m * cfg.micro_batch : (m + 1) * cfg.micro_batch], cfg.seq_len))
              for m in range(micro_steps)]
        xs = [(x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True) for x in xs]
        for x in xs:
            loss, terms = objective.loss(engine, x, step)
            engine.backward(loss)
            engine.step()
            for key, value in terms.items():  # device tensors: no host sync until the log step
                window[key] = window.get(key, 0.0) + value.detach().float() / micro_steps
        step += 1
        window_steps += 1

        if step % cfg.log_every == 0 or step == total_steps:
            means = torch.stack([v / window_steps for v in window.values()]).to(device)
            if env.world > 1:
                dist.all_reduce(means)
                means /= env.world
            terms = dict(zip(window, means.tolist()))
            train_loss = _finite("loss", terms["loss"], step)
            elapsed = time.perf_counter() - window_start
            grad_norm = engine.get_global_grad_norm()
            if reporter:
                reporter.log({
                    "step": step,
                    "tokens": step * tokens_per_step,
                    **terms,
                    "lr": float(scheduler.get_last_lr()[0]),
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": window_steps * tokens_per_step / elapsed,
                    **objective.metrics(engine.module),
                })
            window, window_steps, window_start = {}, 0, time.perf_counter()
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            val_loss = _finite("held-out loss", held_out_loss(), step)
            if reporter:
                reporter.log({"step": step, "tokens": step * tokens_per_step, "val_loss": val_loss})
            window_start = time.perf_counter()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
            save_checkpoint()
            window_start = time.perf_counter()
        if distributed.agree(stop.signum is not None, env) and step < total_steps:
            if saved != step:
                save_checkpoint()
            distributed.leave_for_requeue(run, env, step, stop.signum)

    state = engine._zero3_consolidated_16bit_state_dict() if cfg.zero_stage == 3 else None
    if env.rank == 0:
        reporter.close()
        if state is None:
            state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
        state = objective.final_state(state)
    summary = {
        "tokens": step * tokens_per_step,
        "final_train_loss": train_loss,  # mean over the last log window: what an LR sweep compares
        "final_val_loss": val_loss,
        "unigram_entropy_nats": stream.meta.unigram_entropy_nats,
    }
    return Fitted(env.rank, engine.module, state if env.rank == 0 else None, tokenizer, summary, env.barrier)
