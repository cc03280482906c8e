"""Memory preflight: the peak memory per GPU (or per CPU rank) of a training job, estimated from its shape.

A job that would not fit is refused before it waits in a queue. The estimate adds, per rank:
- parameters, gradients and the optimizer's fp32 master copy and AdamW moments, each divided by the ranks
  that ZeRO partitions it over (stage 1: optimizer; 2: + gradients; 3: + parameters, plus the largest
  parameters gathered whole, with one whole gradient), and DeepSpeed's communication buckets;
- a sparse run's keep-masks (a bool per masked weight on every rank; ZeRO-3: partitioned, in the weights' dtype);
- activations saved for backward, per token and decoder layer (`activations_per_token`), in the
  activation dtype; with checkpointing a layer keeps only its input, plus one layer recomputed at a time;
- the logits of one loss chunk: 16-bit logits, their fp32 copy and its gradient.
The coefficients are checked against measured peaks by benchmarks/train_memory.py (within 25% of the growth).
"""

from __future__ import annotations

from .model import Shape

GIB = 1 << 30
USABLE = 0.9  # of a GPU's memory: the rest is the CUDA context, NCCL buffers and the allocator's fragmentation
DEFAULT_BUCKETS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000}


def activations_per_token(shape: Shape, layers: int, bf16: bool) -> float:
    """Elements saved for backward per token by `layers` decoder layers kept whole: each RMSNorm keeps its
    input, the product and output, plus fp32 copies of the first two when training in 16 bits; the attention
    block its input, q, k and v before and after RoPE, the attention output twice (o_proj's input is a
    contiguous copy); the MLP its input, gate, up, SiLU(gate) and their product."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * (3 + (3 if bf16 else 0)) * shape.hidden
    return layers * (norms + 2 * shape.hidden + 4 * q + 3 * kv + 4 * shape.ffn)


def estimate(shape: Shape, train, world: int, bf16: bool, masked: bool) -> dict[str, float]:
    """Bytes per rank of each part of a training job's peak (`train`: a TrainConfig)."""
    n, p = shape.parameters(), 2 if bf16 else 4
    stage = train.zero_stage
    zero = {**DEFAULT_BUCKETS, **train.deepspeed.get("zero_optimization", {})}
    optimizer = 8 * n + (4 * n if bf16 or stage else 0)  # AdamW's moments; the fp32 master copy ZeRO keeps
    layer = shape.linear_weights()
    largest = max(shape.vocab * shape.hidden, shape.hidden * shape.ffn)  # ZeRO-3 gathers whole parameters
    parts = {
        # ZeRO-3: a partition of everything, plus two whole parameters gathered at a time (one prefetched) and the
        # whole gradient of one before it is reduce-scattered
        "parameters": p * n / world + 2 * p * largest if stage == 3 else p * n,
        "gradients": p * n / world + (p * largest if stage == 3 else 0) if stage >= 2 else p * n,
        "optimizer": optimizer / world if stage >= 1 else optimizer,
        # a bucket never holds more than the whole model's gradients (or parameters, prefetched)
        "buffers": p * min(n, zero["reduce_bucket_size"] + (zero["stage3_prefetch_bucket_size"] if stage == 3 else 0))
                   if stage else 0,
        "masks": (p * shape.layers * layer / world if stage == 3 else shape.layers * layer) if masked else 0,
    }
    tokens = train.micro_batch * train.seq_len
    whole = {"none": shape.layers, "selective": shape.layers // 2, "full": 0}[train.activation_checkpointing]
    recomputed = 0 if whole == shape.layers else 1  # the one layer being recomputed in backward
    inputs_only = shape.layers - whole
    parts["activations"] = p * tokens * (activations_per_token(shape, whole + recomputed, bf16)
                                         + inputs_only * shape.hidden + 4 * shape.hidden)
    chunk = min(train.loss_chunk_tokens or tokens, tokens)
    parts["logits"] = chunk * shape.vocab * (p + 8)
    return parts


def total(parts: dict[str, float]) -> float:
    return sum(parts.values())


def describe(parts: dict[str, float]) -> str:
    return f"{total(parts) / GIB:.1f} GiB (" + ", ".join(
        f"{k} {v / GIB:.1f}" for k, v in parts.items() if v >= GIB / 20) + ")"


def fit_problem(run: str, shape: Shape, train, world: int, bf16: bool, masked: bool, gpu_gib: float) -> str | None:
    """One line when the estimate exceeds what the profile's GPUs hold, naming settings that would fit."""
    parts = estimate(shape, train, world, bf16, masked)
    limit = USABLE * gpu_gib * GIB
    if total(parts) <= limit:
        return None
    tries = [{"zero_stage": 3}, {"zero_stage": 3, "activation_checkpointing": "selective"},
             {"zero_stage": 3, "activation_checkpointing": "full"}]
    if train.micro_batch > 1:
        tries.append({"zero_stage": 3, "activation_checkpointing": "full", "micro_batch": 1})
    fix = next((t for t in tries if total(estimate(shape, train.model_copy(update=t), world, bf16, masked)) <= limit),
               None)
    hint = (" ".join(f"train.{k}={v}" for k, v in fix.items() if getattr(train, k) != v) if fix else
            "more ranks (launch.nodes) or a GPU with more memory")
    return (f"memory: {run} needs about {describe(parts)} per GPU, over the {USABLE:.0%} of {gpu_gib:g} GiB that "
            f"prunectl plans with; try {hint}")
