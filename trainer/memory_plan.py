"""How much memory one rank of a run needs, computed from the config alone: no model is built, no process group.

What ``tarflow train --dry-run`` prints, for the strategy the config names at any world size:

- **training state** per rank: parameters, gradients, fp32 master weights, AdamW moments, the weight average
  (train.ema), and the communication buffers a strategy keeps (DeepSpeed's gradient-reduction bucket). The parameter
  shapes come from ``models.TarFlowConfig`` by the model's own layout (``parameter_shapes``); how each strategy
  shards them is stated here per strategy, from what it actually holds (``tests/test_memory_plan_ranks.py``
  measures every strategy on 2 ranks and holds this module to within 5%);
- **activations** kept by one micro-batch's forward for its backward, with and without activation checkpointing
  (``activation_bytes``: per transformer layer and flow block, from the tensors autograd saves);
- **FLOPs** per optimizer step (``trainer.flops``) and the **checkpoint** payload.

The figures are per rank and for the fullest rank where shards differ (FSDP gives the first ranks the larger
shards). Bytes, not MiB: the formatting is the caller's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from models import TarFlowConfig

from .config import Config
from .flops import flops_per_image
from .optim import _NO_DECAY_NAMES

FP32, BF16 = 4, 2  # bytes per element

# DeepSpeed's defaults for what our DeepSpeed config does not set (deepspeed/runtime/zero/config.py); an expert
# JSON (deepspeed.config) may set them under zero_optimization.
DS_REDUCE_BUCKET_SIZE = 500_000_000         # elements of the gradient-reduction bucket (one buffer)
DS_PARAM_PERSISTENCE_THRESHOLD = 100_000    # ZeRO-3 keeps parameters with at most this many elements gathered
DS_MODEL_PERSISTENCE_THRESHOLD = 2**63 - 1  # ... until the persistent ones add up to this many
DS_ALIGNMENT = 2                            # ZeRO-1/2 pad each flat group to a multiple of this × ranks


@dataclass(frozen=True)
class ParameterShape:
    name: str  # as ``TarFlow.named_parameters()`` names it
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parameter_shapes(model: TarFlowConfig) -> list[ParameterShape]:
    """Every parameter of ``TarFlow(model)``, in ``named_parameters()`` order, from the architecture alone."""
    c = model
    C, D, T, E = c.channels, c.patch_dim, c.num_patches, c.expansion * c.channels
    out_dim = 2 * D if c.nvp else D
    shapes: list[ParameterShape] = []
    for b in range(c.num_blocks):
        p = f"blocks.{b}."
        shapes.append(ParameterShape(p + "pos_embed", (T, C)))  # a module's own parameters come before its children's
        if c.num_classes:
            shapes.append(ParameterShape(p + "class_embed", (c.num_classes, 1, C)))
        shapes += [ParameterShape(p + "proj_in.weight", (C, D)), ParameterShape(p + "proj_in.bias", (C,))]
        for k in range(c.layers_per_block):
            q = f"{p}attn_blocks.{k}."
            for name, shape in (("attention.norm.weight", (C,)), ("attention.norm.bias", (C,)),
                                ("attention.qkv.weight", (3 * C, C)), ("attention.qkv.bias", (3 * C,)),
                                ("attention.proj.weight", (C, C)), ("attention.proj.bias", (C,)),
                                ("mlp.norm.weight", (C,)), ("mlp.norm.bias", (C,)),
                                ("mlp.main.0.weight", (E, C)), ("mlp.main.0.bias", (E,)),
                                ("mlp.main.2.weight", (C, E)), ("mlp.main.2.bias", (C,))):
                shapes.append(ParameterShape(q + name, shape))
        shapes += [ParameterShape(p + "proj_out.weight", (out_dim, C)), ParameterShape(p + "proj_out.bias", (out_dim,))]
    return shapes


def buffer_elements(model: TarFlowConfig) -> int:
    """The prior's variance (T, D): the model's only buffer."""
    return model.num_patches * model.patch_dim


# ---------------------------------------------------------------- training state
@dataclass(frozen=True)
class TrainingState:
    """Bytes one rank holds for training, besides activations."""

    parameters: int
    gradients: int
    master_weights: int     # fp32 copies beside the parameters (DeepSpeed keeps them even for an fp32 model)
    optimizer_moments: int  # AdamW's exp_avg and exp_avg_sq (fp32) and its step counters
    ema: int = 0            # train.ema's fp32 average: of the replica, of the shard, or of the master partition
    buffers: int = 0        # communication buffers the strategy allocates (DeepSpeed's gradient-reduction bucket)
    buffers_freed_before_step: bool = False  # ZeRO-2 frees its bucket at the end of backward, ZeRO-1/3 keep theirs
    location: str = "device"  # "host": fsdp.cpu_offload keeps parameters, gradients and optimizer state there

    @property
    def optimizer_state(self) -> int:
        return self.master_weights + self.optimizer_moments

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.ema + self.buffers

    @property
    def held_at_step(self) -> int:
        """What is held between the last backward of a step and its update (gradients and optimizer state both)."""
        return self.total - (self.buffers if self.buffers_freed_before_step else 0)


def _moments(elements: int, tensors: int) -> int:
    return 2 * FP32 * elements + FP32 * tensors  # torch's AdamW: one fp32 step counter per parameter tensor


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _groups(shapes: list[ParameterShape], cfg: Config) -> list[list[ParameterShape]]:
    """The optimizer's parameter groups (``trainer.optim.parameter_groups``' rule), which DeepSpeed pads one by one."""
    if cfg.optim.decay_norms_biases_embeddings:
        return [shapes]
    exempt = [s for s in shapes if len(s.shape) < 2 or s.name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES]
    return [[s for s in shapes if s not in exempt], exempt]


def training_state(cfg: Config, world_size: int, nodes: int = 1, bf16: bool = False,
                   deepspeed_config: dict | None = None) -> TrainingState:
    """Per-rank training state of ``cfg.train.strategy`` on ``world_size`` ranks (``nodes`` for fsdp.hybrid);
    ``bf16``: bf16 compute (autocast; FSDP and DeepSpeed then hold bf16 copies for compute);
    ``deepspeed_config``: the merged DeepSpeed dict (bucket sizes and thresholds an expert JSON may set)."""
    shapes = parameter_shapes(cfg.model)
    n, tensors = sum(s.numel for s in shapes), len(shapes)
    strategy = cfg.train.strategy
    if strategy in ("single", "ddp"):  # a full replica per rank; DDP's gradient buckets are the gradients
        state = TrainingState(FP32 * n, FP32 * n, 0, _moments(n, tensors))
    elif strategy == "fsdp":
        state = _fsdp_state(cfg, shapes, world_size, nodes)
    elif strategy == "deepspeed":
        state = _deepspeed_state(cfg, shapes, world_size, bf16, deepspeed_config or {})
    else:
        raise ValueError(f"train.strategy={strategy!r} has no memory plan")
    if cfg.train.ema.decay == 0:
        return state
    # The average is an fp32 copy of what the rank holds of the weights: the replica (single, ddp), the shard
    # (fsdp, whose parameters are fp32), the fp32 master partition (deepspeed, every stage).
    held = state.master_weights if strategy == "deepspeed" else state.parameters
    return dataclasses.replace(state, ema=held)


def _fsdp_state(cfg: Config, shapes: list[ParameterShape], world_size: int, nodes: int) -> TrainingState:
    """FSDP2 shards every parameter along dim 0 over the shard group (the node with fsdp.hybrid): rank 0 holds
    ceil(rows / ranks) rows of each, in fp32 (mixed precision gathers bf16 copies only for compute), and so do its
    sharded gradients and AdamW moments."""
    ranks = world_size // nodes if cfg.fsdp.hybrid else world_size
    local = sum(-(-s.shape[0] // ranks) * (s.numel // s.shape[0]) for s in shapes)
    return TrainingState(FP32 * local, FP32 * local, 0, _moments(local, len(shapes)),
                         location="host" if cfg.fsdp.cpu_offload else "device")


def _deepspeed_state(cfg: Config, shapes: list[ParameterShape], world_size: int, bf16: bool,
                     ds: dict) -> TrainingState:
    """ZeRO-1/2: the module's parameters whole (flattened per group, padded to 2 × ranks), fp32 master partitions,
    AdamW moments of the partition; gradients whole (stage 1) or partitioned (stage 2). ZeRO-3: each parameter
    partitioned (padded to a multiple of the ranks), plus a gathered copy of every parameter below the persistence
    threshold (kept after the first forward), fp32 gradient partitions. Every stage allocates a gradient-reduction
    bucket of ``reduce_bucket_size`` elements (unless contiguous_gradients is off): ZeRO-1 keeps it until the step,
    ZeRO-2 frees it at the end of each backward, ZeRO-3 keeps it for the whole run."""
    zero = ds.get("zero_optimization", {})
    stage, W = cfg.deepspeed.stage, world_size
    param_bytes = BF16 if bf16 else FP32
    bucket_elements = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET_SIZE)) \
        if zero.get("contiguous_gradients", True) else 0
    groups = _groups(shapes, cfg)
    if stage in (1, 2):
        flat = sum(_round_up(sum(s.numel for s in g), DS_ALIGNMENT * W) for g in groups if g)
        partition = flat // W
        grads = FP32 * (flat if stage == 1 else partition)
        if stage == 1 and bf16:
            # bf16 parameters with fp32 gradient accumulation: DeepSpeed runs ZeRO-1 through its BF16_Optimizer,
            # which accumulates into one fp32 gradient buffer of the whole model and needs no reduction bucket
            bucket_elements = 0
        # ZeRO-1 stages gradients in the fp32 accumulation dtype; ZeRO-2 in the parameters' dtype
        bucket_bytes = FP32 if stage == 1 else param_bytes
        return TrainingState(param_bytes * flat, grads, FP32 * partition, _moments(partition, len(groups)),
                             buffers=bucket_bytes * bucket_elements, buffers_freed_before_step=stage == 2)
    partition = sum(-(-s.numel // W) for s in shapes)
    persistent, kept = 0, 0
    threshold = int(zero.get("stage3_param_persistence_threshold", DS_PARAM_PERSISTENCE_THRESHOLD))
    model_threshold = int(zero.get("stage3_model_persistence_threshold", DS_MODEL_PERSISTENCE_THRESHOLD))
    for s in shapes:  # deepspeed's mark_persistent_parameters, in registration order
        if kept + s.numel <= model_threshold and s.numel <= threshold:
            persistent += s.numel
            kept += s.numel
    return TrainingState(param_bytes * (partition + persistent), FP32 * partition, FP32 * partition,
                         _moments(partition, len(groups)), buffers=param_bytes * bucket_elements)


# ---------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activations:
    """Bytes one micro-batch's forward keeps for its backward, on one rank."""

    micro_batch: int
    without_checkpointing: int
    with_checkpointing: int  # every ``checkpoint_every``-th layer keeps only its input
    checkpoint_every: int    # train.activation_checkpointing, or 1 when the config has it off
    checkpointed_layers: int
    recompute: int           # one layer's activations, rebuilt during backward when checkpointing
    checkpointing_on: bool   # the config checkpoints (train.activation_checkpointing > 0)

    @property
    def configured(self) -> int:
        """What the configured run keeps (train.activation_checkpointing as set)."""
        return self.with_checkpointing if self.checkpointing_on else self.without_checkpointing


def activation_bytes(model: TarFlowConfig, micro_batch: int, checkpoint_every: int = 0, bf16: bool = False,
                     weight_copies: bool = True) -> Activations:
    """Saved tensors of one forward and the loss, per token of each transformer layer (L = T − 1 tokens):

    - the layer's input (residual stream, fp32 also under autocast), LayerNorm means and reciprocal std (fp32) and
      output (the matmul's input, in the compute dtype), twice; the q|k|v projection (3C), the attention output (C)
      and its log-sum-exp (one fp32 per head), the residual after attention (fp32), the MLP's up projection and its
      GELU (2 × expansion × C, compute dtype);
    - under bf16 autocast also each matmul weight's bf16 copy (kept for backward, per layer and per block), unless
      the strategy computes with bf16 parameters already (``weight_copies=False``: FSDP's mixed precision gathers
      bf16 units and frees them after each forward, DeepSpeed's bf16 module);
    - per flow block: proj_out's and proj_in's inputs (compute dtype), and the affine step's x − b and exp(−a)
      (fp32, and exp(−a)'s bf16 cast under autocast); once: the latents the loss squares.

    A checkpointed layer keeps only its input; its activations are rebuilt in backward, one layer at a time."""
    c = model
    B, L, T, D, C, H = micro_batch, c.num_patches - 1, c.num_patches, c.patch_dim, c.channels, c.num_heads
    E = c.expansion * C
    compute = BF16 if bf16 else FP32
    residual = FP32  # the residual stream stays fp32: proj_in's bf16 output plus the fp32 positional embedding
    per_token = (2 * residual * C + 2 * 2 * FP32           # layer input, residual after attention; LN statistics
                 + compute * (C + 3 * C + C + C + 2 * E)  # LN outputs (2 C), qkv (3 C), attention output, up, GELU
                 + FP32 * H)                              # attention log-sum-exp
    layer = B * L * per_token
    copies = bf16 and weight_copies
    layer_weights = compute * (4 * C * C + 2 * E * C) if copies else 0  # autocast's copies: qkv, proj, up, down
    # proj_out's weight copy (proj_in's is not kept: the images need no gradient)
    block_weights = compute * (2 * D if c.nvp else D) * C if copies else 0
    # the affine step x − b and exp(−a) (fp32), and exp(−a)'s bf16 cast; a volume-preserving block keeps nothing
    affine = B * T * D * (FP32 + FP32 + (compute if bf16 else 0)) if c.nvp else 0
    block = B * L * compute * (C + D) + affine + block_weights  # proj_out's and proj_in's inputs
    layers = c.num_blocks * c.layers_per_block
    loss = B * T * D * FP32
    without = layers * (layer + layer_weights) + c.num_blocks * block + loss
    every = checkpoint_every or 1
    checkpointed = len(range(0, layers, every))
    # a checkpointed layer keeps its input (already in ``layer``) and, under autocast, no weight copies
    kept_by_checkpointed = B * L * residual * C
    with_ckpt = without - checkpointed * (layer + layer_weights - kept_by_checkpointed)
    return Activations(micro_batch=B, without_checkpointing=without, with_checkpointing=with_ckpt,
                       checkpoint_every=every, checkpointed_layers=checkpointed,
                       recompute=layer + layer_weights - kept_by_checkpointed,
                       checkpointing_on=checkpoint_every > 0)


# ---------------------------------------------------------------- FLOPs and checkpoint size
@dataclass(frozen=True)
class StepFlops:
    model: int        # 3 × forward per image × global batch: the MFU convention (trainer.flops)
    recompute: int    # the forward of checkpointed layers, run again in backward (not in MFU)
    per_rank: int     # (model + recompute) / data-parallel ranks


def step_flops(cfg: Config, world_size: int) -> StepFlops:
    m, t = cfg.model, cfg.train
    per_image = flops_per_image(m)
    # one layer's forward, by linearity of the count in layers_per_block
    one = flops_per_image(dataclasses.replace(m, layers_per_block=1)).forward
    two = flops_per_image(dataclasses.replace(m, layers_per_block=2)).forward
    per_layer = (two - one) // m.num_blocks
    layers = m.num_blocks * m.layers_per_block
    every = t.activation_checkpointing
    recomputed = len(range(0, layers, every)) if every else 0
    model = per_image.train * t.global_batch
    recompute = per_layer * recomputed * t.global_batch
    return StepFlops(model=model, recompute=recompute, per_rank=(model + recompute) // world_size)


def checkpoint_bytes(cfg: Config, world_size: int, bf16: bool = False) -> int:
    """Tensor payload of one checkpoint, all ranks' files together (file-format overhead comes on top: ~3% for a
    small model, less for a large one). torch (single, ddp) and DCP (fsdp): the fp32 model, its buffer and AdamW's
    moments. DeepSpeed: its fp32 master partitions and moments on every rank, and the module's weights from rank 0
    (stages 1 and 2: in the compute dtype; stage 3 keeps them only in the masters). With train.ema, the fp32
    average as well."""
    shapes = parameter_shapes(cfg.model)
    n, tensors = sum(s.numel for s in shapes), len(shapes)
    buffer = FP32 * buffer_elements(cfg.model)
    ema = FP32 * n if cfg.train.ema.decay > 0 else 0  # the average, whole over all ranks' files
    if cfg.train.strategy != "deepspeed":
        return FP32 * n + buffer + _moments(n, tensors) + ema
    state = training_state(cfg, world_size, bf16=bf16)
    module = 0 if cfg.deepspeed.stage == 3 else (BF16 if bf16 else FP32) * n
    return module + buffer + world_size * state.optimizer_state + ema


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryPlan:
    strategy: str  # e.g. "deepspeed ZeRO-3"
    world_size: int
    precision: str  # fp32 | bf16 (compute)
    parameters: int  # elements
    state: TrainingState
    activations: Activations
    flops: StepFlops
    checkpoint_bytes: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def peak(self) -> int:
        """Device bytes at the peak of a step, roughly: the state on the device, the configured activations, and
        the layer being recomputed. Allocator slack, gathered FSDP units and optimizer temporaries come on top."""
        state = self.state.total if self.state.location == "device" else 0
        recompute = self.activations.recompute if self.activations.checkpointing_on else 0
        return state + self.activations.configured + recompute


def strategy_label(cfg: Config) -> str:
    if cfg.train.strategy == "deepspeed":
        return f"deepspeed ZeRO-{cfg.deepspeed.stage}"
    if cfg.train.strategy == "fsdp":
        return f"fsdp ({cfg.fsdp.unit} units{', hybrid' if cfg.fsdp.hybrid else ''}" \
               f"{', cpu offload' if cfg.fsdp.cpu_offload else ''})"
    return cfg.train.strategy


def plan_memory(cfg: Config, world_size: int, nodes: int = 1, bf16: bool = False,
                deepspeed_config: dict | None = None) -> MemoryPlan:
    """The whole plan of ``cfg`` on ``world_size`` data-parallel ranks."""
    state = training_state(cfg, world_size, nodes, bf16, deepspeed_config)
    acts = activation_bytes(cfg.model, cfg.train.micro_batch, cfg.train.activation_checkpointing, bf16,
                            weight_copies=cfg.train.strategy in ("single", "ddp"))
    notes = []
    if cfg.train.strategy == "deepspeed" and state.buffers:
        notes.append(f"DeepSpeed's gradient-reduction bucket is {state.buffers / 2**20:,.0f} MiB "
                     f"(zero_optimization.reduce_bucket_size elements; a smaller one in deepspeed.config shrinks it)")
    if cfg.train.strategy == "fsdp":
        notes.append("FSDP also gathers each unit's full parameters for its forward and backward (transient, not "
                     "counted: the largest unit, in the compute dtype, about twice with prefetching)")
    return MemoryPlan(strategy=strategy_label(cfg), world_size=world_size, precision="bf16" if bf16 else "fp32",
                      parameters=sum(s.numel for s in parameter_shapes(cfg.model)), state=state, activations=acts,
                      flops=step_flops(cfg, world_size), checkpoint_bytes=checkpoint_bytes(cfg, world_size, bf16),
                      notes=tuple(notes))


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def format_plan(plan: MemoryPlan, cfg: Config) -> str:
    s, a, f = plan.state, plan.activations, plan.flops
    where = "" if s.location == "device" else f" (in {s.location} memory)"
    rows = [("parameters", s.parameters), ("gradients", s.gradients), ("fp32 master weights", s.master_weights),
            ("AdamW moments", s.optimizer_moments), ("EMA", s.ema), ("communication buffers", s.buffers)]
    lines = [f"memory plan: {plan.strategy} on {plan.world_size} rank(s), {plan.precision} compute, "
             f"{plan.parameters:,} parameters",
             f"  per rank{where}" + (" (the fullest: shards differ by a row)" if plan.strategy.startswith("fsdp")
                                      else "") + ":"]
    lines += [f"    {name:<24}{_size(v) if v else ('off' if name == 'EMA' else '-'):>14}" for name, v in rows]
    lines.append(f"    {'training state':<24}{_size(s.total):>14}")
    ckpt = f"every {a.checkpoint_every} layer(s)" if a.checkpoint_every > 1 else "every layer"
    set_as = "" if a.checkpointing_on else f" (train.activation_checkpointing={a.checkpoint_every})"
    lines += [f"  activations, micro-batch {a.micro_batch}:",
              f"    {'without checkpointing':<24}{_size(a.without_checkpointing):>14}",
              f"    {'checkpointing ' + ckpt:<24}{_size(a.with_checkpointing):>14}"
              f"  + {_size(a.recompute)} while a layer is recomputed{set_as}",
              f"  peak per rank, roughly:   {_size(plan.peak):>14}",
              f"  FLOPs per step: {f.model:.3e} (global batch {cfg.train.global_batch}, 3 × forward)"
              + (f" + {f.recompute:.3e} recomputed" if f.recompute else "")
              + f"; {f.per_rank:.3e} per rank",
              f"  checkpoint: {_size(plan.checkpoint_bytes)} (all ranks' files)"]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)

