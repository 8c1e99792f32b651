"""Evaluation: sampling, held-out bits/dim, FID, model loading. One module per job:

- ``sampler``: the one sampler core (``SamplingSettings`` → ``draw``), fixed noise sharded over ranks and gathered
  (``sample_on_ranks``), the FID sampling plan with NaN redraws (``draw_samples``)
- ``grids``: sample grids of fixed noise (training-time grids, ``tarflow sample``)
- ``trajectory``: the image after each inverted flow block
- ``bpd``: held-out bits/dim, one rank's share and the collective over all ranks
- ``loading``: checkpoint URI → model
- ``fid``, ``inception``: the distance, feature statistics, the FID Inception network
- ``reference``: FID reference statistics of a data set
- ``classifier``, ``quality``: a small classifier of an embedded data set (trained once, cached) and the offline
  quality metrics in its feature space: class accuracy, Fréchet distance, precision/recall
- ``sweep``: the FID (and / or the quality metrics) of a checkpoint at one setting, and sweeps over settings
- ``image_grid``: PNG grids and .npz arrays, written atomically
"""
