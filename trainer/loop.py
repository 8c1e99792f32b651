"""The training loop: data → noise and label drop on the device → strategy forward/backward/step → metrics,
held-out bits/dim, sample grids and checkpoints at their intervals."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_pipeline import build_loader, dataset_info
from models import TarFlow, num_parameters

from .checkpoint import CheckpointManager, atomic_write_text
from .config import Config, config_hash, to_yaml, validate
from .evaluate import heldout_bits_per_dim
from .flops import default_peak_flops, flops_per_image, mfu
from .metric_sinks import ConsoleSink, JsonlSink, MetricLogger, WandbSink
from .noise import corrupt, denoise_std, drop_labels
from .optim import build_schedule
from .run_state import RunState, capture_rng, restore_rng, seed_everything
from .runtime import resolve_device, resolve_precision
from .sampling import fixed_noise_and_labels, generate, sample_config_guidances, save_grids
from .strategy import build_strategy

LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)
LOG_BIN = math.log(128.0)


class NonFiniteLossError(RuntimeError):
    """The run kept producing NaN/Inf losses or gradients; no checkpoint was written from that state."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    initial_bits_per_dim: float | None
    final_bits_per_dim: float
    checkpoint: Path
    sample_grids: list[Path]
    nonfinite_steps: int
    seconds: float


def loss_to_bits_per_dim(loss_nats: float) -> float:
    """The training loss omits ½ln2π; with uniform dequantisation this is the bits/dim of the 8-bit data."""
    return (loss_nats + LOG_2PI_HALF + LOG_BIN) / math.log(2.0)


def check_model_matches_data(cfg: Config) -> None:
    shape, num_classes = dataset_info(cfg.data)
    m = cfg.model
    if shape != (m.in_channels, m.img_size, m.img_size):
        raise ValueError(f"model.in_channels/img_size = {m.in_channels}/{m.img_size} do not match the data's images "
                         f"{shape} (data.source={cfg.data.source!r})")
    if m.num_classes not in (0, num_classes):
        raise ValueError(f"model.num_classes={m.num_classes} but the data has {num_classes} classes; use "
                         f"{num_classes} (class-conditional) or 0 (unconditional)")


def train(cfg: Config) -> TrainResult:
    world_size, rank = 1, 0
    validate(cfg, world_size)
    check_model_matches_data(cfg)
    t, started = cfg.train, time.perf_counter()
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device, t.noise)
    run_dir = Path(t.run_dir)
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep=cfg.checkpoint.keep)
    if t.resume == "never" and checkpoints.steps():
        raise ValueError(f"train.resume=never but {checkpoints.directory} already holds checkpoints; choose a new "
                         f"train.run_dir or resume=auto (refusing to overwrite them)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    seed_everything(t.seed)
    model = TarFlow(cfg.model)
    strategy = build_strategy(t.strategy, device)
    strategy.setup(model, cfg.optim)
    schedule = build_schedule(cfg)
    train_loader = build_loader(cfg.data, "train", t.micro_batch, seed=t.seed, rank=rank, world_size=world_size)
    heldout_loader = build_loader(cfg.data, "heldout", cfg.eval.batch_size, seed=0, rank=rank,
                                  world_size=world_size)

    run = RunState()
    saved = checkpoints.resume(t.resume)
    if saved is not None:
        if saved.get("config_hash") != config_hash(cfg):
            print(f"note: resuming from a checkpoint written with a different config (step {saved['step']})")
        strategy.load_state_dict(saved["strategy"])
        run = RunState.from_dict(saved["run"])
        train_loader.load_state_dict(run.loader)
        restore_rng(run.rng, device)
        print(f"resumed from step {run.step} ({checkpoints.directory})")

    sinks = [ConsoleSink(total_steps=t.steps, bar_width=20 if cfg.logging.progress else 0, extra=False),
             # Records past the resumed step are dropped: this run logs those steps again.
             JsonlSink(run_dir / "metrics.jsonl", truncate_after_step=run.step)]
    if cfg.logging.wandb:
        sinks.append(WandbSink(project=cfg.logging.wandb_project, run_dir=str(run_dir),
                               config=_plain(cfg), run_name=run_dir.name,
                               mode=cfg.logging.wandb_mode))
    logger = MetricLogger(sinks)

    flops = flops_per_image(cfg.model)
    peak = cfg.logging.peak_flops or default_peak_flops(device, precision.autocast_dtype or torch.float32)
    accumulation = t.global_batch // (t.micro_batch * world_size)
    unwrapped = strategy.unwrapped
    conditional = cfg.model.num_classes > 0
    sample_noise, sample_labels = fixed_noise_and_labels(unwrapped, cfg.sample.num, cfg.sample.seed)

    def evaluate() -> float:
        bpd, n = heldout_bits_per_dim(unwrapped, heldout_loader, device, max_images=cfg.eval.max_images)
        logger.log(run.step, {"eval/bits_per_dim": bpd, "eval/images": n})
        return bpd

    def sample(prefix: str) -> list[Path]:
        result = generate(unwrapped, sample_noise, sample_labels, guidances=sample_config_guidances(cfg.sample),
                          attn_temp=cfg.sample.attn_temp, annealed=cfg.sample.annealed,
                          denoise_std=denoise_std(t.noise, t.noise_std) if cfg.sample.denoise else None,
                          device=device, precision=precision)
        if any(result.nonfinite.values()):  # exp-affine sampling can overflow, mostly early in training
            logger.log(run.step, {f"sample/nonfinite_{k}": v for k, v in result.nonfinite.items()})
            print(f"note: samples with NaN/Inf values at step {run.step}: {result.nonfinite}")
        return save_grids(result, run_dir / "samples", prefix, sample_labels)

    def save_checkpoint() -> Path:
        run.loader = train_loader.state_dict()
        run.rng = capture_rng(device)
        run.metric_window = window.state_dict()
        return checkpoints.save(run.step, {"strategy": strategy.state_dict(), "run": run.to_dict(),
                                           "config_yaml": to_yaml(cfg), "config_hash": config_hash(cfg)})

    logger.log(run.step, {"model/parameters": num_parameters(unwrapped), "model/train_flops_per_image": flops.train,
                          "train/accumulation_steps": accumulation})
    if run.step == 0 and cfg.eval.at_start:
        run.initial_bits_per_dim = evaluate()

    batches = iter(train_loader)
    window = _Window(device)
    window.load_state_dict(run.metric_window)
    last_checkpoint = None
    while run.step < t.steps:
        lr = schedule.lr(run.step + 1)
        for micro in range(accumulation):
            x, y = next(batches)
            x = corrupt(x.to(device, non_blocking=True), t.noise, t.noise_std)
            y = drop_labels(y.to(device, non_blocking=True), t.label_drop) if conditional else None
            # Gradients are reduced across ranks only on the last micro-batch of a step.
            with strategy.accumulating() if micro < accumulation - 1 else contextlib.nullcontext():
                with precision.autocast(device):
                    z, logdets = strategy.model(x, y)
                    loss = TarFlow.loss(z, logdets)
                strategy.backward(loss / accumulation)
            window.add_micro(loss.detach(), 0.5 * z.detach().float().pow(2).mean(), logdets.detach().mean(),
                             1.0 / accumulation)
        result = strategy.step(lr, cfg.optim.grad_clip, window.step_loss_finite())
        run.step += 1
        run.images_seen += t.global_batch
        window.end_step(result.grad_norm, result.applied, t.global_batch)
        if result.applied:
            run.nonfinite_consecutive = 0
        else:
            run.nonfinite_total += 1
            run.nonfinite_consecutive += 1
            if run.nonfinite_consecutive >= t.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{run.nonfinite_consecutive} consecutive steps had a NaN/Inf loss or gradient (step {run.step}); "
                    f"stopping without a checkpoint. Lower optim.lr, enable optim.grad_clip, or check the data. "
                    f"The last good checkpoint is in {checkpoints.directory}.")

        if run.step % cfg.logging.every == 0 or run.step == t.steps:
            metrics = window.flush(lr)
            metrics["train/tokens_per_second"] = metrics["train/images_per_second"] * cfg.model.num_patches
            if peak:
                metrics["train/mfu"] = mfu(metrics["train/images_per_second"] * flops.train, peak * world_size)
            if run.nonfinite_total:
                metrics["train/nonfinite_steps"] = run.nonfinite_total
            logger.log(run.step, metrics)
        if cfg.eval.every and run.step % cfg.eval.every == 0 and run.step < t.steps:
            evaluate()
        if cfg.sample.every and run.step % cfg.sample.every == 0 and run.step < t.steps:
            sample(f"step{run.step:08d}_")
        if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0:
            last_checkpoint = save_checkpoint()

    final_bpd = evaluate()
    grids = sample("final_")
    if last_checkpoint is None or checkpoints.steps()[-1:] != [run.step]:
        last_checkpoint = save_checkpoint()
    else:
        last_checkpoint = checkpoints.path_for(run.step)
    logger.close()
    result = TrainResult(run_dir=run_dir, step=run.step, initial_bits_per_dim=run.initial_bits_per_dim,
                         final_bits_per_dim=final_bpd, checkpoint=last_checkpoint, sample_grids=grids,
                         nonfinite_steps=run.nonfinite_total, seconds=time.perf_counter() - started)
    atomic_write_text(run_dir / "summary.json", json.dumps(
        {k: str(v) if isinstance(v, Path) else ([str(p) for p in v] if isinstance(v, list) else v)
         for k, v in result.__dict__.items()}, indent=2) + "\n")
    return result


def _plain(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


class _Window:
    """Metric sums between two log lines, kept on the device: no host sync per step beyond the finite check.
    A skipped (non-finite) step is left out of the averages."""

    def __init__(self, device: torch.device):
        self.device = device
        self._step = torch.zeros(3, dtype=torch.float64, device=device)  # loss, prior term, log-det term
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.grad_norm, self.steps, self.applied, self.images = 0.0, 0, 0, 0
        self.started = time.perf_counter()

    def add_micro(self, loss, prior, logdet, weight: float) -> None:
        self._step += torch.stack([loss, prior, logdet]).double() * weight

    def step_loss_finite(self) -> torch.Tensor:
        return torch.isfinite(self._step[0])

    def end_step(self, grad_norm: float, applied: bool, images: int) -> None:
        self.steps += 1
        self.images += images
        if applied:
            self.applied += 1
            self.grad_norm += grad_norm
            self.sums += self._step
        self._step.zero_()

    def state_dict(self) -> dict:
        """Saved with checkpoints so that a resumed run's first log line averages the same steps."""
        return {"sums": self.sums.tolist(), "grad_norm": self.grad_norm, "steps": self.steps,
                "applied": self.applied, "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.device)
            self.grad_norm, self.steps = state["grad_norm"], state["steps"]
            self.applied, self.images = state["applied"], state["images"]

    def flush(self, lr: float) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        loss, prior, logdet = (self.sums / max(self.applied, 1)).tolist()
        metrics = {"train/loss": loss, "train/bits_per_dim": loss_to_bits_per_dim(loss), "train/prior": prior,
                   "train/logdet": logdet, "train/lr": lr, "train/grad_norm": self.grad_norm / max(self.applied, 1),
                   "train/images_per_second": self.images / elapsed}
        self._reset()
        return metrics
