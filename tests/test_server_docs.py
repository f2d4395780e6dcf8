"""/docs and /redoc render offline: their assets ship with the package. Checked in headless
Chromium with every host except 127.0.0.1 unresolvable and every proxy a dead end."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import requests

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
#: Seconds of page time Chromium lets scripts run before dumping the DOM.
VIRTUAL_TIME_MS = 10000



@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_local_assets(server, page):
    html = requests.get(server.url + page, timeout=5).text
    assert not re.search(r"(src|href)=[\"']https?://", html), html
    assert "googleapis" not in html and "cdn.jsdelivr" not in html
    for asset in re.findall(r"(?:src|href)=[\"'](/static/[^\"']+)", html):
        assert requests.get(server.url + asset, timeout=5).status_code == 200


def test_openapi_declares_every_response_model(server):
    spec = requests.get(server.url + "/openapi.json", timeout=5).json()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            content = operation["responses"]["200"]["content"]
            if path == "/metrics":  # Prometheus text, not JSON
                assert content["text/plain"]["schema"] == {"type": "string"}
                continue
            schema = content["application/json"]["schema"]
            assert schema.get("$ref"), f"{method.upper()} {path} has no response model"
            if method == "post":
                assert operation["requestBody"]["content"]["application/json"]["schema"]


def dump_dom(url: str, profile) -> str:
    done = subprocess.run([
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
        "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom", url,
    ], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow  # a real browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("page, rendered", [
    ("/docs", r'class="opblock-summary-path"[^>]*data-path="/extract_features"'),
    ("/redoc", r'data-section-id="operation/extract_features'),
])
def test_docs_render_in_an_offline_browser(server, tmp_path, page, rendered):
    dom = dump_dom(server.url + page, tmp_path / "profile")
    assert re.search(rendered, dom), dom[:3000]
    assert "/extract_gaussian_splats" in dom and "/batch_process" in dom
