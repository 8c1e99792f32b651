"""DDP, FSDP2 and DeepSpeed ZeRO with real processes (torchrun, 2 ranks, gloo on CPU): the same mathematics as
one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.env import ProcessEnv
from tarflow_testing.checkpoint_helpers import model_state
from tarflow_testing.runs import REPO, TINY, free_port, torchrun, two_agents
from trainer.config import load_config
from trainer.loop import train

# Per-rank bytes of parameters + gradients + AdamW state, as a fraction of a full fp32 replica's 16 bytes per
# parameter (4 parameter + 4 gradient + 8 moments), on 2 ranks:
#   ddp 16/16; fsdp (all sharded) 8/16; ZeRO-1 (4 + 2 master + 4 + 4)/16; ZeRO-2 (4 + 2 + 2 + 4)/16;
#   ZeRO-3 (2 + 2 + 2 + 4)/16: DeepSpeed keeps a separate fp32 master copy of each partition even when the model
#   is fp32; with bf16 parameters (its intended use) (1 + 2 + 2 + 4)/16.
EXPECTED_STATE = {"ddp": 1.0, "fsdp": 0.5, "deepspeed:1": 14 / 16, "deepspeed:2": 12 / 16, "deepspeed:3": 10 / 16,
                  "deepspeed:3,bf16": 9 / 16}


WORKER = str(REPO / "tests" / "workers" / "strategy_equivalence.py")
# One launch per group: starting two processes costs more than the steps of one strategy.
EQUIVALENCE_GROUPS = {
    "torch": ["ddp", "fsdp", "fsdp+ac1", "fsdp:block", "fsdp:keep", "ddp:bf16", "fsdp:bf16+ac1"],
    "deepspeed": ["deepspeed:1", "deepspeed:2", "deepspeed:3", "deepspeed:2+ac1", "deepspeed:3,bf16+ac1"],
}


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """``equivalence(strategy)``: the worker's result for one strategy, its group launched on first use."""
    launched: dict[str, Path] = {}

    def result(strategy: str) -> dict:
        group = next(g for g, names in EQUIVALENCE_GROUPS.items() if strategy in names)
        if group not in launched:
            out = tmp_path_factory.mktemp(f"equivalence-{group}")
            torchrun([WORKER, str(out), *EQUIVALENCE_GROUPS[group]])
            launched[group] = out
        return json.loads((launched[group] / f"{strategy}.json").read_text())

    return result


@pytest.mark.parametrize("strategy", [s for names in EQUIVALENCE_GROUPS.values() for s in names])
def test_steps_match_one_process_on_the_same_global_batch(equivalence, strategy):
    result = equivalence(strategy)
    if "bf16" in strategy:
        # Both runs under bf16 autocast, FSDP and DeepSpeed also with bf16 parameters for compute (fp32 masters):
        # bf16 matmuls over micro-batches of other shapes round differently (~1e-3 relative on gradients), and
        # AdamW's normalised update (about lr per element and step) can turn that into a different direction for
        # elements whose gradients are tiny, e.g. the zero-initialised output projections. So parameters are compared
        # in units of the largest movement AdamW allows (the sum of the learning rates, Σlr): fewer than 2% of the
        # elements may have departed by more than Σlr/10 (a wrong rate, reduction or update moves most of them),
        # none by more than Σlr. Reductions stay fp32.
        assert result["strategy"] == pytest.approx(result["single"], rel=5e-3)
        assert result["far_fraction"] < 0.02 and result["max_abs_param"] < result["lr_sum"]
        assert result["sample_diff"] < 5e-2 and result["denoise_diff"] < 1e-3 and result["jacobi_diff"] < 5e-2
    else:
        assert result["strategy"] == pytest.approx(result["single"], rel=1e-5)
        assert result["max_rel_param"] < 1e-5
        # Sampling and denoising through the (sharded) model equal the unsharded model's.
        assert result["sample_diff"] < 1e-5 and result["denoise_diff"] < 1e-6 and result["jacobi_diff"] < 1e-5
    ratio = result["state_bytes"] / result["replica_bytes"]
    print(f"{strategy}: far {result['far_fraction']:.4f} max {result['max_abs_param']:.2e}; "
          f"{result['state_bytes']:.0f} of {result['replica_bytes']} bytes per rank ({ratio:.4f})")
    kind = strategy.split("+")[0].replace(",bf16", ",bf16" if strategy.startswith("deepspeed") else "")
    kind = kind if kind in EXPECTED_STATE else kind.split(":")[0]
    assert ratio == pytest.approx(EXPECTED_STATE[kind], abs=0.01)
    if kind in ("fsdp", "deepspeed:3,bf16"):
        assert ratio <= 0.6


@pytest.mark.parametrize("strategy", [s for names in EQUIVALENCE_GROUPS.values() for s in names])
def test_weight_average_is_the_one_process_average_held_in_shards(equivalence, strategy):
    """train.ema through each strategy: the average equals one computed by hand (float64) from the one-process
    parameter trajectory; each rank holds its part of it (a replica under DDP, half on 2 ranks when the strategy
    shards: FSDP's shards, ZeRO's fp32 master partition); sampling with it matches an unsharded model holding it and
    puts the trained weights back bit for bit; a checkpoint of it loads bitwise into a new strategy and exports
    bitwise in one process."""
    r = equivalence(strategy)
    assert r["single_ema_diff"] < 1e-6  # the one-process run's own average (bf16 included: its own trajectory)
    if "bf16" in strategy:  # the parameters themselves differ by up to Σlr (see above)
        assert r["ema_diff"] < r["lr_sum"] and r["ema_sample_diff"] < 5e-2
    else:
        assert r["ema_diff"] < 1e-6 and r["ema_sample_diff"] < 1e-5
    assert r["ema_bytes"] / r["ema_replica_bytes"] == pytest.approx(1.0 if strategy.startswith("ddp") else 0.5,
                                                                    abs=0.01)
    assert r["ema_loaded_bitwise"] and r["ema_export_bitwise"] and r["raw_restored_bitwise"]


def test_strategy_and_launch_must_agree_before_any_process_group(tmp_path):
    with pytest.raises(ValueError, match="train.strategy=ddp runs one process per device: launch with torchrun"):
        train(load_config(None, [*TINY, "train.strategy=ddp", f"train.run_dir={tmp_path}"]))
    two = ProcessEnv(rank=0, world_size=2, local_world_size=2, scheduler="torchrun")
    with pytest.raises(ValueError, match="one of 2 processes; choose train.strategy=ddp"):
        train(load_config(None, [*TINY, f"train.run_dir={tmp_path}"]), env=two)
    with pytest.raises(ValueError, match="32 is not divisible by train.micro_batch × data-parallel size = 8 × 3"):
        train(load_config(None, [*TINY, "train.strategy=ddp", f"train.run_dir={tmp_path}"]),
              env=ProcessEnv(rank=0, world_size=3, local_world_size=3, scheduler="torchrun"))
    assert not torch.distributed.is_initialized()


def test_two_nodes_of_one_process_train_exactly_like_one_node_of_two(tmp_path):
    """Multi-node rendezvous through torchrun's c10d backend: two agents (--nnodes=2) on loopback."""
    overrides = [*TINY, "train.strategy=ddp", "train.steps=6", "eval.at_start=false"]
    torchrun(["-m", "tarflow", "train", f"train.run_dir={tmp_path / 'one_node'}", *overrides])
    two_agents(["-m", "tarflow", "train", f"train.run_dir={tmp_path / 'two_nodes'}", *overrides])
    a = model_state(tmp_path / "one_node" / "checkpoints" / "step-00000006")
    b = model_state(tmp_path / "two_nodes" / "checkpoints" / "step-00000006")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_hybrid_sharding_replicates_across_nodes_and_matches_one_process(tmp_path):
    """fsdp.hybrid on 2 nodes × 1 rank: a (replicate=2, shard=1) mesh, i.e. a full replica per node."""
    two_agents([WORKER, str(tmp_path), "fsdp:hybrid"])
    result = json.loads((tmp_path / "fsdp:hybrid.json").read_text())
    assert result["strategy"] == pytest.approx(result["single"], rel=1e-5)
    assert result["max_rel_param"] < 1e-5 and result["sample_diff"] < 1e-5
    assert result["state_bytes"] == result["replica_bytes"]


def test_the_deepspeed_launcher_runs_the_same_entry_point_as_torchrun(tmp_path):
    """`deepspeed --module tarflow train ...` (it appends --local_rank=N) trains exactly like torchrun."""
    overrides = [*TINY, "train.strategy=deepspeed", "deepspeed.stage=2", "train.steps=4", "eval.at_start=false"]
    torchrun(["-m", "tarflow", "train", f"train.run_dir={tmp_path / 'torchrun'}", *overrides])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    launcher = Path(sys.executable).with_name("deepspeed")
    result = subprocess.run([str(launcher), "--num_accelerators=2", f"--master_port={free_port()}", "--module",
                             "tarflow", "train", f"train.run_dir={tmp_path / 'launcher'}", *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a = model_state(tmp_path / "torchrun" / "checkpoints" / "step-00000004")
    b = model_state(tmp_path / "launcher" / "checkpoints" / "step-00000004")
    for key in a:
        assert torch.equal(a[key], b[key]), key
