"""Reading a checkpoint file without executing it: its state dict and layout, the model's sizes
inferred from the weights' shapes alone, and whether the weights fit the model they describe.

Never executes a pickle; infers the architecture from the weights alone, never from the file
name. :mod:`cryolens.checkpoints` finds the file and loads the model with these.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cryolens.errors import CheckpointError, UnsafeCheckpointError
from cryolens.model.config import ENCODER_CHANNELS, CryoLensConfig

#: Key prefixes added by Lightning (``model.``), DDP (``module.``) and torch.compile
#: (``_orig_mod.``).
STRIPPED_PREFIXES: tuple[str, ...] = ("model.", "module.", "_orig_mod.")
#: State-dict entries that are the renderer's grid, rebuilt on load whatever their stored shape.
IGNORED_KEY_PART = "coords"
#: How many offending keys an error message lists before giving the count only.
_KEYS_SHOWN = 5


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- reading ---------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Load a checkpoint file's weights without running any code from it.

    Accepts safetensors and ``torch.save`` files loadable with ``weights_only=True`` holding a raw
    state dict, a Lightning checkpoint (``state_dict``) or ``{'model_state_dict': ...}``; the format
    is read from the bytes, not the file name. Returns the state dict with ``model.``,
    ``module.`` and ``_orig_mod.`` prefixes stripped and the renderer's ``coords`` buffer dropped,
    and the layout: ``"state_dict"``, ``"lightning"``, ``"model_state_dict"`` or ``"safetensors"``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"Cannot read checkpoint {path.name}: {exc}") from exc

    if not looks_like_checkpoint(head):
        raise CheckpointError(f"{path.name} is not a checkpoint: {_what_it_is(head)}, not "
                              "safetensors or a PyTorch file")
    if _looks_like_safetensors(head):
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path.name} is not a readable safetensors file: {exc}") from exc
        layout = "safetensors"
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # only a pickle that names a global (a function or class to call) would run code;
            # any other refusal is of bytes that are no pickle torch wrote (an odd opcode)
            if "weights only" not in str(exc).lower() or "GLOBAL" not in str(exc):
                raise CheckpointError(f"{path.name} is not a checkpoint: a damaged or foreign "
                                      "PyTorch pickle that torch.load cannot read") from exc
            wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
            asks = f" (it asks for {wanted.group(1)})" if wanted else ""
            raise UnsafeCheckpointError(
                f"Refusing to load {path.name}: it contains Python objects that would run code "
                f"when loaded{asks}, and CryoLens never loads such files. Re-save it as a plain "
                "state dict (torch.save(model.state_dict(), path)) or as safetensors, on a machine "
                "where you trust the file."
            ) from exc
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise CheckpointError(
                f"{path.name} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first})"
            ) from exc
        layout, raw = _unwrap(raw, path.name)
    return _clean(raw, path.name), layout


def first_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(16)


def looks_like_checkpoint(head: bytes) -> bool:
    """Could a file starting with ``head`` be a checkpoint: safetensors, a zip (``torch.save``
    since PyTorch 1.6) or a pickle of protocol 2 or later (``torch.save``'s legacy format)?"""
    return _looks_like_safetensors(head) or head.startswith((b"PK\x03\x04", b"\x80"))


def _what_it_is(head: bytes) -> str:
    """What a file that is no checkpoint looks like, from its first bytes."""
    if not head:
        return "the file is empty"
    if head.lstrip()[:1] == b"<":
        return "it looks like an HTML or XML page (a web page served instead of the file?)"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then the JSON header.
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _unwrap(obj: Any, label: str) -> tuple[str, Any]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("state_dict"), Mapping):
        return "lightning", obj["state_dict"]
    if isinstance(obj.get("model_state_dict"), Mapping):
        return "model_state_dict", obj["model_state_dict"]
    return "state_dict", obj


def _clean(raw: Mapping[str, Any], label: str) -> dict[str, torch.Tensor]:
    cleaned: dict[str, torch.Tensor] = {}
    not_tensors = []
    for key, value in raw.items():
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in STRIPPED_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if IGNORED_KEY_PART in name.lower():
            continue
        if not isinstance(value, torch.Tensor):
            not_tensors.append(str(key))
            continue
        if name in cleaned:
            raise CheckpointError(f"{label} holds {name!r} twice (under different prefixes)")
        cleaned[name] = value
    if not_tensors:
        raise CheckpointError(f"{label}: entries that are not tensors: {_some(not_tensors)}")
    return cleaned


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    more = f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else ""
    return f"{shown}{more} ({len(keys)} in all)"


# -- architecture ----------------------------------------------------------------------------------
def infer_config(state_dict: Mapping[str, torch.Tensor]) -> CryoLensConfig:
    """The model's sizes, read from the weights' shapes alone (spec.md b)."""
    needed = ["mu.bias", "mu.weight", "pose.weight", "decoder.affinity_weights.2.bias",
              "decoder.affinity_centroids.0.weight"]
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise CheckpointError(
            f"Not a CryoLens checkpoint: missing {_some(missing)}; found "
            f"{_some(sorted(state_dict)) if state_dict else 'no weights'}"
        )
    latent_dims = state_dict["mu.bias"].shape[0]
    affinity_dims = state_dict["decoder.affinity_centroids.0.weight"].shape[1]
    n_affinity = state_dict["decoder.affinity_weights.2.bias"].shape[0]
    free_bias = state_dict.get("decoder.free_weights.2.bias")
    n_free = 0 if free_bias is None else free_bias.shape[0]
    free_centroids = state_dict.get("decoder.free_centroids.0.weight")
    if free_centroids is not None and free_centroids.shape[1] != latent_dims - affinity_dims:
        raise CheckpointError(
            f"Inconsistent checkpoint: the free segment reads {free_centroids.shape[1]} latent "
            f"dims but mu has {latent_dims} and the affinity segment {affinity_dims}"
        )
    flat = state_dict["mu.weight"].shape[1]
    per_side = round((flat / ENCODER_CHANNELS[-1]) ** (1 / 3))
    if ENCODER_CHANNELS[-1] * per_side**3 != flat:
        raise CheckpointError(
            f"mu.weight reads {flat} encoder features, which is not {ENCODER_CHANNELS[-1]}·k³ "
            "for any box size"
        )
    try:
        return CryoLensConfig(
            box_size=16 * per_side, latent_dims=latent_dims, affinity_dims=affinity_dims,
            n_affinity=n_affinity, n_free=n_free, pose_dims=state_dict["pose.weight"].shape[0],
        )
    except ValueError as exc:
        raise CheckpointError(f"The weights describe an unsupported model: {exc}") from exc


def check_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], label: str
                ) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()
                if IGNORED_KEY_PART not in k.lower()}
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [f"{k} {tuple(state_dict[k].shape)} != {tuple(shape)}"
                  for k, shape in expected.items()
                  if k in state_dict and state_dict[k].shape != shape]
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if mis_shaped:
        problems.append(f"wrong shape {_some(mis_shaped)}")
    if problems:
        raise CheckpointError(f"Checkpoint {label} does not fit the model it describes: "
                              + "; ".join(problems))
