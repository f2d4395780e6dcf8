"""The wire contract: every endpoint of the CryoLens server as one row of :data:`ENDPOINTS`.

A row holds the path, the operation it runs, its options and the fields of its answer: each
field's wire name, the engine array it carries, one entry per volume or shared, dtype and shape,
and where the seed's JSON nests it (``segmented_outputs``, ``splats``). The server builds its
request and answer models, its JSON and ``.npz`` answers from the rows; the client and the
napari plugin read answers by them. The seed (``docs/rest-api.md``) is the authority: a row
describes it and never changes it. Plain numpy; the server's code is never imported here.

One name per quantity: the engine's result types, :class:`cryolens.operations.Result`, the
``.npz`` answers and the client's dicts all use a field's ``name``; only the seed's JSON nests
some fields (``json``), and the seed's plural batch names (``embeddings``, ``poses``) and
reference aliases are fields of their own that carry the same engine array (``source``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal

import numpy as np

Kind = Literal["reconstruct", "features", "splats"]
KINDS: tuple[str, ...] = ("reconstruct", "features", "splats")


@dataclass(frozen=True)
class Operation:
    """What to compute for each particle. Only options that change the computation live here,
    so two requests with equal operations can run as one engine call (the server batches them).

    kind: ``reconstruct`` (decode to a volume), ``features`` (encoder outputs only) or
    ``splats`` (the splats each particle decodes to, in its predicted pose).
    use_predicted_pose: reconstruct in the predicted pose and global weight instead of
    CryoLens's canonical identity pose. final_convolution: apply the decoder's 9^3 convolution.
    segments: also render the affinity and free splats on their own. with_splats: a
    reconstruction also returns its particle's splats. include_free: splats include the free
    ones (``False``: affinity only).
    """

    kind: Kind = "features"
    use_predicted_pose: bool = False
    final_convolution: bool = True
    segments: bool = False
    with_splats: bool = False
    include_free: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"operation must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class Option:
    """A request option: JSON field or query parameter ``name``. Its type is its default's
    (bool or int); ``positive``: an int above 0; ``choices``: one of these strings, or null."""

    name: str
    default: Any
    doc: str = ""
    positive: bool = False
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Field:
    """One field of an answer.

    name: the wire name (top-level JSON key unless ``json`` nests it, ``.npz`` name, the
    client's key); source: the value it carries, an engine array (the names of
    :mod:`cryolens.operations`) or a fact of the request (:data:`FACTS`); per_volume: one entry
    per volume (a stack's answer has a leading N); shape: one volume's (``box``, ``latent``,
    ``splats`` or a number; ``dims`` a length that varies); dtype: as in ``.npz`` (``str``,
    ``object``: JSON only); json: the path in the JSON answer; when: the option that must be
    true for it to be sent; optional: sent only when computed or known (segments, voxel size).
    """

    name: str
    source: str
    per_volume: bool
    shape: tuple[int | str, ...] = ()
    dtype: str = "float32"
    json: tuple[str, ...] = ()
    when: str | None = None
    optional: bool = False
    doc: str = ""

    @property
    def path(self) -> tuple[str, ...]:
        return self.json or (self.name,)


#: Sources that are facts of the request or the answer, not engine arrays.
FACTS = ("input_shape", "voxel_size", "reconstruction_shape", "latent_dims", "n_volumes")


@dataclass(frozen=True)
class Endpoint:
    """One endpoint. volumes: the JSON field holding the volume(s) (None: no volumes); batch:
    that field is a list of volumes and the answer always has a leading N; operation: the
    options (a mapping with every option, defaults filled in) -> the engine's work."""

    path: str
    methods: tuple[str, ...]
    name: str
    summary: str
    answer: tuple[Field, ...]
    volumes: str | None = None
    batch: bool = False
    options: tuple[Option, ...] = ()
    operation: Callable[[Mapping[str, Any]], Operation] | None = None
    media_type: str = "application/json"

    @cached_property
    def _claimed(self) -> frozenset[str]:
        """The top-level JSON keys the answer's fields take."""
        return frozenset(f.path[0] for f in self.answer)

    def defaults(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every option: ``given`` (None meaning the default) over the defaults."""
        out = {o.name: o.default for o in self.options}
        unknown = sorted(set(given or ()) - out.keys())
        if unknown:
            raise TypeError(f"{self.path} has no option {', '.join(unknown)}; its options: "
                            f"{', '.join(out)}")
        out.update({k: v for k, v in (given or {}).items() if v is not None})
        return out

    def facts(self, arrays: Mapping[str, np.ndarray], shape: tuple[int, ...], stacked: bool,
              voxel_size: tuple[float, ...] | None) -> dict[str, Any]:
        """The :data:`FACTS` of an answer: ``shape`` is the (N, D, H, W) volumes', ``stacked``
        whether the client sent a stack (a batch's answer is always one)."""
        out: dict[str, Any] = {
            "input_shape": list(shape if stacked and not self.batch else shape[1:]),
            "n_volumes": shape[0]}
        if voxel_size is not None:
            out["voxel_size"] = list(voxel_size)
        if "reconstruction" in arrays:
            out["reconstruction_shape"] = list(arrays["reconstruction"].shape[
                0 if stacked else 1:])
        if "embedding" in arrays:
            out["latent_dims"] = int(arrays["embedding"].shape[1])
        return out

    def payload(self, values: Mapping[str, Any], options: Mapping[str, Any], stacked: bool
                ) -> dict[str, Any]:
        """The answer as the seed's JSON nests it: each field whose ``when`` option is on and
        whose source is in ``values`` (engine arrays with a leading N, shared arrays, facts).
        One volume sent without a stack: per-volume arrays without the N, a per-volume number
        as a float, shared counts as ints."""
        out: dict[str, Any] = {}
        for f in self.answer:
            if (f.when is not None and not options[f.when]) or f.source not in values:
                continue
            value = values[f.source]
            if f.per_volume and not (stacked or self.batch):
                value = value[0] if f.shape else float(value[0])
            elif not f.per_volume and isinstance(value, np.ndarray) and value.ndim == 0:
                value = int(value)
            place: dict[str, Any] = out
            for key in f.path[:-1]:
                place = place.setdefault(key, {})
            place[f.path[-1]] = value
        return out

    def flat(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """An answer's fields by name, unnested (the ``.npz`` answer, the client's dict). Keys
        of a newer server that no row names are kept (objects flattened one level)."""
        out: dict[str, Any] = {}
        for f in self.answer:
            value: Any = payload
            for key in f.path:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                out[f.name] = value
        for key, value in payload.items():
            if key in self._claimed or value is None:
                continue
            if isinstance(value, dict):
                out.update({k: v for k, v in value.items() if v is not None})
            else:
                out[key] = value
        return out


# -- the rows ------------------------------------------------------------------------------
BOX = ("box", "box", "box")
_SPLATS = "splats"


def _shared(name: str, source: str | None = None, shape: tuple = (), dtype: str = "int64",
            **kw: Any) -> Field:
    return Field(name, source or name, False, shape, dtype, **kw)


def _each(name: str, shape: tuple, source: str | None = None, **kw: Any) -> Field:
    return Field(name, source or name, True, shape, **kw)


def _splat_fields(nest: tuple[str, ...] = ()) -> tuple[Field, ...]:
    def at(name: str) -> tuple[str, ...]:
        return (*nest, name) if nest else ()
    return (
        _each("centers", (_SPLATS, 3), json=at("centers"), doc="(S, 3) centres in voxels, "
              "(z, y, x) array-index order of the box (box centre 23.5), in the predicted "
              "pose."),
        _each("weights", (_SPLATS,), json=at("weights"), doc="(S,) peak amplitudes, already "
              "scaled by sigmoid(global_weight)."),
        _each("scales", (_SPLATS,), json=at("scales"), doc="(S,) Gaussian standard deviations "
              "in voxels."),
        _shared("segment", shape=(_SPLATS,), dtype="int8", json=at("segment"),
                doc="(S,) 0 = affinity splat, 1 = free splat."),
        _shared("n_affinity", json=at("n_affinity")),
        _shared("n_free", json=at("n_free")),
        _shared("n_total", json=at("n_total")))


_INPUT_SHAPE = _shared("input_shape", shape=("dims",))
_VOXEL_SIZE = _shared("voxel_size", shape=(3,), dtype="float64", optional=True,
                      doc="(x, y, z) angstrom, from an MRC body's header.")
_SEGMENTED = "segmented_outputs"


def _reconstruct(o: Mapping[str, Any]) -> Operation:
    return Operation("reconstruct", use_predicted_pose=o["use_predicted_pose"],
                     final_convolution=o["use_final_convolution"],
                     segments=o["use_segmented_decoder"], with_splats=o["return_splat_data"])


def _batch(o: Mapping[str, Any]) -> Operation:
    if o["operation"] == "splats":
        return Operation("splats")
    if o["return_reconstructions"] and o["operation"] in (None, "reconstruction"):
        return Operation("reconstruct", use_predicted_pose=o["use_predicted_pose"],
                         final_convolution=o["use_final_convolution"])
    return Operation("features")


RECONSTRUCT = Endpoint(
    "/reconstruct", ("POST",), "Reconstruct", "Reconstruct a volume through the VAE",
    volumes="input_volume", operation=_reconstruct,
    options=(
        Option("use_segmented_decoder", True, "Also return the affinity and free segments "
               "rendered on their own (`segmented_outputs`)."),
        Option("use_final_convolution", True, "Apply the decoder's final 9x9x9 convolution; "
               "false returns the raw splat render (de-normalised)."),
        Option("return_splat_data", False, "Add `splats` (as /extract_gaussian_splats)."),
        Option("return_embeddings", False, "Add `embeddings` (and `embedding`): mu."),
        Option("use_predicted_pose", False, "Extension: decode in the predicted pose and "
               "global weight instead of the canonical (identity) pose, as CryoLens does by "
               "default.")),
    answer=(
        _each("reconstruction", BOX),
        _INPUT_SHAPE, _VOXEL_SIZE,
        _shared("reconstruction_shape", shape=("dims",)),
        _each("embeddings", ("latent",), "embedding", when="return_embeddings",
              doc="With return_embeddings: mu (the reference server's name)."),
        _each("embedding", ("latent",), when="return_embeddings", doc="Alias of `embeddings`."),
        _each("affinity_reconstruction", BOX, json=(_SEGMENTED, "affinity"), optional=True,
              doc="With use_segmented_decoder: the affinity splats rendered alone."),
        _each("free_reconstruction", BOX, json=(_SEGMENTED, "free"), optional=True,
              doc="With use_segmented_decoder: the free splats rendered alone."),
        *(replace(f, optional=True) for f in _splat_fields(("splats",)))))

FEATURES = Endpoint(
    "/extract_features", ("POST",), "Features", "Embedding, pose and global weight of a volume",
    volumes="input_volume", operation=lambda o: Operation("features"),
    options=(Option("return_pose", True), Option("return_global_weight", True),
             Option("return_variance", False, "Add `log_variance` of the latent Gaussian.")),
    answer=(
        _each("embedding", ("latent",), doc="(latent_dims,) mu."),
        _each("embeddings", ("latent",), "embedding",
              doc="Alias of `embedding` (reference server)."),
        _each("pose", (4,), when="return_pose", doc="Unit quaternion (w, x, y, z)."),
        _each("pose_axis_angle", (4,), when="return_pose",
              doc="Raw pose head: angle (rad), then unnormalised axis (x, y, z)."),
        _each("global_weight", (), when="return_global_weight",
              doc="Raw logit; the decoder scales splat weights by its sigmoid."),
        _each("log_variance", ("latent",), when="return_variance",
              doc="With return_variance."),
        _INPUT_SHAPE, _VOXEL_SIZE, _shared("latent_dims")))

SPLATS = Endpoint(
    "/extract_gaussian_splats", ("POST",), "Splats",
    "Gaussian splats of a volume (voxels, z-y-x)", volumes="input_volume",
    operation=lambda o: Operation("splats", include_free=o["include_free_segment"]),
    options=(Option("include_free_segment", True, "False returns the affinity splats only."),),
    answer=(*_splat_fields(), _INPUT_SHAPE, _VOXEL_SIZE))

BATCH_OPERATIONS = ("reconstruction", "features", "splats")
BATCH = Endpoint(
    "/batch_process", ("POST",), "Batch", "Process many volumes in batches",
    volumes="input_volumes", batch=True, operation=_batch,
    options=(
        Option("batch_size", 32, "Accepted as in the reference (> 0). The server sizes its "
               "engine passes itself: the engine's memory budget bounds memory, so no batch "
               "runs out of it.", positive=True),
        Option("return_reconstructions", True), Option("return_embeddings", True),
        Option("return_poses", True), Option("return_global_weights", True),
        Option("operation", None, "Reference-server compatibility: `features` skips "
               "reconstructions, `splats` returns splats instead; the return_* flags still "
               "apply.", choices=BATCH_OPERATIONS),
        Option("use_final_convolution", True), Option("use_predicted_pose", False)),
    answer=(
        _each("reconstructions", BOX, "reconstruction", optional=True),
        *(replace(f, optional=True) for f in _splat_fields()[:3]),
        _each("embeddings", ("latent",), "embedding", when="return_embeddings"),
        _each("poses", (4,), "pose", when="return_poses", doc="(N, 4) unit quaternions."),
        _each("global_weights", (), "global_weight", when="return_global_weights",
              doc="(N,) raw logits."),
        _shared("n_volumes"),
        _shared("num_processed", "n_volumes", doc="Alias of n_volumes (reference server)."),
        _INPUT_SHAPE, _VOXEL_SIZE))

STATISTICS = Endpoint(
    "/statistics", ("GET", "POST"), "Statistics",
    "Mean, std, min, max and shape of a small volume",
    volumes="volume", answer=(
        *(_shared(k, dtype="float64") for k in ("mean", "std", "min", "max")),
        _shared("shape", shape=("dims",))))


def _info(path: str, name: str, summary: str, *fields: Field) -> Endpoint:
    return Endpoint(path, ("GET",), name, summary, fields)


def _text(name: str) -> Field:
    return _shared(name, dtype="str")


ROOT = _info("/", "Root", "Server metadata and endpoints", _text("service"), _text("version"),
             _text("status"), _shared("endpoints", shape=("n",), dtype="object",
                                      doc="{path, methods, summary} of each endpoint."))
HEALTH = _info("/health", "Health", "Liveness check (never touches the model): 503 once the "
               "inference thread is gone or stuck", _text("status"))
READY = _info("/ready", "Ready", "Readiness: 200 once the model is loaded and warmed up, 503 "
              "before", _text("status"))
MODEL_INFO = _info(
    "/model_info", "ModelInfo", "Model configuration", _shared("latent_dim"),
    _shared("latent_ratio", dtype="float64"), _shared("n_gaussians"),
    _shared("input_shape", shape=(3,)), _text("device"), _shared("n_affinity"),
    _shared("n_free"), _shared("affinity_dims"),
    _shared("checkpoint", dtype="str", doc="Registry name or bare file name, never a path."),
    _text("sha256"), _text("normalisation"))
METRICS = Endpoint("/metrics", ("GET",), "Metrics", "Prometheus metrics (text format)", (),
                   media_type="text/plain")

#: Every endpoint, by path: the seed's (server.md) and the server's own.
ENDPOINTS: dict[str, Endpoint] = {e.path: e for e in (
    ROOT, HEALTH, READY, MODEL_INFO, METRICS, RECONSTRUCT, FEATURES, SPLATS, BATCH, STATISTICS)}
#: The endpoints that run the model.
MODEL_ENDPOINTS = tuple(e for e in ENDPOINTS.values() if e.operation is not None)

_VOLUME_FIELDS = [f for e in MODEL_ENDPOINTS for f in e.answer]
#: Answer fields with one entry per volume (concatenated across a stack's requests).
PER_VOLUME = frozenset(f.name for f in _VOLUME_FIELDS if f.per_volume)
#: Fields that count the volumes (the total, once a stack's answers are gathered).
COUNTS = frozenset(f.name for f in _VOLUME_FIELDS if f.source == "n_volumes")
#: Fields that describe the request or the model: the same in every request's answer.
SHARED = frozenset(f.name for f in _VOLUME_FIELDS if not f.per_volume)
#: Dimensions of each per-volume field for one volume (no leading N).
ONE_VOLUME_NDIM = {f.name: len(f.shape) for f in _VOLUME_FIELDS if f.per_volume}

__all__ = ["BATCH", "BATCH_OPERATIONS", "BOX", "COUNTS", "ENDPOINTS", "FACTS", "FEATURES",
           "HEALTH", "KINDS", "METRICS", "MODEL_ENDPOINTS", "MODEL_INFO", "ONE_VOLUME_NDIM",
           "PER_VOLUME", "READY", "RECONSTRUCT", "ROOT", "SHARED", "SPLATS", "STATISTICS",
           "Endpoint", "Field", "Kind", "Operation", "Option"]
