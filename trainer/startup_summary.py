"""The startup summary rank 0 prints once before training: what is about to run, where, on what, from where.

Built from values the trainer already has (a model, its FLOP count, the launch, the loaders, the resume decision):
nothing here measures or loads anything, so the summary cannot disagree with what the run does.
"""

from __future__ import annotations

from dataclasses import dataclass


def si(value: float, unit: str = "") -> str:
    """``1234567`` → ``1.23 M``: three significant digits with an SI prefix."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


@dataclass(frozen=True)
class StartupSummary:
    run_dir: str
    resumed_step: int             # 0: a fresh start
    resumed_from: str             # the checkpoint's URI when resumed
    parameters: int
    train_flops_per_image: int    # forward + backward (trainer.flops)
    device: str                   # e.g. "cuda:0 (NVIDIA H200)"
    world_size: int
    nodes: int
    strategy: str
    precision: str
    micro_batch: int
    accumulation: int
    global_batch: int
    data: str                     # "embedded digits", "webdataset s3://bucket/prefix"
    train_images: int
    heldout_images: int
    image_shape: tuple[int, int, int]
    num_classes: int
    steps: int
    checkpoints: str              # where checkpoints go
    outputs: tuple[str, ...]      # where metrics go: the sinks' descriptions

    def lines(self) -> list[str]:
        c, h, w = self.image_shape
        classes = f", {self.num_classes} classes" if self.num_classes else ", unconditional"
        resume = (f"resumed from step {self.resumed_step} ({self.resumed_from})" if self.resumed_step
                  else "fresh start (step 0)")
        plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
        rows = [
            ("run", f"{self.run_dir}: {resume}, to step {self.steps}"),
            ("model", f"{self.parameters:,} parameters ({si(self.parameters)}), "
                      f"{si(self.train_flops_per_image, 'FLOP')} per image per training step (forward + backward)"),
            ("launch", f"{self.device}, {plural(self.world_size, 'rank')} on {plural(self.nodes, 'node')}, "
                       f"strategy {self.strategy}, precision {self.precision}"),
            ("batch", f"{self.global_batch} images per step = {self.micro_batch} per forward × "
                      f"{self.accumulation} accumulation × {plural(self.world_size, 'rank')}"),
            ("data", f"{self.data}: {self.train_images:,} train, {self.heldout_images:,} held-out images "
                     f"({c}×{h}×{w}{classes})"),
            ("checkpoints", self.checkpoints),
            ("metrics", ", ".join(self.outputs)),
        ]
        width = max(len(k) for k, _ in rows)
        return [f"{k:<{width}}  {v}" for k, v in rows]

    def text(self) -> str:
        return "\n".join(self.lines())
