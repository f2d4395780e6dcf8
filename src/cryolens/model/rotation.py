"""Pose algebra: the encoder's axis-angle output to a quaternion and a rotation matrix, and a
rotation matrix back to axis-angle (training decodes in known poses).

Conventions follow CryoLens exactly (spec.md c.4), including its epsilon on the axis norm.
"""
from __future__ import annotations

import torch

AXIS_EPS = 1e-8


def axis_angle_to_quaternion(pose: torch.Tensor) -> torch.Tensor:
    """(B, 4) (angle, ax, ay, az) or (B, 1) angle about z -> (B, 4) quaternion (w, x, y, z).

    The axis is divided by ``norm + 1e-8`` and the quaternion is not re-normalised, so a
    near-zero axis gives a shrunken, non-unit quaternion, as in the reference.
    """
    angle = pose[:, :1]
    if pose.shape[1] == 1:
        axis = torch.zeros(pose.shape[0], 3, dtype=pose.dtype, device=pose.device)
        axis[:, 2] = 1.0
    else:
        axis = pose[:, 1:4]
        axis = axis / (torch.linalg.vector_norm(axis, dim=1, keepdim=True) + AXIS_EPS)
    half = angle / 2
    return torch.cat([torch.cos(half), axis * torch.sin(half)], dim=1)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(B, 4) scalar-first quaternion -> (B, 3, 3) active rotation of column vectors (x, y, z).

    Uses the unit-quaternion formula even for a non-unit q (the reference does the same).
    """
    w, x, y, z = q.unbind(dim=1)
    two = 2.0
    rows = [
        1 - two * (y * y + z * z), two * (x * y - w * z), two * (x * z + w * y),
        two * (x * y + w * z), 1 - two * (x * x + z * z), two * (y * z - w * x),
        two * (x * z - w * y), two * (y * z + w * x), 1 - two * (x * x + y * y),
    ]
    return torch.stack(rows, dim=1).reshape(-1, 3, 3)


def pose_to_matrix(pose: torch.Tensor) -> torch.Tensor:
    return quaternion_to_matrix(axis_angle_to_quaternion(pose))


def matrix_to_axis_angle(rot: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotations -> (B, 4) (angle, unit axis) in the pose head's convention."""
    trace = rot[:, 0, 0] + rot[:, 1, 1] + rot[:, 2, 2]
    w = torch.sqrt(torch.clamp(1 + trace, min=1e-12)) / 2
    x = torch.sqrt(torch.clamp(1 + rot[:, 0, 0] - rot[:, 1, 1] - rot[:, 2, 2], min=0)) / 2
    y = torch.sqrt(torch.clamp(1 - rot[:, 0, 0] + rot[:, 1, 1] - rot[:, 2, 2], min=0)) / 2
    zq = torch.sqrt(torch.clamp(1 - rot[:, 0, 0] - rot[:, 1, 1] + rot[:, 2, 2], min=0)) / 2
    x = torch.copysign(x, rot[:, 2, 1] - rot[:, 1, 2])
    y = torch.copysign(y, rot[:, 0, 2] - rot[:, 2, 0])
    zq = torch.copysign(zq, rot[:, 1, 0] - rot[:, 0, 1])
    vec = torch.stack([x, y, zq], 1)
    norm = torch.linalg.vector_norm(vec, dim=1, keepdim=True)
    angle = 2 * torch.atan2(norm[:, 0], w)
    axis = vec / torch.clamp(norm, min=1e-12)
    return torch.cat([angle[:, None], axis], 1)
