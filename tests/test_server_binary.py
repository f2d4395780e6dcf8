"""Binary volumes on a real server process: .npy, MRC and multipart uploads and .npz answers
give the numbers JSON gives; lying headers are refused before anything is allocated."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from cryolens import formats

NPY = {"Content-Type": "application/x-npy"}
NPZ = {"Accept": "application/x-npz"}
TOL = {"rtol": 1e-5, "atol": 1e-5}  # batching across requests may change the last bits



@pytest.fixture(scope="module")
def volumes():
    return np.random.default_rng(3).standard_normal((3, 48, 48, 48)).astype(np.float32)


def npz(response: requests.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npz"
    return formats.read_npz(response.content)


class _mrc_file:
    def __init__(self, volume, voxel):
        import tempfile
        from pathlib import Path

        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "particle.mrc"
        formats.write_mrc(self.path, volume, voxel)

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        self.dir.cleanup()


def test_reconstruct_npy_and_npz_equal_json(server, volumes):
    options = {"use_segmented_decoder": True, "return_splat_data": True,
               "return_embeddings": True}
    as_json = requests.post(server.url + "/reconstruct",
                            json={"input_volume": volumes[0].tolist(), **options}).json()
    query = "&".join(f"{k}=true" for k in options)
    binary = npz(requests.post(f"{server.url}/reconstruct?{query}",
                               data=formats.write_npy(volumes[0]), headers={**NPY, **NPZ}))
    np.testing.assert_allclose(binary["reconstruction"], as_json["reconstruction"], **TOL)
    np.testing.assert_allclose(binary["affinity_reconstruction"],
                               as_json["segmented_outputs"]["affinity"], **TOL)
    np.testing.assert_allclose(binary["free_reconstruction"],
                               as_json["segmented_outputs"]["free"], **TOL)
    np.testing.assert_allclose(binary["centers"], as_json["splats"]["centers"], **TOL)
    np.testing.assert_allclose(binary["embedding"], as_json["embedding"], **TOL)
    assert binary["n_total"] == as_json["splats"]["n_total"] == 40
    assert list(binary["input_shape"]) == as_json["input_shape"] == [48, 48, 48]


def test_json_answer_to_a_binary_request_is_the_seed_json(server, volumes):
    response = requests.post(server.url + "/extract_features",
                             data=formats.write_npy(volumes[0].astype(np.float64)), headers=NPY)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    as_json = requests.post(server.url + "/extract_features",
                            json={"input_volume": volumes[0].tolist()}).json()
    np.testing.assert_allclose(body["embedding"], as_json["embedding"], **TOL)
    assert isinstance(body["global_weight"], float) and body["latent_dims"] == 8


@pytest.mark.parametrize("accept, kind", [
    ("application/x-npz", "application/x-npz"),
    ("application/json;q=0.5, application/x-npz;q=0.9", "application/x-npz"),
    ("application/x-npz;q=0, application/json", "application/json"),  # npz refused outright
    ("application/x-npz; q=0.0", "application/json"),
    ("*/*", "application/json"),
])
def test_accept_picks_npz_unless_its_quality_is_zero(server, volumes, accept, kind):
    response = requests.post(server.url + "/extract_features", data=formats.write_npy(
        volumes[0]), headers={**NPY, "Accept": accept})
    assert response.status_code == 200 and response.headers["content-type"] == kind


def test_a_stack_answers_with_a_leading_n_equal_to_single_calls(server, volumes):
    stack = npz(requests.post(server.url + "/extract_features?return_variance=true",
                              data=formats.write_npy(volumes), headers={**NPY, **NPZ}))
    assert stack["embedding"].shape == (3, 8) and stack["pose"].shape == (3, 4)
    assert stack["global_weight"].shape == (3,) and stack["log_variance"].shape == (3, 8)
    for i, volume in enumerate(volumes):
        one = npz(requests.post(server.url + "/extract_features", data=formats.write_npy(volume),
                                headers={**NPY, **NPZ}))
        np.testing.assert_allclose(stack["embedding"][i], one["embedding"], **TOL)
    assert list(stack["input_shape"]) == [3, 48, 48, 48]


def test_batch_process_binary_equals_json(server, volumes):
    as_json = requests.post(server.url + "/batch_process",
                            json={"input_volumes": volumes.tolist(), "batch_size": 2}).json()
    binary = npz(requests.post(server.url + "/batch_process?batch_size=2",
                               data=formats.write_npy(volumes), headers={**NPY, **NPZ}))
    for key in ("reconstructions", "embeddings", "poses", "global_weights"):
        np.testing.assert_allclose(binary[key], as_json[key], **TOL)
    assert int(binary["n_volumes"]) == as_json["n_volumes"] == 3
    one = npz(requests.post(server.url + "/batch_process?operation=features",
                            data=formats.write_npy(volumes[0]), headers={**NPY, **NPZ}))
    assert one["embeddings"].shape == (1, 8) and "reconstructions" not in one


@pytest.mark.parametrize("dtype", ["u1", "<i2", ">f4", "<f8", "<f2"])
def test_a_stack_in_any_real_dtype_answers_as_its_float32_values(server, volumes, dtype):
    """The server keeps a binary body in its own dtype and converts it a chunk at a time: the
    answer is the one for the same values sent as float32."""
    values = np.round(volumes * 20 + 100).astype(dtype)
    answers = [npz(requests.post(server.url + "/batch_process", data=formats.write_npy(v),
                                 headers={**NPY, **NPZ}))
               for v in (values, values.astype(np.float32))]
    for key in ("reconstructions", "embeddings", "poses", "global_weights"):
        np.testing.assert_allclose(answers[0][key], answers[1][key], **TOL)


def test_concurrent_stacks_of_different_dtypes_answer_as_each_alone(server, volumes):
    """Requests in uint8, big-endian float32 and float64 at once (the worker may batch them
    into one engine call, joining their stacks): each answer is the one it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    stacks = [np.round(volumes[:2] * 20 + 100).astype("u1"), volumes[1:].astype(">f4"),
              volumes.astype("<f8")]

    def features(stack):
        return npz(requests.post(server.url + "/extract_features",
                                 data=formats.write_npy(stack), headers={**NPY, **NPZ}))

    alone = [features(stack) for stack in stacks]
    with ThreadPoolExecutor(len(stacks) * 2) as pool:
        together = list(pool.map(features, stacks * 2))
    for got, want in zip(together, alone * 2, strict=True):
        np.testing.assert_allclose(got["embedding"], want["embedding"], **TOL)
        np.testing.assert_allclose(got["pose"], want["pose"], **TOL)


def test_an_mrcs_upload_is_a_stack_by_its_file_name(server, volumes):
    """Two 48^3 particles written as one 48x48x96 map (ispg 1): a stack when the multipart file
    is named .mrcs, as the command line reads it; one wrong-shaped map otherwise."""
    with _mrc_file(volumes[:2].reshape(96, 48, 48), 10.0) as path:
        data = path.read_bytes()
    stack = npz(requests.post(server.url + "/extract_features", headers=NPZ,
                              files={"file": ("two.mrcs", data)}))
    single = npz(requests.post(server.url + "/extract_features", headers={**NPY, **NPZ},
                               data=formats.write_npy(volumes[:2])))
    np.testing.assert_allclose(stack["embedding"], single["embedding"], **TOL)
    as_map = requests.post(server.url + "/extract_features", files={"file": ("two.mrc", data)})
    assert as_map.status_code == 422 and "(96, 48, 48)" in as_map.json()["detail"]


def test_mrc_upload_keeps_the_voxel_size(server, volumes):
    with _mrc_file(volumes[1], 10.0) as path:
        data = path.read_bytes()
    raw = requests.post(server.url + "/extract_features", data=data,
                        headers={"Content-Type": "application/octet-stream"}).json()
    multipart = requests.post(server.url + "/extract_features",
                              files={"file": ("particle.mrc", data)}).json()
    as_json = requests.post(server.url + "/extract_features",
                            json={"input_volume": volumes[1].tolist()}).json()
    for body in (raw, multipart):
        np.testing.assert_allclose(body["embedding"], as_json["embedding"], **TOL)
        assert body["voxel_size"] == [10.0, 10.0, 10.0]
    npy_in_multipart = requests.post(
        server.url + "/extract_features", headers=NPZ,
        files={"file": ("particle.npy", formats.write_npy(volumes[1]))})
    np.testing.assert_allclose(npz(npy_in_multipart)["embedding"], as_json["embedding"], **TOL)


def test_statistics_of_binary_bodies_in_float64(server):
    stats = requests.post(server.url + "/statistics",
                          data=formats.write_npy(np.array([16777217, 1], np.int64)),
                          headers=NPY).json()
    assert stats["max"] == 16777217.0 and stats["shape"] == [2]
    assert requests.post(server.url + "/statistics",
                         json={"volume": [16777217, 1]}).json()["max"] == 16777217.0


def _npy_declaring(shape, data: bytes) -> bytes:
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    return formats.NPY_MAGIC + b"\x01\x00" + len(header).to_bytes(2, "little") + header + data


@pytest.mark.parametrize("mutate, status, fragment", [
    (lambda b: b[:-1], 400, "body holds"),
    # an int64 product of this shape wraps to one volume's bytes, which follow the header
    (lambda b: _npy_declaring((2**62 + 27648, 4), b[-4 * 48**3:]), 400, "declares shape"),
    (lambda b: _npy_declaring((0, 2**63), b""), 400, "cannot make an array"),
    (lambda b: b.replace(b"(48, 48, 48)", b"(100000, 48, 48, 48)"), 400, "declares shape"),
    (lambda b: b[:40], 400, "header length"),
    (lambda b: b"\x93NUMPY\x09\x00" + b[8:], 400, "version"),
    (lambda b: b.replace(b"'<f4'", b"'<c8'"), 422, "real numbers"),
    (lambda b: formats.write_npy(np.zeros((4, 4, 4), np.float32)), 422, "shape"),
    (lambda b: formats.write_npy(np.zeros((0, 48, 48, 48), np.float32)), 422, "empty stack"),
    (lambda b: formats.write_npy(np.full((48, 48, 48), np.nan, np.float32)), 422, "finite"),
], ids=["truncated", "wrapping shape", "shape beyond numpy", "huge declared shape",
        "cut header", "bad version", "complex",
        "wrong box", "empty stack", "nan"])
def test_lying_or_wrong_npy_is_a_4xx_naming_the_problem(server, volumes, mutate, status,
                                                        fragment):
    body = mutate(formats.write_npy(volumes[0]))
    response = requests.post(server.url + "/reconstruct", data=body, headers=NPY)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"] and response.json()["field"] == "body"


def test_lying_mrc_header_is_refused_before_allocation(server, volumes):
    with _mrc_file(volumes[0], 10.0) as path:
        data = bytearray(path.read_bytes())
    data[0:4] = np.int32(100000).tobytes()  # nx: a 100000 x 48 x 48 map that is not there
    response = requests.post(server.url + "/reconstruct", data=bytes(data),
                             headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 400 and "header declares" in response.json()["detail"]
    response = requests.post(server.url + "/reconstruct", data=b"not an mrc file" * 100,
                             headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 400 and "MAP" in response.json()["detail"]


def test_unknown_media_type_and_bad_query_options(server, volumes):
    response = requests.post(server.url + "/reconstruct", data=b"x",
                             headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and response.json()["field"] == "content-type"
    response = requests.post(server.url + "/reconstruct?use_segmented_decoder=maybe",
                             data=formats.write_npy(volumes[0]), headers=NPY)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "use_segmented_decoder"]


def test_a_misspelt_or_repeated_query_option_is_a_422_naming_it(server, volumes):
    body = formats.write_npy(volumes[0])
    typo = requests.post(server.url + "/reconstruct?return_splat_dat=true", data=body,
                         headers=NPY)
    assert typo.status_code == 422 and typo.json()["field"] == "return_splat_dat"
    assert "return_splat_data" in typo.json()["detail"]  # the options it could have meant
    twice = requests.post(server.url + "/batch_process?batch_size=2&batch_size=3", data=body,
                          headers=NPY)
    assert twice.status_code == 422 and twice.json()["field"] == "batch_size"
    as_json = requests.post(server.url + "/reconstruct",  # JSON ignores unknown fields, as
                            json={"input_volume": volumes[0].tolist(), "extra": 1})  # the seed
    assert as_json.status_code == 200


def test_request_id_is_echoed_or_made(server):
    assert requests.get(server.url + "/health",
                        headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = requests.get(server.url + "/health", headers={"X-Request-ID": "bad id; drop table"})
    assert len(made.headers["x-request-id"]) == 32
    assert requests.head(server.url + "/health").status_code == 200
