"""Where training metrics go, fanned out by ``MetricLogger``: the console (``console_sink``), a JSON-lines file
(here), TensorBoard (``tensorboard_sink``) and Weights & Biases (``wandb_sink``).

Sinks are created on the rank that logs (rank 0); none of them talks to other processes. A record is logged under the
step it belongs to, which is not always the latest step: a checkpoint's record arrives once its background upload is
done, after later steps' records. Every sink keeps it under its own step (the jsonl file is therefore not sorted by
step; TensorBoard and W&B plot by step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class MetricSink(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class ImageSink(Protocol):
    """A sink that also takes images: tag → an (H, W, 3) uint8 grid."""

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None: ...


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

    def describe(self) -> str:
        return str(self.path)


def _step_after(line: str, step: int) -> bool:
    try:
        return int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):
        return False  # keep lines we cannot interpret rather than lose them


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

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """To the sinks that take images (``ImageSink``); the others have the PNG files."""
        for sink in self.sinks:
            if isinstance(sink, ImageSink):
                sink.log_images(step, images)

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
