"""The engine's input checks: volumes of the model's box as a checked batch (numpy or torch),
and the on/off and counting arguments of its constructor and operations. Each mistake is an
:class:`InputError` naming the argument."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from cryolens.checked import CheckedVolumes, float32
from cryolens.errors import InputError


def check_shape(shape: tuple[int, ...], given: object, box: tuple[int, ...]) -> None:
    """``shape``: the batch's, after a single volume got its leading axis; ``given``: what
    the caller passed (named in the message); ``box``: the model's box shape."""
    if len(shape) != 4 or tuple(shape[1:]) != box:
        box = ", ".join(map(str, box))
        what = (f"shape {tuple(given.shape)}" if getattr(given, "ndim", 0)
                else f"a {type(given).__name__}")
        raise InputError(f"volumes must have shape (N, {box}) or ({box}) for one volume, "
                         f"got {what}", field="volumes")
    if shape[0] == 0:
        raise InputError("at least one volume is needed", field="volumes")


def host_batch(volumes, box: tuple[int, ...]) -> np.ndarray:
    """Shape- and dtype-checked (N, D, H, W) numpy array, not yet converted to float32."""
    if isinstance(volumes, CheckedVolumes):
        volumes = volumes.array
    try:
        array = np.asarray(volumes)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InputError(f"volumes must be a regular (N, D, H, W) array: {exc}",
                         field="volumes") from exc
    check_shape(array[None].shape if array.ndim == 3 else array.shape,
                array if array.ndim else volumes, box)
    if array.ndim == 3:
        array = array[None]
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"volumes must be real numbers, got dtype {array.dtype}", "volumes")
    return array


def tensor_batch(volumes: torch.Tensor, box: tuple[int, ...]) -> torch.Tensor:
    tensor = volumes.detach()
    check_shape((1, *tensor.shape) if tensor.ndim == 3 else tuple(tensor.shape), tensor, box)
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise InputError(f"volumes must be real numbers, got dtype {tensor.dtype}", "volumes")
    return tensor


def checked_batch(volumes, box: tuple[int, ...]) -> np.ndarray:
    """Checked (N, D, H, W) numpy array of real numbers each finite in float32, in the dtype
    given (not converted: see :func:`float32`). Volumes that were checked where they came in
    (:class:`~cryolens.checked.CheckedVolumes`: the server's body reader, the client) are not
    checked for finiteness again."""
    if isinstance(volumes, torch.Tensor):
        volumes = host_array(tensor_batch(volumes, box))
    array = host_batch(volumes, box)
    if not isinstance(volumes, CheckedVolumes):
        CheckedVolumes.check(array)
    return array


def as_batch(volumes, box: tuple[int, ...]) -> np.ndarray:
    """:func:`checked_batch` as one C-contiguous float32 array."""
    return float32(checked_batch(volumes, box))


def switch(name: str, value: object) -> bool:
    """An on/off argument, which must be a bool: the string "false" (from a config file, say)
    is truthy, and would silently mean the opposite."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InputError(f"{name} must be True or False, got {type(value).__name__} "
                     f"{repr(value)[:40]}", field=name)


def at_least_one(name: str, value: object, unit: str) -> int:
    """A positive whole number of ``unit`` (a float such as 2e9 is taken as an int)."""
    if (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value) and value >= 1):
        return int(value)
    raise InputError(f"{name} must be a number of {unit}, at least 1, got "
                     f"{type(value).__name__} {repr(value)[:40]}", field=name)


def host_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.cpu()
    if tensor.dtype in (torch.bfloat16, torch.uint16, torch.uint32, torch.uint64) or (
            tensor.dtype.is_floating_point and tensor.element_size() == 1):  # no numpy twin
        tensor = tensor.to(torch.float32)
    return tensor.numpy()
