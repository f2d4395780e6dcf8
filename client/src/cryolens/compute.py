"""What computes the embeddings of ``cryolens embed``: an engine in this process, or a CryoLens
server; either gives a batch's arrays, and the model's facts for the output's metadata."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cryolens.errors import InputError
from cryolens.io import MODEL_VOXEL_SIZE

#: Arrays a compute function returns for a batch (n leading): embedding (n, k), pose (n, 4)
#: unit quaternion w, x, y, z, global_weight (n,); pose_axis_angle (n, 4) when known.
Compute = Callable[[np.ndarray], dict[str, np.ndarray]]


def model_metadata(*, name: str | None, sha256: str | None, latent_dims: int | None,
                   affinity_dims: int | None, box_size: int, server: str | None) -> dict:
    """The model's facts that every table ``cryolens embed`` writes carries, whether the
    numbers were computed here or by a server: the same keys either way."""
    return {"checkpoint_name": name, "checkpoint_sha256": sha256, "server": server,
            "box_size": int(box_size),
            "latent_dims": None if latent_dims is None else int(latent_dims),
            "affinity_dims": None if affinity_dims is None else int(affinity_dims),
            "voxel_size": MODEL_VOXEL_SIZE}


def engine_compute(engine) -> Compute:
    """Features through :func:`cryolens.operations.run`, as every front end computes them."""
    from cryolens.operations import Operation
    from cryolens.operations import run as run_operation

    operation = Operation(kind="features")

    def compute(particles: np.ndarray) -> dict[str, np.ndarray]:
        return run_operation(engine, operation, particles).arrays

    return compute


def engine_metadata(engine) -> dict:
    checkpoint = engine.checkpoint
    return model_metadata(
        name=getattr(checkpoint, "display_name", None) or getattr(checkpoint, "name", None),
        sha256=getattr(checkpoint, "sha256", None), latent_dims=engine.config.latent_dims,
        affinity_dims=engine.config.affinity_dims, box_size=engine.config.box_size, server=None)


def server_compute(url: str) -> tuple[Compute, dict]:
    """Features from the CryoLens server at ``url`` (:class:`cryolens.client.CryoLensClient`),
    and the model's facts from its ``/model_info``."""
    try:
        from cryolens.client import CryoLensClient, CryoLensConnectionError
    except ImportError as exc:
        raise InputError(f"--server needs cryolens.client, which this install lacks ({exc})",
                         field="server") from exc
    client = CryoLensClient(url)
    try:
        info = client.model_info()
    except CryoLensConnectionError as exc:
        raise InputError(f"--server {url}: no server answers there ({exc.__cause__ or exc}); "
                         "start one with cryolens serve, or correct the URL",
                         field="server") from exc
    shape = info.get("input_shape") or [48]
    metadata = model_metadata(name=info.get("checkpoint"), sha256=info.get("sha256"),
                              latent_dims=info.get("latent_dim"),
                              affinity_dims=info.get("affinity_dims"), box_size=shape[0],
                              server=url)

    def compute(particles: np.ndarray) -> dict[str, np.ndarray]:
        got = client.extract_features(particles)
        return {key: np.asarray(got[key]) for key in ("embedding", "pose", "global_weight")}

    return compute, metadata


__all__ = ["Compute", "engine_compute", "engine_metadata", "model_metadata", "server_compute"]
