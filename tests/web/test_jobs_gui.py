"""The web GUI's jobs and services pages in a real browser: Debian's chromium driven by
Playwright, against a real server on 127.0.0.1 whose jobs directory the test writes.
Job files are submitted from the GUI; the pages follow the event stream. Screenshots go
to test-artifacts/web/."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.server import Server
from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(ROOT) / "test-artifacts" / "web"
PY = sys.executable

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

# a diamond: prepare, then left and right, then merge (a fan-in)
DIAMOND = """\
kind: dag
name: diamond
steps:
  - name: prepare
    command: {value: /bin/sh, arguments: ["-c", "echo prepared"]}
    wants: {cpu: 0.1}
  - name: left
    command: {value: /bin/sh, arguments: ["-c", "echo left"]}
    wants: {cpu: 0.1}
    needs: [prepare]
  - name: right
    command: {value: PY, arguments: ["-c", "print('right')"]}
    wants: {cpu: 0.1}
    needs: [prepare]
  - name: merge
    command: {value: /bin/sh, arguments: ["-c", "seq 150; echo merged"]}
    wants: {cpu: 0.1}
    needs: [left, right]
""".replace("PY", PY)

FAILS = """\
kind: dag
name: fails
failure: continue
steps:
  - name: fine
    command: {value: /bin/sh, arguments: ["-c", "echo fine"]}
    wants: {cpu: 0.1}
  - name: broken
    command: {value: /bin/sh, arguments: ["-c", "echo '<b>no calibration</b> here' >&2; exit 3"]}
    wants: {cpu: 0.1}
    needs: [fine]
  - name: after
    command: {value: /bin/true}
    wants: {cpu: 0.1}
    needs: [broken]
"""

# more steps than the GUI draws: it shows a count per state instead
MANY = """\
kind: batch
name: many
array: 600
wants: {cpu: 0.5}
command: {value: /bin/sleep, arguments: ["600"]}
"""

SERVER = """\
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"up\\n")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["CORRAL_PORT"])), H).serve_forever()
"""

WEB = f"""\
kind: service
name: web
replicas: 2
wants: {{cpu: 0.1, ports: 1}}
command: {{value: {PY}, arguments: [server.py]}}
health: {{http: {{path: /}}, interval: 200ms, timeout: 200ms}}
"""


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


def port_block(size: int = 50) -> str:
    """A range of free ports for the server's node, away from 20000-29999, which every
    other corral server on this machine (other tests) gives its replicas' ports from."""
    rnd = random.Random()
    for _ in range(100):
        base = rnd.randrange(10_000, 19_000, size)
        try:
            for port in range(base, base + size):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return f"{base}-{base + size - 1}"
    raise AssertionError("no block of free ports")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("jobs-gui")
    jobs = tmp / "workflows" / "jobs"
    jobs.mkdir(parents=True)
    for name, text in [("diamond.yaml", DIAMOND), ("fails.yaml", FAILS), ("many.yaml", MANY),
                       ("web.yaml", WEB), ("server.py", SERVER)]:  # fmt: skip
        (jobs / name).write_text(text)
    inventory = tmp / "inventory.yaml"
    inventory.write_text(
        f"nodes:\n  - name: localhost\n    cpu: 2\n    memory: 4096\n    ports: {port_block()}\n"
    )
    with Server(tmp / "data", "--workflows", str(tmp / "workflows"),
                "--inventory", str(inventory)) as s:  # fmt: skip
        yield s


PAGE_ERRORS: dict[int, list[str]] = {}


def new_page(browser: Any, **kw: Any) -> Page:
    page: Page = browser.new_page(**kw)
    page.set_default_timeout(PATIENCE_MS)
    page.set_default_navigation_timeout(PATIENCE_MS)
    errors = PAGE_ERRORS.setdefault(id(page), [])
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


def close(page: Page) -> None:
    """Close the page; its scripts must not have thrown."""
    page.close()
    assert PAGE_ERRORS.pop(id(page)) == []


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def login(page: Page, url: str, token: str) -> None:
    page.goto(url)
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#app")).to_be_visible()


def submit(page: Page, file: str) -> None:
    """Submit a job file from the jobs page."""
    page.click("#nav a[data-nav=jobs]")
    expect(page.locator("#jobs-view")).to_be_visible()
    expect(page.locator(f"#job-file option[value='{file}']")).to_have_count(1)
    page.select_option("#job-file", file)
    page.click("#submit-job")


def test_a_dag_submitted_from_the_gui_runs_and_shows_its_graph(
    browser: Any, server: Server
) -> None:
    page = new_page(browser, viewport={"width": 1400, "height": 1000})
    login(page, server.url, server.admin)
    submit(page, "diamond.yaml")
    expect(page).to_have_url(re.compile(r"#/job/\w+"))
    job_id = page.url.rsplit("/", 1)[1]
    state = page.locator("#job-state")
    expect(state).to_have_attribute("data-state", "SUCCEEDED")
    # the graph: a node per step, an edge per dependency, every node SUCCEEDED
    expect(page.locator("#job-graph g.node")).to_have_count(4)
    expect(page.locator("#job-graph g.node[data-state=SUCCEEDED]")).to_have_count(4)
    expect(page.locator("#job-graph path.edge")).to_have_count(4)
    for edge in ("0->1", "0->2", "1->3", "2->3"):
        expect(page.locator(f"#job-graph path.edge[data-edge='{edge}']")).to_have_count(1)
    # layered: what a step needs is left of it; the fan-in is rightmost
    xs = {}
    for i in range(4):
        box = page.locator(f"#job-graph g.node[data-step='{i}']").bounding_box()
        assert box is not None
        xs[i] = box["x"]
    assert xs[0] < xs[1] == xs[2] < xs[3], xs
    expect(page.locator("#job-steps tbody tr[data-state=SUCCEEDED]")).to_have_count(4)
    expect(page.locator("#job-stop")).to_be_hidden()
    # a step's log, from its row's link
    page.click("#job-steps tbody tr[data-step='2'] a.log-link")
    expect(page.locator("#job-log")).to_have_text("right")
    page.click("#job-graph g.node[data-step='3']")
    expect(page.locator("#job-log")).to_contain_text("150\nmerged")
    # a log longer than its panel shows its newest lines (the panel is at its end)
    page.wait_for_function(
        "() => { const b = document.querySelector('#job-log');"
        " return b.scrollHeight > b.clientHeight + 20"
        " && b.scrollTop + b.clientHeight >= b.scrollHeight - 4; }"
    )
    shot(page, "5-dag-succeeded")
    # the job list shows it with its counts
    page.click("#nav a[data-nav=jobs]")
    row = page.locator(f"#jobs tbody tr[data-job='{job_id}']")
    expect(row).to_have_attribute("data-state", "SUCCEEDED")
    expect(row.locator("[data-count=SUCCEEDED]")).to_have_text("SUCCEEDED 4")
    close(page)


def test_a_failing_step_shows_failed_with_its_reason(browser: Any, server: Server) -> None:
    page = new_page(browser, viewport={"width": 1400, "height": 1000})
    login(page, server.url, server.admin)
    submit(page, "fails.yaml")
    expect(page).to_have_url(re.compile(r"#/job/\w+"))
    expect(page.locator("#job-state")).to_have_attribute("data-state", "FAILED")
    expect(page.locator("#job-reason")).to_contain_text("1 of 3 failed; broken:")
    graph = page.locator("#job-graph")
    expect(graph.locator("g.node[data-step='0']")).to_have_attribute("data-state", "SUCCEEDED")
    expect(graph.locator("g.node[data-step='1']")).to_have_attribute("data-state", "FAILED")
    expect(graph.locator("g.node[data-step='2']")).to_have_attribute("data-state", "BLOCKED")
    broken = page.locator("#job-steps tbody tr[data-step='1']")
    expect(broken).to_have_attribute("data-state", "FAILED")
    expect(broken.locator("td.reason")).to_have_text(re.compile(r"exited with status 3$"))
    expect(page.locator("#job-steps tbody tr[data-step='2'] td.reason")).to_have_text(
        "needs broken, which failed"
    )
    broken.locator("a.log-link").click()
    expect(page.locator("#job-log")).to_have_text("<b>no calibration</b> here")  # as text
    expect(page.locator("#job-log b")).to_have_count(0)
    # only the failed steps, by the state filter
    page.select_option("#step-filter", "FAILED")
    expect(page.locator("#job-steps tbody tr")).to_have_count(1)
    shot(page, "6-dag-failed")
    close(page)


def test_a_large_job_is_summarised_and_an_operator_stops_it(browser: Any, server: Server) -> None:
    page = new_page(browser, viewport={"width": 1400, "height": 1000})
    page.on("dialog", lambda d: d.accept())
    login(page, server.url, server.admin)
    submit(page, "many.yaml")
    expect(page).to_have_url(re.compile(r"#/job/\w+"))
    expect(page.locator("#job-state")).to_have_attribute("data-state", "RUNNING")
    expect(page.locator("#job-summary")).to_be_visible()
    expect(page.locator("#job-graph-box")).to_be_hidden()
    expect(page.locator("#job-graph g.node")).to_have_count(0)
    expect(page.locator("#job-summary tbody tr[data-state=''] td").nth(1)).to_have_text("600")
    expect(page.locator("#job-summary tbody tr[data-state=RUNNING]")).to_have_count(1)
    expect(page.locator("#job-steps tbody tr")).to_have_count(500)
    expect(page.locator("#steps-more")).to_have_text("(the first 500 of 600)")
    shot(page, "7-large-job")
    page.click("#job-stop")
    expect(page.locator("#job-state")).to_have_attribute("data-state", "CANCELLED")
    expect(page.locator("#job-stop")).to_be_hidden()
    expect(page.locator("#job-summary tbody tr[data-state=CANCELLED] td").nth(1)).to_have_text(
        "600"
    )
    close(page)


def test_a_service_shows_its_healthy_replicas_scales_and_a_viewer_reads(
    browser: Any, server: Server
) -> None:
    page = new_page(browser, viewport={"width": 1400, "height": 1000})
    login(page, server.url, server.admin)
    submit(page, "web.yaml")
    expect(page).to_have_url(re.compile(r"#/services$"))
    card = page.locator("#services [data-service=web]")
    healthy = card.locator("tbody [data-health=healthy]")
    expect(healthy).to_have_count(2)
    expect(card.locator(".svc-state")).to_have_attribute("data-state", "RUNNING")
    expect(card.locator(".svc-endpoints")).to_contain_text("127.0.0.1:")
    shot(page, "8-service")
    card.locator("input.scale-input").fill("3")
    card.locator("button.scale-button").click()
    expect(card.locator("tbody tr")).to_have_count(3)
    expect(healthy).to_have_count(3)
    expect(card.locator("tbody td", has_text=re.compile(r"^127\.0\.0\.1:\d+$"))).to_have_count(3)
    shot(page, "9-service-scaled")
    # a viewer reads jobs and services, and has no controls
    with server.client(server.admin) as c:
        viewer = c.post("/api/tokens", json={"role": "viewer", "name": "watcher"}).json()
        r = c.post("/api/jobs", json={"file": "diamond"})
        assert r.status_code == 201, r.text
        job = r.json()
    watcher = new_page(browser)
    login(watcher, server.url, viewer["token"])
    watcher.click("#nav a[data-nav=services]")
    expect(
        watcher.locator("#services [data-service=web] tbody [data-health=healthy]")
    ).to_have_count(3)
    expect(watcher.locator("#services [data-service=web] .scale")).to_be_hidden()
    watcher.click("#nav a[data-nav=jobs]")
    expect(watcher.locator("#submit-form")).to_be_hidden()
    watcher.click(f"#jobs tbody tr[data-job='{job['id']}']")
    expect(watcher.locator("#job-graph g.node[data-state=SUCCEEDED]")).to_have_count(4)
    expect(watcher.locator("#job-stop")).to_be_hidden()
    close(watcher)
    with server.client(server.admin) as c:
        assert c.delete("/api/services/web").status_code == 200
    expect(card).to_have_count(0)  # the removal comes as an event
    close(page)
