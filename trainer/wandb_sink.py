"""Weights & Biases: scalars and sample grids of the run, offline unless asked otherwise, never failing training.

Which W&B run this is (project, entity, group, tags, name, mode, directory) is resolved once, in
``resolve_wandb_options``: a non-empty ``logging.*`` value is explicit and wins; an empty one takes the ``WANDB_*``
environment variable wandb itself reads; without either, our default. ``WANDB_MODE=disabled`` always turns W&B off:
it is the user's explicit opt-out, and ``wandb.init(mode=...)`` would otherwise override it.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import LoggingConfig

RUN_ID_FILE = "wandb_run_id"
DEFAULT_PROJECT = "tarflow"
DEFAULT_MODE = "offline"  # nothing leaves the machine unless the user chooses online


@dataclass(frozen=True)
class WandbOptions:
    """The resolved ``wandb.init`` arguments that say which run this is and where it goes."""

    project: str
    mode: str                   # offline | online | disabled
    name: str
    directory: str              # wandb writes under directory/wandb
    entity: str | None = None   # None: the API key's default entity
    group: str | None = None
    tags: tuple[str, ...] = ()


def resolve_wandb_options(cfg: LoggingConfig, run_dir: str | os.PathLike,
                          environ: Mapping[str, str] = os.environ) -> WandbOptions:
    """Config value if set, else the ``WANDB_*`` variable, else our default (see the module doc)."""
    def pick(value: str, variable: str, default: str | None) -> str | None:
        return value or environ.get(variable) or default

    mode = pick(cfg.wandb_mode, "WANDB_MODE", DEFAULT_MODE).lower()
    if environ.get("WANDB_MODE", "").lower() == "disabled":
        mode = "disabled"
    tags = tuple(cfg.wandb_tags) or tuple(t.strip() for t in environ.get("WANDB_TAGS", "").split(",") if t.strip())
    return WandbOptions(project=pick(cfg.wandb_project, "WANDB_PROJECT", DEFAULT_PROJECT), mode=mode,
                        name=pick(cfg.run_name, "WANDB_NAME", Path(run_dir).name),
                        directory=environ.get("WANDB_DIR") or str(run_dir),
                        entity=pick(cfg.wandb_entity, "WANDB_ENTITY", None),
                        group=pick(cfg.wandb_group, "WANDB_RUN_GROUP", None), tags=tags)


class WandbSink:
    """Logs scalars and sample grids (``wandb.Image``) to one W&B run.

    W&B is optional and must never block or fail training: if wandb is not installed, ``wandb.init`` fails or
    times out (``init_timeout`` seconds), or a later call raises, this sink prints one warning to stderr and
    becomes a no-op. ``close`` waits at most ``finish_timeout`` seconds for uploads (offline data is on disk).

    The run id is kept in ``run_dir/wandb_run_id`` (``$WANDB_RUN_ID``, when set, is taken and kept there), and
    passed with ``resume="allow"``, so a resumed run continues the same W&B run. Metrics are plotted against a
    ``step`` metric rather than wandb's own step counter, which only accepts increasing steps and would drop what a
    run resumed from an earlier checkpoint logs again, and a checkpoint's record reported after later steps.
    W&B's capture of the console is off (``console="off"``): the console sink and the job's log have it.

    ``init_kwargs`` are the arguments ``wandb.init`` was called with and ``run`` the run it returned (None when
    disabled): what a caller, or a test, can check without reading wandb's files."""

    def __init__(self, options: WandbOptions, run_dir: str | os.PathLike, config: Mapping[str, Any],
                 init_timeout: float = 30.0, finish_timeout: float = 60.0, environ: Mapping[str, str] = os.environ):
        self.options = options
        self.run: Any = None
        self.init_kwargs: dict[str, Any] = {}
        self.enabled = False
        self._wandb: Any = None
        try:
            import wandb

            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            Path(options.directory).mkdir(parents=True, exist_ok=True)
            self.run_id = _load_or_create_run_id(run_dir / RUN_ID_FILE, environ.get("WANDB_RUN_ID", ""))
            self.init_kwargs = dict(
                project=options.project, entity=options.entity, group=options.group, tags=list(options.tags),
                name=options.name, mode=options.mode, dir=options.directory, id=self.run_id, resume="allow",
                config=dict(config))
            self.run = wandb.init(**self.init_kwargs, settings=wandb.Settings(
                init_timeout=init_timeout, finish_timeout=finish_timeout, console="off"))
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
            self._wandb = wandb
            self.enabled = True
        except (Exception, SystemExit) as error:  # noqa: BLE001 - anything wandb raises, timeouts included
            self._disable(error, "init")

    def _disable(self, error: BaseException, where: str) -> None:
        self.enabled = False
        print(f"warning: W&B logging disabled ({where} failed: {type(error).__name__}: {error}); "
              f"training continues", file=sys.stderr, flush=True)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        try:
            self.run.log({"step": int(step), **{k: float(v) for k, v in metrics.items()}})
        except Exception as error:  # noqa: BLE001
            self._disable(error, "log")

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """``images``: tag → an (H, W, 3) uint8 grid."""
        if not self.enabled:
            return
        try:
            self.run.log({"step": int(step), **{k: self._wandb.Image(v, caption=f"{k} at step {step}")
                                                for k, v in images.items()}})
        except Exception as error:  # noqa: BLE001
            self._disable(error, "log of images")

    def close(self) -> None:
        run, self.run = self.run, None
        was_enabled, self.enabled = self.enabled, False
        if run is None or not was_enabled:
            return
        try:
            run.finish()
        except Exception as error:  # noqa: BLE001
            print(f"warning: W&B finish failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)

    def describe(self) -> str:
        o = self.options
        where = "/".join(p for p in (o.entity, o.project) if p)
        group = f", group {o.group}" if o.group else ""
        return f"wandb {o.mode} {where} run {o.name}{group}" if self.enabled else "wandb (disabled)"


def _load_or_create_run_id(path: Path, preferred: str = "") -> str:
    """The stored run id; ``preferred`` ($WANDB_RUN_ID) replaces it; else a new one, stored."""
    if not preferred and path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    run_id = preferred or secrets.token_hex(8)  # wandb ids: lowercase letters and digits
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return run_id

