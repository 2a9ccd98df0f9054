"""MLflow as the comparison tool, in a real browser: an MLflow tracking server over a store the
platform wrote, its UI in Chromium. The experiment opens on its runs (model-training view), and
two runs' validation bits/byte are compared in one chart. The screenshots go to
docs/screenshots/ (the README shows them)."""

from pathlib import Path

import pytest
from test_dashboard import ARGS, _runs_with_curves

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "screenshots"


@pytest.fixture
def mlflow_server(mlflow_uri, tmp_path):
    from conftest import mlflow_server as server

    with server(mlflow_uri, tmp_path / "art") as url:
        yield url


def test_the_experiment_opens_on_its_runs_and_compares_validation_bpb(mlflow_server):
    from playwright.sync_api import sync_playwright

    from pipelines.tracking import experiment_link, mlflow_client

    _runs_with_curves()
    exp = mlflow_client().get_experiment_by_name("bitlm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(experiment_link(mlflow_server, exp.experiment_id))  # the link the demo prints
        page.get_by_text("finished-run").first.wait_for(timeout=60_000)
        page.get_by_text("running-run").first.wait_for()
        page.get_by_text("Run Name").first.wait_for()  # the runs table, not the GenAI overview
        close = page.get_by_role("button", name="Close")
        if close.count():
            close.first.click()  # the assistant panel
        page.screenshot(path=str(SHOTS / "mlflow-runs.png"))
        # Both runs' validation bits/byte in one chart: the experiment's chart view, searched.
        page.locator("input[value='CHART']").dispatch_event("click")
        page.get_by_placeholder("Search metric charts").fill("val_bpb")
        card = page.locator("[data-testid='experiment-view-compare-runs-card']")
        card.filter(has_text="finished-run (val_bpb)").wait_for(timeout=60_000)
        assert card.count() == 1  # the one chart of that metric ...
        assert "running-run (val_bpb)" in card.inner_text()  # ... holding both runs
        card.locator(".scatterlayer .trace").nth(1).wait_for(state="attached", timeout=60_000)  # one line per run
        page.wait_for_timeout(1000)  # the lines finish drawing
        page.screenshot(path=str(SHOTS / "mlflow-compare-val-bpb.png"))
        browser.close()
