"""The built book as a reader sees it: every page in `_toc.yml` loads in headless Chromium and every image decodes.

Run after `make book`:  `make rendered`  (or `pytest -m rendered tests/test_rendered.py`).

Skipped when `_build/html` or Chromium is missing, unless REQUIRE_RENDERED=1 (CI sets it), which turns the skip into a
failure so that a missing build can never pass for a checked one.

How: `_build/html` is served on 127.0.0.1 by `http.server` in a thread. The server adds a small probe script to
every HTML page it sends; after the page's `load` event the probe makes every image load eagerly, waits until each
has decoded or failed, and writes a JSON report into the page. Chromium's `--dump-dom` prints the page, report
included, and the test reads it. The server also records the status of every request, so a missing stylesheet,
script or image under `_build/html` fails the test even where the page would still look fine.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
import threading
import warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import pytest

from lib.io.runner import REPO_ROOT, declared_outputs, toc_chapters, toc_files

pytestmark = pytest.mark.rendered

HTML_DIR = REPO_ROOT / "_build" / "html"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# The flags this machine needs: root needs --no-sandbox; without the background-networking ones Chromium keeps
# trying to reach Google's hosts through a closed network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--virtual-time-budget=20000",  # let the probe's promises settle before the DOM is dumped
)
REPORT_ID = "rendered-check-report"
PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    if (e instanceof ErrorEvent) errors.push(e.message + " (" + e.filename + ":" + e.lineno + ")");
  });
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    images.forEach(function (img) { img.loading = "eager"; });  // off-screen lazy images would never load
    Promise.all(images.map(function (img) {
      return img.decode().then(function () {}, function () {});  // failures show as naturalWidth 0
    })).then(function () {
      var report = {
        title: document.title,
        errors: errors,
        external: Array.prototype.slice.call(document.querySelectorAll("script[src], link[href], img[src]"))
          .map(function (el) { return el.src || el.href; })
          .filter(function (url) { return /^https?:/.test(url) && new URL(url).origin !== location.origin; }),
        images: images.map(function (img) {
          return {src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth};
        })
      };
      var pre = document.createElement("pre");
      pre.id = "REPORT_ID";
      pre.textContent = JSON.stringify(report);
      document.body.appendChild(pre);
    });
  });
})();
</script>""".replace("REPORT_ID", REPORT_ID)


class PageReport(NamedTuple):
    title: str
    errors: list[str]
    external: list[str]  # scripts, stylesheets and images from other hosts (e.g. MathJax from a CDN)
    images: list[dict]


class ProbingHandler(SimpleHTTPRequestHandler):
    """Serves a directory, adds PROBE to HTML pages, and records (path, status) of every request."""

    def __init__(self, *args, requests: list, **kwargs):
        self.requests = requests
        super().__init__(*args, **kwargs)

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix != ".html" or not path.is_file():
            return super().send_head()
        page = path.read_text(encoding="utf-8")
        assert "<head>" in page, f"{path}: no <head> to put the probe in"
        body = page.replace("<head>", "<head>" + PROBE, 1).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_request(self, code="-", size="-"):
        self.requests.append((self.path, int(code)))

    def log_message(self, format, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def server():
    if not HTML_DIR.is_dir():
        _skip_or_fail(f"{HTML_DIR} does not exist: run `make book` first")
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        _skip_or_fail(f"no Chromium at {CHROMIUM}: run `make chromium` (Debian package `chromium`)")
    requests: list[tuple[str, int]] = []
    handler = partial(ProbingHandler, directory=str(HTML_DIR), requests=requests)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


def _skip_or_fail(reason: str):
    if os.environ.get("REQUIRE_RENDERED") == "1":
        pytest.fail(f"{reason} (REQUIRE_RENDERED=1)")
    pytest.skip(reason)


def load(url: str, tmp_path: Path) -> PageReport:
    """Load `url` in a fresh headless Chromium and return the probe's report."""
    # Headless Chromium's virtual clock now and then dumps the DOM before the load event has run (measured here: 0,
    # 1 and 2 of the 8 pages in three runs of the same build; with this retry, 5 runs of 8 pages all passed). So a
    # page without the probe's report is loaded again, up to 3 times, in a fresh profile; a report, once there, is
    # taken as it is, errors and all.
    for attempt in range(3):
        profile = tmp_path / f"chromium-profile-{attempt}"
        cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"chromium exited {done.returncode} on {url}:\n{done.stderr[-2000:]}"
        found = re.search(rf'<pre id="{REPORT_ID}"[^>]*>(.*?)</pre>', done.stdout, re.DOTALL)
        if found:
            break
    assert found, f"{url}: the page never finished loading in 3 attempts (no probe report in the DOM)"
    return PageReport(**json.loads(html.unescape(found.group(1))))


def pages() -> list[str]:
    return toc_files(REPO_ROOT) if (REPO_ROOT / "_toc.yml").is_file() else []


@pytest.mark.parametrize("page", pages())
def test_page_loads_and_every_image_decodes(page, server, tmp_path):
    base, requests = server
    path = HTML_DIR / f"{page}.html"
    assert path.is_file(), f"_toc.yml lists {page} but the build has no {path.relative_to(REPO_ROOT)}"
    first = len(requests)
    report = load(f"{base}/{page}.html", tmp_path)

    assert report.title.strip(), f"{page}: empty <title>"
    if report.external:  # fine online; offline (CI, a reader on a plane) these parts of the page are missing
        warnings.warn(f"{page} loads from other hosts: {sorted(set(report.external))}", stacklevel=1)
    assert report.errors == [], f"{page}: JavaScript errors: {report.errors}"
    broken = [img["src"] for img in report.images if not img["complete"] or img["width"] == 0]
    assert broken == [], f"{page}: images that did not load or decode: {broken}"
    # Anything the page asked our server for (CSS, JS, images, fonts) must exist in the build.
    # (Chromium asks for /favicon.ico by itself; the book declares no favicon.)
    failed = [(p, code) for p, code in requests[first:] if code >= 400 and p != "/favicon.ico"]
    assert failed == [], f"{page}: requests to the book that failed: {failed}"

    # A chapter shows each figure it declares (lib/book.Outputs.figure displays the PNG it saves).
    stem = page.removeprefix("book/notebooks/")
    chapter = next((c for c in toc_chapters(REPO_ROOT) if c.stem == stem and page.startswith("book/notebooks/")), None)
    if chapter is not None:
        n_declared = len(declared_outputs(chapter).figures)
        assert len(report.images) >= n_declared, (
            f"{page}: declares {n_declared} figure(s) but shows {len(report.images)} image(s)"
        )


def test_index_redirects_to_the_root_page():
    """jupyter-book writes index.html as a bare meta refresh to the toc's root page (no <head>, nothing to probe)."""
    index = HTML_DIR / "index.html"
    if not index.is_file():
        _skip_or_fail(f"{index} does not exist: run `make book` first")
    target = re.search(r'http-equiv="Refresh" content="0; url=([^"]+)"', index.read_text())
    assert target, f"{index} is not a redirect"
    assert target.group(1) == f"{pages()[0]}.html", f"index.html redirects to {target.group(1)}, not the root page"
    assert (HTML_DIR / target.group(1)).is_file(), f"index.html redirects to a missing page {target.group(1)}"
