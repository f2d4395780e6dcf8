"""Request and response models: the seed contract (the CryoLens server docs) as pydantic classes.

Volume fields are declared here for the OpenAPI schema only; the routes parse them with
orjson + numpy (see ``codecs.py``), which is ~100x faster than pydantic on 110,592 floats.
Every other request field is validated by the ``*Options`` models. Unknown fields are ignored.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Volume3D = list[list[list[float]]]
Volume4D = list[Volume3D]
#: The shape every volume field must have, stated in the schema (the routes enforce it: 422).
VOLUME_SHAPE = ("Shape (48, 48, 48): a list of 48 lists of 48 lists of 48 finite numbers "
                "(z, y, x); no booleans, strings or null.")
BATCH_OPERATIONS = ("reconstruction", "features", "splats")


class _Options(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests --------------------------------------------------------------------------------
class ReconstructOptions(_Options):
    use_segmented_decoder: bool = Field(
        True, description="Also return the affinity and free segments rendered on their own "
                          "(`segmented_outputs`).")
    use_final_convolution: bool = Field(
        True, description="Apply the decoder's final 9x9x9 convolution; false returns the raw "
                          "splat render (de-normalised).")
    return_splat_data: bool = Field(
        False, description="Add `splats` (as /extract_gaussian_splats).")
    return_embeddings: bool = Field(False, description="Add `embeddings` (and `embedding`): mu.")
    use_predicted_pose: bool = Field(
        False, description="Extension: decode in the predicted pose and global weight instead of "
                           "the canonical (identity) pose, as CryoLens does by default.")


class ReconstructRequest(ReconstructOptions):
    input_volume: Volume3D = Field(..., description="One particle. " + VOLUME_SHAPE)


class FeaturesOptions(_Options):
    return_pose: bool = True
    return_global_weight: bool = True
    return_variance: bool = Field(False, description="Add `log_variance` of the latent Gaussian.")


class FeaturesRequest(FeaturesOptions):
    input_volume: Volume3D = Field(..., description="One particle. " + VOLUME_SHAPE)


class SplatsOptions(_Options):
    include_free_segment: bool = Field(True, description="False returns the affinity splats only.")


class SplatsRequest(SplatsOptions):
    input_volume: Volume3D = Field(..., description="One particle. " + VOLUME_SHAPE)


class BatchOptions(_Options):
    batch_size: int = Field(32, gt=0, description=(
        "Accepted as in the reference (> 0). The server sizes its engine passes itself: the "
        "engine's memory budget bounds memory, so no batch runs out of it."))
    return_reconstructions: bool = True
    return_embeddings: bool = True
    return_poses: bool = True
    return_global_weights: bool = True
    operation: Literal["reconstruction", "features", "splats"] | None = Field(
        None, description="Reference-server compatibility: `features` skips reconstructions, "
                          "`splats` returns splats instead; the return_* flags still apply.")
    use_final_convolution: bool = True
    use_predicted_pose: bool = False


class BatchRequest(BatchOptions):
    input_volumes: Volume4D = Field(
        ..., description="Shape (N, 48, 48, 48): 1 <= N <= the server's --max-volumes "
                         "(default 256) particles, each of shape (48, 48, 48), z-y-x.")


class StatisticsRequest(BaseModel):
    volume: Any | None = Field(None, description="Nested list of numbers, any shape.")
    volume_data: Any | None = Field(None, description="Alias of `volume` (reference server).")


# -- responses -------------------------------------------------------------------------------
class EndpointInfo(BaseModel):
    path: str
    methods: list[str]
    summary: str


class RootResponse(BaseModel):
    service: str
    version: str
    status: str
    endpoints: list[EndpointInfo]


class HealthResponse(BaseModel):
    status: str


class ModelInfoResponse(BaseModel):
    latent_dim: int
    latent_ratio: float
    n_gaussians: int
    input_shape: list[int]
    device: str
    n_affinity: int
    n_free: int
    affinity_dims: int
    checkpoint: str = Field(..., description="Registry name or bare file name, never a path.")
    sha256: str
    normalisation: str = "z-score"


class SplatData(BaseModel):
    centers: list[list[float]] = Field(
        ..., description="(S, 3) centres in voxels, (z, y, x) array-index order of the 48^3 "
                         "box (box centre 23.5), in the predicted pose.")
    weights: list[float] = Field(..., description="(S,) peak amplitudes, already scaled by "
                                                  "sigmoid(global_weight).")
    scales: list[float] = Field(..., description="(S,) Gaussian standard deviations in voxels.")
    segment: list[int] = Field(..., description="(S,) 0 = affinity splat, 1 = free splat.")
    n_affinity: int
    n_free: int
    n_total: int


class SegmentedOutputs(BaseModel):
    affinity: Volume3D
    free: Volume3D


class ReconstructResponse(BaseModel):
    reconstruction: Volume3D
    input_shape: list[int]
    reconstruction_shape: list[int]
    embeddings: list[float] | None = Field(None, description="With return_embeddings.")
    embedding: list[float] | None = Field(None, description="Alias of `embeddings`.")
    segmented_outputs: SegmentedOutputs | None = Field(
        None, description="With use_segmented_decoder.")
    splats: SplatData | None = Field(None, description="With return_splat_data.")


class FeaturesResponse(BaseModel):
    embedding: list[float] = Field(..., description="(latent_dims,) mu.")
    embeddings: list[float] = Field(..., description="Alias of `embedding` (reference server).")
    pose: list[float] | None = Field(None, description="Unit quaternion (w, x, y, z).")
    pose_axis_angle: list[float] | None = Field(
        None, description="Raw pose head: angle (rad), then unnormalised axis (x, y, z).")
    global_weight: float | None = Field(
        None, description="Raw logit; the decoder scales splat weights by its sigmoid.")
    log_variance: list[float] | None = Field(None, description="With return_variance.")
    input_shape: list[int]
    latent_dims: int


class SplatsResponse(SplatData):
    input_shape: list[int]


class BatchResponse(BaseModel):
    reconstructions: Volume4D | None = None
    embeddings: list[list[float]] | None = None
    poses: list[list[float]] | None = Field(None, description="(N, 4) unit quaternions.")
    global_weights: list[float] | None = Field(None, description="(N,) raw logits.")
    centers: list[list[list[float]]] | None = Field(None, description="operation=splats.")
    weights: list[list[float]] | None = None
    scales: list[list[float]] | None = None
    n_volumes: int
    num_processed: int = Field(..., description="Alias of n_volumes (reference server).")
    input_shape: list[int]


class StatisticsResponse(BaseModel):
    mean: float
    std: float
    min: float
    max: float
    shape: list[int]


class ErrorResponse(BaseModel):
    detail: str | list[dict]
    field: str | None = None
    request_id: str | None = None
