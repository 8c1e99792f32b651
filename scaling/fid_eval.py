"""An FID per point of a study (``fid:`` in the study): checked up front, reference statistics once per study, then
``tarflow eval <the point's checkpoint> --metric fid ...`` after the point trains.

- **Up front** (before anything trains, also for ``--dry-run``): the Inception weights are resolved and loaded as
  ``tarflow eval`` does (``trainer.api``), so missing or wrong weights fail the study with the eval suite's own
  message (where to get the file); a given ``ref_stats`` file must be readable and made with the same network for
  images of the base config's shape.
- **Reference statistics**: ``ref_stats`` as given, else ``tarflow eval stats`` over the base config's data
  (``fid.split``, default the training images), run once by the driver into
  ``<study dir>/fid/reference-<split>-<hash>.pth`` (``.npz`` for ``convention: pytorch-fid``; the hash covers the
  network, the convention and the data settings, so another network or data set makes another file).
- **Per point**: a subprocess like the training run, ``<python> -m tarflow eval CKPT --metric fid --num-samples N
  --ref-stats FILE --fid-convention C --inception W --guidance G --attn-temp T [--annealed] [--denoise] --seed S
  --no-bpd --out <point>/fid``; its output is appended to ``<point>/fid.log``. ``<point>/fid/results.json`` is the
  eval suite's; the driver writes ``<point>/fid/request.json`` (the eval's arguments and the reference's digest)
  when it succeeded. A point's FID is current when ``request.json`` matches what the study asks now: running the
  study again evaluates only the points without a current FID (new points, a changed ``fid:`` section, a recomputed
  reference).
- **Where**: locally right after each point trains; for SLURM and Kubernetes studies, the driver evaluates the
  finished points that lack a current FID each time it runs (on its own machine: give ``fid.device`` and run
  ``tarflow scale run`` where a device is, or let the local run do it).
- **Classifier metrics** (``fid.metric: quality`` or ``fid+quality``): no Inception weights for ``quality`` alone;
  ``tarflow eval classifier train`` runs once per study into ``<study dir>/fid/classifier-<set>-<hash>.pt`` (the
  base config's data set and split; the embedded sets only, checked up front), each point's evaluation gets
  ``--metric quality --classifier FILE`` and ``request.json`` the file's digest.
- A failed FID evaluation does not fail the point (its bits/dim stand): it is reported with its error line, the
  study exits 1, and the next ``tarflow scale run`` evaluates it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cluster.torchrun import tarflow_command
from trainer.api import (
    RANDOM_INCEPTION,
    check_reference_stats,
    classifier_dataset,
    load_config,
    load_fid_network,
    stats_suffix,
)

from .results import RAW, SAMPLE_METRICS
from .rundir import SUMMARY_FILE, atomic_write, error_line, finished, last_lines, read_from, read_summary, utc_now
from .spec import FidSpec, StudyError, StudySpec

FID_DIR = "fid"                  # <point>/fid/: the eval suite's --out
FID_LOG = "fid.log"              # <point>/fid.log: every FID evaluation's output, appended
REQUEST_FILE = "request.json"
RESULTS_FILE = "results.json"

Log = Callable[[str], None]


def eval_command() -> list[str]:
    """``tarflow eval`` with this interpreter (the same environment as the driver)."""
    return tarflow_command("eval")


@dataclass
class FidPlan:
    spec: FidSpec
    inception: str                   # what --inception gets: an absolute path, or tiny-random[:SEED]
    network: str                     # the network's identity (as the statistics files record it)
    ref_stats: str                   # the reference statistics file (absolute)
    data_argv: list[str] = field(default_factory=list)  # `eval stats` arguments (DATA_URI, data.*) when computed
    command: list[str] = field(default_factory=eval_command)
    ref_digest: str = ""             # sha1 of the reference file, once it exists
    classifier: str = ""             # quality: the classifier file (absolute; trained once per study)
    classifier_argv: list[str] = field(default_factory=list)  # `eval classifier train` arguments (DATA_URI, data.*)
    classifier_digest: str = ""      # sha1 of the classifier file, once it exists

    @property
    def plumbing(self) -> bool:
        return self.network.startswith(RANDOM_INCEPTION)

    @property
    def with_fid(self) -> bool:
        return "fid" in self.spec.metric

    def describe(self) -> str:
        s = self.spec
        if not self.with_fid:
            return (f"classifier metrics per point (class accuracy, classifier FD, precision/recall): "
                    f"{s.num_samples} samples, guidance {s.guidance:g}, attn temp {s.attn_temp:g}"
                    f"{', annealed' if s.annealed else ''}{_denoised(s)}; classifier "
                    f"{self.classifier}")
        what = (f"FID per point: {s.num_samples} samples, guidance {s.guidance:g}, attn temp {s.attn_temp:g}"
                f"{', annealed' if s.annealed else ''}{_denoised(s)}; network {self.network}; "
                f"reference {self.ref_stats}" + ("" if Path(self.ref_stats).is_file() or not self.data_argv
                                                 else f" (computed from {self.data_argv[0]}, {s.split} split)"))
        if self.plumbing:
            what += ". PLUMBING ONLY (random network): these are not FIDs; real FIDs need the FID Inception weights"
        if self.classifier:
            what += f"; and the classifier metrics (classifier {self.classifier})"
        return what


def _denoised(s: FidSpec) -> str:
    return {"true": ", denoised", "false": "", "both": ", with and without the denoising step"}[s.denoise]


def _find(path: str, spec: StudySpec) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    candidates = [Path.cwd() / p] + ([Path(spec.source).parent / p] if spec.source else [])
    return next((c for c in candidates if c.exists()), candidates[0]).resolve()


def prepare_fid(spec: StudySpec, directory: Path, config: str | None) -> FidPlan:
    """Check the weights (and a given reference), and that the classifier metrics support the data, before anything
    trains; the eval suite's errors as they are."""
    s = spec.fid
    assert s is not None
    plan = _inception_plan(spec, directory, config) if "fid" in s.metric else FidPlan(s, "", "", "")
    if "quality" in s.metric:
        d = classifier_dataset(load_config(config, spec.overrides).data)  # ClassifierError: embedded sets only
        data = [f"embedded:{d['source']}", f"data.heldout_fraction={d['heldout_fraction']}",
                f"data.split_seed={d['split_seed']}"]
        digest = hashlib.sha1(json.dumps(["classifier", data]).encode()).hexdigest()[:10]
        plan.classifier = str(Path(directory) / FID_DIR / f"classifier-{d['source']}-{digest}.pt")
        plan.classifier_argv = data
    return plan


def _inception_plan(spec: StudySpec, directory: Path, config: str | None) -> FidPlan:
    s = spec.fid
    given = s.inception or None
    if given and not given.startswith(RANDOM_INCEPTION):
        given = str(_find(given, spec))
    net = load_fid_network(given, s.convention)  # InceptionWeightsError (a ValueError): says where to get it
    base = load_config(config, spec.overrides)
    m = base.model
    if s.ref_stats:
        ref = _find(s.ref_stats, spec)
        # FIDError: missing or unreadable (with how to make it), or made with another network or image shape
        check_reference_stats(ref, net, (m.in_channels, m.img_size, m.img_size), where=f"fid.ref_stats {ref}")
        return FidPlan(s, net.weights, net.identity, str(ref))
    d = base.data
    if d.format == "embedded":
        data = [f"embedded:{d.source}", f"data.heldout_fraction={d.heldout_fraction}",
                f"data.split_seed={d.split_seed}"]
    else:
        data = [d.uri, f"data.format={d.format}"]
    data += [f"data.resize={d.resize}", f"data.crop={d.crop}"]
    digest = hashlib.sha1(json.dumps([net.identity, s.convention, data, s.split]).encode()).hexdigest()[:10]
    ref = Path(directory) / FID_DIR / f"reference-{s.split}-{digest}{stats_suffix(s.convention)}"
    return FidPlan(s, net.weights, net.identity, str(ref), data_argv=data)


def _run_logged(argv: list[str], log_path: Path) -> int:
    with open(log_path, "ab") as f:
        f.write(f"\n=== {shlex.join(argv)}\n".encode())
        f.flush()
        return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode


def ensure_reference(plan: FidPlan, log: Log = print) -> None:
    """Compute the study's reference statistics with ``tarflow eval stats`` unless they exist (given or computed
    earlier), and train the classifier of the quality metrics with ``tarflow eval classifier train`` unless it
    exists; a failure stops the study before it trains anything."""
    if plan.with_fid:
        _ensure_stats(plan, log)
    if plan.classifier:
        _ensure_classifier(plan, log)


def _ensure_classifier(plan: FidPlan, log: Log) -> None:
    path = Path(plan.classifier)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [*plan.command, "classifier", "train", *plan.classifier_argv, "--out", str(path)]
        log_path = path.with_suffix(".log")
        log(f"classifier of the quality metrics: {plan.classifier_argv[0]} (train split) → {path} (log: {log_path})")
        rc = _run_logged(argv, log_path)
        if rc != 0 or not path.is_file():
            tail = last_lines(log_path.read_text(errors="replace"))
            raise StudyError(f"`tarflow eval classifier train` failed (exit {rc}): {error_line(tail)} "
                             f"(log: {log_path})")
    plan.classifier_digest = hashlib.sha1(path.read_bytes()).hexdigest()


def _ensure_stats(plan: FidPlan, log: Log) -> None:
    ref = Path(plan.ref_stats)
    if not ref.is_file():
        if not plan.data_argv:
            raise StudyError(f"fid.ref_stats {ref} does not exist")
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.stem}.tmp{ref.suffix}")
        argv = [*plan.command, "stats", *plan.data_argv, "--out", str(tmp), "--split", plan.spec.split,
                "--fid-convention", plan.spec.convention, "--inception", plan.inception, "--device",
                plan.spec.device]
        log_path = ref.with_suffix(".log")
        log(f"FID reference statistics: {plan.data_argv[0]} ({plan.spec.split} split) → {ref} (log: {log_path})")
        t0 = time.perf_counter()
        rc = _run_logged(argv, log_path)
        if rc != 0 or not tmp.is_file():
            tail = last_lines(log_path.read_text(errors="replace"))
            raise StudyError(f"`tarflow eval stats` for the FID reference failed (exit {rc}): {error_line(tail)} "
                             f"(log: {log_path})")
        tmp.replace(ref)
        log(f"FID reference statistics done in {time.perf_counter() - t0:.1f} s")
    plan.ref_digest = hashlib.sha1(ref.read_bytes()).hexdigest()


# ---------------------------------------------------------------- per point
def fid_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FID_DIR


def fid_argv(plan: FidPlan, point) -> list[str] | None:
    """The point's ``tarflow eval`` command line, or None when its run left no checkpoint."""
    summary = read_summary(point.run_dir) or {}
    ckpt = summary.get("checkpoint")
    if not ckpt:
        return None
    s = plan.spec
    argv = [*plan.command, str(ckpt), "--metric", s.metric, "--num-samples", str(s.num_samples)]
    if summary.get("weights"):  # the weights the run's own bits/dim are of (runs from before EMA record none)
        argv += ["--weights", summary["weights"]]
    if plan.with_fid:
        argv += ["--ref-stats", plan.ref_stats, "--fid-convention", s.convention, "--inception", plan.inception]
    argv += ["--guidance", f"{s.guidance!r}", "--attn-temp", f"{s.attn_temp!r}", "--seed", str(s.seed), "--device",
             s.device, "--no-bpd", "--out", str(fid_dir(point.run_dir))]
    if plan.classifier:
        argv += ["--classifier", plan.classifier]
    if s.annealed:
        argv.append("--annealed")
    if s.denoise != "false":
        argv += ["--denoise", {"true": "on", "both": "both"}[s.denoise]]
    if s.method != "sequential":
        argv += ["--method", s.method] + ([] if s.tol is None else ["--tol", f"{s.tol!r}"])
    if s.batch_size:
        argv += ["--batch-size", str(s.batch_size)]
    return argv


def _request(plan: FidPlan, argv: list[str]) -> dict:
    request = {"argv": argv[len(plan.command):], "reference_sha1": plan.ref_digest}
    if plan.classifier:
        request["classifier_sha1"] = plan.classifier_digest
    return request


def _results(run_dir: str | Path) -> dict:
    """The point's last successful evaluation's ``results.json`` ({} when there is none)."""
    d = fid_dir(run_dir)
    if not (d / REQUEST_FILE).is_file():
        return {}
    try:
        return json.loads((d / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def read_metrics(run_dir: str | Path) -> dict:
    """The sample metrics of the point's last successful evaluation ({} when there is none): ``fid_network`` and
    each of ``SAMPLE_METRICS`` (None when not computed) of the study's sampling (denoised unless ``fid.denoise:
    false``), and with ``fid.denoise: both`` the same metrics without the denoising step as ``<metric>_raw``."""
    results = _results(run_dir)
    rows = [r for r in results.get("results") or [] if isinstance(r, dict)]
    if not rows:
        return {}
    denoised = [r for r in rows if r.get("denoise") is True]
    raw = [r for r in rows if r.get("denoise") is False]
    main = (denoised or raw)[0]
    out = {"fid_network": str(results.get("inception", ""))}
    out.update({k: _finite(main.get(k)) for k in SAMPLE_METRICS})
    if denoised and raw:
        out.update({k + RAW: _finite(raw[0].get(k)) for k in SAMPLE_METRICS})
    return out


def _complete(plan: FidPlan, metrics: dict) -> bool:
    """Every metric the study asks for is in ``read_metrics``' answer (without the step too, for ``both``)."""
    wanted = (["fid"] if plan.with_fid else []) + (["classifier_fd"] if plan.classifier else [])
    wanted += [k + RAW for k in wanted] if plan.spec.denoise == "both" else []
    return all(metrics.get(k) is not None for k in wanted)


def fid_current(plan: FidPlan, point) -> bool:
    argv = fid_argv(plan, point)
    if argv is None or not _complete(plan, read_metrics(point.run_dir)):
        return False
    try:
        return json.loads((fid_dir(point.run_dir) / REQUEST_FILE).read_text()) == _request(plan, argv)
    except (OSError, ValueError):
        return False


def run_fid(plan: FidPlan, point, st, log: Log = print, stop=None) -> bool:
    """Evaluate the point's FID unless it is current; records the outcome in its state (``fid_error``)."""
    if fid_current(plan, point):
        st.fid_error = ""
        return True
    argv = fid_argv(plan, point)
    if argv is None:
        st.fid_error = f"no checkpoint in {point.run_dir}/{SUMMARY_FILE} to evaluate"
        log(f"[{point.name}] FID not evaluated: {st.fid_error}")
        return False
    out = fid_dir(point.run_dir)
    (out / REQUEST_FILE).unlink(missing_ok=True)  # what is there now no longer answers the request
    log_path = Path(point.run_dir) / FID_LOG
    t0 = time.perf_counter()
    with open(log_path, "ab") as f:
        f.write(f"\n=== {utc_now()}: {shlex.join(argv)}\n".encode())
        offset = f.tell()
        f.flush()
        child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if stop is not None:
            stop.child = child
        rc = child.wait()
        if stop is not None:
            stop.child = None
    seconds = time.perf_counter() - t0
    st.fid_seconds = getattr(st, "fid_seconds", 0.0) + seconds
    m: dict = {}
    if rc == 0:
        atomic_write(out / REQUEST_FILE, json.dumps(_request(plan, argv), indent=2) + "\n")
        m = read_metrics(point.run_dir)
    if rc != 0 or not _complete(plan, m):
        (out / REQUEST_FILE).unlink(missing_ok=True)
        tail = last_lines(read_from(log_path, offset))
        st.fid_error = f"FID evaluation failed (exit {rc}): {error_line(tail)} (log: {log_path})"
        if stop is None or not stop.requested:
            log(f"[{point.name}] {st.fid_error}")
        return False
    st.fid_error = ""
    what = [_describe_metrics(plan, m)]
    if plan.spec.denoise == "both":
        what.append(f"without the denoising step: {_describe_metrics(plan, m, RAW)}")
    log(f"[{point.name}] {'; '.join(what)} over {plan.spec.num_samples} samples in {seconds:.1f} s")
    return True


def _describe_metrics(plan: FidPlan, m: dict, suffix: str = "") -> str:
    what = []
    if plan.with_fid:
        note = " (plumbing only: random network)" if m["fid_network"].startswith(RANDOM_INCEPTION) else ""
        what.append(f"FID {m['fid' + suffix]:.4g}{note}")
    if plan.classifier:
        acc = m["class_accuracy" + suffix]
        what.append(f"class accuracy {'n/a' if acc is None else f'{acc:.4f}'}, classifier FD "
                    f"{m['classifier_fd' + suffix]:.4g}, precision {m['precision' + suffix]:.3f}, recall "
                    f"{m['recall' + suffix]:.3f}")
    return ", ".join(what)


def catch_up(plan: FidPlan, points, state, log: Log = print, skip: set[str] = frozenset()) -> list[str]:
    """Evaluate every finished point (not in ``skip``) without a current FID; returns those that failed."""
    failed = []
    for p in points:
        if p.error or p.name in skip or not finished(p):
            continue
        if not run_fid(plan, p, state[p.name], log):
            failed.append(p.name)
        state.save()
    return failed
