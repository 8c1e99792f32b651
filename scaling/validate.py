"""Loading a study file and checking it once: unknown keys (the trainer's did-you-mean check), types (OmegaConf),
then every value and the rules of ``scaling.spec``; each error names the file and the key."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.api import SAMPLING_METHODS, ConfigError, check_keys

from .plan import budget_name, grid_tag
from .spec import (
    BUDGET_KEYS,
    DENOISE,
    FIT_X,
    MEASUREMENT,
    NAME_RE,
    PER_POINT,
    SIZE_CONFIG_KEYS,
    SIZE_KEYS,
    STUDY_FILE_SCHEMA,
    WHERE,
    Budget,
    FidSpec,
    NamedSize,
    SizeGrid,
    StudyError,
    StudySpec,
)


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
    _check_keys(raw, STUDY_FILE_SCHEMA, "", source)
    sizes = raw.pop("sizes")
    if isinstance(raw.get("budgets"), dict):  # a single budget written as a mapping
        raw["budgets"] = [raw["budgets"]]
    if isinstance(raw.get("seeds"), int):
        raw["seeds"] = [raw["seeds"]]
    budgets = raw.pop("budgets", [])  # one by one, so that an error names budgets[i]
    if not isinstance(budgets, list):
        raise StudyError(f"{source}: 'budgets' must be a list, got {budgets!r}")
    for i, b in enumerate(budgets):
        if not isinstance(b, dict):
            raise StudyError(f"{source}: 'budgets[{i}]' must be a mapping, got {b!r}")
        _check_keys(b, Budget, f"budgets[{i}].", source)
    grid, grid_sets = _parse_grid(raw.pop("grid", None), source)
    fid = raw.pop("fid", None)
    spec = _structured(StudySpec, raw, source, "")
    spec.grid, spec.grid_sets = grid, grid_sets
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


_SCALAR = (int, float, str, bool)


def _parse_grid(node: Any, source: str) -> tuple[dict, dict]:
    """``{train.noise_std: [..]}`` or ``{train: {noise_std: [..]}}`` → ``{"train.noise_std": [..]}``; a single value
    is a list of one. An axis of named sets (a key without a section, a list of mappings, each a ``name`` and config
    keys): ``{noise: [{name: uniform, train.noise: uniform}, ...]}`` → ``{"noise": ["uniform", ...]}`` and, second,
    ``{"noise": {"uniform": {"train.noise": "uniform"}, ...}}``."""
    if node is None:
        return {}, {}
    if not isinstance(node, dict):
        raise StudyError(f"{source}: grid must map config keys to lists of values, e.g. "
                         f"grid: {{train.noise_std: [0.05, 0.1]}}; got {node!r}")
    out: dict = {}
    sets: dict = {}

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
        if "." not in prefix and all(isinstance(v, dict) for v in values):
            sets[prefix] = _parse_set_axis(values, where, source)
            out[prefix] = list(sets[prefix])
            return
        bad = [v for v in values if not isinstance(v, _SCALAR)]
        if bad:
            raise StudyError(f"{source}: {where}: values must be numbers, strings or booleans, got {bad[0]!r}")
        if len({(type(v), v) for v in values}) != len(values):
            raise StudyError(f"{source}: {where}: has duplicates: {values}")
        if "." not in prefix:
            raise StudyError(f"{source}: {where}: give the full config key (section.key), e.g. train.{prefix}, or "
                             f"a list of named sets ({prefix}: [{{name: a, section.key: value, ...}}, ...])")
        out[prefix] = list(values)

    for key, value in node.items():
        walk(str(key), value)
    return out, sets


def _parse_set_axis(items: list[dict], where: str, source: str) -> dict:
    """Named sets of overrides: name → {config key: value}."""
    axis: dict = {}
    for i, item in enumerate(items):
        name = item.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise StudyError(f"{source}: {where}[{i}].name: give each set a name of letters, digits, '.', '_' or "
                             f"'-' (it is part of the point names), got {name!r}")
        if name in axis:
            raise StudyError(f"{source}: {where}[{i}].name: {name!r} names two sets")
        values = {str(k): v for k, v in item.items() if k != "name"}
        if not values:
            raise StudyError(f"{source}: {where}[{i}] ({name}): give at least one config key")
        for k, v in values.items():
            if "." not in k:
                raise StudyError(f"{source}: {where}[{i}].{k}: give the full config key (section.key)")
            if not isinstance(v, _SCALAR):
                raise StudyError(f"{source}: {where}[{i}].{k}: values must be numbers, strings or booleans, "
                                 f"got {v!r}")
        axis[name] = values
    return axis


def _check_keys(node: dict, schema: type, prefix: str, source: str) -> None:
    """Unknown keys fail with the closest valid one: the trainer's own check, through its sections."""
    try:
        check_keys(node, schema, prefix=prefix, origin="the study")
    except ConfigError as e:
        raise StudyError(f"{source}: {e}") from None


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
    _require(bool(spec.name) and bool(NAME_RE.match(spec.name)), src, "name",
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
            _require(bool(s.name) and bool(NAME_RE.match(s.name)), src, f"sizes[{i}].name",
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
        _require(d.metric in ("fid", "quality", "fid+quality"), src, "fid.metric",
                 f"must be fid, quality or fid+quality, got {d.metric!r}")
        _require(d.num_samples >= 1, src, "fid.num_samples", f"must be >= 1, got {d.num_samples}")
        _require(d.split in ("train", "heldout"), src, "fid.split", f"must be train or heldout, got {d.split!r}")
        _require(d.convention in ("paper", "pytorch-fid"), src, "fid.convention",
                 f"must be paper or pytorch-fid, got {d.convention!r}")
        _require(d.guidance >= 0 and math.isfinite(d.guidance), src, "fid.guidance", f"must be >= 0, got {d.guidance}")
        _require(d.attn_temp > 0, src, "fid.attn_temp", f"must be > 0, got {d.attn_temp}")
        _require(d.batch_size >= 0, src, "fid.batch_size", f"must be >= 0, got {d.batch_size}")
        _require(d.denoise.lower() in DENOISE, src, "fid.denoise",
                 f"must be {', '.join(DENOISE[:-1])} or {DENOISE[-1]}, got {d.denoise!r}")
        d.denoise = d.denoise.lower()  # YAML's booleans arrive as True/False
        _require(d.method in SAMPLING_METHODS, src, "fid.method",
                 f"must be one of {', '.join(SAMPLING_METHODS)}, got {d.method!r}")
        _require(d.tol is None or (d.tol >= 0 and math.isfinite(d.tol)), src, "fid.tol",
                 f"must be a number >= 0 (0: iterate until exact), got {d.tol}")


def _validate_grid(spec: StudySpec) -> None:
    src = spec.source
    set_by_overrides = {o.split("=", 1)[0].strip() for o in spec.overrides}
    for axis in spec.grid:
        sets = spec.grid_sets.get(axis)
        keys = [(f"grid.{axis}.{name}.{k}", k) for name, s in sets.items() for k in s] if sets else \
            [(f"grid.{axis}", axis)]
        for where, key in keys:
            _require(key not in PER_POINT, src, where, f"{key} is set per point by {PER_POINT.get(key)}")
            _require(key not in MEASUREMENT, src, where,
                     f"a scaling study measures held-out bits/dim in fp32 over the whole held-out split, so every "
                     f"point runs with {key}={MEASUREMENT.get(key)}")
            _require(key not in SIZE_CONFIG_KEYS, src, where, "model sizes are an axis of their own: use sizes:")
            _require(key not in set_by_overrides, src, where, f"{key} is also set in overrides: remove one of them")
            _require(key not in spec.grid or key == axis, src, where, f"{key} is also an axis of the grid")
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
