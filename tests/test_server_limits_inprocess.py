"""Two limits of docs/limits.md checked in-process (a socket adds nothing): a multipart body
carries one file, and a 422 lists at most five validation errors, then counts the rest."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # starlette's own note about its httpx-based client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from cryolens.engine import Engine
from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.server import Settings, create_app
from cryolens.server.handlers import MAX_REPORTED_ERRORS


@pytest.fixture(scope="module")
def client():
    torch.manual_seed(0)
    engine = Engine(CryoLensVAE(CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=32,
                                               n_free=8)), device="cpu")
    with TestClient(create_app(Settings(), engine=engine)) as client:
        yield client


@pytest.fixture(scope="module")
def volume_npy() -> bytes:
    out = io.BytesIO()
    np.save(out, np.zeros((48, 48, 48), np.float32))
    return out.getvalue()


def test_a_multipart_body_with_two_files_is_400(client, volume_npy):
    answer = client.post("/extract_features", files=[("file", ("a.npy", volume_npy)),
                                                     ("other", ("b.npy", volume_npy))])
    assert answer.status_code == 400
    assert answer.json() == {"detail": "the multipart body cannot be read: Too many files. "
                                       "Maximum number of files is 1.", "field": "body"}


def test_a_422_lists_five_errors_and_counts_the_rest(client, volume_npy):
    names = ["batch_size", "return_reconstructions", "return_embeddings", "return_poses",
             "return_global_weights", "use_predicted_pose", "use_final_convolution"]
    answer = client.post("/batch_process?" + "&".join(f"{name}=x" for name in names),
                         content=volume_npy, headers={"Content-Type": "application/x-npy"})
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert [entry["loc"] for entry in detail[:MAX_REPORTED_ERRORS]] == [
        ["query", name] for name in names[:MAX_REPORTED_ERRORS]]
    assert detail[MAX_REPORTED_ERRORS:] == [
        {"loc": [], "type": "truncated",
         "msg": f"{len(names) - MAX_REPORTED_ERRORS} more errors not shown"}]
