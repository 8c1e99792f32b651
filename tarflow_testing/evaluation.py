"""Shared by the evaluation tests: a tiny digits TarFlow whose blocks do something, its one-file export, random
FID Inception weights in each library's own file layout, and FID reference statistics of held-out digits.

The FID Inception weights cannot be downloaded here: random weights (scaled so that features vary) stand in, in
the files each library loads (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` for the paper
convention, pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``). The tests check the plumbing and the
conventions, not FID values: real numbers need the real weights."""

from pathlib import Path
from unittest import mock

import torch

from models import TarFlow
from trainer.checkpoint.export import save_model_file
from trainer.config import load_config
from trainer.evaluation.fid import save_stats, stats_suffix
from trainer.evaluation.inception import CONVENTIONS, FEATURE_DIM, PAPER, WEIGHTS, check_convention, load_fid_network
from trainer.evaluation.reference import compute_reference_stats, data_config_for
from trainer.runtime import Precision

TINY = ["model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1"]
CPU = torch.device("cpu")
FP32 = Precision(None)
# a small held-out set: the networks are the full Inception at 299×299 (0.2–0.5 s per image on this 2-core CPU)
SMALL_HELDOUT = ["data.heldout_fraction=0.005"]  # 9 digits (an odd count: on 2 ranks, shards of 5 and 4)


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


def random_state_dict(convention: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the layout of ``convention``'s weights file: convolutions He-scaled, BatchNorm at unit
    scale with small random shifts, so that pool3 features vary with the image (unscaled random weights make them
    nearly constant). Deterministic in ``seed``."""
    shapes = _layout(check_convention(convention))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.int64)
        elif name.endswith("running_var") or (name.endswith("bn.weight")):
            state[name] = torch.ones(shape)
        elif name.endswith("running_mean"):
            state[name] = torch.zeros(shape)
        elif name.endswith("bn.bias") or name == "fc.bias":
            state[name] = torch.randn(shape, generator=g) * 0.1
        else:  # conv and fc weights
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def _layout(convention: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the convention's weights file, from the library's own network (built unloaded)."""
    if convention == PAPER:
        from torch_fidelity import feature_extractor_inceptionv3 as tf

        with mock.patch.object(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None), \
                mock.patch.object(tf, "load_state_dict_from_url", lambda *a, **k: {}):
            net = tf.FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)])
    else:
        from pytorch_fid import inception as pytorch_fid

        with mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None), \
                mock.patch.object(pytorch_fid, "load_state_dict_from_url", lambda *a, **k: {}):
            net = pytorch_fid.fid_inception_v3()
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def random_weight_files(directory: Path, seed: int = 0) -> Path:
    """Both conventions' weights files, random, under their libraries' file names in ``directory`` (which then
    serves as ``--inception DIR`` for either convention)."""
    directory.mkdir(parents=True, exist_ok=True)
    for convention in CONVENTIONS:
        torch.save(random_state_dict(convention, seed), directory / WEIGHTS[convention].name)
    return directory


def checkpoint_and_reference(root: Path, weights: Path, convention: str = "paper") -> dict:
    """``perturbed_model()`` exported to ``root/model.pt`` and ``convention`` statistics of the 9 held-out digits
    of ``SMALL_HELDOUT``."""
    model, cfg = perturbed_model()
    ckpt = export(model, cfg, root / "model.pt")
    # as `tarflow eval stats digits data.heldout_fraction=0.005 --split heldout --inception WEIGHTS` makes it
    ref = root / f"ref{stats_suffix(convention)}"
    network = load_fid_network(str(weights), convention, CPU)
    save_stats(compute_reference_stats(data_config_for("digits", SMALL_HELDOUT), "heldout", network,
                                       batch_size=100, device=CPU), ref, network.stats_state())
    return {"root": root, "ckpt": str(ckpt), "ref": str(ref), "weights": str(weights)}
