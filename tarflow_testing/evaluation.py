"""Shared by the evaluation tests: a tiny digits TarFlow whose blocks do something, its one-file export, random
FID Inception weights in each library's own file layout, and FID reference statistics of held-out digits.

The FID Inception weights cannot be downloaded here: random weights (scaled so that features vary) stand in, in
the files each library loads (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` for the paper
convention, pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``). The tests check the plumbing and the
conventions, not FID values: real numbers need the real weights."""

from pathlib import Path

import torch

from models import TarFlow
from trainer.checkpoint.export import save_model_file
from trainer.config import load_config
from trainer.evaluation.fid import save_stats, stats_suffix
from trainer.evaluation.inception import CONVENTIONS, WEIGHTS, load_fid_network, random_state_dict
from trainer.evaluation.reference import compute_reference_stats, data_config_for
from trainer.runtime import Precision

TINY = ["model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1"]
CPU = torch.device("cpu")
FP32 = Precision(None)
# a small held-out set: the networks are the full Inception at 299×299 (0.2–0.5 s per image on this 2-core CPU)
SMALL_HELDOUT = ["data.heldout_fraction=0.01"]  # 18 digits


def perturbed_model(overrides=(), seed=0) -> tuple[TarFlow, object]:
    """A tiny digits TarFlow whose blocks do something (a fresh one's proj_out is zero: guidance would be a no-op)."""
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(seed)
    model = TarFlow(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.02 if "proj_out" in name else 0.3 if "embed" in name else 0.05
            p.add_(torch.randn_like(p) * scale)
    return model.eval(), cfg


def export(model: TarFlow, cfg, path: Path) -> Path:
    return save_model_file(model.state_dict(), cfg, 0, path)


def random_weight_files(directory: Path, seed: int = 0) -> Path:
    """Both conventions' weights files, random, under their libraries' file names in ``directory`` (which then
    serves as ``--inception DIR`` for either convention)."""
    directory.mkdir(parents=True, exist_ok=True)
    for convention in CONVENTIONS:
        torch.save(random_state_dict(convention, seed), directory / WEIGHTS[convention].name)
    return directory


def checkpoint_and_reference(root: Path, weights: Path, convention: str = "paper") -> dict:
    """``perturbed_model()`` exported to ``root/model.pt`` and ``convention`` statistics of 18 held-out digits."""
    model, cfg = perturbed_model()
    ckpt = export(model, cfg, root / "model.pt")
    # as `tarflow eval stats digits data.heldout_fraction=0.01 --split heldout --inception WEIGHTS` makes it
    ref = root / f"ref{stats_suffix(convention)}"
    network = load_fid_network(str(weights), convention, CPU)
    save_stats(compute_reference_stats(data_config_for("digits", SMALL_HELDOUT), "heldout", network,
                                       batch_size=100, device=CPU), ref, network.stats_state())
    return {"root": root, "ckpt": str(ckpt), "ref": str(ref), "weights": str(weights)}
