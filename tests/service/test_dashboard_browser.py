"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver, via selenium).

A job submitted over REST appears, a real ``kdcache worker`` runs it and its progress bar climbs
to 100%; a failed job shows the worker's error; each cache links its report; /docs renders from
bundled assets. Every request the page makes goes to the service on 127.0.0.1 (the browser's
performance log is checked). Screenshots of each state go to ``build/artifacts/``.
`make browser` (part of `make test`) installs chromium with apt-get when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _net import serve

from kdcache.service import Settings, create_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "build" / "artifacts"
ADMIN, WORKER, READ = "adm-browser", "wrk-browser", "read-browser"


def _chrome_paths() -> tuple[str, str]:
    driver = shutil.which("chromedriver")
    browser = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser")) if p is not None), None
    )
    if driver is None or browser is None:
        pytest.skip("chromium/chromedriver not installed (run `make browser`, needs apt-get)")
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chrome_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,760",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        root=str(tmp_path_factory.mktemp("dash-root")),
        admin_token=ADMIN,
        worker_token=WORKER,
        read_token=READ,
        max_attempts=1,
    )
    with serve(create_app(settings)) as url:
        yield url


def _spec(teacher: Path, tokens: Path, name: str, topk: int) -> dict[str, Any]:
    return {
        "name": name,
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": topk, "temperatures": [1.0, 2.0], "hidden_layers": [1, 2]},
        "batch_size": 2,
        "rows_per_shard": 1,
    }


def _shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    driver.save_screenshot(str(path))
    return path


def _job_state(driver: Any, job_id: str) -> tuple[str, float] | None:
    """(status, progress %) of a job's row, or None while it is not shown."""
    return driver.execute_script(  # type: ignore[no-any-return]
        """const r = document.querySelector(`tr.job[data-job-id="${arguments[0]}"]`);
        if (!r) return null;
        return [r.querySelector('.status').textContent,
                parseFloat(r.querySelector('[role=progressbar]').getAttribute('aria-valuenow'))];""",
        job_id,
    )


def _wait(predicate: Any, timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _requests_made(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def test_dashboard_in_a_browser(
    browser: Any,
    service: str,
    tiny_teacher_dir: Path,
    tokens_npy: Path,
    tmp_path: Path,
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    seen: list[str] = []

    # no token: the page asks for one
    browser.get(f"{service}/")
    _wait(lambda: browser.find_element("id", "login").is_displayed(), 30, "the token box")
    # the token once in the address, then a cookie; the address loses it
    browser.get(f"{service}/?token={READ}")
    assert "token=" not in browser.current_url
    _wait(lambda: "no jobs yet" in browser.page_source, 30, "the empty jobs table")

    # 4x the rows, one shard each: a job long enough (seconds) for the page's 1 s polls to show
    # the bar between 0 and 100 even with a fast service
    rows = np.tile(np.load(tokens_npy), (4, 1))
    np.save(tmp_path / "tokens.npy", rows)
    ok = _spec(tiny_teacher_dir, tmp_path / "tokens.npy", "browser-ok", topk=4)
    job = httpx.post(f"{service}/v1/jobs", json=ok, headers=admin, timeout=60).json()
    first = _wait(lambda: _job_state(browser, job["id"]), 30, "the submitted job")
    assert first == ["pending", 0]
    _shot(browser, "pending")

    worker = subprocess.Popen(
        [sys.executable, "-m", "kdcache.cli", "worker", "--server", service, "--token", WORKER,
         "--job", job["id"], "--max-idle", "2", "--poll-interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        progress: list[float] = []
        shot_running = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            state = _job_state(browser, job["id"])
            if state is not None:
                if not progress or state[1] != progress[-1]:
                    progress.append(state[1])
                if 0 < state[1] < 100 and not shot_running:
                    _shot(browser, "running")
                    shot_running = True
                if state[0] == "done":
                    break
            time.sleep(0.1)
        out, _ = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, out
    assert progress[0] == 0 and progress[-1] == 100, progress
    assert progress == sorted(progress)  # the bar only advances
    assert len(progress) >= 3, progress  # and it moved through intermediate states on screen
    row = browser.find_element("css selector", f'tr.job[data-job-id="{job["id"]}"]')
    assert row.find_element("css selector", ".tokens-per-s").text not in ("?", "")
    assert "done" in row.get_attribute("class")
    worker_rows = browser.find_elements("css selector", "tr.worker")
    # every shard done by that worker
    assert worker_rows and str(len(rows)) in worker_rows[0].text
    _shot(browser, "done")

    # a failed job shows its error
    bad = _spec(tiny_teacher_dir, tokens_npy, "browser-failing", topk=2)
    failing = httpx.post(f"{service}/v1/jobs", json=bad, headers=admin, timeout=60).json()
    wh = {"Authorization": f"Bearer {WORKER}"}
    lease = httpx.post(
        f"{service}/v1/leases", json={"worker": "gpu-7", "job_id": failing["id"]}, headers=wh
    ).json()
    message = "CUDA error: out of memory (shard 0, batch 2)"
    r = httpx.post(f"{service}/v1/leases/{lease['id']}/fail", json={"message": message}, headers=wh)
    assert r.status_code == 200, r.text
    _wait(lambda: (_job_state(browser, failing["id"]) or [""])[0] == "failed", 30, "failed")
    error = browser.find_element("css selector", f'tr.job-error[data-job-id="{failing["id"]}"]')
    assert message in error.text
    _shot(browser, "failed")

    # the finished cache links its report
    seen += _requests_made(browser)
    row = browser.find_element("css selector", f'tr.job[data-job-id="{job["id"]}"]')
    row.find_element("css selector", "a.report").click()
    _wait(lambda: "Tail mass vs k" in browser.page_source, 120, "the report page")
    assert browser.execute_script(
        "return [...document.images].every(i => i.complete && i.naturalWidth > 100)"
    )
    _shot(browser, "report")

    # /docs renders Swagger UI from the bundled assets
    browser.get(f"{service}/docs")
    _wait(lambda: browser.find_elements("css selector", ".opblock"), 60, "Swagger UI")
    _shot(browser, "docs")

    seen += _requests_made(browser)
    assert any(u.endswith("/v1/dashboard") for u in seen)
    assert any("swagger-ui-bundle.js" in u for u in seen)
    outside = [u for u in seen if not (u.startswith(service) or u.startswith("data:"))]
    assert not outside, outside
