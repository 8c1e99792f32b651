"""TarFlow architecture hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TarFlowConfig:
    """Architecture of a TarFlow model (the paper's P-Ch-T-K naming: patch, channels, blocks, layers).

    ``channels`` must be a multiple of ``head_dim``. The reference code fixes ``head_dim=64`` and
    ``expansion=4``; other values give models the reference cannot load.
    """

    in_channels: int = 3
    img_size: int = 32
    patch_size: int = 4
    channels: int = 128
    num_blocks: int = 4
    layers_per_block: int = 2
    head_dim: int = 64
    expansion: int = 4
    nvp: bool = True
    num_classes: int = 0

    def __post_init__(self) -> None:
        for name in ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "layers_per_block",
                     "head_dim", "expansion"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TarFlowConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"TarFlowConfig.num_classes must be an integer >= 0, got {self.num_classes!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"TarFlowConfig.img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
        if self.channels % self.head_dim:
            raise ValueError(
                f"TarFlowConfig.channels={self.channels} is not a multiple of head_dim={self.head_dim}")
        if self.num_patches < 2:
            raise ValueError(f"TarFlow needs at least 2 patches per image, got {self.num_patches} "
                             f"(img_size={self.img_size}, patch_size={self.patch_size})")

    @property
    def num_patches(self) -> int:
        """Sequence length T."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Features per token D = in_channels * patch_size**2 (channel-major inside a patch)."""
        return self.in_channels * self.patch_size ** 2

    @property
    def num_heads(self) -> int:
        return self.channels // self.head_dim

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0
