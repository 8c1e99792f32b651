"""FID of a checkpoint, sampled across all ranks; sweeps over guidance weights and attention temperatures; the
reference statistics of a data set. ``tarflow eval CKPT --metric fid`` and ``tarflow eval stats`` run these.

Sampling plan (independent of the number of ranks)
    Sample ``i`` of ``N`` (its *global index*) has the label ``i mod num_classes`` (balanced classes; none for
    unconditional models) and noise drawn on the CPU from a generator seeded by
    ``derive_seed("fid-noise", seed, i, attempt)``; ``attempt`` is 0 for the first draw. Rank ``r`` of ``W`` takes
    the contiguous indices ``[r·N/W, (r+1)·N/W)``; ``N`` must be a multiple of ``W`` (an error says so before any
    work). So every index is sampled exactly once, no two draws anywhere share a seed, and each sample's noise and
    label are the same whatever the number of ranks or the batch size.

NaN/Inf samples
    Exp-affine sampling can overflow. A sample that is not finite (after the optional denoising step) is redrawn
    with fresh noise (the next ``attempt``) and the same label, up to ``max_redraws`` times, and every redraw is
    counted (``nan_redraws`` in the results). The reference's evaluate_fid.py redraws the whole batch when one
    sample is NaN; redrawing only that sample keeps the other samples' noise fixed and the result rank-independent.

Features
    Each rank feeds its samples (clipped and rounded to uint8, as the PNG grids) to the FID Inception
    (``trainer.inception``: pool3, pytorch-fid preprocessing) and accumulates n, Σx, Σxxᵀ in float64
    (``trainer.fid``); one all-reduce combines the ranks and rank 0 computes the FID against reference statistics.
    Only statistics travel between ranks, never images; the draw records (index, attempt, seed) are gathered.

Bits/dim in sweeps
    ``heldout_bits_per_dim``: the model's held-out bits/dim (uniform dequantisation, as ``tarflow eval``), computed
    once: guidance does not change the density. ``sample_bits_per_dim``: the bits/dim the model assigns to its own
    samples, quantised to 8 bits and dequantised like data, which guidance and the temperature move.

Outputs (``--out DIR``, rank 0)
    ``sweep.csv`` (one row per setting: guidance, attn_temp, annealed, denoise, num_samples, fid, nan_redraws,
    sample_bits_per_dim, heldout_bits_per_dim, seconds), ``sweep.png`` (FID and bits/dim against the swept value),
    ``results.json`` (the rows and the provenance of the reference and the network), and per setting
    ``samples_<setting>_stats.npz`` (the samples' μ, Σ: an FID against other references needs no resampling),
    ``draws_<setting>.npz`` (index, attempt, seed of every draw) and ``preview_<setting>.png``. The reference's
    FID evaluation always used annealed guidance and the denoising step: ``--annealed --denoise``.

Reference statistics (``tarflow eval stats DATA_URI --out FILE``)
    Default split ``train``, the usual FID reference (the training images): one epoch of the train loader with
    flips off, sharded over ranks; its ``drop_last`` leaves out fewer than ranks × batch-size images (the count ``n``
    is stored), so with several ranks the set can differ by those few images. ``--split heldout`` reads every
    held-out image exactly once on any number of ranks. Images are what the loader yields (``data.resize`` /
    ``data.crop`` apply): compute them at the resolution the model generates.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data_pipeline.seeding import derive_seed
from models import TarFlow, TarFlowConfig

from .fid import FeatureAccumulator, FeatureStats, FIDError, check_comparable, load_stats, save_stats
from .inception import PREPROCESSING, FIDInception, to_uint8
from .runtime import Precision

NOISE_STREAM = "fid-noise"
BPD_STREAM = "fid-sample-bpd"
PREVIEW = 64


# ---------------------------------------------------------------- the sampling plan
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


@dataclass(frozen=True)
class SamplingSettings:
    guidance: float = 0.0
    attn_temp: float = 1.0
    annealed: bool = False
    denoise_std: float | None = None  # σ of the Tweedie step; None: no denoising

    @property
    def name(self) -> str:
        return f"g{self.guidance:g}_t{self.attn_temp:g}"


def sweep_settings(guidances: list[float], attn_temps: list[float], *, annealed: bool,
                   denoise_std: float | None) -> list[SamplingSettings]:
    """Every (guidance, attention temperature) pair, in the order given, duplicates removed."""
    if not guidances or not attn_temps:
        raise ValueError("give at least one --guidance and one --attn-temp value")
    for g in guidances:
        if g < 0 or not math.isfinite(g):
            raise ValueError(f"--guidance values must be finite and >= 0, got {g}")
    for t in attn_temps:
        if t <= 0 or not math.isfinite(t):
            raise ValueError(f"--attn-temp values must be finite and > 0, got {t}")
    pairs = dict.fromkeys((float(g), float(t)) for g in guidances for t in attn_temps)
    return [SamplingSettings(g, t, annealed, denoise_std) for g, t in pairs]


def settings_notes(settings: list[SamplingSettings], conditional: bool) -> list[str]:
    """Combinations that run but cannot do what they seem to (the sampler's semantics, TARFLOW.md §7.3)."""
    notes = []
    for s in settings:
        if s.guidance == 0 and s.attn_temp != 1:
            notes.append(f"{s.name}: the attention temperature only acts in the guidance branch; with guidance 0 "
                         f"it is ignored")
        if not conditional and s.guidance > 0 and s.attn_temp == 1:
            notes.append(f"{s.name}: for an unconditional model guidance acts only through the attention "
                         f"temperature; with attn_temp 1 both branches agree and guidance changes nothing")
    return notes


# ---------------------------------------------------------------- drawing samples
@dataclass
class DrawnBatch:
    indices: list[int]
    images: torch.Tensor              # (B, C, H, W) float32 in model space, all finite, on the sampling device
    labels: torch.Tensor | None       # (B,) int64 on the CPU
    draws: list[tuple[int, int, int]]  # (index, attempt, seed) of every draw made for this batch, redraws included
    redraws: int


def _draw(model: TarFlow, noise: torch.Tensor, labels: torch.Tensor | None, s: SamplingSettings,
          device: torch.device, precision: Precision) -> torch.Tensor:
    noise = noise.to(device)
    y = labels.to(device) if labels is not None else None
    with precision.autocast(device):
        x = model.reverse(noise, y, guidance=s.guidance, attn_temp=s.attn_temp, annealed_guidance=s.annealed)
    x = x.float()
    if s.denoise_std is not None:
        finite = torch.isfinite(x).flatten(1).all(1)
        if finite.any():  # a non-finite sample is redrawn anyway; it must not poison the others' step
            x = x.clone()
            x[finite] = model.denoise(x[finite], y[finite] if y is not None else None,
                                      noise_std=s.denoise_std).float()
    return x


def draw_samples(model: TarFlow, indices, settings: SamplingSettings, *, base_seed: int, batch_size: int,
                 device: torch.device, precision: Precision, max_redraws: int = 10) -> Iterator[DrawnBatch]:
    """The samples of ``indices`` in batches, each finite: non-finite ones are redrawn with fresh noise."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    indices = list(indices)
    c = model.config
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            labels = sample_labels(batch, c.num_classes)
            attempts = [0] * len(batch)
            out = torch.empty(len(batch), c.in_channels, c.img_size, c.img_size, device=device)
            pending = list(range(len(batch)))
            draws: list[tuple[int, int, int]] = []
            while pending:
                seeds = [noise_seed(base_seed, batch[p], attempts[p]) for p in pending]
                draws += [(batch[p], attempts[p], s) for p, s in zip(pending, seeds)]
                rows = torch.tensor(pending)
                x = _draw(model, draw_noise(c, seeds), labels[rows] if labels is not None else None, settings,
                          device, precision)
                finite = torch.isfinite(x).flatten(1).all(1).cpu()
                out[rows[finite].to(device)] = x[finite.to(device)]
                pending = [p for p, ok in zip(pending, finite.tolist()) if not ok]
                for p in pending:
                    attempts[p] += 1
                    if attempts[p] > max_redraws:
                        raise FIDError(f"sample {batch[p]} ({settings.name}) was still NaN/Inf after "
                                       f"{max_redraws} redraws with fresh noise; the model diverges at these "
                                       f"settings (raise --max-redraws, or lower the guidance)")
            yield DrawnBatch(batch, out, labels, draws, sum(attempts))
    finally:
        model.train(was_training)


def _to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 k → k/255·2 − 1, what the loaders yield."""
    return images_uint8.float() / 255.0 * 2.0 - 1.0


# ---------------------------------------------------------------- one setting
SWEEP_COLUMNS = ("guidance", "attn_temp", "annealed", "denoise", "num_samples", "fid", "nan_redraws",
                 "sample_bits_per_dim", "heldout_bits_per_dim", "seconds")


@dataclass
class SettingResult:
    guidance: float
    attn_temp: float
    annealed: bool
    denoise: bool
    num_samples: int
    fid: float | None                  # on rank 0; None elsewhere
    nan_redraws: int                   # over all ranks
    sample_bits_per_dim: float | None  # over all ranks
    heldout_bits_per_dim: float | None
    seconds: float
    stats: FeatureStats | None = field(default=None, repr=False)            # the samples' statistics, rank 0
    draws: list[tuple[int, int, int]] | None = field(default=None, repr=False)  # every rank's draws, rank 0
    preview: torch.Tensor | None = field(default=None, repr=False)          # rank 0's first samples, uint8

    def row(self) -> dict:
        return {k: getattr(self, k) for k in SWEEP_COLUMNS}


def evaluate_setting(model: TarFlow, inception: FIDInception, reference: FeatureStats | None,
                     settings: SamplingSettings, *, num_samples: int, base_seed: int, batch_size: int,
                     device: torch.device, precision: Precision, rank: int = 0, world_size: int = 1,
                     max_redraws: int = 10, sample_bpd: bool = True, heldout_bpd: float | None = None,
                     save_dir: Path | None = None) -> SettingResult:
    """Collective: every rank samples its slice; rank 0 gets the FID (when ``reference`` is given), the gathered
    draw records, the samples' statistics and a preview."""
    from .distributed import all_reduce_sum, gather_objects
    from .evaluate import heldout_bits_per_dim

    start = time.perf_counter()
    mine = rank_indices(num_samples, rank, world_size)
    acc = FeatureAccumulator(inception.feature_dim, device)
    bpd_sum, redraws, draws, preview, saved = 0.0, 0, [], [], []
    for batch in draw_samples(model, mine, settings, base_seed=base_seed, batch_size=batch_size, device=device,
                              precision=precision, max_redraws=max_redraws):
        pixels = to_uint8(batch.images)
        acc.update(inception(pixels))
        if sample_bpd:
            y = batch.labels if batch.labels is not None else torch.zeros(len(batch.indices), dtype=torch.int64)
            seed = derive_seed(BPD_STREAM, base_seed, batch.indices[0]) % 2 ** 63
            bpd, n = heldout_bits_per_dim(model, [(_to_model_space(pixels), y)], device, seed=seed)
            bpd_sum += bpd * n
        redraws += batch.redraws
        draws += batch.draws
        if rank == 0 and sum(len(p) for p in preview) < PREVIEW:
            preview.append(pixels[:PREVIEW - sum(len(p) for p in preview)].cpu())
        if save_dir is not None:
            saved.append((pixels.cpu(), batch.labels, batch.indices))
    if save_dir is not None:
        _save_samples(saved, save_dir / f"samples_{settings.name}_rank{rank:05d}.npz")
    acc.all_reduce()
    bpd_sum, redraws_total = all_reduce_sum([bpd_sum, float(redraws)], device)
    all_draws = gather_objects(draws)
    result = SettingResult(settings.guidance, settings.attn_temp, settings.annealed,
                           settings.denoise_std is not None, acc.n, None, int(redraws_total),
                           bpd_sum / acc.n if sample_bpd else None, heldout_bpd, 0.0)
    if rank == 0:
        result.stats = FeatureStats.from_accumulator(acc, {"network": inception.identity, **asdict(settings)})
        if reference is not None:
            result.fid = result.stats.fid(reference)
        result.draws = [d for part in all_draws for d in part]
        result.preview = torch.cat(preview) if preview else None
    result.seconds = time.perf_counter() - start
    return result


def _save_samples(parts, path: Path) -> None:
    from .image_grid import save_samples_npz

    images = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, dtype=torch.uint8)
    arrays = {"images": images, "indices": np.asarray([i for p in parts for i in p[2]], dtype=np.int64)}
    if parts and parts[0][1] is not None:
        arrays["labels"] = torch.cat([p[1] for p in parts])
    save_samples_npz(path, **arrays)


# ---------------------------------------------------------------- sweeps
def run_sweep(model: TarFlow, inception: FIDInception, reference: FeatureStats | None,
              settings: list[SamplingSettings], *, out_dir: Path | None = None, title: str = "",
              save_samples: bool = False, log=None, rank: int = 0, **kwargs) -> list[SettingResult]:
    """Collective: ``evaluate_setting`` for each setting (``kwargs`` are its keywords). Rank 0 writes, into
    ``out_dir``: ``sweep.csv``, ``sweep.png``, and per setting the samples' statistics
    (``samples_<setting>_stats.npz``), every draw's (index, attempt, seed) (``draws_<setting>.npz``) and a preview
    grid of up to 64 samples (``preview_<setting>.png``); with ``save_samples`` every rank writes its samples (uint8,
    with their indices and labels) as ``samples_<setting>_rank<r>.npz``."""
    results = []
    for s in settings:
        r = evaluate_setting(model, inception, reference, s, rank=rank,
                             save_dir=out_dir if save_samples else None, **kwargs)
        results.append(r)
        if rank != 0:
            continue
        if log is not None:
            fid = "n/a" if r.fid is None else f"{r.fid:.4f}"
            log(f"{s.name}: FID {fid} over {r.num_samples} samples, {r.nan_redraws} NaN redraws, "
                f"{r.seconds:.1f} s")
        if out_dir is not None:
            _write_setting_outputs(r, s, out_dir)
    if rank == 0 and out_dir is not None:
        write_sweep_csv(results, out_dir / "sweep.csv")
        plot_sweep(results, out_dir / "sweep.png", title=title)
    return results


def _write_setting_outputs(r: SettingResult, s: SamplingSettings, out_dir: Path) -> None:
    from .image_grid import save_image_grid, save_samples_npz

    save_stats(r.stats, out_dir / f"samples_{s.name}_stats.npz")
    draws = np.array(sorted(r.draws or []), dtype=np.uint64).reshape(-1, 3)
    save_samples_npz(out_dir / f"draws_{s.name}.npz", index=draws[:, 0].astype(np.int64),
                     attempt=draws[:, 1].astype(np.int64), seed=draws[:, 2])
    if r.preview is not None:
        scale = max(1, 64 // r.preview.shape[-1])
        save_image_grid(_to_model_space(r.preview), out_dir / f"preview_{s.name}.png", scale=scale)


def write_sweep_csv(results: list[SettingResult], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if v is None else v) for k, v in r.row().items()})
    return path


def plot_sweep(results: list[SettingResult], path: Path, title: str = "") -> Path:
    """FID (left) and bits/dim (right) against the swept value: guidance weight when several were given (one line
    per attention temperature), else attention temperature (one line per guidance weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_guidance = len({r.guidance for r in results}) > 1 or len({r.attn_temp for r in results}) == 1
    x_of = (lambda r: r.guidance) if by_guidance else (lambda r: r.attn_temp)
    series_of = (lambda r: r.attn_temp) if by_guidance else (lambda r: r.guidance)
    series_name = "attn temp" if by_guidance else "guidance"
    fig, (ax_fid, ax_bpd) = plt.subplots(1, 2, figsize=(10, 4))
    for value in dict.fromkeys(series_of(r) for r in results):
        rows = sorted((r for r in results if series_of(r) == value), key=x_of)
        xs = [x_of(r) for r in rows]
        ax_fid.plot(xs, [np.nan if r.fid is None else r.fid for r in rows], "o-", label=f"{series_name} {value:g}")
        ax_bpd.plot(xs, [np.nan if r.sample_bits_per_dim is None else r.sample_bits_per_dim for r in rows], "o-",
                    label=f"samples, {series_name} {value:g}")
    heldout = next((r.heldout_bits_per_dim for r in results if r.heldout_bits_per_dim is not None), None)
    if heldout is not None:
        ax_bpd.axhline(heldout, color="k", linestyle="--", label="held-out data")
    xlabel = "guidance weight" if by_guidance else "attention temperature"
    ax_fid.set(xlabel=xlabel, ylabel="FID", title="FID")
    ax_bpd.set(xlabel=xlabel, ylabel="bits/dim", title="bits/dim")
    for ax in (ax_fid, ax_bpd):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- reference statistics
def data_config_for(data_uri: str, overrides: list[str]):
    """A DataConfig from ``DATA_URI`` — ``digits`` / ``photos`` (or ``embedded:NAME``): an embedded set; a directory
    or ``s3://bucket/prefix``: shards written by ``tarflow data write`` (format from its manifest) — then
    ``data.*`` overrides."""
    from data_pipeline.manifest import MANIFEST_NAME
    from data_pipeline.storage import DataSourceError, join, read_text

    from .config import ConfigError, load_config

    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ConfigError(f"eval stats takes data.* overrides only, got {bad[0]!r}")
    if data_uri.startswith("embedded:") or data_uri in ("digits", "photos"):
        base = ["data.format=embedded", f"data.source={data_uri.removeprefix('embedded:')}"]
    else:
        base = [f"data.uri={data_uri}"]
        if not any(o.startswith("data.format=") for o in overrides):
            where = join(data_uri, "train", MANIFEST_NAME)
            try:
                fmt = json.loads(read_text(where))["format"]
            except (DataSourceError, ValueError, KeyError) as e:
                raise DataSourceError(f"{data_uri} is neither an embedded set (digits, photos) nor a dataset "
                                      f"written by `tarflow data write` (reading {where}: {e})") from None
            base.append(f"data.format={fmt}")
    cfg = load_config(None, [*base, *overrides, "data.random_flip=false"])
    return cfg.data


def compute_reference_stats(data_cfg, split: str, inception: FIDInception, *, batch_size: int,
                            device: torch.device, rank: int = 0, world_size: int = 1,
                            max_images: int = 0) -> FeatureStats:
    """Collective: every rank reads its share of ``split`` (see the module doc); statistics on every rank."""
    from data_pipeline import build_loader, dataset_info

    if split not in ("train", "heldout"):
        raise ValueError(f"--split must be train or heldout, got {split!r}")
    image_shape, _ = dataset_info(data_cfg)
    loader = build_loader(data_cfg, split, batch_size, seed=0, rank=rank, world_size=world_size)
    limit = -(-max_images // world_size) if max_images else 0
    batches = loader.batches_per_epoch if split == "train" else None  # the train loader never ends by itself
    acc = FeatureAccumulator(inception.feature_dim, device)
    seen = 0
    for i, (x, _) in enumerate(loader):
        if batches is not None and i >= batches:
            break
        if limit and seen >= limit:
            break
        if limit:
            x = x[: limit - seen]
        acc.update(inception(to_uint8(x)))
        seen += x.shape[0]
    acc.all_reduce()
    dataset = {k: v for k, v in asdict(data_cfg).items()
               if k in ("format", "source", "uri", "heldout_fraction", "split_seed", "resize", "crop")}
    if data_cfg.format == "embedded":
        dataset.pop("uri")
    else:
        dataset.pop("source")
    meta = {"dataset": dataset, "split": split, "image_shape": list(image_shape), "num_images": acc.n,
            "max_images": max_images, "ranks": world_size, "loader_batch_size": batch_size,
            "network": inception.identity, "feature_dim": inception.feature_dim, "features": "pool3",
            "preprocessing": PREPROCESSING.format(size=inception.input_size),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if split == "train":
        meta["note"] = ("one epoch of the train loader (no flips); its drop_last leaves out fewer than "
                        "ranks x loader_batch_size images")
    return FeatureStats.from_accumulator(acc, meta)


def heldout_bits_per_dim_all_ranks(model: TarFlow, data_cfg, *, batch_size: int, device: torch.device,
                                   rank: int = 0, world_size: int = 1, max_images: int = 0) -> float:
    """Collective: the held-out bits/dim over all ranks' shares (as the training loop's evaluation)."""
    from data_pipeline import build_loader

    from .distributed import all_reduce_sum
    from .evaluate import heldout_bits_per_dim

    loader = build_loader(data_cfg, "heldout", batch_size, seed=0, rank=rank, world_size=world_size)
    limit = -(-max_images // world_size) if max_images else 0
    bpd, n = heldout_bits_per_dim(model, loader, device, max_images=limit)
    total, count = all_reduce_sum([bpd * n, float(n)], device)
    return total / count


# ---------------------------------------------------------------- loading, and the commands
def load_model(uri: str, device: torch.device):
    """(model, config) of any checkpoint; a state dict that does not match its config names the first bad key."""
    from models.tarflow import check_state_dict_matches

    from .checkpoint.export import consolidated_model

    state, cfg, _ = consolidated_model(uri)
    model = TarFlow(cfg.model)
    check_state_dict_matches(model, state)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cli_eval_fid(args) -> int:
    """``tarflow eval CKPT --metric fid ...`` (see trainer.cli for the flags)."""
    from cluster.env import discover

    from .config import ConfigError, load_config
    from .distributed import process_group
    from .inception import load_fid_inception, resolve_weights_path
    from .noise import denoise_std
    from .runtime import resolve_device, resolve_precision

    env = discover()
    per_rank = check_num_samples(args.num_samples, env.world_size)
    if not args.ref_stats:
        raise FIDError("--metric fid needs --ref-stats FILE: make it with `tarflow eval stats DATA_URI --out FILE` "
                       "(the same --inception as here)")
    if args.split != "train":
        raise ValueError("--split applies to `tarflow eval stats` only")
    if args.max_redraws < 0:
        raise ValueError(f"--max-redraws must be >= 0, got {args.max_redraws}")
    not_data = [o for o in args.overrides if not o.startswith("data.")]
    if not_data:
        raise ConfigError(f"eval takes data.* overrides only, got {not_data[0]!r}")
    reference = load_stats(args.ref_stats)
    device = resolve_device(args.device, env.local_rank)
    model, cfg = load_model(args.checkpoint, device)
    cfg = load_config(None, args.overrides, base=cfg)
    weights = resolve_weights_path(args.inception, cfg.eval.inception_weights or None)
    inception = load_fid_inception(weights, device)
    c = model.config
    notes = check_comparable(reference, network=inception.identity, feature_dim=inception.feature_dim,
                             image_shape=(c.in_channels, c.img_size, c.img_size),
                             where=f"--ref-stats {args.ref_stats}")
    sigma = denoise_std(cfg.train.noise, cfg.train.noise_std) if args.denoise else None
    settings = sweep_settings(args.guidance, args.attn_temp, annealed=args.annealed, denoise_std=sigma)
    notes += settings_notes(settings, c.conditional)
    out_dir = Path(args.out) if args.out else None
    if out_dir is None and (len(settings) > 1 or args.save_samples):
        raise ValueError("a sweep (several --guidance / --attn-temp values) and --save-samples write files: "
                         "give --out DIR")
    precision = resolve_precision(args.precision, device, "gaussian")
    batch_size = min(args.batch_size or cfg.eval.batch_size, per_rank)
    with process_group(env, device):
        if env.is_main:
            for note in notes:
                _stderr(f"note: {note}")
            if inception.identity.startswith("tiny-random"):
                _stderr("WARNING: --inception tiny-random is a random stand-in for plumbing tests; these are not "
                        "FIDs")
        heldout = None
        if not args.no_bpd:
            heldout = heldout_bits_per_dim_all_ranks(model, cfg.data, batch_size=cfg.eval.batch_size,
                                                     device=device, rank=env.rank, world_size=env.world_size,
                                                     max_images=args.max_images)
        if out_dir is not None and env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        title = f"{args.checkpoint} ({args.num_samples} samples)"
        results = run_sweep(model, inception, reference, settings, out_dir=out_dir, title=title,
                            save_samples=args.save_samples, log=_stderr, rank=env.rank,
                            world_size=env.world_size, num_samples=args.num_samples, base_seed=args.seed,
                            batch_size=batch_size, device=device, precision=precision,
                            max_redraws=args.max_redraws, sample_bpd=not args.no_bpd, heldout_bpd=heldout)
        if not env.is_main:
            return 0
        report = {"checkpoint": str(args.checkpoint), "metric": "fid", "num_samples": args.num_samples,
                  "ranks": env.world_size, "seed": args.seed, "inception": inception.identity,
                  "reference": {"file": str(args.ref_stats), "n": reference.n, **reference.meta},
                  "precision": precision.name, "results": [r.row() for r in results], "notes": notes}
        if len(results) == 1:
            report["fid"] = results[0].fid
        if out_dir is not None:
            (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
            report["out"] = str(out_dir)
        print(json.dumps(report))
    return 0


def cli_eval_stats(args, data_uri: str, overrides: list[str]) -> int:
    """``tarflow eval stats DATA_URI --out FILE [data.key=value ...]``."""
    from cluster.env import discover

    from .distributed import process_group
    from .inception import load_fid_inception, resolve_weights_path
    from .runtime import resolve_device

    if not args.out:
        raise ValueError("eval stats needs --out FILE (an .npz)")
    env = discover()
    data_cfg = data_config_for(data_uri, overrides)
    device = resolve_device(args.device, env.local_rank)
    inception = load_fid_inception(resolve_weights_path(args.inception), device)
    with process_group(env, device):
        stats = compute_reference_stats(data_cfg, args.split, inception, batch_size=args.batch_size or 100,
                                        device=device, rank=env.rank, world_size=env.world_size,
                                        max_images=args.max_images)
        if env.is_main:
            path = save_stats(stats, args.out)
            print(json.dumps({"out": str(path), "n": stats.n, "feature_dim": int(stats.mu.shape[0]),
                              **{k: stats.meta[k] for k in ("split", "image_shape", "network")}}))
    return 0
