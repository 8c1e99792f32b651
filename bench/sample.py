"""Sampling throughput and accuracy of the samplers, measured in one run.

Three modes:

``(default)`` **trained checkpoints**: every inversion method on trained models, the digits checkpoint (8×8, T=16,
class-conditional; guidance = classifier-free guidance with labels i mod 10) and a photos checkpoint (32×32 RGB,
patch 4, T=64, unconditional; guidance = attention-temperature guidance with ``attn_temp`` 0.8 as in
configs/photos.yaml). For each model × batch × guidance, one interleaved run (A B C ... A B C ..., best of N) times:

- ``official``: the reference code's sampler design (``baseline_reverse`` below);
- ``sequential``: our exact sampler (``TarFlow.reverse`` default), the accuracy yardstick;
- per tolerance: ``jacobi`` (no window), ``jacobi-wW`` (a window of W tokens past the frontier, default
  max(8, T/4)), ``gs-jacobi-mM`` (modules of M = ``--module-size`` tokens, default T/4, on the tough blocks and with
  the per-block initial iterate of ``models.calibrate`` run on a few images sampled from another seed), and
  ``auto`` (when ``models.inversion.METHODS`` has it; its cost model is measured in the warm-up round).

Per row: images/s, the speed ratio against ``official`` and against ``sequential`` (time_ref / time_method: > 1 is
faster) from the same interleaved run, Jacobi passes per block (last block first, ``*`` = stopped at max_iters;
for auto each prefixed by what ran: s = sequential, j = Jacobi, j+s = Jacobi handed over to the sequential sampler
mid-block; passes, Δ and nan are those of the timed calls, and where auto's first call, which probes, ran otherwise
a note says so), the transformer token evaluations relative to the sequential sampler's ("work"), and max |Δ| against
the sequential result in model space ([-1, 1] scale, raw outputs, no clamp) over the rows finite in both; ``nan``
counts the rows that are not finite in either. Noise is fixed (seeded). ``--quick``: a small subset (< 1 minute) as
a smoke test.

``--random``: the original comparison on random-weight models (cases A, B): ours against the reference's design,
with the images checked equal before timing.

``--quality``: the offline quality metric of ``tarflow eval --metric quality`` (class accuracy, classifier-feature
FD, precision / recall; ``trainer.evaluation.quality``, the classifier cached by ``tarflow eval classifier train
digits``) of 1000 class-conditional digits samples drawn by the same sampling plan (``draw_samples``: sample i has
label i mod 10 and noise seeded by (seed, i, attempt), NaN samples redrawn) for the sequential sampler and Jacobi at
tol 1e-3 and 1e-4: the same noise for every method.

    .venv/bin/python bench/sample.py [--quick] [--json PATH] [--digits CKPT] [--photos CKPT] [--threads 2]
    .venv/bin/python bench/sample.py --random [--repeats 3] [--cases A,B]
    .venv/bin/python bench/sample.py --quality [--quality-samples 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import interleaved_best, interleaved_rounds  # noqa: E402
from models import TarFlow, TarFlowConfig  # noqa: E402
from trainer.evaluation.sampler import finite_rows  # noqa: E402

# What these commands leave (the first is the README's first command; both take minutes on a CPU):
#   tarflow train                                   → the digits checkpoint
#   tarflow train configs/photos.yaml train.steps=1000 train.run_dir=runs/photos_1k
DIGITS = "runs/digits/checkpoints/step-00001000"
PHOTOS = "runs/photos_1k/checkpoints/step-00001000"
TRAIN_COMMANDS = {DIGITS: "tarflow train",
                  PHOTOS: "tarflow train configs/photos.yaml train.steps=1000 train.run_dir=runs/photos_1k"}
PHOTOS_ATTN_TEMP = 0.8  # configs/photos.yaml sample.attn_temp

CASES = {
    # name: (config, batch)
    "A": (TarFlowConfig(in_channels=3, img_size=32, patch_size=4, channels=128, num_blocks=4, layers_per_block=2,
                        num_classes=10), 32),
    "B": (TarFlowConfig(in_channels=3, img_size=32, patch_size=2, channels=256, num_blocks=4, layers_per_block=4,
                        num_classes=10), 16),
}


# ---------------------------------------------------------------- the reference's sampler design
def _baseline_attention(attn, x, cache, temp):
    B, T, C = x.shape
    x = attn.norm(x.float()).type(x.dtype)
    q, k, v = attn.qkv(x).reshape(B, T, 3 * attn.num_heads, attn.head_dim).transpose(1, 2).chunk(3, dim=1)
    cache[0].append(k)
    cache[1].append(v)
    k = torch.cat(cache[0], dim=2)
    v = torch.cat(cache[1], dim=2)
    x = F.scaled_dot_product_attention(q, k, v, scale=attn.head_dim ** -0.5 / temp)
    return attn.proj(x.transpose(1, 2).reshape(B, T, C))


def _baseline_step(block, x_i, pos_i, y, caches, temp):
    h = block.proj_in(x_i) + pos_i
    if block.class_embed is not None:
        h = h + (block.class_embed[y] if y is not None else block.class_embed.mean(dim=0))
    for layer, cache in zip(block.attn_blocks, caches):
        h = h + _baseline_attention(layer.attention, h, cache, temp)
        h = h + layer.mlp.main(layer.mlp.norm(h.float()).type(h.dtype))
    return block.proj_out(h).chunk(2, dim=-1)


@torch.no_grad()
def baseline_reverse(model: TarFlow, noise, y=None, guidance=0.0, attn_temp=1.0):
    x = noise * model.var.sqrt()
    for block in reversed(model.blocks):
        x = block.permute(x).clone()
        pos = block.permute(block.pos_embed)
        cond = [[[], []] for _ in block.attn_blocks]
        uncond = [[[], []] for _ in block.attn_blocks]
        for i in range(x.shape[1] - 1):
            a, b = _baseline_step(block, x[:, i:i + 1], pos[i:i + 1], y, cond, 1.0)
            if guidance > 0:
                a_u, b_u = _baseline_step(block, x[:, i:i + 1], pos[i:i + 1], None, uncond, attn_temp)
                a = a + guidance * (a - a_u)
                b = b + guidance * (b - b_u)
            x[:, i + 1] = x[:, i + 1] * torch.exp(a[:, 0].float()).type(a.dtype) + b[:, 0]
        x = block.permute(x)
    return model.unpatchify(x)


def trained_like(config: TarFlowConfig) -> TarFlow:
    """Random but non-trivial weights with finite samples (proj_out is zero at init, which would hide work)."""
    torch.manual_seed(0)
    model = TarFlow(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.002 if "proj_out" in name else 0.02))
    return model


# ---------------------------------------------------------------- mode --random: the original comparison
def run_random(args: argparse.Namespace) -> None:
    print(f"{'case':<6}{'batch':>6}{'guidance':>10}{'baseline img/s':>16}{'ours img/s':>12}{'ratio':>8}")
    for name in args.cases.split(","):
        config, batch = CASES[name]
        model = trained_like(config)
        noise = torch.randn(batch, config.num_patches, config.patch_dim, generator=torch.Generator().manual_seed(1))
        y = torch.arange(batch) % config.num_classes
        for guidance in (0.0, args.guidance):
            ours = model.reverse(noise, y, guidance=guidance)
            ref = baseline_reverse(model, noise, y, guidance=guidance)
            assert torch.isfinite(ours).all()
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
            t_base, t_ours = interleaved_best(
                [lambda: baseline_reverse(model, noise, y, guidance=guidance),
                 lambda: model.reverse(noise, y, guidance=guidance)], args.repeats)
            print(f"{name:<6}{batch:>6}{guidance:>10.1f}{batch / t_base:>16.2f}{batch / t_ours:>12.2f}"
                  f"{t_base / t_ours:>8.2f}", flush=True)


# ---------------------------------------------------------------- mode (default): trained checkpoints
@dataclasses.dataclass
class Method:
    """One sampler under test: ``run()`` returns the images; ``stats`` the last call's per-block stats."""

    name: str
    tol: float | None
    run: Callable[[list], torch.Tensor]


@dataclasses.dataclass
class Row:
    model: str
    batch: int
    guidance: float
    method: str
    tol: float | None
    seconds: float
    img_per_s: float
    vs_official: float
    vs_sequential: float
    passes: list[int] | None
    ran: list[str] | None       # per block, what ran (auto: sequential, jacobi or jacobi+sequential)
    capped: bool
    work: float | None          # token evaluations / the sequential sampler's
    max_abs_diff: float | None  # vs sequential, rows finite in both
    nan_rows: int
    first_passes: list[int] | None = None  # the warm-up call's, where it differs from the timed calls' (auto)
    first_ran: list[str] | None = None


def _summary(stats: list) -> list:
    return [(b.method, b.passes) for b in stats]


def load_checkpoint(path: str):
    from trainer.evaluation.loading import load_model

    if not Path(path).exists():
        how = TRAIN_COMMANDS.get(path, "a `tarflow train` run")
        sys.exit(f"bench/sample.py: checkpoint {path} not found; make it with `{how}` or pass its path "
                 f"(--digits / --photos)")
    model, cfg, _ = load_model(path, torch.device("cpu"))
    return model.eval(), cfg


def has_auto() -> bool:
    from models import inversion

    return "auto" in inversion.METHODS


@torch.no_grad()
def calibrate_gs(model: TarFlow, guidance: float, attn_temp: float, n: int = 8, seed: int = 123):
    """``models.calibrate`` on ``n`` images sampled (sequentially, the given guidance) from another seed than the
    benchmark's noise; non-finite samples are dropped."""
    from models import calibrate

    c = model.config
    noise = torch.randn(n, c.num_patches, c.patch_dim, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(n) % c.num_classes if c.num_classes else None
    x = model.reverse(noise, y, guidance=guidance, attn_temp=attn_temp)
    ok = finite_rows(x)
    if not bool(ok.any()):
        raise RuntimeError("every calibration sample is non-finite")
    return calibrate(model, x[ok], y[ok] if y is not None else None)


def build_methods(model: TarFlow, noise: torch.Tensor, y, guidance: float, attn_temp: float, tols, window: int,
                  module_size: int, calib, auto: bool) -> list[Method]:
    kw = dict(guidance=guidance, attn_temp=attn_temp)

    def ours(**extra):
        def run(stats: list) -> torch.Tensor:
            return model.reverse(noise, y, stats=stats, **kw, **extra)
        return run

    methods = [Method("official", None, lambda stats: baseline_reverse(model, noise, y, **kw)),
               Method("sequential", None, ours())]
    for tol in tols:
        methods += [Method("jacobi", tol, ours(method="jacobi", tol=tol)),
                    Method(f"jacobi-w{window}", tol, ours(method="jacobi", tol=tol, window=window)),
                    Method(f"gs-jacobi-m{module_size}", tol,
                           ours(method="gs-jacobi", tol=tol, module_size=module_size,
                                tough_blocks=calib.tough_blocks, init=calib.init))]
        if auto:
            methods.append(Method("auto", tol, ours(method="auto", tol=tol)))
    return methods


def measure_group(label: str, model: TarFlow, batch: int, guidance: float, attn_temp: float, conditional: bool,
                  tols, args, calib, auto: bool) -> list[Row]:
    c = model.config
    noise = torch.randn(batch, c.num_patches, c.patch_dim, generator=torch.Generator().manual_seed(args.seed))
    y = torch.arange(batch) % c.num_classes if conditional else None
    module_size = args.module_size or max(1, c.num_patches // 4)
    window = args.window or max(8, c.num_patches // 4)
    methods = build_methods(model, noise, y, guidance, attn_temp, tols, window, module_size, calib, auto)
    first_stats: list[list | None] = [None] * len(methods)
    stats: list[list] = [[] for _ in methods]
    last: list[torch.Tensor | None] = [None] * len(methods)

    def caller(i: int) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            s: list = []
            out = methods[i].run(s)
            if first_stats[i] is None:
                first_stats[i] = s
            stats[i], last[i] = s, out  # the last (timed) call's: what auto ran can change after its first call
            return out
        return call

    best, rounds = interleaved_rounds([caller(i) for i in range(len(methods))], args.repeats, args.group_budget)
    t_off, t_seq = best[0], best[1]
    seq = last[1]
    seq_evals = len(model.blocks) * (c.num_patches - 1)
    rows = []
    for m, t, out, s, s0 in zip(methods, best, last, stats, first_stats):
        both = finite_rows(out) & finite_rows(seq)
        diff = float((out[both].double() - seq[both].double()).abs().max()) if bool(both.any()) else None
        rows.append(Row(label, batch, guidance, m.name, m.tol, t, batch / t, t_off / t, t_seq / t,
                        [b.passes for b in s] if s else None, [b.method for b in s] if s else None,
                        any(b.capped for b in s),
                        sum(b.token_evals for b in s) / seq_evals if s else None, diff,
                        int((~both).sum()),
                        None if s0 is None or _summary(s0) == _summary(s) else [b.passes for b in s0],
                        None if s0 is None or _summary(s0) == _summary(s) else [b.method for b in s0]))
    print(f"  [{label} batch {batch} guidance {guidance:g}: {len(methods)} samplers, best of {rounds} "
          f"interleaved rounds]", flush=True)
    return rows


HEADER = (f"{'model':<8}{'batch':>6}{'g':>4}  {'method':<14}{'tol':>7}{'img/s':>10}{'×off':>7}{'×seq':>7}"
          f"  {'passes/block (last first)':<27}{'work':>6}{'max|Δ|':>10}{'nan':>5}")


RAN = {"sequential": "s", "jacobi": "j", "jacobi+sequential": "j+s"}


def passes_text(passes: list[int], ran: list[str] | None, capped: bool) -> str:
    """Passes per block, "/"-separated; with ``ran`` (auto) each prefixed by what ran: s (sequential: T-1 steps),
    j (Jacobi), j+s (Jacobi handed over to the sequential sampler: passes + steps)."""
    tags = [RAN.get(m, m) for m in ran] if ran else [""] * len(passes)
    return "/".join(f"{t}{n}" for t, n in zip(tags, passes)) + ("*" if capped else "")


def format_row(r: Row) -> str:
    tol = "-" if r.tol is None else f"{r.tol:.0e}"
    passes = "-" if r.passes is None else passes_text(r.passes, r.ran if r.method == "auto" else None, r.capped)
    work = "-" if r.work is None else f"{r.work:.2f}"
    diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
    return (f"{r.model:<8}{r.batch:>6}{r.guidance:>4g}  {r.method:<14}{tol:>7}{r.img_per_s:>10.2f}"
            f"{r.vs_official:>7.2f}{r.vs_sequential:>7.2f}  {passes:<27}{work:>6}{diff:>10}{r.nan_rows:>5}")


def run_trained(args: argparse.Namespace) -> None:
    auto = has_auto()
    if not auto:
        print("note: models.inversion.METHODS has no 'auto' yet: the auto rows are skipped")
    if args.quick:
        plan = {"batches": [4], "tols": [1e-3], "guidances": [0.0, 2.0]}
    else:
        plan = {"batches": args.batches, "tols": args.tols, "guidances": [0.0, args.guidance]}
    models = [("digits", args.digits), ("photos", args.photos)]
    results: list[Row] = []
    meta: dict = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
                  "group_budget_s": args.group_budget, "seed": args.seed,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": {}}
    start = time.perf_counter()
    for label, path in models:
        model, cfg = load_checkpoint(path)
        c = model.config
        conditional = c.num_classes > 0
        attn_temp = 1.0 if conditional else PHOTOS_ATTN_TEMP
        calibs = {g: calibrate_gs(model, g, attn_temp if g > 0 else 1.0) for g in plan["guidances"]}
        meta["models"][label] = {"checkpoint": path, "T": c.num_patches, "D": c.patch_dim,
                                 "blocks": c.num_blocks, "conditional": conditional, "attn_temp": attn_temp,
                                 "module_size": args.module_size or max(1, c.num_patches // 4),
                                 "window": args.window or max(8, c.num_patches // 4),
                                 "calibration": {str(g): {"crm": list(cal.crm),
                                                          "tough_blocks": sorted(cal.tough_blocks),
                                                          "init": list(cal.init)} for g, cal in calibs.items()}}
        for g, cal in calibs.items():
            print(f"{label} (T={c.num_patches}, {'class-conditional' if conditional else 'unconditional'}), "
                  f"guidance {g:g}: CRM {', '.join(f'{v:.2f}' for v in cal.crm)} → tough blocks "
                  f"{sorted(cal.tough_blocks)}, init {list(cal.init)}", flush=True)
        for batch in plan["batches"]:
            for g in plan["guidances"]:
                rows = measure_group(label, model, batch, g, attn_temp if g > 0 else 1.0, conditional,
                                     plan["tols"], args, calibs[g], auto)
                print(HEADER)
                for r in rows:
                    print(format_row(r))
                for r in rows:
                    if r.first_passes is not None:
                        print(f"  note: {r.method} tol {r.tol:.0e}: the warm-up call ran "
                              f"{passes_text(r.first_passes, r.first_ran, False)}, the timed calls the above")
                print(flush=True)
                results += rows
    meta["seconds"] = round(time.perf_counter() - start, 1)
    print("\nall rows")
    print(HEADER)
    for r in results:
        print(format_row(r))
    print(f"\n{meta['seconds']:.0f} s in all", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in results]},
                                              indent=1, default=float))
        print(f"wrote {args.json}")


# ---------------------------------------------------------------- mode --quality
def run_quality(args: argparse.Namespace) -> None:
    from trainer.evaluation.classifier import find_classifier
    from trainer.evaluation.inception import to_uint8
    from trainer.evaluation.quality import QualityScorer, baseline
    from trainer.evaluation.sampler import SamplingSettings, draw_samples
    from trainer.runtime import Precision

    @dataclasses.dataclass(frozen=True)
    class MethodSettings(SamplingSettings):
        """The sweep's sampling settings plus the inversion method (a keyword of ``TarFlow.reverse``)."""

        method: str = "sequential"
        tol: float = 1e-4

        def reverse_kwargs(self) -> dict:
            return {**super().reverse_kwargs(), "method": self.method, "tol": self.tol}

    device = torch.device("cpu")
    model, cfg = load_checkpoint(args.digits)
    c = model.config
    clf = find_classifier(cfg.data, None, device, image_shape=(c.in_channels, c.img_size, c.img_size),
                          num_classes=c.num_classes)
    base = baseline(clf)
    print(f"classifier {clf.path}: held-out accuracy {base['heldout_accuracy']:.4f}, held-out halves FD "
          f"{base['halves_fd']:.4f} ({base['heldout_images']} images)")
    n = args.quality_samples
    settings = [MethodSettings(guidance=args.quality_guidance, method="sequential"),
                MethodSettings(guidance=args.quality_guidance, method="jacobi", tol=1e-3),
                MethodSettings(guidance=args.quality_guidance, method="jacobi", tol=1e-4)]
    print(f"{n} class-conditional samples of {args.digits}, guidance {args.quality_guidance:g}, base seed "
          f"{args.seed}, fp32")
    print(f"{'method':<12}{'tol':>7}{'accuracy':>10}{'class FD':>10}{'precision':>11}{'recall':>8}"
          f"{'redraws':>9}{'s':>7}{'pixels≠seq':>12}{'max|Δ|':>9}")
    reference = None
    out = []
    for s in settings:
        scorer = QualityScorer(clf, device)
        pixels_all, raw_all, redraws = [], [], 0
        t0 = time.perf_counter()
        for batch in draw_samples(model, range(n), s, base_seed=args.seed, batch_size=cfg.eval.batch_size,
                                  device=device, precision=Precision(None)):
            pixels = to_uint8(batch.images)
            scorer.update(batch.indices, batch.labels, pixels)
            pixels_all.append(pixels)
            raw_all.append(batch.images)
            redraws += batch.redraws
        seconds = time.perf_counter() - t0
        q = scorer.finish()
        pixels, raw = torch.cat(pixels_all), torch.cat(raw_all)
        if reference is None:
            reference = (pixels, raw)
        differ = float((pixels != reference[0]).double().mean())
        diff = float((raw.double() - reference[1].double()).abs().max())
        tol = "-" if s.method == "sequential" else f"{s.tol:.0e}"
        print(f"{s.method:<12}{tol:>7}{q.class_accuracy:>10.4f}{q.classifier_fd:>10.4f}{q.precision:>11.4f}"
              f"{q.recall:>8.4f}{redraws:>9}{seconds:>7.1f}{differ:>12.2e}{diff:>9.1e}", flush=True)
        out.append({"method": s.method, "tol": None if s.method == "sequential" else s.tol, **q.row(),
                    "nan_redraws": redraws, "seconds": seconds, "pixels_differing_vs_sequential": differ,
                    "max_abs_diff_vs_sequential": diff})
    print("(pixels≠seq: fraction of uint8 pixels that differ from the sequential sampler's; a redrawn sample has "
          "fresh noise, so it differs anyway)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": args.digits, "num_samples": n, "baseline": base,
                                               "rows": out}, indent=1))
        print(f"wrote {args.json}")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds at most (best of)")
    p.add_argument("--random", action="store_true", help="the original comparison on random-weight models")
    p.add_argument("--cases", default="A,B", help="--random: the cases")
    p.add_argument("--guidance", type=float, default=2.0, help="the guided setting (beside guidance 0)")
    p.add_argument("--quality", action="store_true", help="offline quality metric, sequential vs Jacobi (digits)")
    p.add_argument("--quality-samples", type=int, default=1000)
    p.add_argument("--quality-guidance", type=float, default=0.0)
    p.add_argument("--quick", action="store_true", help="a small subset (< 1 minute): a smoke test")
    p.add_argument("--digits", default=DIGITS, help="digits checkpoint (T=16, class-conditional)")
    p.add_argument("--photos", default=PHOTOS, help="photos checkpoint (T=64, unconditional)")
    p.add_argument("--batches", type=_ints, default=[1, 4, 64])
    p.add_argument("--tols", type=_floats, default=[1e-2, 1e-3, 1e-4])
    p.add_argument("--window", type=int, default=0,
                   help="windowed Jacobi: tokens past the frontier per pass (0: max(8, T/4): 8 digits, 16 photos)")
    p.add_argument("--module-size", type=int, default=0, help="GS-Jacobi module size (0: T/4)")
    p.add_argument("--group-budget", type=float, default=45.0,
                   help="seconds of timed rounds per model × batch × guidance group (fewer rounds when over)")
    p.add_argument("--seed", type=int, default=0, help="the benchmark noise's seed")
    p.add_argument("--json", default=None, help="write the rows (and settings) to this file")
    args = p.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 1)
    torch.set_num_threads(args.threads)
    rounds = "best of {} interleaved runs".format(args.repeats) + ("" if args.random or args.quality else
                                                                   f" (fewer past {args.group_budget:g} s a group)")
    print(f"torch {torch.__version__}, {args.threads} threads, float32 CPU, {rounds}")
    return args


def main() -> None:
    args = parse_args()
    if args.random:
        run_random(args)
    elif args.quality:
        run_quality(args)
    else:
        run_trained(args)


if __name__ == "__main__":
    main()
