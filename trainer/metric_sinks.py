"""Where training metrics go: the console, a JSON-lines file, Weights & Biases — fanned out by ``MetricLogger``.

Metric names the console formats specially (others are printed generically): ``loss``, ``bits_per_dim``, ``lr``,
``grad_norm``, ``images_per_second``, ``mfu`` (a fraction, printed as a percentage). Sinks are created on the
rank that logs (rank 0); none of them talks to other processes.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable


@runtime_checkable
class MetricSink(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------ console
# (key, label, format) in printing order.
_CONSOLE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", "{:.4f}"),
    ("bits_per_dim", "bpd", "{:.4f}"),
    ("lr", "lr", "{:.2e}"),
    ("grad_norm", "gnorm", "{:.3g}"),
    ("images_per_second", "img/s", "{:.1f}"),
)


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ConsoleSink:
    """One compact line per ``log``, e.g. ``step 120/1000 12.0% [##--------] loss 3.1234 bpd 4.5120 lr 1.00e-04
    gnorm 0.532 img/s 1234.5 mfu 41.2% eta 5m10s``. Printed with ``flush=True`` so that lines appear promptly
    in batch-system log files. ``bar_width=0`` leaves the bar out; the ETA extrapolates the step rate seen
    since the first line of this process (so a resumed run does not count the steps it skipped)."""

    def __init__(self, total_steps: int | None = None, bar_width: int = 0, extra: bool = True, file=None):
        self.total_steps = total_steps
        self.bar_width = bar_width
        self.extra = extra
        self.file = file  # None: sys.stdout at print time (so pytest's capsys and redirections see it)
        self._first: tuple[int, float] | None = None

    def format(self, step: int, metrics: Mapping[str, float]) -> str:
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
        total = self.total_steps
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if total:
            fraction = min(max(step / total, 0.0), 1.0)
            parts.append(f"{100 * fraction:.1f}%")
            if self.bar_width > 0:
                filled = int(round(fraction * self.bar_width))
                parts.append("[" + "#" * filled + "-" * (self.bar_width - filled) + "]")
        # Keys may carry a section ("train/loss", "eval/bits_per_dim"): matched by their last part, and labelled
        # with the section unless it is "train".
        formats = {key: (label, fmt) for key, label, fmt in _CONSOLE_FIELDS}
        formats["mfu"] = ("mfu", "{:.1%}")
        order = {key: i for i, key in enumerate(formats)}
        known, other = [], []
        for name, value in metrics.items():
            section, _, key = name.rpartition("/")
            prefix = "" if section in ("", "train") else f"{section} "
            if key in formats:
                label, fmt = formats[key]
                known.append((order[key], f"{prefix}{label} {fmt.format(float(value))}"))
            elif self.extra:
                other.append(f"{name} {float(value):.4g}")
        parts.extend(text for _, text in sorted(known, key=lambda item: item[0]))
        parts.extend(other)
        first_step, first_time = self._first
        if total and step > first_step and step < total:
            rate = (step - first_step) / (now - first_time) if now > first_time else math.inf
            parts.append(f"eta {_format_duration((total - step) / rate)}")
        return " ".join(parts)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        print(self.format(step, metrics), file=self.file if self.file is not None else sys.stdout, flush=True)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------ JSON lines
class JsonlSink:
    """Appends ``{"step": step, **metrics}`` as one JSON line per ``log``, flushed each time, so the file is
    readable while the run goes on and survives a crash up to the last line.

    Opening an existing file appends: a resumed run continues the same file. On opening, a torn last line (a
    crash mid-write) is dropped, and with ``truncate_after_step`` so are the records of steps after it — the
    steps a run resumed from that checkpoint step will log again. Non-finite values are written as Python's
    json does (``NaN``, ``Infinity``), which ``json.loads`` reads back."""

    def __init__(self, path: str | os.PathLike, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._repair(truncate_after_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def _repair(self, truncate_after_step: int | None) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")[:-1]  # the part after the last newline is empty or a torn record
        if truncate_after_step is not None:
            lines = [line for line in lines if not _step_after(line, truncate_after_step)]
        repaired = "".join(line + "\n" for line in lines)
        if repaired != text:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(repaired, encoding="utf-8")
            os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _step_after(line: str, step: int) -> bool:
    try:
        return int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):
        return False  # keep lines we cannot interpret rather than lose them


# ------------------------------------------------------------------------------------------------ wandb
RUN_ID_FILE = "wandb_run_id"


class WandbSink:
    """Logs to Weights & Biases, offline by default (``mode="online"`` to upload; ``"disabled"``, or
    ``WANDB_MODE=disabled`` in the environment, for nothing).

    W&B is optional and must never block or fail training: if wandb is not installed, ``wandb.init`` fails or
    times out (``init_timeout`` seconds), or a later call raises, this sink prints one warning to stderr and
    becomes a no-op. ``close`` waits at most ``finish_timeout`` seconds for uploads (offline data is on disk).

    Files go under ``run_dir`` (``run_dir/wandb/offline-run-*`` offline). The run id is kept in
    ``run_dir/wandb_run_id``, and passed with ``resume="allow"``, so a resumed run continues the same W&B run.
    Metrics are plotted against a ``step`` metric rather than wandb's own step counter, which only accepts
    increasing steps and would drop what a run resumed from an earlier checkpoint logs again.
    W&B's capture of the console is off (``console="off"``): the console sink and the job's log have it."""

    def __init__(self, project: str, run_dir: str | os.PathLike, config: Mapping[str, Any],
                 run_name: str | None = None, mode: str = "offline", init_timeout: float = 30.0,
                 finish_timeout: float = 60.0):
        self._run = None
        self.enabled = False
        self.run_dir = Path(run_dir)
        try:
            import wandb

            if os.environ.get("WANDB_MODE", "").lower() == "disabled":
                mode = "disabled"  # the user's explicit opt-out; wandb.init(mode=...) would override it
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run_id = _load_or_create_run_id(self.run_dir / RUN_ID_FILE)
            self._run = wandb.init(
                project=project, dir=str(self.run_dir), config=dict(config), name=run_name, id=self.run_id,
                resume="allow", mode=mode,
                settings=wandb.Settings(init_timeout=init_timeout, finish_timeout=finish_timeout,
                                        console="off"),
            )
            self._run.define_metric("step")
            self._run.define_metric("*", step_metric="step")
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
            self._run.log({"step": int(step), **{k: float(v) for k, v in metrics.items()}})
        except Exception as error:  # noqa: BLE001
            self._disable(error, "log")

    def close(self) -> None:
        run, self._run = self._run, None
        was_enabled, self.enabled = self.enabled, False
        if run is None or not was_enabled:
            return
        try:
            run.finish()
        except Exception as error:  # noqa: BLE001
            print(f"warning: W&B finish failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def _load_or_create_run_id(path: Path) -> str:
    if path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(8)  # wandb ids: lowercase letters and digits
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return run_id


# ------------------------------------------------------------------------------------------------ fan-out
class MetricLogger:
    """Sends each ``log`` to every sink, with values converted to plain floats once (tensors and numpy scalars
    are accepted; converting a CUDA tensor synchronises, so call ``log`` only on logging steps)."""

    def __init__(self, sinks: Iterable[MetricSink]):
        self.sinks = list(sinks)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        for sink in self.sinks:
            sink.log(step, values)

    def close(self) -> None:
        """Close every sink, even if one raises (the first error is re-raised afterwards)."""
        first_error: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as error:  # noqa: BLE001
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
