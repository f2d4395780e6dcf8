"""cryolens explore's exports, in-process: CSV and Parquet subsets, copick picks read back with
copick's own API, and what is refused (bad rows, a read-only project, rows not from copick)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from explore_helpers import FAMILIES, explorer_client

from cryolens.cli import main
from cryolens.explore.particles import slices_png
from cryolens.explore.table import EmbeddingTable

pytestmark = pytest.mark.slow  # its dataset is simulated and embedded once a run (15-70 s)


def test_csv_export_has_the_rows_in_order(client, table):
    import pandas as pd

    rows = [40, 2, 77]
    response = client.post("/api/export/csv", json={"rows": rows})
    assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
    frame = pd.read_csv(io.BytesIO(response.content))
    assert frame["table_row"].tolist() == rows
    assert frame["particle_key"].tolist() == [table.row(r)["particle_key"] for r in rows]
    np.testing.assert_allclose(frame["embedding_3"], table.embeddings[rows, 3], rtol=1e-6)


def test_parquet_export_is_a_subset_that_keeps_the_metadata(client, table, tmp_path):
    import pyarrow.parquet as pq

    rows = [1, 60, 95]
    response = client.post("/api/export/parquet", json={"rows": rows})
    path = tmp_path / "subset.parquet"
    path.write_bytes(response.content)
    subset = pq.read_table(path)
    meta = subset.schema.metadata
    for key in (b"cryolens", b"checkpoint_name", b"checkpoint_sha256"):
        assert meta[key] == table.arrow.schema.metadata[key]
    assert json.loads(meta[b"cryolens_explore"]) == {"table": "embeddings.parquet", "rows": 3}
    assert subset.drop_columns(["table_row"]).equals(
        table.arrow.take(rows).replace_schema_metadata(None).cast(
            subset.drop_columns(["table_row"]).schema.remove_metadata()), check_metadata=False)
    again = EmbeddingTable.open(path)  # the subset opens in the explorer again
    np.testing.assert_array_equal(again.embeddings, table.embeddings[rows])


@pytest.mark.parametrize("body, status, words", [
    ({"rows": []}, 422, "no rows selected"),
    ({"rows": [3, 3]}, 422, "twice"),
    ({"rows": [3, 96]}, 404, "no row 96"),
    ({"rows": "all"}, 422, None),
])
def test_bad_export_rows_are_refused(client, body, status, words):
    for kind in ("csv", "parquet"):
        response = client.post(f"/api/export/{kind}", json=body)
        assert response.status_code == status
        if words:
            assert words in response.json()["detail"]


def _read_picks(config: Path, run: str, user: str, session: str, obj: str):
    import copick

    picks = copick.from_file(str(config)).get_run(run).get_picks(
        object_name=obj, user_id=user, session_id=session)
    return picks


def test_copick_export_reads_back_with_copick(client, table, data):
    config = data[0]
    rows = [0, 3, 12, 60]  # two of TS_1, two of TS_2
    body = {"rows": rows, "object": "enolase", "user_id": "curator", "session_id": "101"}
    got = client.post("/api/export/copick", json=body).json()
    assert got == {"config": str(config), "object": "enolase", "user_id": "curator",
                   "session_id": "101", "runs": {"TS_1": 2, "TS_2": 2}, "picks": 4}
    for run in ("TS_1", "TS_2"):
        picks = _read_picks(config, run, "curator", "101", "enolase")
        assert len(picks) == 1
        points, transforms = picks[0].numpy()
        want = [[table.row(r)[f"{a}_angstrom"] for a in "xyz"] for r in rows
                if table.row(r)["run"] == run]
        np.testing.assert_allclose(points, want)
        np.testing.assert_allclose(transforms, np.tile(np.eye(4), (2, 1, 1)))
    again = client.post("/api/export/copick", json=body)
    assert again.status_code == 409 and "choose another session" in again.json()["detail"]


@pytest.mark.parametrize("change, status, words", [
    ({"object": "ribosome"}, 422, "no object 'ribosome'"),
    ({"session_id": "a_b"}, 422, "session_id must be"),
    ({"user_id": ""}, 422, "user_id must be"),
    ({"session_id": "x/../../y"}, 422, "session_id must be"),
    ({"rows": [5, 500]}, 404, "no row 500"),
])
def test_bad_copick_exports_write_nothing(client, data, change, status, words):
    body = {"rows": [1, 2], "object": "enolase", "user_id": "curator", "session_id": "202",
            **change}
    response = client.post("/api/export/copick", json=body)
    assert response.status_code == status and words in response.json()["detail"]
    for run in ("TS_1", "TS_2"):
        for obj in FAMILIES:
            assert not _read_picks(data[0], run, "curator", "202", obj)


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys, a place no one may write")
def test_a_read_only_copick_project_is_a_403_and_nothing_is_written(table, data, tmp_path):
    """The project as a read-only share: its data as copick's static root, its overlay (where
    picks go) somewhere that cannot be written, even by root."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = json.loads(data[0].read_text())
    config["static_root"] = config["overlay_root"]
    config["overlay_root"] = "local:///sys/cryolens-explore-read-only"
    read_only = tmp_path / "read_only.json"
    read_only.write_text(json.dumps(config))
    arrow = table.arrow.set_column(table.arrow.column_names.index("source"), "source",
                                   pa.array([str(read_only)] * table.rows))
    pq.write_table(arrow, tmp_path / "t.parquet")
    with explorer_client(EmbeddingTable.open(tmp_path / "t.parquet")) as client:
        body = {"rows": [0, 60], "object": "enolase", "user_id": "curator", "session_id": "303"}
        response = client.post("/api/export/copick", json=body)
    assert response.status_code == 403
    assert "cannot be written" in response.json()["detail"]
    assert "nothing was written" in response.json()["detail"]
    assert not Path("/sys/cryolens-explore-read-only").exists()
    for run in ("TS_1", "TS_2"):
        assert not _read_picks(read_only, run, "curator", "303", "enolase")


def test_rows_not_from_copick_cannot_become_picks(tmp_path):
    from io_helpers import particle_stack

    stack = tmp_path / "stack.npy"
    np.save(stack, particle_stack(4))
    out = tmp_path / "e.parquet"
    assert main(["embed", str(stack), "-o", str(out), "-c", "demo", "--device", "cpu",
                 "--quiet"]) == 0
    with explorer_client(EmbeddingTable.open(out)) as client:
        assert client.get("/api/table").json()["copick"] is None
        response = client.post("/api/export/copick", json={
            "rows": [0], "object": "x", "user_id": "a", "session_id": "1"})
        assert response.status_code == 422 and "copick project" in response.json()["detail"]
        # a file source: the picture is that file's particle
        got = client.get("/api/particle/2.png")
        assert got.content == slices_png(np.load(stack)[2])
        stack.unlink()  # its source gone: a 404 that says so (row 3 was never read)
        gone = client.get("/api/particle/3.png")
        assert gone.status_code == 404 and "is gone" in gone.json()["detail"]
