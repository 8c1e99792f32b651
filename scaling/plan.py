"""The plan of a study: the points its sizes × budgets × grid × seeds expand to, each an ordinary ``tarflow train``
run with its name, run directory, exact overrides and cost (parameters, FLOPs per image, steps), resolved with the
trainer's own config loader; and the plan file of the study directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.api import ConfigError, load_config, parameter_counts, train_flops_per_image

from .rundir import atomic_write
from .spec import DEFAULT_NOISE, MEASUREMENT, SIZE_KEYS, Budget, StudyError, StudySpec, spec_to_dict


# ---------------------------------------------------------------- sizes and budgets
@dataclass(frozen=True)
class Size:
    name: str
    model: dict[str, int]  # model.<key> → value, only the keys this size sets
    overrides: tuple[str, ...] = ()

    def as_overrides(self) -> list[str]:
        return [f"model.{k}={v}" for k, v in self.model.items()] + list(self.overrides)


def expand_sizes(spec: StudySpec) -> list[Size]:
    if spec.size_grid is None:
        return [Size(s.name, {k: getattr(s, k) for k in SIZE_KEYS if getattr(s, k) is not None}, tuple(s.overrides))
                for s in spec.named_sizes]
    g = spec.size_grid
    out = []
    for c in g.channels or [None]:
        for b in g.num_blocks or [None]:
            for l in g.layers_per_block or [None]:
                model = {k: v for k, v in (("channels", c), ("num_blocks", b), ("layers_per_block", l),
                                           ("head_dim", g.head_dim)) if v is not None}
                # Every dimension the grid names is in the name, so adding a value later keeps the old names.
                parts = [f"{tag}{v}" for tag, key, v in (("c", "channels", c), ("b", "num_blocks", b),
                                                         ("l", "layers_per_block", l)) if v is not None]
                out.append(Size("-".join(parts), model))
    return out


def format_value(v: Any) -> str:
    """A grid value as an override's right-hand side: YAML spelling of booleans, shortest exact floats."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def grid_short(grid: dict, key: str) -> str:
    """The key's last part (``train.noise_std`` → ``noise_std``), or all of it (dots as ``_``) when another grid
    key ends the same way."""
    last = key.rsplit(".", 1)[-1]
    clash = sum(k.rsplit(".", 1)[-1] == last for k in grid) > 1
    return key.replace(".", "_") if clash else last


def grid_tag(grid: dict, key: str, value: Any) -> str:
    """The point-name part of one grid value: ``noise_std0.05``; of a named set (an axis without a section): its
    name."""
    if "." not in key:
        return str(value)
    v = format_value(value) if not isinstance(value, float) else f"{value:.6g}"
    return grid_short(grid, key) + re.sub(r"[^A-Za-z0-9._-]", "-", v)


def grid_overrides(spec: StudySpec, combo: dict) -> list[str]:
    """The ``key=value`` overrides of one combination of grid values (a named set: its keys)."""
    out = []
    for key, value in combo.items():
        pairs = spec.grid_sets[key][value].items() if key in spec.grid_sets else [(key, value)]
        out += [f"{k}={format_value(v)}" for k, v in pairs]
    return out


def expand_grid(grid: dict) -> list[dict]:
    """Every combination of the grid's values (in the order written), as {key: value}; [{}] without a grid."""
    combos: list[dict] = [{}]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def grid_sort_key(values: dict, grid: dict | None = None) -> tuple:
    """Numbers in increasing order; other values (strings, booleans) in the order the grid lists them."""
    def one(k, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (0, float(v), "")
        listed = (grid or {}).get(k, [])
        return (1, float(listed.index(v)) if v in listed else math.inf, str(v))

    return tuple(one(k, v) for k, v in values.items())


def budget_name(b: Budget) -> str:
    if b.steps is not None:
        return f"steps{b.steps}"
    if b.images is not None:
        return f"images{b.images:.0f}" if b.images == int(b.images) else f"images{b.images:g}"
    return "flops" + f"{b.flops:.3g}".replace("e+", "e").replace("+", "")


# ---------------------------------------------------------------- the plan
@dataclass
class Point:
    """One run of the study. ``argv`` is what follows ``tarflow train`` (config, then overrides); ``error`` is set
    when the point's config does not resolve (it is then reported failed and never launched)."""

    name: str
    size: str
    budget: str
    seed: int
    run_dir: str
    argv: list[str]
    steps: int = 0
    global_batch: int = 0
    flops_per_image: int = 0         # analytic training FLOPs (forward + backward) of one image
    params_total: int = 0
    params_no_embed: int = 0         # without the positional and class embeddings
    error: str = ""
    grid: dict = field(default_factory=dict)  # the grid's config key → this point's value

    @property
    def images(self) -> int:
        return self.steps * self.global_batch

    @property
    def train_flops(self) -> float:
        return float(self.flops_per_image) * self.images

    def fingerprint(self, config_text: str) -> str:
        """Identity of what the point runs: a finished point whose fingerprint changed ran another config."""
        return hashlib.sha256(json.dumps([config_text, self.argv]).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Point:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_config_path(spec: StudySpec) -> str | None:
    """The base config: as written from the working directory, else next to the study file; absolute."""
    if spec.config is None:
        return None
    p = Path(spec.config)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + (
        [Path(spec.source).parent / p] if spec.source else [])
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    raise StudyError(f"{spec.source}: config: {spec.config} not found (looked at "
                     f"{', '.join(str(c) for c in candidates)})")


def study_dir(spec: StudySpec, override: str | None = None) -> Path:
    return Path(override or spec.dir or f"runs/scaling/{spec.name}").resolve()


def plan_study(spec: StudySpec, directory: str | Path | None = None) -> list[Point]:
    """Every point of the study, smallest model first. Resolves each point's training config with the trainer's own
    loader, so a point whose config is invalid carries the trainer's message in ``error``."""
    config = resolve_config_path(spec)
    root = Path(directory) if directory is not None else study_dir(spec)
    try:
        base = load_config(config, spec.overrides)
    except ConfigError as e:
        raise StudyError(f"{spec.source}: the base config (config: {spec.config}, overrides: ...) is invalid: {e}") \
            from None
    budgets = spec.budgets or [Budget(steps=base.train.steps)]
    _check_grid_values(spec, config)
    measurement = _measurement(spec)
    combos = expand_grid(spec.grid)
    points, noises = [], set()
    for size in expand_sizes(spec):
        size_overrides = size.as_overrides()
        for combo in combos:
            combo_overrides = grid_overrides(spec, combo)
            tags = "".join(f"-{grid_tag(spec.grid, k, v)}" for k, v in combo.items())
            sized, size_error = None, ""
            try:
                sized = load_config(config, spec.overrides + size_overrides + combo_overrides + measurement)
                noises.add(sized.train.noise)
            except (ConfigError, ValueError) as e:
                size_error = f"size {size.name}{' with ' + ' '.join(combo_overrides) if combo else ''}: {e}"
            for budget in budgets:
                for seed in spec.seeds:
                    name = f"{size.name}-{budget_name(budget)}{tags}-s{seed}"
                    run_dir = root / "points" / name
                    point = Point(name=name, size=size.name, budget=budget_name(budget), seed=seed,
                                  run_dir=str(run_dir), argv=[], error=size_error, grid=dict(combo))
                    if sized is not None:
                        _fill(point, spec, config, sized, size_overrides + combo_overrides, budget, root)
                    points.append(point)
    if "train.noise_std" in spec.grid and noises and "gaussian" not in noises:
        raise StudyError(f"{spec.source}: grid.train.noise_std: every point trains with train.noise=uniform "
                         f"(dequantisation), where noise_std does nothing; add train.noise=gaussian to overrides")
    points.sort(key=lambda p: (p.params_total, p.train_flops, p.steps, grid_sort_key(p.grid, spec.grid), p.seed,
                               p.name))
    return points


def _sets_noise(spec: StudySpec) -> bool:
    keys = [o.split("=", 1)[0].strip() for o in spec.overrides]
    keys += [o.split("=", 1)[0].strip() for s in spec.named_sizes for o in s.overrides]
    keys += [k for sets in spec.grid_sets.values() for overrides in sets.values() for k in overrides]
    return DEFAULT_NOISE[0] in keys or DEFAULT_NOISE[0] in spec.grid


def _measurement(spec: StudySpec) -> list[str]:
    # The default noise first: the argv of a study that does not set train.noise is what it always was.
    noise = [] if _sets_noise(spec) else [f"{DEFAULT_NOISE[0]}={DEFAULT_NOISE[1]}"]
    return noise + [f"{k}={v}" for k, v in MEASUREMENT.items()]


def _check_grid_values(spec: StudySpec, config: str | None) -> None:
    """Each grid value on its own over the base config, through the trainer's loader: an unknown key or a bad value
    fails the study before anything runs, naming grid.<key>."""
    for key, values in spec.grid.items():
        for v in values:
            try:
                load_config(config, spec.overrides + grid_overrides(spec, {key: v}))
            except (ConfigError, ValueError) as e:
                raise StudyError(f"{spec.source}: grid.{key}: {v!r}: {e}") from None


def grouping_overrides(spec: StudySpec, point_name: str, root: Path) -> list[str]:
    """How a study's points are filed together where runs are compared: wandb group = the study's name, the point's
    name as the run name, and one TensorBoard directory for the study (``tensorboard --logdir <study>/tensorboard``
    shows every point as a run). Logging only (``trainer.resume_policy``: free to change on resume); they come
    before the study's own overrides, which may set any of them otherwise."""
    return [f"logging.wandb_group={spec.name}", f"logging.run_name={point_name}",
            f"logging.tensorboard_dir={root / 'tensorboard'}"]


def _fill(point: Point, spec: StudySpec, config: str | None, sized, size_overrides: list[str],
          budget: Budget, root: Path) -> None:
    gb = sized.train.global_batch
    fpi = train_flops_per_image(sized.model)
    if budget.steps is not None:
        steps = budget.steps
    elif budget.images is not None:
        steps = max(1, round(budget.images / gb))
    else:
        steps = max(1, round(budget.flops / (fpi * gb)))
    overrides = grouping_overrides(spec, point.name, root) + list(spec.overrides) + size_overrides + \
        [f"train.steps={steps}"]
    if spec.warmup_fraction is not None:
        overrides.append(f"schedule.warmup_steps={int(spec.warmup_fraction * steps)}")
    overrides += [f"train.seed={point.seed}", *_measurement(spec), "train.resume=auto",
                  f"train.run_dir={point.run_dir}"]
    point.argv = ([config] if config else []) + overrides
    point.steps, point.global_batch, point.flops_per_image = steps, gb, fpi
    try:
        cfg = load_config(config, overrides)
    except (ConfigError, ValueError) as e:
        point.error = f"{budget_name(budget)}: {e}"
        if "schedule.warmup_steps" in str(e) and spec.warmup_fraction is None:
            point.error += "; set warmup_fraction (e.g. 0.1) in the study to scale the warmup with each budget"
        return
    point.params_total, point.params_no_embed = parameter_counts(cfg.model)


# ---------------------------------------------------------------- the study directory
SPEC_FILE = "study.yaml"
PLAN_FILE = "plan.json"


def write_plan(directory: Path, spec: StudySpec, points: list[Point], config: str | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"study": spec.name, "source": spec.source, "config": config,
                       "config_text": Path(config).read_text() if config else "",
                       "spec": spec_to_dict(spec), "points": [p.to_dict() for p in points]}, indent=2) + "\n"
    atomic_write(directory / PLAN_FILE, text)
    if spec.source and Path(spec.source).is_file():
        atomic_write(directory / SPEC_FILE, Path(spec.source).read_text())


def read_plan(directory: str | Path) -> dict:
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        raise StudyError(f"{directory} is not a study directory (no {PLAN_FILE}); run `tarflow scale run STUDY.yaml` "
                         f"first")
    plan = json.loads(path.read_text())
    plan["points"] = [Point.from_dict(p) for p in plan["points"]]
    return plan
