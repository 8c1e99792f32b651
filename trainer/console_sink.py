"""The console: one progress line per log interval, and one labelled line for each other record.

A record holding a training loss (``train/loss``, or a bare ``loss``) is a *progress line*: ``step 120/1000 12.0%
[##--------] loss 3.1234 bpd 4.5120 lr 1.00e-04 gnorm 0.532 img/s 1234.5 mfu 41.2% eta 5m10s``. Any other record is
labelled by the section of its keys and says its own step — ``eval step 250/1000: held-out bpd 5.1234 over 180
images``, ``checkpoint step 250 committed: 1.2 MB in 0.8 s (training waited 0.05 s)`` — so a record reported later
than its step (a checkpoint's, once its background upload is done) never looks like progress going back. A record
with nothing to show prints nothing: there are no bare ``step N/M`` lines. Lines are printed with ``flush=True`` so
that they appear promptly in batch-system log files.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Mapping

# (key, label, format) of the progress line, in printing order; keys are matched by their last part.
_PROGRESS_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", "{:.4f}"),
    ("bits_per_dim", "bpd", "{:.4f}"),
    ("lr", "lr", "{:.2e}"),
    ("grad_norm", "gnorm", "{:.3g}"),
    ("images_per_second", "img/s", "{:.1f}"),
    ("mfu", "mfu", "{:.1%}"),  # a fraction
    ("nonfinite_steps", "nan-skipped", "{:.0f}"),
    ("skipped_corrupt", "corrupt", "{:.0f}"),
)
_PROGRESS_FORMATS = {key: (i, label, fmt) for i, (key, label, fmt) in enumerate(_PROGRESS_FIELDS)}


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    raise AssertionError("unreachable")


def _sections(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"eval/bits_per_dim": x}`` → ``{"eval": {"bits_per_dim": x}}``; keys without a section are ``train``'s."""
    out: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        section, _, key = name.rpartition("/")
        out.setdefault(section or "train", {})[key] = float(value)
    return out


def _values(values: Mapping[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in values.items())


def _generic(values: Mapping[str, float]) -> str:
    return f": {_values(values)}"


def _eval_text(values: Mapping[str, float]) -> str:
    parts = [":"]
    if "bits_per_dim" in values:
        parts.append(f"held-out bpd {values['bits_per_dim']:.4f}")
    if "bits_per_dim_ema" in values:
        parts.append(f"(weight average {values['bits_per_dim_ema']:.4f})")
    if "images" in values:
        parts.append(f"over {values['images']:.0f} images")
    rest = {k: v for k, v in values.items() if k not in ("bits_per_dim", "bits_per_dim_ema", "images")}
    return " ".join(parts + ([_values(rest)] if rest else []))


def _checkpoint_text(values: Mapping[str, float]) -> str:
    if "failed_step" in values:
        return " NOT committed (see the warning above); the previous checkpoint is intact"
    size = f"{format_bytes(values['bytes'])} " if "bytes" in values else ""
    waited = f" (training waited {values['blocked_seconds']:.2f} s)" if "blocked_seconds" in values else ""
    return f" committed: {size}in {values.get('save_seconds', math.nan):.2f} s{waited}"


# section → (label, what follows "<label> step N/M"); sections not listed print their values as they are.
_LABELLED: dict[str, tuple[str, Callable[[Mapping[str, float]], str]]] = {
    "eval": ("eval", _eval_text),
    "checkpoint": ("checkpoint", _checkpoint_text),
    "sample": ("samples", _generic),
}


class ConsoleSink:
    """The console (see the module doc). ``bar_width=0`` leaves the bar out; the ETA extrapolates the step rate seen
    since the first progress line of this process (so a resumed run does not count the steps it skipped).
    ``extra=False`` leaves out of the progress line the metrics it has no label for; records of ``quiet`` sections
    (``model``: the startup summary shows it) are not printed at all."""

    def __init__(self, total_steps: int | None = None, bar_width: int = 0, extra: bool = True,
                 quiet: tuple[str, ...] = (), file=None):
        self.total_steps = total_steps
        self.bar_width = bar_width
        self.extra = extra
        self.quiet = tuple(quiet)
        self.file = file  # None: sys.stdout at print time (so pytest's capsys and redirections see it)
        self._first: tuple[int, float] | None = None

    def lines(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        sections = _sections(metrics)
        if "loss" in sections.get("train", {}):
            return [self._progress(step, sections)]
        out = []
        for section, values in sections.items():
            if section in self.quiet or section == "train":  # train values without a loss: setup, not progress
                continue
            label, text = _LABELLED.get(section, (section, _generic))
            out.append(f"{label} step {self._of_total(step)}{text(values)}")
        return out

    def _of_total(self, step: int) -> str:
        return f"{step}/{self.total_steps}" if self.total_steps else f"{step}"

    def _progress(self, step: int, sections: Mapping[str, Mapping[str, float]]) -> str:
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
        total = self.total_steps
        parts = [f"step {self._of_total(step)}"]
        if total:
            fraction = min(max(step / total, 0.0), 1.0)
            parts.append(f"{100 * fraction:.1f}%")
            if self.bar_width > 0:
                filled = int(round(fraction * self.bar_width))
                parts.append("[" + "#" * filled + "-" * (self.bar_width - filled) + "]")
        known, other = [], []
        for section, values in sections.items():
            prefix = "" if section == "train" else f"{section} "
            for key, value in values.items():
                if key in _PROGRESS_FORMATS:
                    order, label, fmt = _PROGRESS_FORMATS[key]
                    known.append((order, f"{prefix}{label} {fmt.format(value)}"))
                elif self.extra:
                    other.append(f"{prefix}{key} {value:.4g}")
        parts.extend(text for _, text in sorted(known, key=lambda item: item[0]))
        parts.extend(other)
        first_step, first_time = self._first
        if total and first_step < step < total:
            rate = (step - first_step) / (now - first_time) if now > first_time else math.inf
            parts.append(f"eta {format_duration((total - step) / rate)}")
        return " ".join(parts)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for line in self.lines(step, metrics):
            print(line, file=self.file if self.file is not None else sys.stdout, flush=True)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "console"
