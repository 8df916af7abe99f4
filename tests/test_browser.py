"""The HTML report in headless Chromium: loads with no console errors or broken images, the
layer-alignment section shows (its store has layers a@0, a@1 of one model), the concept table
sorts on a header click, a concept page opens, a screenshot is taken.

Chromium is driven through the DevTools protocol over --remote-debugging-pipe (fds 3/4,
NUL-separated JSON): no websocket library, no network port. Without Chromium the test skips,
except under CI=true, where it fails (CI installs Debian's chromium).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from test_metrics import planted
from usae.analysis.report import AnalyzeConfig, run_analyze

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
    "--window-size=1280,900",
]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but headless Chromium is not installed (apt-get install chromium)")
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


class Browser:
    """Minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, exe: str, profile: Path):
        to_r, to_w = os.pipe()  # we write, Chromium reads on fd 3
        from_r, from_w = os.pipe()  # Chromium writes on fd 4, we read
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_r, from_w)]  # out of the way of 3/4

        def child_fds():
            os.dup2(hi[0], 3)
            os.dup2(hi[1], 4)

        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4),
            preexec_fn=child_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (to_r, from_w, *hi):
            os.close(fd)
        self.out = os.fdopen(to_w, "wb", buffering=0)
        self.inbox: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self.next_id = 0
        threading.Thread(
            target=self._read, args=(os.fdopen(from_r, "rb", buffering=0),), daemon=True
        ).start()

    def _read(self, f) -> None:
        buf = b""
        while chunk := f.read(65536):
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for m in msgs:
                self.inbox.put(json.loads(m))

    def _pump(self, until, timeout: float = 60.0):
        end = time.monotonic() + timeout
        while True:
            try:
                msg = self.inbox.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise TimeoutError("no answer from Chromium") from None
            if "method" in msg:
                self.events.append(msg)
            if until(msg):
                return msg

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.out.write(json.dumps(msg).encode() + b"\0")
        got = self._pump(lambda m, i=self.next_id: m.get("id") == i)
        if "error" in got:
            raise RuntimeError(f"{method}: {got['error']}")
        return got.get("result", {})

    def wait_event(self, method: str, session: str, since: int) -> None:
        if any(
            e["method"] == method and e.get("sessionId") == session for e in self.events[since:]
        ):
            return
        self._pump(lambda m: m.get("method") == method and m.get("sessionId") == session)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Page:
    """One tab: navigate, evaluate JavaScript, collect console errors."""

    def __init__(self, b: Browser):
        self.b = b
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            b.send(f"{domain}.enable", session=self.s)
        b.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            self.s,
        )

    def js(self, expr: str):
        r = self.b.send(
            "Runtime.evaluate",
            {"expression": expr, "returnByValue": True, "awaitPromise": True},
            self.s,
        )
        if "exceptionDetails" in r:
            raise AssertionError(f"JS error in {expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def goto(self, url: str | None = None, click: str | None = None) -> None:
        """Open a URL, or click the element matching a CSS selector, and wait for the load event."""
        mark = len(self.b.events)
        if url:
            self.b.send("Page.navigate", {"url": url}, self.s)
        else:
            self.js(f"document.querySelector({json.dumps(click)}).click()")
        self.b.wait_event("Page.loadEventFired", self.s, mark)
        self.js("new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)))")

    def errors(self) -> list[str]:
        out = []
        for e in self.b.events:
            if e.get("sessionId") != self.s:
                continue
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:300])
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:300])
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def screenshot(self, path: Path) -> None:
        data = self.b.send("Page.captureScreenshot", {"format": "png"}, self.s)["data"]
        path.write_bytes(base64.b64decode(data))


def column(page: Page, name: str) -> list[float | None]:
    return page.js(f"""(() => {{
        const t = document.getElementById('concepts');
        const col = Array.from(t.tHead.rows[0].cells).findIndex(h => h.textContent.trim() === {json.dumps(name)});
        return Array.from(t.tBodies[0].rows).map(r => {{
            const v = r.cells[col].getAttribute('data-v'); return v === '' ? null : parseFloat(v); }});
    }})()""")


def click_header(page: Page, name: str) -> str:
    return page.js(f"""(() => {{
        const h = Array.from(document.querySelectorAll('#concepts th')).find(h => h.textContent.trim() === {json.dumps(name)});
        h.click(); return h.getAttribute('aria-sort'); }})()""")


BROKEN_IMAGES = (
    "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
)


LOADED = """(() => {{
    const imgs = Array.from(document.querySelectorAll({sel!r}));
    if (!imgs.length || imgs.some(i => !(i.complete && i.naturalWidth > 0))) {{ return -1; }}
    return imgs.length; }})()"""
"""How many images match the selector, all loaded (-1: none, or one not loaded)."""


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_path()


@pytest.fixture(scope="module")
def report(chromium, tmp_path_factory) -> Path:
    from PIL import Image
    from skimage import data

    tmp = tmp_path_factory.mktemp("browser")
    # two layers of one model and another model: the page has the layer-alignment section
    p = planted(tmp, n_images=16, chunk_images=4, n_universal=5, keys=("a@0", "a@1", "b"))
    photo = data.chelsea()
    (tmp / "imgs").mkdir()
    rows = []
    for n, iid in enumerate(p.store.image_ids):
        Image.fromarray(photo[n * 10 : n * 10 + 200, n * 12 : n * 12 + 260]).save(
            tmp / "imgs" / f"{iid}.png"
        )
        rows.append({"image_id": iid, "path": f"imgs/{iid}.png"})
    rows[3]["path"] = "imgs/missing.png"  # one unloadable image: a placeholder, listed on the page
    pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
    cfg = AnalyzeConfig(
        run=str(p.run),
        store=str(p.store.path),
        out=str(tmp / "report"),
        manifest=str(tmp / "manifest.csv"),
        top_concepts=3,
        top_images=3,
    )
    run_analyze(cfg, progress=False)
    return tmp / "report"


def test_report_in_headless_chromium(chromium, report, tmp_path):
    b = Browser(chromium, tmp_path / "profile")
    try:
        page = Page(b)
        page.goto((report / "index.html").resolve().as_uri())
        assert page.js("document.title") == "usae report"
        assert page.js("document.querySelectorAll('#concepts tbody tr').length") == len(
            pd.read_parquet(report / "concepts.parquet")
        )
        assert page.js(BROKEN_IMAGES) == []
        # the gallery: cards of thumbnails (photos and token maps), every one loaded
        assert page.js(LOADED.format(sel="#gallery ~ .gset .gcard img")) >= 3 * 2
        assert page.js("document.querySelectorAll('.gcard .gmain img').length") >= 4
        shown = "(e => !!e && e.getBoundingClientRect().height > 0)"
        assert page.js(f"{shown}(document.querySelector('#layer-alignment'))")
        assert page.js(
            f"{shown}(document.querySelector('img[src=\"figures/layer_alignment.png\"]'))"
        )
        assert page.js("document.querySelectorAll('#layer-best tbody tr').length") > 0
        # click-to-sort: first click descending, second ascending; missing values stay last
        assert click_header(page, "cofires") == "descending"
        got = column(page, "cofires")
        assert got == sorted(got, reverse=True) and got[0] > got[-1]
        assert click_header(page, "cofires") == "ascending"
        got = column(page, "cofires")
        assert got == sorted(got)
        assert click_header(page, "firing_entropy") == "descending"
        fe = column(page, "firing_entropy")
        known = [v for v in fe if v is not None]
        assert known == sorted(known, reverse=True) and fe[len(known) :] == [None] * (
            len(fe) - len(known)
        )
        assert None in fe  # the dead concept has no firing entropy
        page.screenshot(tmp_path / "index.png")
        # a concept page opens from the table
        href = page.js("document.querySelector('#concepts a').getAttribute('href')")
        page.goto(click="#concepts a")
        assert page.js("location.href").endswith(href)
        assert page.js("document.querySelector('h1').textContent").startswith("Concept ")
        assert page.js(BROKEN_IMAGES) == []
        assert page.js(LOADED.format(sel="table.thumbs img")) >= 2
        page.screenshot(tmp_path / "concept.png")
        # a gallery card opens its concept's page, whose thumbnails load
        page.goto((report / "index.html").resolve().as_uri())
        href = page.js("document.querySelector('.gcard').getAttribute('href')")
        page.goto(click=".gcard")
        assert page.js("location.href").endswith(href)
        assert page.js(LOADED.format(sel="table.thumbs img")) >= 2
        assert page.errors() == []
        # the check can fail: a page with a script error and a broken image is caught
        bad = tmp_path / "bad.html"
        bad.write_text(
            '<html><body><img src="nope.png"><script>undefinedFunction()</script></body></html>'
        )
        page.goto(bad.as_uri())
        assert len(page.errors()) >= 2
    finally:
        b.close()
    for shot in ("index.png", "concept.png"):
        png = (tmp_path / shot).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    keep = os.environ.get("USAE_SCREENSHOTS")  # optional: where to copy the screenshots
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in ("index.png", "concept.png"):
            shutil.copyfile(tmp_path / shot, Path(keep) / shot)
