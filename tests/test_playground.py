"""The playground page in a real browser: Playwright driving Debian's Chromium (headless).

It is served by the Ray Serve application and, without Ray, by serve/dashboard.py (run_dashboard);
in both, typing a prompt and pressing Generate streams text and draws K/C/S per byte."""

import threading

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _use_page(browser, url: str, shot, seed: int) -> None:
    page = browser.new_page()
    page.goto(url)
    page.fill("#prompt", "The quick brown")
    page.fill("#max_tokens", "40")  # a range input: fill sets its value
    page.fill("#seed", str(seed))
    page.click("#generate")
    done = "['Gate: passed', 'Gate: BLOCKED', 'Error'].some(s => document.querySelector('#verdict').textContent.startsWith(s))"
    page.wait_for_function(done, timeout=120_000)
    text = page.inner_text("#output")
    points = int(page.get_attribute("#chart", "data-points"))
    verdict = page.inner_text("#verdict")
    page.screenshot(path=str(shot))
    page.close()
    assert len(text) > 0 and points >= 10, (text, points, verdict)
    assert verdict.startswith("Gate: passed")


def test_playground_on_ray_serve(browser, server, tmp_path):
    for seed in (1, 2):  # any seed: the trained model's ordinary text passes the guide's gate
        _use_page(browser, server + "/", tmp_path / f"serve{seed}.png", seed)


def test_playground_without_ray(browser, checkpoints, tmp_path):
    from conftest import free_port

    from serve.dashboard import make_server

    port = free_port()
    httpd = make_server("127.0.0.1", port, checkpoint=str(checkpoints / "good"))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        # the dashboard's page embeds it (tests/test_dashboard.py); here the playground alone
        _use_page(browser, f"http://127.0.0.1:{port}/playground", tmp_path / "dashboard.png", 3)
    finally:
        httpd.shutdown()
        httpd.server_close()
