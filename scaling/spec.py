"""A scaling study's YAML spec: its schema (typed dataclasses) and the rules every point runs under. Loading and
checking it is ``scaling.validate``; the plan of points it expands to, ``scaling.plan``.

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
    # fid: {metric: quality, num_samples: 1000}                   # ... or the offline classifier metrics
    run: {where: local, max_retries: 1}                            # local | slurm | k8s

A budget in images is ``round(images / train.global_batch)`` steps, one in FLOPs
``round(flops / (train FLOPs per image × train.global_batch))`` steps, with the trainer's analytic count
(``trainer.api``).

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
trainer's own config loader before anything runs. An axis of *named sets* moves several keys together (a key
without a section, listing mappings of a ``name`` and config keys; the name is the point-name part and the grid
value)::

    grid:
      noise:
        - {name: uniform, train.noise: uniform}               # dequantisation only
        - {name: sigma0.05, train.noise: gaussian, train.noise_std: 0.05}
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import List, Optional

WHERE = ("local", "slurm", "k8s")
FIT_X = ("params_no_embed", "params_total")
DENOISE = ("true", "false", "both")  # fid.denoise
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
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    ``tarflow eval stats``; "": computed once per study from the base config's data (``split``). ``metric``: what
    ``tarflow eval --metric`` computes: ``fid``, ``quality`` (the offline classifier metrics: class accuracy,
    classifier-feature FD, precision/recall; no Inception weights; the classifier is trained once per study on the
    base config's data) or ``fid+quality`` (both from the same samples). ``denoise``: sample with the denoising step
    (``true``, the paper's), without (``false``), or ``both``: every metric with and without it from the same draws
    (the results' ``*_raw`` columns are without). ``method`` and ``tol``: how the samples invert the flow blocks
    (``tarflow eval --method --tol``; the exact sequential sampler by default, ``tol`` None: the default 1e-4)."""

    metric: str = "fid"
    num_samples: int = 1000
    convention: str = "paper"        # the FID convention (`tarflow eval --fid-convention`): paper | pytorch-fid
    inception: str = ""
    ref_stats: str = ""
    split: str = "train"
    guidance: float = 0.0
    attn_temp: float = 1.0
    annealed: bool = False
    denoise: str = "true"            # the Tweedie step: true | false | both (the same draws with and without it)
    method: str = "sequential"       # block inversion: sequential | jacobi | gs-jacobi | auto
    tol: Optional[float] = None      # parallel methods' tolerance (None: the sampler's default)
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
    # an axis of named sets (grid: {noise: [{name: uniform, train.noise: uniform}, ...]}): axis → name → overrides;
    # its grid values are the names
    grid_sets: dict = field(default_factory=dict)
    # sizes is parsed by hand (a grid mapping or a list of named sizes): see load_study
    size_grid: Optional[SizeGrid] = None
    named_sizes: List[NamedSize] = field(default_factory=list)
    source: str = ""                 # the file it came from (for messages)


# Fields set by the loader, not by the study file.
INTERNAL = ("size_grid", "named_sizes", "source", "grid_sets")
# The keys a study file may have, as a schema for the trainer's key check (``trainer.api.check_keys``): the public
# fields, ``fid`` as a section (it is optional only in the spec), ``sizes`` (a grid mapping or a list: parsed by
# hand) and ``budgets`` (a list: each checked on its own).
_FILE_TYPES = {"fid": "FidSpec", "budgets": "Any", "grid": "Any"}
STUDY_FILE_SCHEMA = dataclasses.make_dataclass(
    "StudySpec", [(f.name, _FILE_TYPES.get(f.name, f.type)) for f in dataclasses.fields(StudySpec)
                  if f.name not in INTERNAL] + [("sizes", "Any")], namespace={"__module__": __name__})


def spec_to_dict(spec: StudySpec) -> dict:
    d = dataclasses.asdict(spec)
    d.pop("source", None)
    return d
