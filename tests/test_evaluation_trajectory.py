"""The sampling trajectory: the image after each inverted block, as an array and a grid (rows: samples)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow.main import main
from tarflow_testing.evaluation import export, perturbed_model
from trainer.evaluation.image_grid import image_grid
from trainer.evaluation.sampler import SamplingSettings
from trainer.evaluation.trajectory import column_names, sampling_trajectory, save_trajectory


def test_the_trajectory_is_the_noise_then_each_blocks_inversion():
    model, _ = perturbed_model()
    noise = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 5, 9])
    traj, names = sampling_trajectory(model, noise, labels, SamplingSettings(guidance=1.0, annealed=True))
    assert traj.shape == (3, 3, 1, 8, 8) and names == ["noise", "block 1 inverted", "block 0 inverted"]
    torch.testing.assert_close(traj[:, 0], model.unpatchify(noise * model.var.sqrt()), rtol=0, atol=0)
    torch.testing.assert_close(traj[:, -1], model.reverse(noise, labels, guidance=1.0, annealed_guidance=True),
                               rtol=0, atol=0)
    # Without guidance each state is the forward pass of the next one: the flow's per-block outputs, backwards.
    traj0, _ = sampling_trajectory(model, noise, labels)
    _, _, outputs = model(traj0[:, -1], labels, return_outputs=True)
    torch.testing.assert_close(model.unpatchify(outputs[0]), traj0[:, 1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.unpatchify(outputs[1]), traj0[:, 0], rtol=1e-4, atol=1e-4)
    with_denoise, names = sampling_trajectory(model, noise, labels, SamplingSettings(denoise_std=0.05))
    assert with_denoise.shape[1] == 4 and names[-1] == "denoised"
    torch.testing.assert_close(with_denoise[:, -1], model.denoise(with_denoise[:, -2], labels, noise_std=0.05))
    assert column_names(4) == ["noise", "block 3 inverted", "block 2 inverted", "block 1 inverted",
                               "block 0 inverted"]


def test_the_grid_has_a_row_per_sample_and_a_column_per_state(tmp_path):
    traj = torch.rand(2, 5, 3, 4, 4) * 2 - 1
    png, npz = save_trajectory(traj, [f"c{i}" for i in range(5)], tmp_path, torch.tensor([0, 1]))
    grid = np.asarray(Image.open(png))
    scale = 16  # 64 // 4
    assert grid.shape == ((2 * 5 + 1) * scale, (5 * 5 + 1) * scale, 3)
    expected = image_grid(traj.reshape(10, 3, 4, 4), nrow=5)
    np.testing.assert_array_equal(grid[::scale, ::scale], expected)
    # row 1, column 3 is sample 1 after the fourth state
    cell = expected[1 + 1 * 5: 1 + 1 * 5 + 4, 1 + 3 * 5: 1 + 3 * 5 + 4]
    np.testing.assert_array_equal(cell, image_grid(traj[1, 3:4], padding=0))
    arrays = np.load(npz)
    assert arrays["trajectory"].shape == (2, 5, 3, 4, 4) and arrays["columns"].tolist() == [f"c{i}" for i in range(5)]
    with pytest.raises(ValueError, match="expected a trajectory"):
        save_trajectory(traj, ["too", "few"], tmp_path)


def test_sample_trajectory_command(tmp_path, capsys):
    model, cfg = perturbed_model()
    ckpt = export(model, cfg, tmp_path / "model.pt")
    out = tmp_path / "traj"
    assert main(["sample", str(ckpt), "--trajectory", "--num", "4", "--guidance", "1", "--labels", "2", "7",
                 "--denoise", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "raw_trajectory.png"), str(out / "raw_trajectory.npz")]
    arrays = np.load(out / "raw_trajectory.npz")
    assert arrays["trajectory"].shape == (4, 4, 1, 8, 8) and arrays["labels"].tolist() == [2, 7, 2, 7]
    assert arrays["columns"].tolist()[-1] == "denoised"
    noise = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(0))  # `sample`'s fixed noise, seed 0
    expected = model.reverse(noise, torch.tensor([2, 7, 2, 7]), guidance=1.0)
    torch.testing.assert_close(torch.from_numpy(arrays["trajectory"][:, -2]), expected, rtol=1e-6, atol=1e-6)
    assert np.asarray(Image.open(out / "raw_trajectory.png")).shape == ((4 * 9 + 1) * 8, (4 * 9 + 1) * 8, 3)
