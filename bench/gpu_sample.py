"""Sampling throughput on one GPU: the sequential sampler against Jacobi, windowed Jacobi, GS-Jacobi and (when
``models.inversion.METHODS`` has it) ``auto``, on the paper's ImageNet-64 shape (P2-768-8-8: 1024 tokens of 12
features, 8 blocks × 8 layers, 1000 classes) with random but non-trivial weights (``bench.sample.trained_like``'s
recipe, built on the device), bf16 autocast, at batch 16, 64 and 256.

Per batch: one warm-up round over every sampler (its output and per-block stats are kept), then up to
``--repeats`` timed rounds, the samplers interleaved, each call between two ``torch.cuda.synchronize()``; best of
the rounds. Prints images/s, the ratio against the sequential sampler (t_seq / t: > 1 is faster), Jacobi passes
per block (last block first; auto's prefixed s / j / j+s by what ran), token evaluations relative to the
sequential sampler, and max |Δ| against the sequential result (both bf16, so ~1e-2 is rounding). GS-Jacobi's
tough blocks and initial iterates come from ``models.calibrate`` on a few random images (where its dominance rule
finds no tough block, as on random weights, the quarter of the blocks with the highest CRM).

The whole run keeps to ``--budget`` seconds of sampling (default 400: with the model build, within 8 minutes on
one GPU): a sampler whose warm-up would start past the deadline is skipped, and fewer timed rounds are run when
the warm-up round says they would not fit; every batch's table is printed as soon as it is measured.

    .venv/bin/python bench/gpu_sample.py [--batches 16,64,256] [--tols 1e-3] [--window 64] [--json PATH]
    .venv/bin/python bench/gpu_sample.py --device cpu --tiny      # smoke test of the same code path (seconds)

Random weights close to the identity make Jacobi converge in few passes; a trained model needs more (see
bench/sample.py on the trained checkpoints), so read the Jacobi rows as an upper bound of what it gains.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sample import passes_text  # noqa: E402
from models import TarFlow, TarFlowConfig, calibrate  # noqa: E402

P2_768_8_8 = TarFlowConfig(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                           num_classes=1000)
TINY = TarFlowConfig(in_channels=3, img_size=16, patch_size=2, channels=64, num_blocks=2, layers_per_block=2,
                     head_dim=32, num_classes=10)


def trained_like_on(config: TarFlowConfig, device: torch.device, proj_out_std: float) -> TarFlow:
    """``bench.sample.trained_like`` built directly on ``device`` (a 450M-parameter init on the CPU is slow)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = TarFlow(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (proj_out_std if "proj_out" in name else 0.02))
    return model


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Result:
    batch: int
    guidance: float
    method: str
    tol: float | None
    seconds: float | None = None     # best timed call (None: skipped)
    rounds: int = 0                  # timed rounds (0: the warm-up call's time is reported)
    img_per_s: float | None = None
    vs_sequential: float | None = None
    passes: list[int] | None = None
    ran: list[str] | None = None
    capped: bool = False
    work: float | None = None
    max_abs_diff: float | None = None
    nan_rows: int = 0
    note: str = ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test; seconds on a CPU)")
    p.add_argument("--batches", default=None, help="comma-separated (default 16,64,256; --tiny 2,4)")
    p.add_argument("--guidance", default="0", help="comma-separated guidance weights (classifier-free)")
    p.add_argument("--tols", default="1e-3", help="comma-separated Jacobi tolerances")
    p.add_argument("--window", type=int, default=0, help="windowed Jacobi's window (0: T/16)")
    p.add_argument("--module-size", type=int, default=0, help="GS-Jacobi module size (0: T/8)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds at most (best of)")
    p.add_argument("--budget", type=float, default=None, help="seconds of sampling in all (default 400; --tiny 60)")
    p.add_argument("--proj-out-std", type=float, default=0.002, help="random proj_out weights' std")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    config = TINY if args.tiny else P2_768_8_8
    batches = [int(b) for b in (args.batches or ("2,4" if args.tiny else "16,64,256")).split(",")]
    guidances = [float(g) for g in args.guidance.split(",")]
    tols = [float(t) for t in args.tols.split(",")]
    T = config.num_patches
    window = args.window or max(2, T // 16)
    module_size = args.module_size or max(1, T // 8)
    budget = args.budget if args.budget is not None else (60.0 if args.tiny else 400.0)
    dtype = None if args.fp32 else torch.bfloat16

    from models import inversion

    auto = "auto" in inversion.METHODS
    t_build = time.perf_counter()
    model = trained_like_on(config, device, args.proj_out_std)
    sync(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {'fp32' if dtype is None else 'bf16 autocast'}, model "
          f"{'tiny' if args.tiny else 'P2-768-8-8'} (T={T}, D={config.patch_dim}, {config.num_blocks} blocks × "
          f"{config.layers_per_block} layers, {config.channels} channels), built in "
          f"{time.perf_counter() - t_build:.1f} s; window {window}, GS-Jacobi module {module_size}; budget "
          f"{budget:g} s, best of {args.repeats} interleaved rounds", flush=True)
    if not auto:
        print("note: models.inversion.METHODS has no 'auto': its rows are skipped", flush=True)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    with torch.no_grad(), autocast():
        calib_images = torch.rand(4, config.in_channels, config.img_size, config.img_size, device=device,
                                  generator=torch.Generator(device=device).manual_seed(7)) * 2 - 1
        calib_labels = torch.arange(4, device=device) % config.num_classes
        calib = calibrate(model, calib_images, calib_labels)
        if not calib.tough_blocks:  # random weights: no block stands out; modules on the hardest quarter anyway
            calib = calibrate(model, calib_images, calib_labels, num_tough=max(1, config.num_blocks // 4))
            print("calibration: no block is tough by the CRM's dominance rule; GS-Jacobi modules on the "
                  f"{max(1, config.num_blocks // 4)} highest-CRM blocks", flush=True)
    print(f"calibration: CRM {', '.join(f'{c:.3f}' for c in calib.crm)} → tough blocks "
          f"{sorted(calib.tough_blocks)}, init {list(calib.init)}", flush=True)

    deadline = time.perf_counter() + budget
    results: list[Result] = []
    header = (f"{'batch':>6}{'g':>4}  {'method':<16}{'tol':>7}{'img/s':>10}{'×seq':>7}{'rounds':>7}  "
              f"{'passes/block (last first)':<34}{'work':>6}{'max|Δ|':>9}{'nan':>5}  note")
    combos_left = len(batches) * len(guidances)
    for batch in batches:
        for g in guidances:
            noise = torch.randn(batch, T, config.patch_dim, generator=torch.Generator().manual_seed(0)).to(device)
            y = torch.arange(batch, device=device) % config.num_classes
            specs: list[tuple[str, float | None, dict]] = [("sequential", None, {})]
            for tol in tols:
                specs += [("jacobi", tol, {"method": "jacobi", "tol": tol}),
                          (f"jacobi-w{window}", tol, {"method": "jacobi", "tol": tol, "window": window}),
                          (f"gs-jacobi-m{module_size}", tol,
                           {"method": "gs-jacobi", "tol": tol, "module_size": module_size,
                            "tough_blocks": calib.tough_blocks, "init": calib.init})]
                if auto:
                    specs.append(("auto", tol, {"method": "auto", "tol": tol}))
            rows = [Result(batch, g, n, tol) for n, tol, _ in specs]

            def call(kw: dict, stats: list | None = None) -> tuple[torch.Tensor, float]:
                sync(device)
                t0 = time.perf_counter()
                with torch.no_grad(), autocast():
                    out = model.reverse(noise, y, guidance=g, stats=stats, **kw)
                sync(device)
                return out, time.perf_counter() - t0

            # warm-up round: outputs, stats, and the time estimate of a round
            outputs: list[torch.Tensor | None] = []
            warm = 0.0
            for row, (_, _, kw) in zip(rows, specs):
                if time.perf_counter() > deadline:
                    row.note = "skipped: past the budget"
                    outputs.append(None)
                    continue
                stats: list = []
                out, t = call(kw, stats)
                warm += t
                row.seconds = t
                outputs.append(out.float())
                if stats:
                    row.passes = [s.passes for s in stats]
                    row.ran = [s.method for s in stats]
                    row.capped = any(s.capped for s in stats)
                    row.work = sum(s.token_evals for s in stats) / (config.num_blocks * (T - 1))
            # timed rounds: this batch's share of the time left
            share = (deadline - time.perf_counter()) / combos_left
            combos_left -= 1
            rounds = max(0, min(args.repeats, int(share / max(warm, 1e-9))))
            best = [float("inf")] * len(rows)
            for _ in range(rounds):
                for i, (row, (_, _, kw)) in enumerate(zip(rows, specs)):
                    if outputs[i] is not None:
                        stats = []
                        out, t = call(kw, stats)
                        best[i] = min(best[i], t)
                        outputs[i] = out.float()  # the timed calls' (auto can change its choice after a probe)
                        if stats and [(s.method, s.passes) for s in stats] != list(zip(row.ran, row.passes)):
                            row.note = (f"first call ran {passes_text(row.passes, row.ran, row.capped)}; "
                                        f"timed calls the passes shown")
                            row.passes = [s.passes for s in stats]
                            row.ran = [s.method for s in stats]
                            row.capped = any(s.capped for s in stats)
                            row.work = sum(s.token_evals for s in stats) / (config.num_blocks * (T - 1))
            seq = outputs[0]
            for i, row in enumerate(rows):
                if outputs[i] is None:
                    continue
                row.rounds = rounds
                if rounds:
                    row.seconds = best[i]
                else:
                    row.note = "warm-up call only (no time for timed rounds)"
                row.img_per_s = batch / row.seconds
                if seq is not None:
                    row.vs_sequential = rows[0].seconds / row.seconds
                    fin = torch.isfinite(outputs[i]).flatten(1).all(1) & torch.isfinite(seq).flatten(1).all(1)
                    row.nan_rows = int((~fin).sum())
                    if bool(fin.any()):
                        row.max_abs_diff = float((outputs[i][fin] - seq[fin]).abs().max())
            print(header)
            for r in rows:
                tol = "-" if r.tol is None else f"{r.tol:.0e}"
                passes = "-" if r.passes is None else passes_text(r.passes, r.ran if r.method == "auto" else None,
                                                                  r.capped)
                passes = passes if len(passes) <= 33 else passes[:30] + "..."
                print(f"{r.batch:>6}{r.guidance:>4g}  {r.method:<16}{tol:>7}{fmt(r.img_per_s, '.2f'):>10}"
                      f"{fmt(r.vs_sequential, '.2f'):>7}{r.rounds:>7}  {passes:<34}{fmt(r.work, '.2f'):>6}"
                      f"{fmt(r.max_abs_diff, '.1e'):>9}{r.nan_rows:>5}  {r.note}")
            print(flush=True)
            results += rows
            del outputs, seq
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": name, "config": dataclasses.asdict(config),
                                               "window": window, "module_size": module_size,
                                               "calibration": {"crm": list(calib.crm),
                                                               "tough_blocks": sorted(calib.tough_blocks),
                                                               "init": list(calib.init)},
                                               "rows": [dataclasses.asdict(r) for r in results]}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
