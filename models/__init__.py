"""TarFlow in pure PyTorch: the model, its samplers, reference interoperability, safetensors export and bits/dim."""

from .config import TarFlowConfig
from .convergence import Calibration, calibrate
from .inversion import METHODS, BlockStats, InversionSettings
from .metrics import bits_per_dim, uniform_dequantize
from .pretrained import PretrainedError, read_pretrained_metadata
from .tarflow import TarFlow, check_state_dict_matches, num_parameters

__all__ = ["TarFlow", "TarFlowConfig", "bits_per_dim", "uniform_dequantize", "check_state_dict_matches",
           "num_parameters", "METHODS", "BlockStats", "InversionSettings", "Calibration", "calibrate",
           "PretrainedError", "read_pretrained_metadata"]
