"""napari-cryolens without napari: pick geometry, boxes, placement, colours and settings."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "napari-cryolens"
try:
    from napari_cryolens import core
except ImportError:  # not installed: its source is beside the tests
    sys.path.insert(0, str(PLUGIN / "src"))
    from napari_cryolens import core


def test_pick_voxels_undo_both_layers_transforms():
    image_scale, image_translate = np.array([10.0, 8.0, 6.0]), np.array([5.0, -20.0, 30.0])
    voxels = np.array([[3.0, 4.0, 5.0], [0.0, 0.0, 0.0]])
    world = voxels * image_scale + image_translate
    # the same picks in a Points layer with its own transform
    p_scale, p_translate = np.array([2.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0])
    points = (world - p_translate) / p_scale
    got = core.pick_voxels(points, p_scale, p_translate, image_scale, image_translate)
    np.testing.assert_allclose(got, voxels)


def test_centre_voxels_round_half_up():
    got = core.centre_voxels([[0.5, 1.49, -0.5], [2.51, 3.0, 159.4]])
    assert got.tolist() == [[1, 1, 0], [3, 3, 159]]


def test_boxes_are_the_tomogram_around_the_pick_padded_with_its_mean():
    rng = np.random.default_rng(0)
    tomo = rng.normal(size=(64, 100, 90)).astype(np.float32)
    fill = core.fill_value(tomo)
    assert fill == pytest.approx(float(tomo.mean(dtype=np.float64)))
    padded = np.pad(tomo, core.HALF, constant_values=fill)
    centres = np.array([[32, 50, 45], [0, 0, 0], [63, 99, 89], [10, 97, 3]])
    boxes = core.cut_boxes(tomo, centres, fill)
    assert boxes.shape == (4, 48, 48, 48) and boxes.dtype == np.float32
    for box, (z, y, x) in zip(boxes, centres, strict=True):
        # voxel centre - 24 + j of the tomogram is j of the box: in the padded array, + 24
        np.testing.assert_array_equal(box, padded[z:z + 48, y:y + 48, x:x + 48])


def test_inside_is_a_centre_voxel_within_the_tomogram():
    centres = np.array([[0, 0, 0], [63, 99, 89], [-1, 5, 5], [5, 100, 5], [5, 5, 90]])
    assert core.inside(centres, (64, 100, 90)).tolist() == [True, True, False, False, False]
    assert core.inside(np.zeros((0, 3), int), (64, 100, 90)).shape == (0,)


def test_box_translate_puts_box_voxel_over_its_tomogram_voxel():
    scale, translate = np.array([10.0, 10.0, 10.0]), np.array([5.0, -20.0, 30.0])
    centre = np.array([2, 5, 158])
    t = core.box_translate(centre, scale, translate)
    np.testing.assert_allclose(t, (centre - 24) * scale + translate)
    # box voxel j at world j * scale + t; tomogram voxel centre - 24 + j at the same place
    j = np.array([24, 24, 24])
    np.testing.assert_allclose(j * scale + t, centre * scale + translate)


def test_fill_value_of_a_large_lazy_array_is_a_sample_mean():
    class Lazy:  # indexing only, like zarr
        def __init__(self, data):
            self._data, self.shape = data, data.shape

        def __getitem__(self, key):
            return self._data[key]

    data = np.full((40, 40, 40), 3.0, np.float32)
    assert core.fill_value(Lazy(data)) == pytest.approx(3.0)


def test_fill_value_is_the_mean_of_the_finite_voxels():
    """A masked region of NaN must not make every box past the edge NaN too."""
    tomo = np.full((40, 40, 40), 2.0, np.float32)
    tomo[:, :, 30:] = np.nan
    tomo[0, 0, 0] = np.inf
    assert core.fill_value(tomo) == pytest.approx(2.0)

    class Lazy:  # the sampled path
        shape = tomo.shape

        def __getitem__(self, key):
            return tomo[key]

    assert core.fill_value(Lazy()) == pytest.approx(2.0)


def test_contrast_limits_are_ordered_and_finite():
    vol = np.zeros((48, 48, 48), np.float32)
    assert core.contrast_limits(vol) == (0.0, 1.0)
    vol[20:28, 20:28, 20:28] = 5.0
    low, high = core.contrast_limits(vol)
    assert low == 0.0 and high == 5.0


def test_pca_colours_separate_clusters():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(10, 8)) + 5
    b = rng.normal(size=(10, 8)) - 5
    colours = core.pca_colours(np.concatenate([a, b]))
    assert colours.shape == (20, 4) and np.all((colours >= 0) & (colours <= 1))
    assert np.linalg.norm(colours[:10, :3].mean(0) - colours[10:, :3].mean(0)) > 0.5
    assert core.pca_colours(a[:1]).shape == (1, 4)


def test_layer_names():
    assert core.layer_name(12) == "cryolens pick 12"
    assert core.layer_name(3, "free") == "cryolens pick 3 free"


def test_settings_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "sub" / "settings.json"
    assert core.Settings.load(path) == core.Settings()
    core.Settings(url="http://gpu-box:9000", mode="local", batch_size=8).save(path)
    loaded = core.Settings.load(path)
    assert (loaded.url, loaded.mode, loaded.batch_size) == ("http://gpu-box:9000", "local", 8)
    path.write_text('{"url": 5, "batch_size": 4, "unknown": 1}')
    assert core.Settings.load(path) == core.Settings(batch_size=4)
    path.write_text("not json")
    assert core.Settings.load(path) == core.Settings()


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"http://gpu-box:9000"', "5"])
def test_settings_that_are_json_but_not_an_object_are_the_defaults(tmp_path, text):
    path = tmp_path / "settings.json"
    path.write_text(text)
    assert core.Settings.load(path) == core.Settings()


def test_settings_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_CRYOLENS_SETTINGS", str(tmp_path / "s.json"))
    assert core.settings_path() == tmp_path / "s.json"
    monkeypatch.delenv("NAPARI_CRYOLENS_SETTINGS")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    if sys.platform.startswith("linux"):
        assert core.settings_path() == tmp_path / "napari-cryolens" / "settings.json"


def test_down_server_is_described_not_raised():
    backend = core.ServerBackend("http://127.0.0.1:9", connect_timeout=2, max_retries=0)
    with pytest.raises(Exception) as info:
        backend.reconstruct(np.zeros((1, 48, 48, 48), np.float32), core.Options())
    message = core.describe_error(info.value, backend.url)
    assert message.startswith("CryoLens: could not reach the server at http://127.0.0.1:9")
    assert "\n" not in message


def test_server_errors_are_one_line_with_status_and_request_id_once():
    from cryolens.client import CryoLensHTTPError

    invalid = CryoLensHTTPError(422, [{"loc": ["query", "use_predicted_pose"],
                                       "msg": "Input should be a valid boolean"}],
                                request_id="abc", method="POST", path="/reconstruct")
    assert core.describe_error(invalid, "x") == (
        "CryoLens server error 422: query.use_predicted_pose: Input should be a valid boolean "
        "(request id abc)")
    proxy = CryoLensHTTPError(502, "<html>\n<head><title>502 Bad Gateway</title></head>\n"
                              + "<body>" + "x" * 5000 + "</body>\n</html>\n")
    message = core.describe_error(proxy, "x")
    assert message.startswith("CryoLens server error 502: <html> <head><title>502 Bad Gateway")
    assert "\n" not in message and len(message) < 600


def test_check_in_local_mode_loads_the_checkpoint():
    """The Check button's tooltip says it loads the local model: a wrong checkpoint is found
    then, not at the first reconstruction."""
    pytest.importorskip("torch", reason="local mode needs PyTorch")
    from cryolens.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        core.LocalBackend("/no/such/model.safetensors").describe()


def test_plugin_imports_neither_torch_nor_the_server():
    """The widget's modules load where only numpy, httpx and cryolens.client are."""
    code = ("import sys; import napari_cryolens.core as c; c.ServerBackend('http://x:1'); "
            "import cryolens.io; "
            "bad = [m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules]; "
            "assert not bad, bad")
    env_path = f"{PLUGIN / 'src'}:{REPO / 'client' / 'src'}:{REPO / 'src'}"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": env_path},
                   timeout=60)


def test_manifest_names_the_distribution_and_the_widget():
    import tomllib
    import yaml

    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    manifest = yaml.safe_load((PLUGIN / "src" / "napari_cryolens" / "napari.yaml").read_text())
    assert manifest["name"] == project["name"] == "napari-cryolens"
    entry = project["entry-points"]["napari.manifest"]
    assert entry == {"napari-cryolens": "napari_cryolens:napari.yaml"}
    deps = " ".join(project["dependencies"])
    for forbidden in ("torch", "fastapi", "uvicorn", "PyQt", "PySide", "cryolens-server"):
        assert forbidden.lower() not in deps.lower()
    (command,) = manifest["contributions"]["commands"]
    assert command["python_name"] == "napari_cryolens._widget:CryoLensWidget"


@pytest.mark.slow  # imports the widget, with napari and Qt, in a fresh interpreter
def test_npe2_validates_the_manifest():
    """``npe2 validate`` on the installed plugin (importing its widget), else on the file."""
    pytest.importorskip("npe2", reason="npe2 (napari's plugin engine) is not installed")
    from importlib.metadata import entry_points

    installed = "napari-cryolens" in {e.name for e in entry_points(group="napari.manifest")}
    target = (["napari-cryolens", "--imports"] if installed
              else [str(PLUGIN / "src" / "napari_cryolens" / "napari.yaml")])
    done = subprocess.run([sys.executable, "-m", "npe2", "validate", *target], check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid!" in done.stdout
