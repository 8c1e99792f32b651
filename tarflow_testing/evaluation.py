"""Shared by the evaluation tests: a tiny digits TarFlow whose blocks do something, its one-file export, and FID
reference statistics of the held-out digits.

A tiny Inception-architecture network with random weights (``--inception tiny-random``) stands in for the FID
Inception: the tests check the plumbing, not FID values (real numbers need the real weights)."""

from pathlib import Path

import torch

from models import TarFlow
from trainer.checkpoint.export import save_model_file
from trainer.config import load_config
from trainer.evaluation.fid import save_stats
from trainer.evaluation.inception import load_fid_inception, resolve_weights_path
from trainer.evaluation.reference import compute_reference_stats, data_config_for
from trainer.runtime import Precision

TINY = ["model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1"]
CPU = torch.device("cpu")
FP32 = Precision(None)


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


def checkpoint_and_reference(root: Path) -> dict:
    """``perturbed_model()`` exported to ``root/model.pt`` and tiny-random statistics of the held-out digits."""
    model, cfg = perturbed_model()
    ckpt = export(model, cfg, root / "model.pt")
    ref = root / "ref.npz"  # as `tarflow eval stats digits --split heldout --inception tiny-random` makes it
    inception = load_fid_inception(resolve_weights_path("tiny-random"), CPU)
    save_stats(compute_reference_stats(data_config_for("digits", []), "heldout", inception, batch_size=100,
                                       device=CPU), ref)
    return {"root": root, "ckpt": str(ckpt), "ref": str(ref)}
