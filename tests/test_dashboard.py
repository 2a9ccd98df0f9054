"""The dashboard in a real browser (Playwright driving Debian's Chromium), one test per function
the guide promises: training monitoring, telemetry visualization, configuration controls that
start a run, checkpoint management, safe inference. A real MLflow store, a real training run on
the session's Ray cluster, real files."""

import io
import threading
import zipfile

import pytest
from conftest import free_port

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def dashboard(checkpoints, mlflow_uri, tmp_path):
    """The dashboard on a free port, serving the good test checkpoint, listing tmp_path/runs."""
    import shutil

    from serve.dashboard import make_server

    runs = tmp_path / "runs"
    shutil.copytree(checkpoints / "good", runs / "good" / "final_checkpoint")
    port = free_port()
    httpd = make_server("127.0.0.1", port, checkpoint=str(checkpoints / "good"), runs_dir=runs)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}", runs
    httpd.shutdown()
    httpd.server_close()


def _runs_with_curves(n_points: int = 6) -> list[str]:
    """Two runs in the store, logged as the platform logs them (one finished, one running)."""
    from bitlm import load_config
    from pipelines.tracking import MetricLog, mlflow_client, open_run, tracking_uri

    client = mlflow_client()
    manifest = {"inputs": ["builtin"], "window_bytes": 16, "shards": [], "splits": {"train": {"windows": 1}}}
    ids = []
    for i, name in enumerate(("finished-run", "running-run")):
        run_id = open_run(client, load_config(None), name, "data/prepared", manifest)
        log = MetricLog(tracking_uri(), run_id)
        for step in range(1, n_points + 1):
            log.log({"bpb": 5 - step * 0.3 - i, "K": 0.1 * step, "C": 0.7, "S": 0.9, "step": step}, step)
            if step % 2 == 0:
                log.log({"val_bpb": 5.2 - step * 0.3 - i}, step)
        log.flush()
        if i == 0:
            client.set_terminated(run_id)
        ids.append(run_id)
    return ids


def test_training_monitoring_lists_runs_and_draws_their_curves(browser, dashboard, tmp_path):
    url, _ = dashboard
    _runs_with_curves()
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("tr.run >> text=running-run")
    assert page.inner_text("tr.run >> nth=0").split()[1] == "RUNNING"  # newest first, still running
    page.click("tr.run >> text=finished-run")
    page.wait_for_function("document.querySelector('#curves').dataset.points === '9'")  # 6 bpb + 3 val_bpb
    assert int(page.get_attribute("#kcs", "data-points")) == 18
    page.screenshot(path=str(tmp_path / "dashboard-runs.png"))
    page.close()


def test_telemetry_visualization_draws_per_byte_kcs_and_attention(browser, dashboard, checkpoints):
    url, _ = dashboard
    page = browser.new_page()
    page.goto(url)
    page.click("text=Telemetry")
    page.fill("#tel-prompt", "The quick brown")
    page.click("#tel-run")
    page.wait_for_function("document.querySelector('#attention').dataset.layers === '2'", timeout=60_000)
    points = int(page.get_attribute("#tel-chart", "data-points"))
    assert points == 3 * (len("The quick brown") - 1 + 48)  # K, C, S for every byte after the first
    assert page.inner_text("#tel-text").startswith("The quick brown")
    page.close()


def test_configuration_controls_start_a_training_run_that_appears(browser, dashboard, ray_session, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_session.get_runtime_context().gcs_address)  # the session's cluster
    url, _ = dashboard
    page = browser.new_page()
    page.goto(url)
    page.click("text=Configure & train")
    page.select_option("#train-config", "tiny")
    page.fill("#train-overrides", "train.max_steps=6\ntrain.eval_every=3\ntrain.log_every=2\nrun.num_workers=1")
    page.click("#train-start")
    page.wait_for_selector("#jobs tr >> text=dash-tiny")
    page.wait_for_function(
        "[...document.querySelectorAll('.job-state')].some(td => td.textContent !== 'running')", timeout=300_000
    )
    assert page.inner_text(".job-state") == "finished", page.inner_text("#jobs")
    page.click("text=Training runs")
    page.wait_for_selector("tr.run >> text=dash-tiny")
    assert "FINISHED" in page.inner_text("tr.run >> text=dash-tiny >> xpath=..")
    page.close()


def test_a_bad_override_is_refused_by_name(dashboard):
    import json
    import urllib.error
    import urllib.request

    url, _ = dashboard
    body = json.dumps({"config": "tiny", "overrides": ["train.lerning_rate=1"]}).encode()
    req = urllib.request.Request(f"{url}/api/train", body, {"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 400 and "lerning_rate" in json.loads(info.value.read())["error"]["message"]


def test_checkpoint_management_loads_exports_imports_and_registers(browser, dashboard, tmp_path):
    url, runs = dashboard
    page = browser.new_page()
    page.goto(url)
    page.click("text=Checkpoints")
    page.wait_for_selector("#ckpt-local >> text=good")
    with page.expect_download() as download:
        page.click("#ckpt-local a >> nth=0")
    exported = tmp_path / "exported.zip"
    download.value.save_as(exported)
    assert set(zipfile.ZipFile(exported).namelist()) == {"config.json", "model.safetensors"}
    page.set_input_files("#ckpt-file", str(exported))
    page.fill("#ckpt-name", "again")
    page.click("#ckpt-import")
    page.wait_for_selector("#ckpt-status >> text=imported")
    assert (runs / "imported" / "again" / "model.safetensors").is_file()
    page.click("[data-load$='again']")
    page.wait_for_selector("#ckpt-status >> text=loaded")
    page.wait_for_function("document.querySelector('#loaded').textContent.endsWith('again')")
    page.once("dialog", lambda d: d.accept("bitlm-dash-test"))
    page.click("[data-register$='again']")
    page.wait_for_selector("#ckpt-status >> text=registered models:/bitlm-dash-test/1", timeout=60_000)
    page.wait_for_selector("#ckpt-registered >> text=models:/bitlm-dash-test/1")
    page.click("[data-load='models:/bitlm-dash-test/1']")
    page.wait_for_selector("#ckpt-status >> text=loaded models:/bitlm-dash-test/1")
    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("config.json", "{}")
    (tmp_path / "bad.zip").write_bytes(bad.getvalue())
    page.set_input_files("#ckpt-file", str(tmp_path / "bad.zip"))
    page.click("#ckpt-import")
    page.wait_for_selector("#ckpt-status >> text=Error: the zip must hold")
    page.close()


def test_safe_inference_in_the_embedded_playground(browser, dashboard):
    url, _ = dashboard
    page = browser.new_page()
    page.goto(url)
    page.click("text=Safe inference")
    frame = page.frame_locator("#playground")
    frame.locator("#prompt").fill("The quick brown")
    frame.locator("#max_tokens").fill("40")
    frame.locator("#seed").fill("4")
    frame.locator("#generate").click()
    verdict = frame.locator("#verdict")
    verdict.filter(has_text="Gate:").wait_for()
    page.wait_for_timeout(100)
    frame.locator("#verdict.passed, #verdict.blocked").wait_for(timeout=120_000)
    assert verdict.inner_text().startswith("Gate: passed")
    assert len(frame.locator("#output").inner_text()) > 0
    page.close()


def test_an_api_key_guards_the_dashboard(checkpoints, mlflow_uri):
    """With a key every route but /health answers 401 without it; a browser logs in once with
    ?key= (a cookie), an API client sends Authorization: Bearer."""
    import json
    import urllib.error
    import urllib.request

    from serve.dashboard import make_server

    port = free_port()
    httpd = make_server("127.0.0.1", port, checkpoint=str(checkpoints / "good"), api_key="dash-key")
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        for path in ("/", "/api/runs", "/playground"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(base + path, timeout=30)
            assert info.value.code == 401 and info.value.headers["WWW-Authenticate"] == "Bearer"
        with pytest.raises(urllib.error.HTTPError) as info:  # starting a training run is refused too
            urllib.request.urlopen(urllib.request.Request(base + "/api/train", data=b"{}", method="POST"), timeout=30)
        assert info.value.code == 401 and json.loads(info.value.read())["error"]["code"] == "invalid_api_key"
        assert urllib.request.urlopen(base + "/health", timeout=30).status == 200
        bearer = urllib.request.Request(base + "/v1/models", headers={"Authorization": "Bearer dash-key"})
        assert urllib.request.urlopen(bearer, timeout=30).status == 200
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(base + "/?key=dash-key", timeout=30) as r:
            assert r.url == base + "/" and "<html" in r.read().decode().lower()
        assert opener.open(base + "/api/runs", timeout=30).status == 200
    finally:
        httpd.shutdown()
        httpd.server_close()
