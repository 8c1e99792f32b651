"""Run under torchrun as ``strategy_equivalence.py OUT_DIR STRATEGY [STRATEGY ...]``: for each strategy in turn,
(rank 0) k optimizer steps in one process on the whole global batch, then the same steps with STRATEGY over all
ranks, each on its part of every global batch. Writes ``OUT_DIR/STRATEGY.json``: both loss sequences, the largest
parameter difference and, after training, the largest difference between sampling (and denoising) through the
strategy's model and through an unsharded copy; and the weight average (train.ema) against one computed by hand from
the one-process parameter trajectory, its bytes per rank, and its checkpoint (save, load into a new strategy, export
in one process). Several strategies share one launch (and one process group)
because starting the processes costs more than the steps."""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cluster.env import discover  # noqa: E402
from models import TarFlow, TarFlowConfig  # noqa: E402
from tarflow_testing.memory import training_state_bytes  # noqa: E402
from trainer.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from trainer.config import Config, EMAConfig, FSDPConfig, OptimConfig  # noqa: E402
from trainer.distributed import process_group  # noqa: E402
from trainer.strategies import SingleDevice, build_strategy  # noqa: E402
from trainer.strategies.deepspeed_config import build_deepspeed_config  # noqa: E402

CONFIG = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                       layers_per_block=1, num_classes=10)
GLOBAL_BATCH, MICRO_STEPS, STEPS = 8, 2, 4
LRS = [1e-3 * (k + 1) / STEPS for k in range(STEPS)]  # a changing rate: the strategy must apply the one it is given
EMA = EMAConfig(decay=0.7, start_step=1)  # step 1 copies the weights, steps 2.. average them


def global_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=g) * 2 - 1,
             torch.randint(-1, 10, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def hand_ema(trajectory: list[dict]) -> dict:
    """The weight average of a parameter trajectory (initial weights, then after each step), in float64."""
    ema = {k: v.double() for k, v in trajectory[0].items()}
    for step, params in enumerate(trajectory[1:], start=1):
        d = 0.0 if step <= EMA.start_step else EMA.decay
        ema = {k: d * ema[k] + (1 - d) * params[k].double() for k in ema}
    return ema


def build(strategy, checkpoint_every: int = 0):
    torch.manual_seed(0)
    model = TarFlow(CONFIG)
    apply_activation_checkpointing(model, checkpoint_every)
    strategy.setup(model, OptimConfig(lr=1e-3))
    strategy.attach_ema(EMA)


def run(strategy, parts: int, part: int, checkpoint_every: int = 0, bf16: bool = False, trajectory=None):
    build(strategy, checkpoint_every)
    record = (lambda: trajectory.append({k: p.detach().clone() for k, p in strategy.unwrapped.named_parameters()})) \
        if trajectory is not None else (lambda: None)
    record()
    losses = []
    for lr, (x, y) in zip(LRS, global_batches()):
        x, y = x.chunk(parts)[part], y.chunk(parts)[part]
        step_loss = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(MICRO_STEPS), y.chunk(MICRO_STEPS))):
            with strategy.accumulating() if i < MICRO_STEPS - 1 else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = TarFlow.loss(*strategy.model(xm, ym))
                strategy.backward(loss / MICRO_STEPS)
            step_loss += loss.item() / MICRO_STEPS
        strategy.step(lr, 1.0, torch.tensor(True))
        strategy.update_ema(len(losses) + 1)
        record()
        losses.append(step_loss)
    return losses, {k: v.detach().clone() for k, v in strategy.unwrapped.state_dict().items()}


def main() -> None:
    out_dir, names = Path(sys.argv[1]), sys.argv[2:]
    env, device = discover(), torch.device("cpu")
    references: dict[bool, tuple] = {}  # the one-process run depends only on bf16
    with process_group(env, device):
        for name in names:
            compare(name, out_dir / f"{name}.json", env, device, references)


def compare(strategy_name: str, out: Path, env, device, references: dict) -> None:
    name, _, every = strategy_name.partition("+ac")  # e.g. "fsdp+ac1": activation checkpointing of every layer
    name, _, variant = name.partition(":")  # e.g. "fsdp:block", "fsdp:hybrid", "fsdp:bf16", "deepspeed:3,bf16"
    variants = set(variant.split(","))
    bf16 = "bf16" in variants  # both runs under bf16 autocast; FSDP also keeps bf16 parameters for compute
    if env.rank == 0 and bf16 not in references:
        # the one-process reference first: no rank may leave while another still computes
        single, trajectory = SingleDevice(device), []
        ref_losses, ref_params = run(single, 1, 0, bf16=bf16, trajectory=trajectory)
        ref_ema = hand_ema(trajectory)
        single_ema = single.full_ema_state_dict()
        single_ema_diff = max((single_ema[k].double() - ref_ema[k]).abs().max().item() for k in ref_ema)
        references[bf16] = ref_losses, ref_params, training_state_bytes(single), ref_ema, single_ema_diff
    if env.rank == 0:
        ref_losses, ref_params, replica_bytes, ref_ema, single_ema_diff = references[bf16]
    options = FSDPConfig(unit="block" if "block" in variants else "layer", hybrid="hybrid" in variants,
                         reshard_after_forward="keep" not in variants)
    ds_config = None
    if name == "deepspeed":
        cfg = Config()
        cfg.train.global_batch, cfg.train.micro_batch = GLOBAL_BATCH, GLOBAL_BATCH // (env.world_size * MICRO_STEPS)
        cfg.deepspeed.stage = int(next(v for v in variants if v.isdigit()))
        ds_config = build_deepspeed_config(cfg, env.world_size, bf16=bf16)
    def new_strategy():
        return build_strategy(name, device, torch.bfloat16 if bf16 else None, fsdp=options,
                              nodes=env.world_size // env.local_world_size, deepspeed_config=ds_config)

    strategy = new_strategy()
    losses, _ = run(strategy, env.world_size, env.rank, int(every or 0), bf16=bf16)
    ema = check_ema(strategy, new_strategy, out.with_suffix(".ckpt"), int(every or 0), bf16, env)
    held = torch.tensor([training_state_bytes(strategy)], dtype=torch.float64)
    dist.all_reduce(held, op=dist.ReduceOp.MAX)  # the fullest rank
    mean = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(mean)
    losses = (mean / env.world_size).tolist()
    full = strategy.full_model_state_dict()  # collective for sharded strategies; full on rank 0

    # Sampling and denoising through the strategy's model (every rank, same noise) vs an unsharded copy.
    noise = torch.randn(3, CONFIG.num_patches, CONFIG.patch_dim, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, -1, 7])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with strategy.inference() as model, autocast:  # denoise between two samplings, as the trainer does
        model.denoise(model.reverse(noise, labels, guidance=0.0), labels, noise_std=0.05)
        sampled = model.reverse(noise, labels, guidance=1.0)
        denoised = model.denoise(sampled, labels, noise_std=0.05)
        # the parallel inverse through the same (sharded) model: tol=0 iterates until exact
        jacobi = model.reverse(noise, labels, guidance=1.0, method="jacobi", tol=0.0)
    if env.rank == 0:
        plain = TarFlow(CONFIG)
        plain.load_state_dict(full)
        rels = {k: ((full[k] - ref_params[k]).abs().max() / ref_params[k].abs().max().clamp_min(1e-12)).item()
                for k in full}
        worst = max(rels, key=rels.get)
        print(f"largest relative parameter difference: {worst} {rels[worst]:.3g}")
        rel = rels[worst]
        abs_diff = max((full[k] - ref_params[k]).abs().max().item() for k in full)
        params = dict(plain.named_parameters())
        diffs = torch.cat([(full[k] - ref_params[k]).abs().flatten() for k in full if k in params])
        far = (diffs > 0.1 * sum(LRS)).float().mean().item()  # elements whose AdamW path departed noticeably
        with autocast:
            plain_sampled = plain.reverse(noise, labels, guidance=1.0)
            plain_denoised = plain.denoise(sampled, labels, noise_std=0.05)
        ema_diff = max((ema["full"][k].double() - ref_ema[k]).abs().max().item() for k in ref_ema)
        out.write_text(json.dumps({
            **{k: v for k, v in ema.items() if k != "full"}, "ema_diff": ema_diff, "single_ema_diff": single_ema_diff,
            "strategy": losses, "single": ref_losses, "max_rel_param": rel, "max_abs_param": abs_diff,
            "far_fraction": far, "lr_sum": sum(LRS),
            "state_bytes": held.item(), "replica_bytes": replica_bytes,
            "sample_diff": (sampled - plain_sampled).abs().max().item(),
            "denoise_diff": (denoised - plain_denoised).abs().max().item(),
            "jacobi_diff": (jacobi - plain_sampled).abs().max().item()}))
    dist.barrier()


def check_ema(strategy, new_strategy, directory: Path, checkpoint_every: int, bf16: bool, env) -> dict:
    """The weight average through the strategy: gathered, its bytes on the fullest rank over a full fp32 replica's,
    sampling with it (raw weights put back bit for bit), and a checkpoint of it loaded into a new strategy (bitwise)
    and exported in one process (bitwise)."""
    from trainer.ema import _local

    raw_before = strategy.full_model_state_dict()
    full = strategy.full_ema_state_dict()
    held = torch.tensor([strategy.ema.nbytes()], dtype=torch.float64)
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    noise = torch.randn(2, CONFIG.num_patches, CONFIG.patch_dim, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([3, -1])
    with strategy.inference("ema") as model, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        sampled = model.reverse(noise, labels, guidance=1.0)
    raw_after = strategy.full_model_state_dict()
    directory.mkdir(exist_ok=True)
    strategy.save_state(directory)
    dist.barrier()
    loaded = new_strategy()
    build(loaded, checkpoint_every)
    loaded.load_state(directory)
    same = torch.tensor([float(loaded.ema.updates == strategy.ema.updates and all(
        torch.equal(_local(a), _local(loaded.ema.averages[k])) for k, a in strategy.ema.averages.items()))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    result = {"full": full, "ema_bytes": held.item(), "ema_loaded_bitwise": bool(same.item())}
    if env.rank == 0:
        replica = 4 * sum(p.numel() for p in TarFlow(CONFIG).parameters())  # a full fp32 copy of the parameters
        exported = type(strategy).export_model_state(directory, "ema")
        plain = TarFlow(CONFIG)
        plain.load_state_dict(full)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            plain_sampled = plain.reverse(noise, labels, guidance=1.0)
        result.update(
            ema_replica_bytes=replica,
            ema_export_bitwise=all(torch.equal(exported[k], full[k]) for k in full) and exported.keys() == full.keys(),
            ema_sample_diff=(sampled - plain_sampled).abs().max().item(),
            raw_restored_bitwise=all(torch.equal(raw_before[k], raw_after[k]) for k in raw_before))
    dist.barrier()
    return result


if __name__ == "__main__":
    main()
