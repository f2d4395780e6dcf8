"""cryolens explore's API, in-process (httpx over ASGI): the map's layout, exact neighbours,
particle pictures read back from their source, clusters, search, and the errors of bad input
(exports: test_explore_export.py)."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from explore_helpers import FAMILIES, explorer_client
from hypothesis import given, settings
from hypothesis import strategies as st

from cryolens.cli import main
from cryolens.engine import Engine
from cryolens.errors import InputError
from cryolens.explore.app import Explorer, create_app
from cryolens.explore.neighbours import Neighbours
from cryolens.explore.particles import slices_png
from cryolens.explore.table import EmbeddingTable

pytestmark = pytest.mark.slow  # its dataset is simulated and embedded once a run (15-70 s)


def _brute_force(embeddings: np.ndarray, row: int, k: int):
    distances = np.linalg.norm(embeddings.astype(np.float64) - embeddings[row], axis=1)
    others = np.array([i for i in range(len(embeddings)) if i != row])
    order = np.lexsort((others, distances[others]))[:k]
    return others[order], distances[others][order]


def test_table_describes_rows_columns_and_the_copick_project(client, table):
    got = client.get("/api/table").json()
    assert got["rows"] == table.rows == len(FAMILIES) * 2 * 12
    assert got["dims"] == 16
    assert got["default_color"] == "object"
    assert not any(c.startswith("embedding_") for c in got["columns"])
    assert got["copick"] == {"objects": list(FAMILIES)}
    assert got["reconstruction"] == "demo, in-process"
    objects = client.get("/api/column/object").json()
    assert objects == {"name": "object", "kind": "category", "categories": sorted(FAMILIES),
                       "counts": [24] * 4}
    codes = np.frombuffer(client.get("/api/values/object").content, "<f4")
    names = table.arrow["object"].to_pylist()
    assert [objects["categories"][int(c)] for c in codes] == names
    weight = client.get("/api/column/global_weight").json()
    assert weight["kind"] == "number"
    assert weight["min"] == pytest.approx(min(table.arrow["global_weight"].to_pylist()))


def test_layout_is_the_pca_of_the_embeddings_in_the_unit_square(client, table):
    response = client.get("/api/layout")
    coords = np.frombuffer(response.content, "<f4").reshape(-1, 2)
    assert coords.shape == (table.rows, 2)
    assert np.abs(coords).max() <= 1.0
    x = table.embeddings.astype(np.float64) - table.embeddings.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    for axis in range(2):
        corr = np.corrcoef(coords[:, axis], x @ vt[axis])[0, 1]
        assert abs(corr) > 0.99999
    info = json.loads(response.headers["X-Layout"])
    assert info["method"] == "pca"
    np.testing.assert_allclose(info["explained"], s[:2] ** 2 / (s**2).sum(), rtol=1e-6)


def test_layout_separates_the_particle_families(client, table):
    coords = np.frombuffer(client.get("/api/layout").content, "<f4").reshape(-1, 2)
    names = np.array(table.arrow["object"].to_pylist())
    centres = {n: coords[names == n].mean(0) for n in FAMILIES}
    spread = max(np.linalg.norm(coords[names == n] - centres[n], axis=1).mean() for n in FAMILIES)
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a in FAMILIES for b in FAMILIES if a < b]
    assert min(gaps) > 2 * spread


def test_neighbours_are_the_brute_force_answer(client, table):
    for row, k in ((0, 1), (5, 8), (50, 20), (table.rows - 1, table.rows - 1)):
        got = client.get(f"/api/neighbours/{row}", params={"k": k}).json()
        rows, distances = _brute_force(table.embeddings, row, k)
        assert got["rows"] == rows.tolist()
        np.testing.assert_allclose(got["distances"], distances, rtol=1e-12)
        assert row not in got["rows"]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_neighbours_match_brute_force_with_ties_and_duplicates(data):
    n = data.draw(st.integers(2, 60))
    dims = data.draw(st.integers(1, 6))
    values = data.draw(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0, 1e3]),
                                min_size=n * dims, max_size=n * dims))
    embeddings = np.array(values, np.float32).reshape(n, dims)
    row = data.draw(st.integers(0, n - 1))
    k = data.draw(st.integers(1, n - 1))
    rows, distances = Neighbours(embeddings).query(row, k)
    want_rows, want_distances = _brute_force(embeddings, row, k)
    assert rows.tolist() == want_rows.tolist()
    np.testing.assert_allclose(distances, want_distances, rtol=1e-12)


@pytest.mark.parametrize("k", ["0", "-3", "96", "1000000", "abc", "2.5"])
def test_k_out_of_range_is_a_clear_422(client, k):
    response = client.get("/api/neighbours/3", params={"k": k})
    assert response.status_code == 422
    if k.lstrip("-").isdigit():
        assert "k must be a whole number from 1 to 95" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/api/neighbours/{}", "/api/rows/{}", "/api/particle/{}.png",
                                  "/api/reconstruction/{}.png"])
@pytest.mark.parametrize("row", ["96", "-1", "abc", "1e3"])
def test_an_unknown_row_is_a_404_naming_the_range(client, path, row):
    response = client.get(path.format(row))
    assert response.status_code == 404
    assert response.json()["detail"] == f"no row {row}: rows are 0 .. 95"


def _png(content: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(content), format="png")


def test_particle_picture_shows_the_box_embed_read(client, table, data):
    from cryolens.io import CopickOptions, load_particles

    row = 30
    response = client.get(f"/api/particle/{row}.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    values = table.row(row)
    particles, records = load_particles(str(data[0]), copick=CopickOptions(
        object=values["object"], runs=(values["run"],)))
    volume = particles[values["index"]]
    assert records[values["index"]].key == values["particle_key"]
    assert response.content == slices_png(volume)
    image = _png(response.content)
    assert image.shape[:2] == (48 * 3, (3 * 48 + 4) * 3)
    lo, hi = np.percentile(volume.astype(np.float64), [1, 99])
    want = np.clip((volume[24] - lo) / (hi - lo), 0, 1)  # the central z slice, in grey
    np.testing.assert_allclose(image[::3, :48 * 3:3, 0], want, atol=1.5 / 255)


def test_reconstruction_picture_is_the_engines(client, table, data, engine):
    from cryolens.operations import Operation, run

    row = 7
    volume_png = client.get(f"/api/particle/{row}.png")
    response = client.get(f"/api/reconstruction/{row}.png", params={"scale": 2})
    assert response.status_code == 200
    from cryolens.explore.sources import ParticleSource, read_options

    volume = ParticleSource(table.row, read_options(table.meta)).volume(row)
    want = run(engine, Operation(kind="reconstruct", use_predicted_pose=True),
               volume[None]).arrays["reconstruction"][0]
    assert _png(response.content).shape[:2] == (96, 296)
    np.testing.assert_allclose(_png(response.content), _png(slices_png(want, 2)), atol=2 / 255)
    assert volume_png.status_code == 200


def test_without_a_model_a_reconstruction_is_a_409(table):
    with explorer_client(table) as client:
        response = client.get("/api/reconstruction/3.png")
        assert response.status_code == 409
        assert "--checkpoint" in response.json()["detail"]
        assert client.get("/api/table").json()["reconstruction"] is None


def test_scale_out_of_range_is_a_422(client):
    assert client.get("/api/particle/1.png", params={"scale": 0}).status_code == 422
    assert client.get("/api/particle/1.png", params={"scale": 99}).status_code == 422


def test_kmeans_finds_the_families_and_becomes_a_column(client, table):
    got = client.post("/api/cluster", json={"method": "kmeans", "k": 4}).json()
    assert got["name"] == "kmeans_4" and got["kind"] == "category" and sum(got["counts"]) == 96
    codes = np.frombuffer(client.get("/api/values/kmeans_4").content, "<f4").astype(int)
    names = np.array(table.arrow["object"].to_pylist())
    for family in FAMILIES:
        assert len(set(codes[names == family])) == 1
    assert len(set(codes)) == 4
    assert "kmeans_4" in client.get("/api/table").json()["columns"]
    assert client.get("/api/rows/0").json()["values"]["kmeans_4"] in got["categories"]
    bad = client.post("/api/cluster", json={"method": "kmeans", "k": 1})
    assert bad.status_code == 422 and "k must be" in bad.json()["detail"]


def test_search_finds_rows_by_number_id_and_source(client):
    assert client.get("/api/search", params={"q": "ts_2"}).json()["total"] == 48
    got = client.get("/api/search", params={"q": "5"}).json()
    assert got["rows"][0] == 5
    key = client.get("/api/rows/17").json()["values"]["particle_key"]
    assert client.get("/api/search", params={"q": key}).json() == {"rows": [17], "total": 1}
    assert client.get("/api/search", params={"q": " "}).status_code == 422


def test_a_table_without_embeddings_is_a_one_line_error(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"source": ["a", "b"], "x": [1.0, 2.0]}), plain)
    with pytest.raises(InputError, match="has no embedding_0 .. embedding_k columns"):
        EmbeddingTable.open(plain)
    assert main(["explore", str(plain), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cryolens: ") and "no embedding_0" in err and len(err.splitlines()) == 1
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet")
    assert main(["explore", str(text)]) == 1
    assert "not a readable Parquet file" in capsys.readouterr().err
    assert main(["explore", str(tmp_path / "missing.parquet")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_explore_refuses_both_a_checkpoint_and_a_server(data, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["explore", str(data[1]), "--checkpoint", "demo", "--server", "http://x"])
    assert stop.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow  # numba compiles UMAP's kernels on first use
def test_umap_layout_is_cached_beside_the_table(table, tmp_path):
    pytest.importorskip("umap", reason="umap-learn is the optional 'explore' extra")
    from cryolens.explore.layout import Layouts

    path = tmp_path / "copy.parquet"
    shutil.copyfile(table.path, path)
    first, info = Layouts(path, table.embeddings).get("umap")
    assert info["cached"] is False and (tmp_path / "copy.parquet.umap.npz").exists()
    again, info = Layouts(path, table.embeddings).get("umap")
    assert info["cached"] is True
    np.testing.assert_array_equal(first, again)
    assert np.abs(first).max() <= 1.0


def test_hdbscan_finds_the_families(client, table):
    got = client.post("/api/cluster", json={"method": "hdbscan", "min_cluster_size": 10})
    assert got.status_code == 200 and got.json()["name"] == "hdbscan_10"
    codes = np.frombuffer(client.get("/api/values/hdbscan_10").content, "<f4").astype(int)
    names = np.array(table.arrow["object"].to_pylist())
    categories = got.json()["categories"]
    for family in FAMILIES:  # each family is one cluster, bar a few rows called noise
        found = [categories[c] for c in codes[names == family] if categories[c] != "noise"]
        assert len(set(found)) == 1 and len(found) >= 20


def test_a_model_that_fails_is_a_502_naming_it(table):
    def broken(volume):
        raise ConnectionError("server at http://127.0.0.1:9 refused the connection")

    from fastapi.testclient import TestClient

    with TestClient(create_app(Explorer.open(table, broken, "server http://127.0.0.1:9"))) as c:
        got = c.get("/api/reconstruction/4.png")
    assert got.status_code == 502
    assert got.json()["detail"] == ("row 4: server http://127.0.0.1:9 did not reconstruct it: "
                                    "ConnectionError: server at http://127.0.0.1:9 refused the "
                                    "connection")


@pytest.mark.slow  # a server process
def test_with_server_the_reconstruction_comes_from_that_server(table, server, tmp_path):
    """``cryolens explore --server URL``: the panel's reconstruction is the server's (the
    conftest server runs server_helpers' small model, rebuilt here for the answer)."""
    import argparse

    from fastapi.testclient import TestClient
    from server_helpers import small_model_file

    from cryolens.commands.explore import model
    from cryolens.explore.sources import ParticleSource, read_options
    from cryolens.operations import Operation, run

    args = argparse.Namespace(server=server.url, checkpoint=None, device="cpu")
    reconstruct, described = model(args, table)
    assert described == f"server {server.url}"
    with TestClient(create_app(Explorer.open(table, reconstruct, described))) as client:
        got = client.get("/api/reconstruction/9.png")
        assert client.get("/api/table").json()["reconstruction"] == described
    assert got.status_code == 200
    small = Engine.from_checkpoint(str(small_model_file(tmp_path / "small.safetensors")),
                                   device="cpu")
    volume = ParticleSource(table.row, read_options(table.meta)).volume(9)
    want = run(small, Operation(kind="reconstruct", use_predicted_pose=True),
               volume[None]).arrays["reconstruction"][0]
    np.testing.assert_allclose(_png(got.content), _png(slices_png(want)), atol=2 / 255)


def test_edge_boxes_are_padded_as_embed_padded_them(tmp_path):
    """Picks at a tomogram's corner and far edge (io_helpers' project): the explorer's box,
    cut from the zarr array alone, is the very box `cryolens embed` read."""
    from io_helpers import make_copick_project

    from cryolens.explore.sources import ParticleSource, read_options
    from cryolens.io import CopickOptions, load_particles

    config, _ = make_copick_project(tmp_path)
    out = tmp_path / "edges.parquet"
    assert main(["embed", str(config), "--object", "ribosome", "-o", str(out), "-c", "demo",
                 "--device", "cpu", "--quiet"]) == 0
    table = EmbeddingTable.open(out)
    assert sum(table.arrow["edge"].to_pylist()) >= 2
    particles, records = load_particles(str(config), copick=CopickOptions(object="ribosome"))
    source = ParticleSource(table.row, read_options(table.meta))
    for row in range(table.rows):
        assert table.row(row)["particle_key"] == records[row].key
        np.testing.assert_array_equal(source.volume(row), particles[row])


def test_the_api_is_described_and_the_page_names_no_other_host(client):
    spec = client.get("/api/openapi.json").json()
    assert {"/api/table", "/api/layout", "/api/neighbours/{row}", "/api/particle/{row}.png",
            "/api/export/copick"} <= set(spec["paths"])
    page = client.get("/").text
    assert "data-state" in page and "http" not in page.replace("http-equiv", "")
    script = client.get("/static/explore.js").text
    assert "https://" not in script and "http://" not in script
    assert client.get("/static/vendor/regl-scatterplot.js").status_code == 200


def test_kmeans_numbers_clusters_by_size_and_copes_with_repeated_rows():
    from cryolens.explore.clusters import kmeans

    rng = np.random.default_rng(3)
    sizes = (50, 30, 20)
    rows = np.concatenate([rng.normal(10.0 * i, 0.1, (n, 6)) for i, n in enumerate(sizes)])
    labels = kmeans(rows.astype(np.float32), 3, seed=1)
    assert [np.bincount(labels)[i] for i in range(3)] == list(sizes)
    assert np.array_equal(labels, kmeans(rows.astype(np.float32), 3, seed=1))
    repeated = np.repeat(np.eye(3, 6, dtype=np.float32), 4, axis=0)  # 3 distinct rows, k 5
    labels = kmeans(repeated, 5)
    assert labels.shape == (12,) and len(set(labels)) == 3 and labels.max() < 5
