"""A scaling study: its YAML spec (typed, checked once, errors naming the key) and the plan of points it expands to.

A study names a base training config (+ overrides) and a grid: model sizes × training budgets × seeds, and where the
points run. Every point is an ordinary ``tarflow train`` run; the plan says, for each, its name, run directory and
the exact ``key=value`` overrides it runs with, and what it costs (parameters, FLOPs per image, steps)::

    name: digits_sizes
    config: configs/digits.yaml        # the base training config (paths: from the working directory, else the file's)
    overrides: [sample.num=10]         # applied to every point
    sizes:                             # a grid (every combination) ...
      channels: [16, 32, 64]
      num_blocks: [4]
      layers_per_block: [2]
      head_dim: 16                     # one value for every size (default: the base config's)
    # sizes:                           # ... or a list of named sizes (unset fields: the base config's)
    #   - {name: small, channels: 32, head_dim: 16, num_blocks: 2, layers_per_block: 1}
    #   - {name: big, channels: 256, overrides: [model.expansion=2]}
    budgets: [{steps: 500}, {images: 64000}, {flops: 1.0e+13}]   # default: the base config's train.steps
    seeds: [0, 1]
    grid: {train.noise_std: [0.05, 0.1, 0.2]}                     # more axes: any config keys (every combination)
    fid: {num_samples: 200, inception: /path/to/pt_inception.pth}  # optional: an FID per point (see FidSpec)
    run: {where: local, max_retries: 1}                            # local | slurm | k8s

A budget in images is ``round(images / train.global_batch)`` steps, one in FLOPs
``round(flops / (train FLOPs per image × train.global_batch))`` steps, with the analytic count of ``trainer.flops``.

Every point is forced to measure the same thing: held-out bits/dim, which the trainer always evaluates under uniform
dequantisation, in ``train.precision=fp32`` over ``eval.max_images=0`` (the whole held-out split); its own
``train.run_dir`` under the study directory, ``train.resume=auto``, its budget's ``train.steps`` and its
``train.seed``. Study overrides that contradict these are errors. The *training* corruption is ``train.noise=uniform``
unless the study sets ``train.noise`` itself (in ``overrides`` or ``grid``: a noise-level ablation trains with
``train.noise=gaussian`` over a grid of ``train.noise_std``; its bits/dim are still those of uniformly dequantised
held-out data).

``grid`` adds axes besides sizes × budgets × seeds: a mapping of config keys (``section.key``, or nested mappings) to
lists of values; every combination of them is a point of every size, budget and seed, named
``<size>-<budget>-<key><value>...-s<seed>`` (the key's last part: ``noise_std0.05``). Each value is checked with the
trainer's own config loader before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

WHERE = ("local", "slurm", "k8s")
FIT_X = ("params_no_embed", "params_total")
SIZE_KEYS = ("channels", "num_blocks", "layers_per_block", "head_dim")
BUDGET_KEYS = ("steps", "images", "flops")
# What every point runs with, whatever the base config says: held-out bits/dim (the trainer evaluates it under uniform
# dequantisation whatever the training noise) in fp32, over the whole held-out split. Appended after the study's
# overrides, so they win.
MEASUREMENT = {"train.precision": "fp32", "eval.max_images": "0"}
# The training corruption when the study does not choose one (overrides or grid): dequantisation, so that the
# training loss is bits/dim too.
DEFAULT_NOISE = ("train.noise", "uniform")
# Grid keys that have an axis of their own.
SIZE_CONFIG_KEYS = tuple(f"model.{k}" for k in SIZE_KEYS)
# Keys the driver sets per point; a study sets them through sizes, budgets, seeds and the study directory.
PER_POINT = {"train.run_dir": "the study directory (dir:)", "train.resume": "the driver (always auto)",
             "train.steps": "budgets:", "train.seed": "seeds:"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StudyError(ValueError):
    """A study spec that cannot run; the message names the file and the key."""


# ---------------------------------------------------------------- the schema
@dataclass
class NamedSize:
    name: str = ""
    channels: Optional[int] = None
    num_blocks: Optional[int] = None
    layers_per_block: Optional[int] = None
    head_dim: Optional[int] = None
    overrides: List[str] = field(default_factory=list)  # more overrides for this size only (e.g. model.expansion=2)


@dataclass
class SizeGrid:
    channels: List[int] = field(default_factory=list)          # empty: the base config's
    num_blocks: List[int] = field(default_factory=list)
    layers_per_block: List[int] = field(default_factory=list)
    head_dim: Optional[int] = None                              # one value for every size; None: the base config's


@dataclass
class Budget:
    steps: Optional[int] = None
    images: Optional[float] = None   # a count; a float so that 1.0e+6 reads
    flops: Optional[float] = None


@dataclass
class SlurmSpec:
    """``cluster.slurm.SlurmJob`` settings of the job array (one array task per point)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "01:00:00"           # per point
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    max_parallel: int = 0            # array throttle (--array=0-N%max_parallel); 0: no limit
    max_restarts: int = 3            # requeues after preemption (failures are the study's retries)
    signal_grace_s: int = 120
    job_name: str = ""               # default: the study's name
    extra_sbatch: List[str] = field(default_factory=list)


@dataclass
class K8sSpec:
    """``cluster.k8s.K8sJob`` settings; one job per point."""

    image: str = ""
    namespace: str = "default"
    flavor: str = "indexed-job"
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: Optional[int] = None
    cpu: Optional[str] = None
    memory: Optional[str] = None
    s3_secret: Optional[str] = None
    # The study directory as the pods see it (a shared volume); "": the same absolute path as here.
    run_root: str = ""
    checkpoint_prefix: str = ""      # s3://bucket/prefix: each point's checkpoints under <prefix>/<point>
    workdir: Optional[str] = None
    grace_s: int = 120


@dataclass
class RunSpec:
    where: str = "local"
    max_retries: int = 1             # a failed point runs at most 1 + max_retries times
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    k8s: K8sSpec = field(default_factory=K8sSpec)


@dataclass
class FitSpec:
    x: str = "params_no_embed"       # the model size N of L(N): params_no_embed | params_total
    n_boot: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class ReportSpec:
    plots_dir: str = ""              # also write the PNG plots here (e.g. docs/scaling), besides <study dir>/plots
    markdown: str = ""               # also write the table and the fitted laws as markdown to this file


@dataclass
class FidSpec:
    """An FID per point: after a point trains, ``tarflow eval <its checkpoint> --metric fid`` (results in
    ``<point>/fid/``). ``inception``: the FID Inception weights (a path; "": ``$TARFLOW_INCEPTION_WEIGHTS`` or torch
    hub's cache) or ``tiny-random[:SEED]`` (a random stand-in: plumbing only, not an FID). ``ref_stats``: a file from
    ``tarflow eval stats``; "": computed once per study from the base config's data (``split``)."""

    num_samples: int = 1000
    inception: str = ""
    ref_stats: str = ""
    split: str = "train"
    guidance: float = 0.0
    attn_temp: float = 1.0
    annealed: bool = False
    denoise: bool = True
    seed: int = 0
    batch_size: int = 0              # samples per batch (0: the point's eval.batch_size)
    device: str = "auto"


@dataclass
class StudySpec:
    name: str = ""
    dir: str = ""                    # the study directory; "": runs/scaling/<name>
    config: Optional[str] = None     # the base training config (None: the embedded digits default)
    overrides: List[str] = field(default_factory=list)
    warmup_fraction: Optional[float] = None  # schedule.warmup_steps = fraction × steps (budgets of many lengths)
    budgets: List[Budget] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [0])
    run: RunSpec = field(default_factory=RunSpec)
    fit: FitSpec = field(default_factory=FitSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    fid: Optional[FidSpec] = None
    # config key → its values (parsed by hand: keys with dots, nested mappings flattened)
    grid: dict = field(default_factory=dict)
    # sizes is parsed by hand (a grid mapping or a list of named sizes): see load_study
    size_grid: Optional[SizeGrid] = None
    named_sizes: List[NamedSize] = field(default_factory=list)
    source: str = ""                 # the file it came from (for messages)


# ---------------------------------------------------------------- loading and checking
def load_study(path: str | Path) -> StudySpec:
    """Read and check a study file; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # a YAML syntax error
        raise StudyError(f"{path}: cannot read YAML: {e}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study is a mapping (name:, config:, sizes:, ...), got {type(raw).__name__}")
    return study_from_dict(raw, source=str(path))


def study_from_dict(raw: dict, source: str = "study") -> StudySpec:
    raw = dict(raw)
    if "sizes" not in raw:
        raise StudyError(f"{source}: 'sizes' is missing: give a grid (sizes: {{channels: [...], ...}}) or a list of "
                         f"named sizes (sizes: [{{name: ..., channels: ...}}, ...])")
    sizes = raw.pop("sizes")
    for key in _INTERNAL:
        if key in raw:
            raise StudyError(f"{source}: unknown key '{key}'" + _hint(key, _top_keys()))
    if isinstance(raw.get("budgets"), dict):  # a single budget written as a mapping
        raw["budgets"] = [raw["budgets"]]
    if isinstance(raw.get("seeds"), int):
        raw["seeds"] = [raw["seeds"]]
    _check_keys(raw, StudySpec, "", source, extra=("sizes",))
    budgets = raw.pop("budgets", [])  # one by one, so that an error names budgets[i]
    grid = _parse_grid(raw.pop("grid", None), source)
    fid = raw.pop("fid", None)
    spec = _structured(StudySpec, raw, source, "")
    spec.grid = grid
    if fid is not None:
        spec.fid = _structured(FidSpec, fid, source, "fid.")
    spec.budgets = [_structured(Budget, b, source, f"budgets[{i}].") for i, b in enumerate(budgets)]
    spec.source = source
    if isinstance(sizes, dict):
        sizes = {k: ([v] if k != "head_dim" and not isinstance(v, list) else v) for k, v in sizes.items()}
        _check_keys(sizes, SizeGrid, "sizes.", source)
        spec.size_grid = _structured(SizeGrid, sizes, source, "sizes.")
    elif isinstance(sizes, list):
        named = []
        for i, item in enumerate(sizes):
            where = f"sizes[{i}]."
            if not isinstance(item, dict):
                raise StudyError(f"{source}: sizes[{i}] must be a mapping like {{name: small, channels: 32}}, "
                                 f"got {item!r}")
            _check_keys(item, NamedSize, where, source)
            named.append(_structured(NamedSize, item, source, where))
        spec.named_sizes = named
    else:
        raise StudyError(f"{source}: sizes must be a grid mapping or a list of named sizes, got {sizes!r}")
    _validate(spec)
    return spec


_INTERNAL = ("size_grid", "named_sizes", "source")
_SCALAR = (int, float, str, bool)


def _top_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(StudySpec) if f.name not in _INTERNAL] + ["sizes"]


def _parse_grid(node: Any, source: str) -> dict:
    """``{train.noise_std: [..]}`` or ``{train: {noise_std: [..]}}`` → ``{"train.noise_std": [..]}``; a single value
    is a list of one."""
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise StudyError(f"{source}: grid must map config keys to lists of values, e.g. "
                         f"grid: {{train.noise_std: [0.05, 0.1]}}; got {node!r}")
    out: dict = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            if not value:
                raise StudyError(f"{source}: grid.{prefix}: an empty mapping")
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        values = value if isinstance(value, list) else [value]
        where = f"grid.{prefix}"
        if not values:
            raise StudyError(f"{source}: {where}: give at least one value")
        bad = [v for v in values if not isinstance(v, _SCALAR)]
        if bad:
            raise StudyError(f"{source}: {where}: values must be numbers, strings or booleans, got {bad[0]!r}")
        if len({(type(v), v) for v in values}) != len(values):
            raise StudyError(f"{source}: {where}: has duplicates: {values}")
        if "." not in prefix:
            raise StudyError(f"{source}: {where}: give the full config key (section.key), e.g. train.{prefix}")
        out[prefix] = list(values)

    for key, value in node.items():
        walk(str(key), value)
    return out


def _hint(key: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _check_keys(node: Any, schema: type, prefix: str, source: str, extra: tuple[str, ...] = ()) -> None:
    """Unknown keys fail with the closest valid one, recursively through sections and lists of sections."""
    if not isinstance(node, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema) if f.name not in _INTERNAL}
    valid = list(fields) + list(extra)
    for key, value in node.items():
        if key in extra:
            continue
        if key not in fields:
            raise StudyError(f"{source}: unknown key '{prefix}{key}'" + _hint(key, valid, prefix))
        sub = _section_type(schema, key)
        if sub is None:
            continue
        if sub[1]:  # a list of sections
            if not isinstance(value, list):
                raise StudyError(f"{source}: '{prefix}{key}' must be a list, got {value!r}")
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise StudyError(f"{source}: '{prefix}{key}[{i}]' must be a mapping, got {item!r}")
                _check_keys(item, sub[0], f"{prefix}{key}[{i}].", source)
        else:
            if not isinstance(value, dict):
                raise StudyError(f"{source}: '{prefix}{key}' is a section; give its fields, e.g. "
                                 f"{prefix}{key}: {{...}}; got {value!r}")
            _check_keys(value, sub[0], f"{prefix}{key}.", source)


_SECTIONS: dict[tuple[type, str], tuple[type, bool]] = {
    (StudySpec, "run"): (RunSpec, False), (StudySpec, "fit"): (FitSpec, False),
    (StudySpec, "report"): (ReportSpec, False), (StudySpec, "budgets"): (Budget, True),
    (StudySpec, "fid"): (FidSpec, False),
    (RunSpec, "slurm"): (SlurmSpec, False), (RunSpec, "k8s"): (K8sSpec, False),
}


def _section_type(schema: type, key: str) -> tuple[type, bool] | None:
    return _SECTIONS.get((schema, key))


def _structured(schema: type, values: dict, source: str, prefix: str):
    """Type-check and convert with OmegaConf; errors name the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        message = str(getattr(e, "msg", e)).splitlines()[0]
        raise StudyError(f"{source}: {prefix}{key}: {message}") from None


def _require(ok: bool, source: str, key: str, message: str) -> None:
    if not ok:
        raise StudyError(f"{source}: {key}: {message}")


def _validate(spec: StudySpec) -> None:
    src = spec.source
    _require(bool(spec.name) and bool(_NAME.match(spec.name)), src, "name",
             f"give the study a name of letters, digits, '.', '_' and '-' (it names the study directory), "
             f"got {spec.name!r}")
    for i, o in enumerate(spec.overrides):
        _require("=" in o and o.split("=", 1)[0].strip() != "", src, f"overrides[{i}]",
                 f"must look like key=value, got {o!r}")
    _check_forced(spec.overrides, src, "overrides")
    if spec.size_grid is not None:
        g = spec.size_grid
        for key in ("channels", "num_blocks", "layers_per_block"):
            values = getattr(g, key)
            _require(all(v >= 1 for v in values), src, f"sizes.{key}", f"must be positive integers, got {values}")
            _require(len(set(values)) == len(values), src, f"sizes.{key}", f"has duplicates: {values}")
        _require(g.head_dim is None or g.head_dim >= 1, src, "sizes.head_dim", f"must be >= 1, got {g.head_dim}")
        _require(any(getattr(g, k) for k in ("channels", "num_blocks", "layers_per_block")), src, "sizes",
                 "the grid is empty: give at least one of channels, num_blocks, layers_per_block")
    else:
        _require(len(spec.named_sizes) > 0, src, "sizes", "the list of named sizes is empty")
        names = [s.name for s in spec.named_sizes]
        for i, s in enumerate(spec.named_sizes):
            _require(bool(s.name) and bool(_NAME.match(s.name)), src, f"sizes[{i}].name",
                     f"every named size needs a name of letters, digits, '.', '_' and '-', got {s.name!r}")
            for key in SIZE_KEYS:
                v = getattr(s, key)
                _require(v is None or v >= 1, src, f"sizes[{i}].{key}", f"must be >= 1, got {v}")
            for j, o in enumerate(s.overrides):
                _require("=" in o, src, f"sizes[{i}].overrides[{j}]", f"must look like key=value, got {o!r}")
            _check_forced(s.overrides, src, f"sizes[{i}].overrides")
        dup = sorted({n for n in names if names.count(n) > 1})
        _require(not dup, src, "sizes", f"duplicate size names: {dup}")
    seen = set()
    for i, b in enumerate(spec.budgets):
        given = [(k, getattr(b, k)) for k in BUDGET_KEYS if getattr(b, k) is not None]
        _require(len(given) == 1, src, f"budgets[{i}]",
                 f"give exactly one of steps, images or flops, got {dict(given) or 'none'}")
        key, value = given[0]
        _require(value > 0 and math.isfinite(value), src, f"budgets[{i}].{key}", f"must be > 0, got {value}")
        _require(budget_name(b) not in seen, src, f"budgets[{i}]", f"duplicate budget {key}={value}")
        seen.add(budget_name(b))
    _require(len(spec.seeds) > 0, src, "seeds", "give at least one seed")
    _require(len(set(spec.seeds)) == len(spec.seeds), src, "seeds", f"has duplicates: {spec.seeds}")
    _require(all(s >= 0 for s in spec.seeds), src, "seeds", f"must be >= 0, got {spec.seeds}")
    _require(spec.warmup_fraction is None or 0 <= spec.warmup_fraction < 1, src, "warmup_fraction",
             f"must be in [0, 1), got {spec.warmup_fraction}")
    r = spec.run
    _require(r.where in WHERE, src, "run.where", f"must be one of {', '.join(WHERE)}, got {r.where!r}")
    _require(r.max_retries >= 0, src, "run.max_retries", f"must be >= 0, got {r.max_retries}")
    _require(r.slurm.max_parallel >= 0, src, "run.slurm.max_parallel", f"must be >= 0, got {r.slurm.max_parallel}")
    if r.where == "k8s":
        _require(bool(r.k8s.image), src, "run.k8s.image", "run.where=k8s needs a container image with this "
                                                           "project installed")
    f = spec.fit
    _require(f.x in FIT_X, src, "fit.x", f"must be one of {', '.join(FIT_X)}, got {f.x!r}")
    _require(f.n_boot >= 0, src, "fit.n_boot", f"must be >= 0, got {f.n_boot}")
    _require(0 < f.confidence < 1, src, "fit.confidence", f"must be in (0, 1), got {f.confidence}")
    _validate_grid(spec)
    if spec.fid is not None:
        d = spec.fid
        _require(d.num_samples >= 1, src, "fid.num_samples", f"must be >= 1, got {d.num_samples}")
        _require(d.split in ("train", "heldout"), src, "fid.split", f"must be train or heldout, got {d.split!r}")
        _require(d.guidance >= 0 and math.isfinite(d.guidance), src, "fid.guidance", f"must be >= 0, got {d.guidance}")
        _require(d.attn_temp > 0, src, "fid.attn_temp", f"must be > 0, got {d.attn_temp}")
        _require(d.batch_size >= 0, src, "fid.batch_size", f"must be >= 0, got {d.batch_size}")


def _validate_grid(spec: StudySpec) -> None:
    src = spec.source
    set_by_overrides = {o.split("=", 1)[0].strip() for o in spec.overrides}
    for key in spec.grid:
        where = f"grid.{key}"
        _require(key not in PER_POINT, src, where, f"{key} is set per point by {PER_POINT.get(key)}")
        _require(key not in MEASUREMENT, src, where,
                 f"a scaling study measures held-out bits/dim in fp32 over the whole held-out split, so every point "
                 f"runs with {key}={MEASUREMENT.get(key)}")
        _require(key not in SIZE_CONFIG_KEYS, src, where, f"model sizes are an axis of their own: use sizes:")
        _require(key not in set_by_overrides, src, where, f"{key} is also set in overrides: remove one of them")
    tags: dict[str, str] = {}
    for key, values in spec.grid.items():
        for v in values:
            tag = grid_tag(spec.grid, key, v)
            _require(tag not in tags, src, f"grid.{key}", f"values {tags.get(tag)} and {v!r} give the same point name "
                                                          f"part {tag!r}")
            tags[tag] = repr(v)

def _check_forced(overrides: list[str], source: str, where: str) -> None:
    for i, o in enumerate(overrides):
        key, _, value = o.partition("=")
        key, value = key.strip(), value.strip()
        if key in PER_POINT:
            raise StudyError(f"{source}: {where}[{i}]: {key} is set per point by {PER_POINT[key]}; remove {o!r}")
        if key in MEASUREMENT and value != MEASUREMENT[key]:
            raise StudyError(f"{source}: {where}[{i}]: a scaling study measures held-out bits/dim under uniform "
                             f"dequantisation in fp32 over the whole held-out split, so every point runs with "
                             f"{key}={MEASUREMENT[key]}; remove {o!r}")


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
    """The point-name part of one grid value: ``noise_std0.05``."""
    v = format_value(value) if not isinstance(value, float) else f"{value:.6g}"
    return grid_short(grid, key) + re.sub(r"[^A-Za-z0-9._-]", "-", v)


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
    from trainer.config import ConfigError, load_config  # the driver uses the trainer's public config API

    config = resolve_config_path(spec)
    root = Path(directory) if directory is not None else study_dir(spec)
    try:
        base = load_config(config, spec.overrides)
    except ConfigError as e:
        raise StudyError(f"{spec.source}: the base config (config: {spec.config}, overrides: ...) is invalid: {e}") \
            from None
    budgets = spec.budgets or [Budget(steps=base.train.steps)]
    _check_grid_values(spec, config, load_config, ConfigError)
    measurement = _measurement(spec)
    combos = expand_grid(spec.grid)
    points, noises = [], set()
    for size in expand_sizes(spec):
        size_overrides = size.as_overrides()
        for combo in combos:
            grid_overrides = [f"{k}={format_value(v)}" for k, v in combo.items()]
            tags = "".join(f"-{grid_tag(spec.grid, k, v)}" for k, v in combo.items())
            sized, size_error = None, ""
            try:
                sized = load_config(config, spec.overrides + size_overrides + grid_overrides + measurement)
                noises.add(sized.train.noise)
            except (ConfigError, ValueError) as e:
                size_error = f"size {size.name}{' with ' + ' '.join(grid_overrides) if combo else ''}: {e}"
            for budget in budgets:
                for seed in spec.seeds:
                    name = f"{size.name}-{budget_name(budget)}{tags}-s{seed}"
                    run_dir = root / "points" / name
                    point = Point(name=name, size=size.name, budget=budget_name(budget), seed=seed,
                                  run_dir=str(run_dir), argv=[], error=size_error, grid=dict(combo))
                    if sized is not None:
                        _fill(point, spec, config, sized, size_overrides + grid_overrides, budget, load_config,
                              ConfigError)
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
    return DEFAULT_NOISE[0] in keys or DEFAULT_NOISE[0] in spec.grid


def _measurement(spec: StudySpec) -> list[str]:
    # The default noise first: the argv of a study that does not set train.noise is what it always was.
    noise = [] if _sets_noise(spec) else [f"{DEFAULT_NOISE[0]}={DEFAULT_NOISE[1]}"]
    return noise + [f"{k}={v}" for k, v in MEASUREMENT.items()]


def _check_grid_values(spec: StudySpec, config: str | None, load_config, ConfigError) -> None:
    """Each grid value on its own over the base config, through the trainer's loader: an unknown key or a bad value
    fails the study before anything runs, naming grid.<key>."""
    for key, values in spec.grid.items():
        for v in values:
            try:
                load_config(config, spec.overrides + [f"{key}={format_value(v)}"])
            except (ConfigError, ValueError) as e:
                raise StudyError(f"{spec.source}: grid.{key}: {v!r}: {e}") from None


def _fill(point: Point, spec: StudySpec, config: str | None, sized, size_overrides: list[str], budget: Budget,
          load_config, ConfigError) -> None:
    from trainer.flops import flops_per_image

    gb = sized.train.global_batch
    fpi = flops_per_image(sized.model).train
    if budget.steps is not None:
        steps = budget.steps
    elif budget.images is not None:
        steps = max(1, round(budget.images / gb))
    else:
        steps = max(1, round(budget.flops / (fpi * gb)))
    overrides = list(spec.overrides) + size_overrides + [f"train.steps={steps}"]
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


def parameter_counts(model_config) -> tuple[int, int]:
    """(total, without embeddings). "Embeddings" are each block's positional embedding (patches × channels) and
    class embedding (classes × channels): tables looked up by position or label, not matrices applied to the data.
    ``proj_in`` (patch → channels) and ``proj_out`` are ordinary weights and count. Built on the meta device: no
    memory, no initialisation."""
    import torch

    from models import TarFlow, num_parameters

    with torch.device("meta"):
        model = TarFlow(model_config)
    return num_parameters(model), num_parameters(model, exclude_embeddings=True)


# ---------------------------------------------------------------- the study directory
SPEC_FILE = "study.yaml"
PLAN_FILE = "plan.json"


def write_plan(directory: Path, spec: StudySpec, points: list[Point], config: str | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"study": spec.name, "source": spec.source, "config": config,
                       "config_text": Path(config).read_text() if config else "",
                       "spec": spec_to_dict(spec), "points": [p.to_dict() for p in points]}, indent=2) + "\n"
    _atomic_write(directory / PLAN_FILE, text)
    if spec.source and Path(spec.source).is_file():
        _atomic_write(directory / SPEC_FILE, Path(spec.source).read_text())


def read_plan(directory: str | Path) -> dict:
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        raise StudyError(f"{directory} is not a study directory (no {PLAN_FILE}); run `tarflow scale run STUDY.yaml` "
                         f"first")
    plan = json.loads(path.read_text())
    plan["points"] = [Point.from_dict(p) for p in plan["points"]]
    return plan


def spec_to_dict(spec: StudySpec) -> dict:
    d = dataclasses.asdict(spec)
    d.pop("source", None)
    return d


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
