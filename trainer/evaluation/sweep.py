"""FID of a checkpoint, sampled across all ranks (the sampling plan and NaN redraws: ``sampler``), and sweeps over
guidance weights and attention temperatures; the classifier metrics (``quality``) from the same samples, with or
without the FID.

Features
    Each rank feeds its float samples to the FID network of the chosen convention (``inception``: ``paper``, as
    the official code feeds torchmetrics, or ``pytorch-fid``; each does its own quantisation and resize) and
    accumulates n, Σx, Σxxᵀ in float64 (``fid``); one
    all-reduce combines the ranks and rank 0 computes the FID against reference statistics (``reference``). Only
    statistics travel between ranks, never images; the draw records (index, attempt, seed) are gathered.

Bits/dim in sweeps
    ``heldout_bits_per_dim``: the model's held-out bits/dim (uniform dequantisation, as ``tarflow eval``), computed
    once by the caller: guidance does not change the density. ``sample_bits_per_dim``: the bits/dim the model
    assigns to its own samples, quantised to 8 bits and dequantised like data, which guidance and the temperature
    move.

Outputs (``out_dir``, rank 0)
    ``sweep.csv`` (one row per setting: guidance, attn_temp, annealed, denoise, num_samples, fid, nan_redraws,
    sample_bits_per_dim, heldout_bits_per_dim, seconds; class_accuracy, classifier_fd, precision, recall: the
    offline metrics of ``quality``, empty unless asked for), ``sweep.png`` (FID and bits/dim against the swept value),
    and per setting ``samples_<setting>_stats.pth|npz`` (the samples' statistics in the convention's file format:
    an FID against other references needs no resampling), ``draws_<setting>.npz`` (index, attempt, seed of every
    draw) and ``preview_<setting>.png``. The reference's FID evaluation always used annealed guidance and the
    denoising step: ``--annealed --denoise``.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_pipeline.seeding import derive_seed
from models import InversionSettings, TarFlow

from ..distributed import all_reduce_sum, gather_objects
from ..runtime import Precision
from .bpd import heldout_bits_per_dim
from .fid import FeatureAccumulator, FeatureStats, save_stats, stats_suffix
from .image_grid import save_image_grid, save_samples_npz
from .inception import FIDNetwork, to_uint8
from .progress import progress_bar
from .quality import QualityScorer
from .sampler import SamplingSettings, draw_samples, rank_indices

BPD_STREAM = "fid-sample-bpd"
PREVIEW = 64


# ---------------------------------------------------------------- settings
def sweep_settings(guidances: list[float], attn_temps: list[float], *, annealed: bool,
                   denoise_stds: list[float | None],
                   inversion: InversionSettings | None = None) -> list[SamplingSettings]:
    """Every (guidance, attention temperature, denoising) combination, in the order given, duplicates removed.
    ``denoise_stds``: the Tweedie step's σ, None for none; both (``[None, σ]``) evaluate the same draws (the noise of
    sample i depends only on the seed, i and the attempt) with and without the step, except where the step itself
    gives a non-finite sample, which is redrawn (and counted) in the denoised setting only. ``inversion``: how
    every setting inverts the blocks (default: the exact sequential sampler)."""
    if not guidances or not attn_temps:
        raise ValueError("give at least one --guidance and one --attn-temp value")
    for g in guidances:
        if g < 0 or not math.isfinite(g):
            raise ValueError(f"--guidance values must be finite and >= 0, got {g}")
    for t in attn_temps:
        if t <= 0 or not math.isfinite(t):
            raise ValueError(f"--attn-temp values must be finite and > 0, got {t}")
    combos = dict.fromkeys((float(g), float(t), d) for g in guidances for t in attn_temps for d in denoise_stds)
    inversion = inversion or InversionSettings()
    return [SamplingSettings(g, t, annealed, d, inversion) for g, t, d in combos]


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


def _to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 k → k/255·2 − 1, what the loaders yield."""
    return images_uint8.float() / 255.0 * 2.0 - 1.0


# ---------------------------------------------------------------- one setting
QUALITY_COLUMNS = ("class_accuracy", "classifier_fd", "precision", "recall")
SWEEP_COLUMNS = ("guidance", "attn_temp", "annealed", "denoise", "num_samples", "fid", "nan_redraws",
                 "sample_bits_per_dim", "heldout_bits_per_dim", "seconds", *QUALITY_COLUMNS, "method", "tol",
                 "passes_per_block")


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
    class_accuracy: float | None = None  # the classifier metrics (``quality``), rank 0, when asked for
    classifier_fd: float | None = None
    precision: float | None = None
    recall: float | None = None
    method: str = "sequential"         # how the blocks were inverted (``models.InversionSettings``)
    tol: float | None = None           # its tolerance; None for the exact sequential sampler
    passes_per_block: str = ""         # mean passes per block over the batches, last block first ("15 15 15 15")
    stats: FeatureStats | None = field(default=None, repr=False)            # the samples' statistics, rank 0
    draws: list[tuple[int, int, int]] | None = field(default=None, repr=False)  # every rank's draws, rank 0
    preview: torch.Tensor | None = field(default=None, repr=False)          # rank 0's first samples, uint8

    def row(self) -> dict:
        return {k: getattr(self, k) for k in SWEEP_COLUMNS}


def evaluate_setting(model: TarFlow, inception: FIDNetwork | None, reference: FeatureStats | None,
                     settings: SamplingSettings, *, num_samples: int, base_seed: int, batch_size: int,
                     device: torch.device, precision: Precision, rank: int = 0, world_size: int = 1,
                     max_redraws: int = 10, sample_bpd: bool = True, heldout_bpd: float | None = None,
                     save_dir: Path | None = None, classifier=None) -> SettingResult:
    """Collective: every rank samples its slice; rank 0 gets the FID (when ``reference`` is given), the gathered
    draw records, the samples' statistics (with ``inception``), the classifier metrics (with ``classifier``, a
    ``classifier.Classifier``) and a preview."""
    start = time.perf_counter()
    mine = rank_indices(num_samples, rank, world_size)
    acc = FeatureAccumulator(inception.feature_dim, device) if inception is not None else None
    scorer = QualityScorer(classifier, device) if classifier is not None else None
    bpd_sum, redraws, draws, preview, saved = 0.0, 0, [], [], []
    pass_sums, batches = [0.0] * len(model.blocks), 0
    # An equal share per rank (rank_indices): rank 0's count × ranks is the pass's.
    with progress_bar(num_samples, f"sampling {settings.name}", rank=rank) as bar:
        for batch in draw_samples(model, mine, settings, base_seed=base_seed, batch_size=batch_size, device=device,
                                  precision=precision, max_redraws=max_redraws):
            pixels = to_uint8(batch.images)
            if acc is not None:
                acc.update(inception.features(batch.images))
            if scorer is not None:
                scorer.update(batch.indices, batch.labels, pixels)
            if sample_bpd:
                y = batch.labels if batch.labels is not None else torch.zeros(len(batch.indices), dtype=torch.int64)
                # each sample's dequantisation keyed by its index: the same whatever the ranks and batches
                bpd, n = heldout_bits_per_dim(model, [(_to_model_space(pixels), y, torch.as_tensor(batch.indices))],
                                              device, seed=derive_seed(BPD_STREAM, base_seed) % 2 ** 63)
                bpd_sum += bpd * n
            redraws += batch.redraws
            draws += batch.draws
            pass_sums = [t + p for t, p in zip(pass_sums, batch.passes)]
            batches += 1
            if rank == 0 and sum(len(p) for p in preview) < PREVIEW:
                preview.append(pixels[:PREVIEW - sum(len(p) for p in preview)].cpu())
            if save_dir is not None:
                saved.append((pixels.cpu(), batch.labels, batch.indices))
            bar.update(len(batch.indices) * world_size)
    if save_dir is not None:
        _save_samples(saved, save_dir / f"samples_{settings.name}_rank{rank:05d}.npz")
    if acc is not None:
        acc.all_reduce()
    quality = scorer.finish(rank) if scorer is not None else None
    bpd_sum, redraws_total, batches_total, *pass_totals = all_reduce_sum(
        [bpd_sum, float(redraws), float(batches), *pass_sums], device)
    all_draws = gather_objects(draws)
    record = settings.record()
    result = SettingResult(settings.guidance, settings.attn_temp, settings.annealed,
                           settings.denoise_std is not None, num_samples, None, int(redraws_total),
                           bpd_sum / num_samples if sample_bpd else None, heldout_bpd, 0.0,
                           method=str(record["method"]), tol=record["tol"],
                           passes_per_block=" ".join(f"{p / max(batches_total, 1):g}" for p in pass_totals))
    if quality is not None:
        for k in QUALITY_COLUMNS:
            setattr(result, k, getattr(quality, k))
    if rank == 0 and acc is not None:
        result.stats = FeatureStats.from_accumulator(acc, {"network": inception.identity,
                                                           "convention": inception.convention, **settings.record()})
        if reference is not None:
            result.fid = result.stats.fid(reference)
    if rank == 0:
        result.draws = [d for part in all_draws for d in part]
        result.preview = torch.cat(preview) if preview else None
    result.seconds = time.perf_counter() - start
    return result


def _save_samples(parts, path: Path) -> None:
    images = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, dtype=torch.uint8)
    arrays = {"images": images, "indices": np.asarray([i for p in parts for i in p[2]], dtype=np.int64)}
    if parts and parts[0][1] is not None:
        arrays["labels"] = torch.cat([p[1] for p in parts])
    save_samples_npz(path, **arrays)


# ---------------------------------------------------------------- sweeps
def run_sweep(model: TarFlow, inception: FIDNetwork | None, reference: FeatureStats | None,
              settings: list[SamplingSettings], *, out_dir: Path | None = None, title: str = "",
              save_samples: bool = False, log=None, rank: int = 0, **kwargs) -> list[SettingResult]:
    """Collective: ``evaluate_setting`` for each setting (``kwargs`` are its keywords). Rank 0 writes, into
    ``out_dir``: ``sweep.csv``, ``sweep.png``, and per setting the samples' statistics
    (``samples_<setting>_stats.pth|npz``), every draw's (index, attempt, seed) (``draws_<setting>.npz``) and a preview
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
            quality = "" if r.classifier_fd is None else (
                f"class accuracy {'n/a' if r.class_accuracy is None else f'{r.class_accuracy:.4f}'}, classifier "
                f"FD {r.classifier_fd:.4f}, precision {r.precision:.4f}, recall {r.recall:.4f}, ")
            log(f"{s.name}: FID {fid}, {quality}over {r.num_samples} samples, {r.nan_redraws} NaN redraws, "
                f"{r.seconds:.1f} s")
        if out_dir is not None:
            _write_setting_outputs(r, s, out_dir)
    if rank == 0 and out_dir is not None:
        write_sweep_csv(results, out_dir / "sweep.csv")
        plot_sweep(results, out_dir / "sweep.png", title=title)
    return results


def _write_setting_outputs(r: SettingResult, s: SamplingSettings, out_dir: Path) -> None:
    if r.stats is not None:
        save_stats(r.stats, out_dir / f"samples_{s.name}_stats{stats_suffix(r.stats.convention)}")
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
    per attention temperature), else attention temperature (one line per guidance weight); with the classifier
    metrics two more panels: the classifier FD, and class accuracy, precision and recall (and no FID panel
    without FIDs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_guidance = len({r.guidance for r in results}) > 1 or len({r.attn_temp for r in results}) == 1
    x_of = (lambda r: r.guidance) if by_guidance else (lambda r: r.attn_temp)
    series_name = "attn temp" if by_guidance else "guidance"
    both = len({r.denoise for r in results}) > 1  # with and without the denoising step: a line each

    def series_of(r: SettingResult) -> tuple:
        return (r.attn_temp if by_guidance else r.guidance), (r.denoise if both else None)

    def label_of(series: tuple) -> str:
        return f"{series_name} {series[0]:g}" + (", denoised" if series[1] else "")

    quality = any(r.classifier_fd is not None for r in results)
    with_fid = any(r.fid is not None for r in results) or not quality
    panels = 1 + with_fid + 2 * quality
    fig, grid = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(grid[0])
    ax_fid = axes[0] if with_fid else None
    ax_bpd = axes[int(with_fid)]
    for value in dict.fromkeys(series_of(r) for r in results):
        rows = sorted((r for r in results if series_of(r) == value), key=x_of)
        xs = [x_of(r) for r in rows]
        if ax_fid is not None:
            ax_fid.plot(xs, [np.nan if r.fid is None else r.fid for r in rows], "o-",
                        label=label_of(value))
        ax_bpd.plot(xs, [np.nan if r.sample_bits_per_dim is None else r.sample_bits_per_dim for r in rows], "o-",
                    label=f"samples, {label_of(value)}")
        if quality:
            axes[-2].plot(xs, [r.classifier_fd for r in rows], "o-", label=label_of(value))
            for key, marker in (("class_accuracy", "o-"), ("precision", "s--"), ("recall", "^:")):
                axes[-1].plot(xs, [np.nan if getattr(r, key) is None else getattr(r, key) for r in rows], marker,
                             label=f"{key.replace('_', ' ')}, {label_of(value)}")
    heldout = next((r.heldout_bits_per_dim for r in results if r.heldout_bits_per_dim is not None), None)
    if heldout is not None:
        ax_bpd.axhline(heldout, color="k", linestyle="--", label="held-out data")
    xlabel = "guidance weight" if by_guidance else "attention temperature"
    if ax_fid is not None:
        ax_fid.set(xlabel=xlabel, ylabel="FID", title="FID")
    ax_bpd.set(xlabel=xlabel, ylabel="bits/dim", title="bits/dim")
    if quality:
        axes[-2].set(xlabel=xlabel, ylabel="FD", title="classifier-feature FD (vs held-out)")
        axes[-1].set(xlabel=xlabel, ylabel="fraction", title="class accuracy, precision, recall", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
