"""The progress of ``tarflow data write``: a tqdm bar (images, rate, ETA) on a terminal; in a log file (stderr not a
terminal: a batch job, a pipe) one plain line a minute, since a bar's carriage returns would fill it with noise and a
write of hours should still show it is alive; nothing at all when disabled."""

from __future__ import annotations

import sys
import time

PLAIN_LINE_EVERY = 60.0  # seconds between lines in a log file


class WriteProgress:
    def __init__(self, total: int, done: int = 0, *, enabled: bool = True, stream=None,
                 every: float = PLAIN_LINE_EVERY):
        self.total, self.done, self.every = total, done, every
        self.stream = stream if stream is not None else sys.stderr
        self.label = ""
        self._bar = None
        self._plain = enabled and not _is_terminal(self.stream)
        self._start = self._last_line = time.monotonic()
        self._first = done
        if enabled and not self._plain:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="img", file=self.stream, dynamic_ncols=True,
                             smoothing=0.05)

    def describe(self, label: str) -> None:
        self.label = label
        if self._bar is not None:
            self._bar.set_description(label, refresh=False)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._plain and time.monotonic() - self._last_line >= self.every:
            self._last_line = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """``train: 12800/1281167 images (1.0%), 843 img/s, eta 25:04``: the rate over this run's images only."""
        from tqdm import tqdm

        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.done - self._first) / elapsed
        eta = tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {self.done}/{self.total} images ({percent:.1f}%), {rate:.0f} img/s, "
                f"eta {eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
