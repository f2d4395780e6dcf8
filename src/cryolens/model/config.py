"""The shape of a CryoLens model: every size the weights can describe, in one frozen dataclass.

v001 is ``CryoLensConfig()``; other configurations come from
:func:`cryolens.checkpoints.infer_config`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

#: Encoder widths, never stored in a checkpoint: the same for every CryoLens model.
ENCODER_CHANNELS: tuple[int, ...] = (8, 16, 32, 64)
#: Extra render margin the decoder adds around the box before the final convolution.
DECODER_PADDING = 9
#: Side of the final "valid" convolution kernel.
FINAL_KERNEL = 9


@dataclass(frozen=True)
class CryoLensConfig:
    """Sizes of a CryoLens VAE.

    ``affinity_dims`` of the ``latent_dims`` feed the affinity segment (``n_affinity`` splats, which
    carry the structure and follow the pose); the rest feed the free segment (``n_free`` splats).
    """

    box_size: int = 48
    latent_dims: int = 40
    affinity_dims: int = 32
    n_affinity: int = 614
    n_free: int = 154
    pose_dims: int = 4
    sigma_min: float = 0.005
    sigma_max: float = 0.1

    def __post_init__(self) -> None:
        if self.box_size % 16 or self.box_size <= 0:
            raise ValueError(f"box_size must be a positive multiple of 16, got {self.box_size}")
        if not 0 < self.affinity_dims <= self.latent_dims:
            raise ValueError(
                f"affinity_dims must be in 1..latent_dims={self.latent_dims}, "
                f"got {self.affinity_dims}"
            )
        if self.n_affinity <= 0 or self.n_free < 0:
            raise ValueError("n_affinity must be positive and n_free non-negative")
        if self.n_free and self.free_dims == 0:
            raise ValueError("free splats need at least one free latent dimension")
        if self.pose_dims not in (1, 4):
            raise ValueError("pose_dims must be 1 (angle about z) or 4 (axis-angle), "
                             f"got {self.pose_dims}")

    @property
    def free_dims(self) -> int:
        return self.latent_dims - self.affinity_dims

    @property
    def n_splats(self) -> int:
        return self.n_affinity + self.n_free

    @property
    def latent_ratio(self) -> float:
        return self.affinity_dims / self.latent_dims

    @property
    def margin(self) -> int:
        """Render voxels on each side of the box: padding plus half the final kernel (13 for
        v001)."""
        return DECODER_PADDING + FINAL_KERNEL // 2

    @property
    def render_size(self) -> int:
        """Side of the decoder's render grid (74 for v001)."""
        return self.box_size + 2 * self.margin

    @property
    def encoder_flat(self) -> int:
        return ENCODER_CHANNELS[-1] * (self.box_size // 16) ** 3

    def to_dict(self) -> dict:
        return {**asdict(self), "latent_ratio": self.latent_ratio, "n_splats": self.n_splats,
                "free_dims": self.free_dims}
