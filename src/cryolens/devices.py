"""Where the engine runs: a device name resolved against this machine, and full float32 on
CUDA while an operation runs."""
from __future__ import annotations

import contextlib
import threading

import torch

from cryolens.errors import DeviceError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cpu``, ``cuda``, ``cuda:N`` (and ``mps`` where
    PyTorch has it). A device this machine does not have is a :class:`DeviceError`."""
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"device {device!r} was requested but this PyTorch ({torch.__version__}) sees no CUDA "
            "GPU; use --device cpu or auto, or install a CUDA build of PyTorch"
        )
    try:
        target = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from exc
    if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceError(f"device {device!r} was requested but this machine has {count} CUDA "
                          f"GPU(s): use cuda:0 .. cuda:{count - 1}, cuda or auto")
    mps = getattr(torch.backends, "mps", None)
    if target.type == "mps" and mps is not None and mps.is_available():
        return target
    if target.type not in ("cpu", "cuda"):  # meta, xla, ...: no weights could live there
        raise DeviceError(f"device {device!r} is not available to the engine: use cpu, cuda, "
                          "cuda:N or auto")
    return target


_FLOAT32_LOCK = threading.Lock()
_float32_users = 0
_tf32_saved: tuple[bool, bool] = (False, False)


@contextlib.contextmanager
def full_float32():
    """While any engine operation runs on CUDA (``allow_tf32=False``): cuDNN convolutions and
    cuBLAS products in full float32. cuDNN defaults to TF32 (10-bit mantissa): ~1e-3 relative
    error in the encoder, far outside CryoLens parity; full float32 costs little at these
    sizes. torch's flags are process-wide, so they are set only for the duration (counted over
    threads: the last operation to finish restores what was there before)."""
    global _float32_users, _tf32_saved
    with _FLOAT32_LOCK:
        if _float32_users == 0:
            _tf32_saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        _float32_users += 1
    try:
        yield
    finally:
        with _FLOAT32_LOCK:
            _float32_users -= 1
            if _float32_users == 0:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = \
                    _tf32_saved
