"""The one sampler: noise and labels in, images out. Every caller (training-time grids, ``tarflow sample``, FID
evaluation and sweeps, trajectories) draws through ``draw``, which owns eval mode, autograd, autocast and the
optional denoising step; ``sample_on_ranks`` shards fixed noise over the ranks and gathers it, ``draw_samples``
follows the FID sampling plan below and redraws NaN/Inf samples.

How to invert the flow is one ``SamplingSettings``: guidance weight, attention temperature of the guidance branch,
annealed guidance, the σ of the denoising step, and how each block is inverted (``models.InversionSettings``:
the exact sequential sampler by default, or Jacobi / GS-Jacobi / auto with a tolerance). A new sampling option is
one more field (and its keyword in ``reverse_kwargs``), not a new argument threaded through every caller. Every
draw reports the parallel passes each block took (``Drawn.passes``, inversion order: last block first).

Two noise schemes, each fixed (changing either changes every saved sample):
    *Fixed grids* (training-time grids, ``tarflow sample``): ``fixed_noise_and_labels`` draws all ``num`` noise
    tensors from one CPU generator seeded by ``seed``; labels cycle ``0, 1, ..., num_classes - 1``.
    *FID sampling plan*: sample ``i`` of ``N`` (its *global index*) has the label ``i mod num_classes`` (none for
    unconditional models) and noise drawn on the CPU from a generator seeded by
    ``derive_seed("fid-noise", seed, i, attempt)``; ``attempt`` is 0 for the first draw. Rank ``r`` of ``W`` takes
    the contiguous indices ``[r·N/W, (r+1)·N/W)``; ``N`` must be a multiple of ``W`` (an error says so before any
    work). So every index is sampled exactly once, no two draws anywhere share a seed, and each sample's noise and
    label are the same whatever the number of ranks or the batch size.

NaN/Inf samples
    Exp-affine sampling can overflow. The denoising step is applied to the finite samples only, so that one
    non-finite sample does not poison the others'. In the FID plan a sample that is not finite (after the optional
    denoising step) is redrawn with fresh noise (the next ``attempt``) and the same label, up to ``max_redraws``
    times, and every redraw is counted. The reference's evaluate_fid.py redraws the whole batch when one sample is
    NaN; redrawing only that sample keeps the other samples' noise fixed and the result rank-independent.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import Iterator

import torch

from data_pipeline.seeding import derive_seed
from models import InversionSettings, TarFlow, TarFlowConfig

from ..distributed import gather_objects
from ..runtime import Precision
from .fid import FIDError

NOISE_STREAM = "fid-noise"


@dataclass(frozen=True)
class SamplingSettings:
    guidance: float = 0.0
    attn_temp: float = 1.0
    annealed: bool = False
    denoise_std: float | None = None  # σ of the Tweedie step; None: no denoising
    inversion: InversionSettings = field(default_factory=InversionSettings)

    @property
    def name(self) -> str:
        return f"g{self.guidance:g}_t{self.attn_temp:g}" + self.inversion_tag + (
            "_denoised" if self.denoise_std is not None else "")

    @property
    def inversion_tag(self) -> str:
        """"" for the exact sequential sampler; else e.g. "_jacobi0.001" (method and tolerance)."""
        method = self.inversion.method
        if method == "sequential":
            return ""
        method = method if isinstance(method, str) else "+".join(method)
        return f"_{method}{self.inversion.tol:g}"

    def reverse_kwargs(self) -> dict:
        """The keywords of ``TarFlow.reverse`` these settings set."""
        inversion = {f.name: getattr(self.inversion, f.name) for f in fields(self.inversion)}
        return {"guidance": self.guidance, "attn_temp": self.attn_temp, "annealed_guidance": self.annealed,
                **inversion}

    def record(self) -> dict:
        """Plain values for metadata and results: the settings, with the inversion as method and tolerance."""
        method = self.inversion.method
        return {"guidance": self.guidance, "attn_temp": self.attn_temp, "annealed": self.annealed,
                "denoise_std": self.denoise_std, "method": method if isinstance(method, str) else list(method),
                "tol": self.inversion.tol if method != "sequential" else None}


def inversion_settings(method: str = "sequential", tol: float | None = None, max_iters: int = 0,
                       window: int = 0, module_size: int = 0) -> InversionSettings:
    """``InversionSettings`` from config / command-line values, where 0 means "the default" (T-1 passes, no window,
    one module) and ``tol=None`` the models' default tolerance."""
    kwargs = {} if tol is None else {"tol": tol}
    return InversionSettings(method=method, max_iters=max_iters or None, window=window or None,
                             module_size=module_size or None, **kwargs)


@contextlib.contextmanager
def evaluating(model: TarFlow) -> Iterator[TarFlow]:
    """Eval mode without autograd for the duration; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the samples whose every value is finite."""
    return torch.isfinite(x).flatten(1).all(1)


@dataclass
class Drawn:
    states: list[torch.Tensor]       # float32: the sample alone, or the trajectory (the sample last)
    denoised: torch.Tensor | None    # the sample after the denoising step (finite samples only), or None
    passes: list[int] = field(default_factory=list)  # per block, inversion order (sequential: T-1 each)

    @property
    def sample(self) -> torch.Tensor:
        return self.states[-1]

    @property
    def final(self) -> torch.Tensor:
        """What the settings produce: the denoised sample when they denoise, else the sample."""
        return self.sample if self.denoised is None else self.denoised

    def cpu(self) -> Drawn:
        return Drawn([s.cpu() for s in self.states], None if self.denoised is None else self.denoised.cpu(),
                     self.passes)


def draw(model: TarFlow, noise: torch.Tensor, labels: torch.Tensor | None, settings: SamplingSettings, *,
         device: torch.device, precision: Precision, sequence: bool = False) -> Drawn:
    """Invert ``noise`` (B, T, D) with ``labels`` under ``settings`` on ``device``; results stay on ``device``.
    ``sequence``: every state of ``model.reverse(..., return_sequence=True)`` (the starting noise first)."""
    noise = noise.to(device)
    y = labels.to(device) if labels is not None else None
    stats = []
    with evaluating(model):
        with precision.autocast(device):
            out = model.reverse(noise, y, return_sequence=sequence, stats=stats, **settings.reverse_kwargs())
        states = [s.float() for s in out] if sequence else [out.float()]
        denoised = None
        if settings.denoise_std is not None:
            x = states[-1]
            finite = finite_rows(x)
            denoised = x.clone()
            if finite.any():  # one non-finite sample must not poison the others' denoising
                denoised[finite] = model.denoise(x[finite], y[finite] if y is not None else None,
                                                 noise_std=settings.denoise_std).float()
    return Drawn(states, denoised, [s.passes for s in stats])


# ---------------------------------------------------------------- fixed noise, sharded over ranks
def fixed_noise_and_labels(model: TarFlow, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drawn on the CPU from ``seed``, so the same seed gives the same samples on any device."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, c.num_patches, c.patch_dim, generator=generator)
    labels = torch.arange(num) % c.num_classes if c.num_classes else None
    return noise, labels


def sample_on_ranks(model: TarFlow, noise: torch.Tensor, labels: torch.Tensor | None,
                    settings: list[SamplingSettings], *, device: torch.device, precision: Precision, rank: int = 0,
                    world_size: int = 1) -> list[Drawn] | None:
    """Collective: each rank draws an equal slice of the fixed noise under every setting (the last slice padded by
    wrapping around, so that sharded models see the same collectives everywhere); rank 0 gets the gathered samples
    (on the CPU, one ``Drawn`` per setting, in order), the other ranks None."""
    n = len(noise)
    per_rank = -(-n // world_size)
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank) % n
    part = [draw(model, noise[mine], labels[mine] if labels is not None else None, s, device=device,
                 precision=precision).cpu() for s in settings]
    parts = gather_objects(part)
    if rank != 0:
        return None

    def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors)[:n]

    # passes: the slowest rank's, per block (it sets the wall time)
    return [Drawn([joined([p[k].states[j] for p in parts]) for j in range(len(d.states))],
                  None if d.denoised is None else joined([p[k].denoised for p in parts]),
                  [max(block) for block in zip(*(p[k].passes for p in parts))])
            for k, d in enumerate(parts[0])]


# ---------------------------------------------------------------- the FID sampling plan
def check_num_samples(num_samples: int, world_size: int) -> int:
    """Samples per rank; a clear error unless ``num_samples`` is a positive multiple of ``world_size``."""
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if num_samples % world_size:
        lower = num_samples // world_size * world_size
        raise ValueError(f"--num-samples {num_samples} is not divisible by the {world_size} ranks: every rank "
                         f"samples the same number; use a multiple of {world_size}, e.g. {lower or world_size} "
                         f"or {lower + world_size}")
    return num_samples // world_size


def rank_indices(num_samples: int, rank: int, world_size: int) -> range:
    """The global sample indices of ``rank``: a contiguous slice, the same length on every rank."""
    per_rank = check_num_samples(num_samples, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    return range(rank * per_rank, (rank + 1) * per_rank)


def noise_seed(base_seed: int, index: int, attempt: int = 0) -> int:
    """The seed of sample ``index``'s ``attempt``-th draw: a 64-bit hash, distinct for distinct (index, attempt)."""
    return derive_seed(NOISE_STREAM, base_seed, index, attempt)


def draw_noise(config: TarFlowConfig, seeds: list[int]) -> torch.Tensor:
    """(len(seeds), T, D) float32 on the CPU, one generator per sample: the same on every device and rank count."""
    rows = [torch.randn(config.num_patches, config.patch_dim, generator=torch.Generator().manual_seed(s))
            for s in seeds]
    return torch.stack(rows) if rows else torch.empty(0, config.num_patches, config.patch_dim)


def sample_labels(indices, num_classes: int) -> torch.Tensor | None:
    """``i mod num_classes`` (balanced classes), or None for an unconditional model."""
    if not num_classes:
        return None
    return torch.as_tensor(list(indices), dtype=torch.int64) % num_classes


@dataclass
class DrawnBatch:
    indices: list[int]
    images: torch.Tensor              # (B, C, H, W) float32 in model space, all finite, on the sampling device
    labels: torch.Tensor | None       # (B,) int64 on the CPU
    draws: list[tuple[int, int, int]]  # (index, attempt, seed) of every draw made for this batch, redraws included
    redraws: int
    passes: list[int] = field(default_factory=list)  # per block (inversion order) of the batch's first draw


def draw_samples(model: TarFlow, indices, settings: SamplingSettings, *, base_seed: int, batch_size: int,
                 device: torch.device, precision: Precision, max_redraws: int = 10) -> Iterator[DrawnBatch]:
    """The samples of ``indices`` in batches, each finite: non-finite ones are redrawn with fresh noise."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    indices = list(indices)
    c = model.config
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        labels = sample_labels(batch, c.num_classes)
        attempts = [0] * len(batch)
        out = torch.empty(len(batch), c.in_channels, c.img_size, c.img_size, device=device)
        pending = list(range(len(batch)))
        draws: list[tuple[int, int, int]] = []
        passes: list[int] = []
        while pending:
            seeds = [noise_seed(base_seed, batch[p], attempts[p]) for p in pending]
            draws += [(batch[p], attempts[p], s) for p, s in zip(pending, seeds)]
            rows = torch.tensor(pending)
            drawn = draw(model, draw_noise(c, seeds), labels[rows] if labels is not None else None, settings,
                         device=device, precision=precision)
            x = drawn.final
            passes = passes or drawn.passes
            finite = finite_rows(x).cpu()
            out[rows[finite].to(device)] = x[finite.to(device)]
            pending = [p for p, ok in zip(pending, finite.tolist()) if not ok]
            for p in pending:
                attempts[p] += 1
                if attempts[p] > max_redraws:
                    raise FIDError(f"sample {batch[p]} ({settings.name}) was still NaN/Inf after "
                                   f"{max_redraws} redraws with fresh noise; the model diverges at these "
                                   f"settings (raise --max-redraws, or lower the guidance)")
        yield DrawnBatch(batch, out, labels, draws, sum(attempts), passes)
