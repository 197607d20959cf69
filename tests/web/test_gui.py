"""The web GUI in a real browser: Debian's chromium driven by Playwright, against a real
server on 127.0.0.1. Screenshots go to test-artifacts/web/."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.server import Server
from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(ROOT) / "test-artifacts" / "web"

if not os.path.exists(CHROMIUM):  # pragma: no cover - scripts/setup installs it
    if os.environ.get("CI") == "true":
        raise RuntimeError("chromium is missing: scripts/setup should have installed it")
    pytest.skip("no chromium here (scripts/setup installs it when run as root)",
                allow_module_level=True)  # fmt: skip

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

# How long an expectation or an action waits before it gives up (milliseconds): only a
# hung test should ever reach it, so it is generous; it is never a performance bound.
PATIENCE_MS = 60_000
expect.set_options(timeout=PATIENCE_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Any, **kw: Any) -> Page:
    page: Page = browser.new_page(**kw)
    page.set_default_timeout(PATIENCE_MS)
    page.set_default_navigation_timeout(PATIENCE_MS)
    return page


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def login(page: Page, url: str, token: str) -> None:
    page.goto(url)
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#app")).to_be_visible()


def test_an_operator_runs_the_example_from_the_browser(browser: Any, tmp_path: Path) -> None:
    with Server(tmp_path / "data") as s:
        page = new_page(browser, viewport={"width": 1400, "height": 1000})
        page.on("dialog", lambda d: d.accept())
        login(page, s.url, s.admin)
        expect(page.locator("#who")).to_have_text("admin (admin)")
        page.click("#new-env")
        page.select_option("#workflow", "datataking")
        detector = page.locator("#public-vars select[name=detector]")
        expect(detector).to_have_value("TST")
        detector.select_option("TPC")
        shot(page, "1-create-form")
        page.click("#create-form button[type=submit]")
        expect(page).to_have_url(re.compile(r"#/env/\w+"))
        state = page.locator("#env-state")
        expect(state).to_have_attribute("data-state", "STANDBY")
        for event, expected in [("DEPLOY", "DEPLOYED"), ("CONFIGURE", "CONFIGURED"),
                                ("START_ACTIVITY", "RUNNING")]:  # fmt: skip
            page.click(f"#controls button[data-event={event}]")
            expect(state).to_have_attribute("data-state", expected)
        # the task table follows live: every process RUNNING, the hook task DONE
        rows = page.locator("#tasks tbody tr")
        expect(rows).to_have_count(8)
        expect(page.locator("#tasks tbody [data-state=RUNNING]")).to_have_count(7)
        expect(page.locator("#env-run")).to_have_text(re.compile(r"run \d+"))
        # the dataflow graph: a node per task, an edge per channel, coloured by state
        expect(page.locator("#graph g.node")).to_have_count(8)
        assert page.locator("#graph path.edge").count() >= 6
        expect(page.locator("#roles [data-role='datataking.epn-localhost'] .state")).to_have_text(
            "RUNNING"
        )
        # the QC task's log, tailed
        page.click("#tasks tbody tr[data-task='datataking.qc']")
        expect(page.locator("#log")).to_contain_text("qc: messages=")
        expect(page.locator("#events li").first).to_be_visible()
        shot(page, "2-running")
        page.click("#controls button[data-event=STOP_ACTIVITY]")
        expect(state).to_have_attribute("data-state", "CONFIGURED")
        page.click("#controls button[data-event=DESTROY]")
        expect(state).to_have_attribute("data-state", "DONE")
        expect(page.locator("#tasks tbody [data-state=DONE]")).to_have_count(8)
        shot(page, "3-destroyed")
        page.goto(s.url + "/#/")
        expect(page.locator("#envs tbody tr")).to_have_count(1)
        expect(page.locator("#envs tbody [data-state=DONE]")).to_have_count(1)
        page.close()


def test_a_viewer_sees_no_controls_and_a_bad_token_is_refused(browser: Any, tmp_path: Path) -> None:
    import httpx

    with Server(tmp_path / "data") as s:
        auth = {"Authorization": f"Bearer {s.admin}"}
        with httpx.Client(base_url=s.url, headers=auth, timeout=60) as c:
            viewer = c.post("/api/tokens", json={"role": "viewer", "name": "watcher"}).json()
            env = c.post("/api/environments", json={"workflow": "hello"}).json()
        page = new_page(browser)
        page.goto(s.url)
        page.fill("#token", "crl_wrong")
        page.click("#login-form button[type=submit]")
        expect(page.locator("#login-error")).to_contain_text("refused")
        login(page, s.url, viewer["token"])
        expect(page.locator("#new-env")).to_be_hidden()
        page.click(f"#envs tbody tr[data-env='{env['id']}']")
        expect(page.locator("#env-state")).to_have_attribute("data-state", "STANDBY")
        expect(page.locator("#controls")).to_be_hidden()
        shot(page, "4-viewer")
        page.close()
