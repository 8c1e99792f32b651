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

from cluster.env import ProcessEnv, discover
from cluster.run_contract import PREEMPTED_FILE, SUMMARY_FILE  # the run contract launchers read
from data_pipeline import build_loader, dataset_info
from models import TarFlow, num_parameters

from .activation_checkpointing import apply_activation_checkpointing, compile_layers
from .checkpoint import atomic_write_text
from .checkpoint.run_checkpointer import RunCheckpointer
from .config import Config, to_yaml, validate
from .console_sink import ConsoleSink
from .distributed import all_reduce_sum, process_group
from .ema import eval_weights
from .evaluation.bpd import collective_bits_per_dim
from .evaluation.grids import grid_pictures, grid_settings, sample_grids, save_grids
from .evaluation.sampler import fixed_noise_and_labels
from .flops import default_peak_flops, flops_per_image, mfu
from .metric_sinks import JsonlSink, MetricLogger
from .noise import corrupt, denoise_std, drop_labels, sample_generators
from .optim import build_schedule
from .preemption import PreemptionGuard
from .resume_policy import CONFIG_HISTORY_FILE, history_jsonl
from .run_state import seed_everything
from .runtime import resolve_device, resolve_precision
from .startup_summary import StartupSummary
from .strategies import DISTRIBUTED, check_strategy_config, strategy_from_config
from .tensorboard_sink import TensorBoardSink, tensorboard_log_dir
from .wandb_sink import WandbSink, resolve_wandb_options

LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)
LOG_BIN = math.log(128.0)


class NonFiniteLossError(RuntimeError):
    """The run kept producing NaN/Inf losses or gradients; no checkpoint was written from that state."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    initial_bits_per_dim: float | None
    final_bits_per_dim: float | None  # None: the run stopped early, or had already finished
    checkpoint: str  # the last checkpoint's URI
    sample_grids: list[Path]
    nonfinite_steps: int
    seconds: float
    preempted: str | None = None  # why the run stopped early (a signal, the time limit), or None
    already_finished: bool = False  # the checkpoint had reached train.steps: nothing was done, nothing written
    weights: str = "raw"  # which weights final_bits_per_dim and the grids are of: ema (the average) | raw


def loss_to_bits_per_dim(loss_nats: float) -> float:
    """The training loss omits ½ln2π; with uniform dequantisation this is the bits/dim of the 8-bit data."""
    return (loss_nats + LOG_2PI_HALF + LOG_BIN) / math.log(2.0)


def check_model_matches_data(cfg: Config) -> None:
    shape, num_classes = dataset_info(cfg.data)
    m = cfg.model
    if shape != (m.in_channels, m.img_size, m.img_size):
        where = f"data.source={cfg.data.source!r}" if cfg.data.format == "embedded" else f"data.uri={cfg.data.uri!r}"
        raise ValueError(f"model.in_channels/img_size = {m.in_channels}/{m.img_size} do not match the data's images "
                         f"{shape} ({where})")
    if m.num_classes not in (0, num_classes):
        raise ValueError(f"model.num_classes={m.num_classes} but the data has {num_classes} classes; use "
                         f"{num_classes} (class-conditional) or 0 (unconditional)")


class Trainer:
    """One training run: built from a validated config, resumed from the newest checkpoint when there is one.

    ``run()`` trains to ``train.steps``; evaluation, samples and checkpoints happen at their intervals and at the end.
    """

    def __init__(self, cfg: Config, env: ProcessEnv, device: torch.device):
        self.env, self.world_size, self.rank = env, env.world_size, env.rank
        self.cfg, t = cfg, cfg.train
        self.device = device
        self.precision = resolve_precision(t.precision, self.device, t.noise)
        self.run_dir = Path(t.run_dir)
        nodes = self.world_size // env.local_world_size
        self.strategy = strategy_from_config(cfg, self.device, self.precision.autocast_dtype, self.world_size, nodes)
        self.checkpoints = RunCheckpointer(cfg, env, self.strategy, device)

        seed_everything(t.seed)  # the same initial model on every rank
        model = TarFlow(cfg.model)
        apply_activation_checkpointing(model, t.activation_checkpointing)  # checkpointing → compile → sharding
        if t.compile:
            compile_layers(model)
        self.strategy.setup(model, cfg.optim)
        if t.ema.decay > 0:
            self.strategy.attach_ema(t.ema)
        self.weights = eval_weights(cfg)  # which weights evaluation and grids use: ema | raw
        self.model = self.strategy.unwrapped
        self.schedule = build_schedule(cfg)
        self.accumulation = t.global_batch // (t.micro_batch * self.world_size)
        self.train_loader = build_loader(cfg.data, "train", t.micro_batch, seed=t.seed, rank=self.rank,
                                         world_size=self.world_size, global_batch=t.global_batch)
        self.heldout_loader = build_loader(cfg.data, "heldout", cfg.eval.batch_size, seed=0, rank=self.rank,
                                           world_size=self.world_size)
        self.window = _Window(self.device)
        self.state = self.checkpoints.resume(self.train_loader, self.window)
        # Written only now: a refused resume raised above and left the run directory as it was, a finished run
        # writes nothing, and config.yaml is the config the run is running under from here on.
        if env.is_main and not self.checkpoints.finished:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(cfg))
            atomic_write_text(self.run_dir / CONFIG_HISTORY_FILE, history_jsonl(self.state.config_history))
            (self.run_dir / PREEMPTED_FILE).unlink(missing_ok=True)  # this attempt's outcome is not known yet
        self.logger = self._build_logger()
        self.flops = flops_per_image(cfg.model)
        self.peak_flops = cfg.logging.peak_flops or default_peak_flops(
            self.device, self.precision.autocast_dtype or torch.float32)
        self.sample_noise, self.sample_labels = fixed_noise_and_labels(self.model, cfg.sample.num, cfg.sample.seed)

    # ---------------------------------------------------------------- setup
    def _build_logger(self) -> MetricLogger:
        cfg = self.cfg
        if not self.env.is_main or self.checkpoints.finished:  # a finished run's metrics files stay as they are
            return MetricLogger([])
        log = cfg.logging
        # The model record (parameters, FLOPs) is in the startup summary: not printed again.
        sinks = [ConsoleSink(total_steps=cfg.train.steps, bar_width=20 if log.progress else 0, extra=False,
                             quiet=("model",)),
                 # Records past the resumed step are dropped: this run logs those steps again.
                 JsonlSink(self.run_dir / "metrics.jsonl", truncate_after_step=self.state.step)]
        if log.tensorboard:
            sinks.append(TensorBoardSink(tensorboard_log_dir(log, self.run_dir), resumed_step=self.state.step))
        if log.wandb:
            sinks.append(WandbSink(resolve_wandb_options(log, self.run_dir), self.run_dir,
                                   config=OmegaConf.to_container(OmegaConf.structured(cfg))))
        return MetricLogger(sinks)

    def startup_summary(self) -> StartupSummary:
        cfg, device = self.cfg, self.device
        name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
        d = cfg.data
        shape, num_classes = dataset_info(d)
        return StartupSummary(
            run_dir=str(self.run_dir), resumed_step=self.state.step,
            resumed_from=self.checkpoints.last_uri if self.state.step else "",
            parameters=num_parameters(self.model), train_flops_per_image=self.flops.train, device=name,
            world_size=self.world_size, nodes=self.env.num_nodes, strategy=cfg.train.strategy,
            precision=self.precision.name, micro_batch=cfg.train.micro_batch, accumulation=self.accumulation,
            global_batch=cfg.train.global_batch,
            data=f"embedded {d.source}" if d.format == "embedded" else f"{d.format} {d.uri}",
            train_images=self.train_loader.num_samples, heldout_images=self.heldout_loader.num_samples,
            image_shape=tuple(shape), num_classes=num_classes, steps=cfg.train.steps,
            checkpoints=(f"every {cfg.checkpoint.every} steps and at the end" if cfg.checkpoint.every else
                         "at the end") + f", to {self.checkpoints}",
            outputs=tuple(sink.describe() for sink in self.logger.sinks if hasattr(sink, "describe")))

    # ---------------------------------------------------------------- the run
    def run(self) -> TrainResult:
        started = time.perf_counter()
        cfg, state = self.cfg, self.state
        if self.checkpoints.finished:  # resume() said so; no evaluation, samples, checkpoint or summary again
            return TrainResult(run_dir=self.run_dir, step=state.step, initial_bits_per_dim=state.initial_bits_per_dim,
                               final_bits_per_dim=None, checkpoint=self.checkpoints.last_uri, sample_grids=[],
                               nonfinite_steps=state.nonfinite_total, seconds=time.perf_counter() - started,
                               already_finished=True, weights=self.weights)
        guard = PreemptionGuard(cfg.preemption.signals, 60.0 * cfg.preemption.time_limit_minutes)
        final_bpd, grids, stopped = None, [], None
        try:
            if self.env.is_main:
                print(self.startup_summary().text(), flush=True)
            self.logger.log(state.step, {"model/parameters": num_parameters(self.model),
                                         "model/train_flops_per_image": self.flops.train,
                                         "train/accumulation_steps": self.accumulation})
            if state.step == 0 and cfg.eval.at_start:
                state.initial_bits_per_dim = self.evaluate()
            batches = iter(self.train_loader)
            while state.step < cfg.train.steps:
                lr = self.train_step(batches)
                self._after_step(lr)
                stopped = guard.requested(self.device)
                if stopped:
                    if self.env.is_main:
                        print(f"stopping at step {state.step}: {stopped}; saving a checkpoint", flush=True)
                    break
            if not stopped:
                final_bpd = self.evaluate()
                grids = self.sample("final_")
            if self.checkpoints.last_saved_step != state.step:
                self.save_checkpoint()
            self._log_save(self.checkpoints.finish(required=True))
        finally:
            self.checkpoints.wait()  # never leave while an upload is in flight
            guard.close()
            self.logger.close()
        result = TrainResult(run_dir=self.run_dir, step=state.step, initial_bits_per_dim=state.initial_bits_per_dim,
                             final_bits_per_dim=final_bpd, checkpoint=self.checkpoints.last_uri,
                             sample_grids=grids, nonfinite_steps=state.nonfinite_total,
                             seconds=time.perf_counter() - started, preempted=stopped, weights=self.weights)
        if self.env.is_main and stopped:
            # torchrun exits 1 whatever its workers' codes, so launchers also look for this file to requeue.
            atomic_write_text(self.run_dir / PREEMPTED_FILE, json.dumps(
                {"step": state.step, "reason": stopped, "checkpoint": result.checkpoint,
                 "exit_code": cfg.preemption.exit_code}) + "\n")
        if self.env.is_main:
            atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(
                {k: str(v) if isinstance(v, Path) else ([str(p) for p in v] if isinstance(v, list) else v)
                 for k, v in result.__dict__.items()}, indent=2) + "\n")
        return result

    def train_step(self, batches) -> float:
        """One optimizer step over ``accumulation`` micro-batches; returns the learning rate it used."""
        t, state = self.cfg.train, self.state
        step = state.step + 1
        lr = self.schedule.lr(step)
        for micro in range(self.accumulation):
            x, y, indices = next(batches)
            # Per-sample draws keyed by (seed, step, index): the same on any launch (trainer.noise).
            x = corrupt(x.to(self.device, non_blocking=True), t.noise, t.noise_std,
                        sample_generators("noise", t.seed, step, indices, self.device))
            if not self.model.config.num_classes:
                y = None
            elif t.label_drop > 0:
                y = drop_labels(y.to(self.device, non_blocking=True), t.label_drop,
                                sample_generators("label_drop", t.seed, step, indices, self.device))
            else:
                y = y.to(self.device, non_blocking=True)
            # Gradients are reduced across ranks only on the last micro-batch of a step.
            last = micro == self.accumulation - 1
            with self.strategy.accumulating() if not last else contextlib.nullcontext():
                with self.precision.autocast(self.device):
                    z, logdets = self.strategy.model(x, y)
                    loss = TarFlow.loss(z, logdets)
                self.strategy.backward(loss / self.accumulation)
            self.window.add_micro(loss.detach(), 0.5 * z.detach().float().pow(2).mean(), logdets.detach().mean(),
                                  1.0 / self.accumulation)
        result = self.strategy.step(lr, self.cfg.optim.grad_clip, self.window.step_loss_finite())
        state.step += 1
        state.images_seen += t.global_batch
        self.window.end_step(result.grad_norm, result.applied, t.global_batch)
        if result.applied:
            self.strategy.update_ema(state.step)
            state.nonfinite_consecutive = 0
            return lr
        state.nonfinite_total += 1
        state.nonfinite_consecutive += 1
        if state.nonfinite_consecutive >= t.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{state.nonfinite_consecutive} consecutive steps had a NaN/Inf loss or gradient (step {state.step}); "
                f"stopping without a checkpoint. Lower optim.lr, enable optim.grad_clip, or check the data. "
                f"The last good checkpoint is in {self.checkpoints}.")
        return lr

    def _after_step(self, lr: float) -> None:
        cfg, step = self.cfg, self.state.step
        due = lambda every: every and step % every == 0  # noqa: E731
        if due(cfg.logging.every) or step == cfg.train.steps:
            metrics = self.window.flush(lr, lambda sums: [v / self.world_size
                                                          for v in all_reduce_sum(sums, self.device)])
            metrics["train/tokens_per_second"] = metrics["train/images_per_second"] * cfg.model.num_patches
            if self.peak_flops:
                metrics["train/mfu"] = mfu(metrics["train/images_per_second"] * self.flops.train,
                                           self.peak_flops * self.world_size)
            if self.state.nonfinite_total:
                metrics["train/nonfinite_steps"] = self.state.nonfinite_total
            if self.train_loader.skipped_corrupt:
                metrics["data/skipped_corrupt"] = self.train_loader.skipped_corrupt
            self.logger.log(step, metrics)
        if due(cfg.eval.every) and step < cfg.train.steps:
            self.evaluate()
        if due(cfg.sample.every) and step < cfg.train.steps:
            self.sample(f"step{step:08d}_")
        if due(cfg.checkpoint.every):
            self.save_checkpoint()
        # A save whose background upload is done is reported now, under its own step (not at the next save).
        self._log_save(self.checkpoints.poll())

    # ---------------------------------------------------------------- evaluation, samples, checkpoints
    def evaluate(self) -> float:
        """Each rank evaluates its part of the held-out split; the mean is over all of it. With a weight average,
        both the trained weights (``eval/bits_per_dim``) and the average (``eval/bits_per_dim_ema``) are evaluated;
        the value returned (the summary's) is of ``eval.weights``."""
        cfg = self.cfg.eval
        results = {}
        for weights in ("raw", "ema") if self.strategy.ema is not None else ("raw",):
            with self.strategy.evaluating(weights) as model:
                results[weights], n = collective_bits_per_dim(model, self.heldout_loader, self.device,
                                                              max_images=cfg.max_images, world_size=self.world_size)
        metrics = {"eval/bits_per_dim": results["raw"], "eval/images": n}
        if "ema" in results:
            metrics["eval/bits_per_dim_ema"] = results["ema"]
        self.logger.log(self.state.step, metrics)
        return results[self.weights]

    def sample(self, prefix: str) -> list[Path]:
        """Each rank samples an equal slice of the fixed noise (the last padded by wrapping around, so that sharded
        models see the same collectives everywhere); rank 0 gathers the slices and writes the grids, named after the
        weights they come from (``final_ema_g1.png``)."""
        cfg, t = self.cfg.sample, self.cfg.train
        settings = grid_settings(cfg, denoise_std(t.noise, t.noise_std) if cfg.denoise else None)
        with self.strategy.inference(self.weights) as model:
            result = sample_grids(model, self.sample_noise, self.sample_labels, settings, device=self.device,
                                  precision=self.precision, rank=self.rank, world_size=self.world_size)
        if result is None:
            return []
        if cfg.method != "sequential":  # what the parallel inversion cost: passes summed over the blocks
            self.logger.log(self.state.step, {f"sample/passes_{k}": sum(v) for k, v in result.passes.items()})
        if any(result.nonfinite.values()):  # exp-affine sampling can overflow, mostly early in training
            self.logger.log(self.state.step, {f"sample/nonfinite_{k}": v for k, v in result.nonfinite.items()})
            print(f"note: samples with NaN/Inf values at step {self.state.step}: {result.nonfinite}")
        pictures = grid_pictures(result)
        self.logger.log_images(self.state.step, {f"samples/{self.weights}_{name}": grid
                                                 for name, grid in pictures.items()})
        return save_grids(result, self.run_dir / "samples", f"{prefix}{self.weights}_", self.sample_labels, pictures)

    def save_checkpoint(self) -> None:
        """Collective; training waits only for the staging. A save's record is logged when its upload is done
        (``poll`` at each step boundary, or at the latest when the next save starts)."""
        self._log_save(self.checkpoints.save(self.state, self.train_loader, self.window))

    def _log_save(self, record: dict | None) -> None:
        if record is not None:
            self.logger.log(record["step"], record["metrics"])


def check_launch(cfg: Config, env: ProcessEnv) -> None:
    """Everything that can be checked before a process group exists."""
    check_launch_config(cfg, env)
    check_model_matches_data(cfg)


def check_launch_config(cfg: Config, env: ProcessEnv) -> None:
    """``check_launch`` without reading the data: the config for this launch, the strategy against it."""
    validate(cfg, env.world_size)
    strategy = cfg.train.strategy
    if strategy in DISTRIBUTED and env.scheduler == "none":
        raise ValueError(f"train.strategy={strategy} runs one process per device: launch with torchrun, e.g. "
                         f"`torchrun --nproc_per_node=2 -m tarflow train ...` (or the deepspeed launcher)")
    if strategy not in DISTRIBUTED and env.world_size > 1:
        raise ValueError(f"train.strategy={strategy} but this is one of {env.world_size} processes; choose "
                         f"train.strategy=ddp")
    check_strategy_config(cfg, env.world_size)


def train(cfg: Config, env: ProcessEnv | None = None) -> TrainResult:
    env = discover() if env is None else env
    check_launch(cfg, env)
    device = resolve_device(cfg.train.device, env.local_rank)
    with process_group(env, device):
        return Trainer(cfg, env, device).run()


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

    def flush(self, lr: float, mean_over_ranks) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        loss, prior, logdet = mean_over_ranks((self.sums / max(self.applied, 1)).tolist())
        metrics = {"train/loss": loss, "train/bits_per_dim": loss_to_bits_per_dim(loss), "train/prior": prior,
                   "train/logdet": logdet, "train/lr": lr, "train/grad_norm": self.grad_norm / max(self.applied, 1),
                   "train/images_per_second": self.images / elapsed}
        self._reset()
        return metrics
