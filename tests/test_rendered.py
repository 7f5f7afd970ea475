"""The built book as a reader sees it: every page in `_toc.yml` loads in headless Chromium, every image decodes, and
no page shows an absolute path of the build machine, a Python warning, an error, stderr or a progress bar
(lib/io/book_check.py's `scan_html`).

Run after `make book`:  `make rendered`  (or `pytest -m rendered tests/test_rendered.py`).

Skipped when `_build/html` or Chromium is missing, unless REQUIRE_RENDERED=1 (CI sets it), which turns the skip into a
failure so that a missing build can never pass for a checked one.

The tests not marked `rendered` (they run with `make test`) build a two-page book of their own with the project's
`_config.yml`: Jupyter Book honours the cell tags the chapters use to hide plumbing (`remove-cell`, `remove-input`,
`remove-output`, `hide-input`, `hide-output`), and `scan_html` finds each kind of problem in a built page and
nothing in a clean one.

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
import sys
import threading
import warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import nbformat
import pytest

from lib.io.book import REPO_ROOT, declared_outputs, toc_chapters, toc_files
from lib.io.book_check import scan_html

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


@pytest.mark.rendered
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


@pytest.mark.rendered
@pytest.mark.parametrize("page", pages())
def test_page_shows_no_machine_path_warning_or_error(page):
    """The page as built (no browser needed): every cell's outputs, and machine paths anywhere in it."""
    if not HTML_DIR.is_dir():
        _skip_or_fail(f"{HTML_DIR} does not exist: run `make book` first")
    path = HTML_DIR / f"{page}.html"
    assert path.is_file(), f"_toc.yml lists {page} but the build has no {path.relative_to(REPO_ROOT)}"
    problems = scan_html(path.read_text(encoding="utf-8"), f"{page}.html")
    assert not problems, f"{page}.html shows what a page must not:\n" + "\n".join(f"  {p}" for p in problems)


@pytest.mark.rendered
def test_index_redirects_to_the_root_page():
    """jupyter-book writes index.html as a bare meta refresh to the toc's root page (no <head>, nothing to probe)."""
    index = HTML_DIR / "index.html"
    if not index.is_file():
        _skip_or_fail(f"{index} does not exist: run `make book` first")
    target = re.search(r'http-equiv="Refresh" content="0; url=([^"]+)"', index.read_text())
    assert target, f"{index} is not a redirect"
    assert target.group(1) == f"{pages()[0]}.html", f"index.html redirects to {target.group(1)}, not the root page"
    assert (HTML_DIR / target.group(1)).is_file(), f"index.html redirects to a missing page {target.group(1)}"


# ---------------------------------------------------------------------------------------------------------------
# A book of our own, built with the project's _config.yml (a few seconds; no `make book`, no Chromium)


def _cell(source: str, tags: list[str], *outputs) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = tags
    if not outputs and source.startswith("src_"):  # a tagged cell of the `tags` page prints out_<tag>
        outputs = (nbformat.v4.new_output("stream", name="stdout", text=f"out_{source[4:]}\n"),)
    cell.outputs = list(outputs)
    return cell


def _page(title: str, cells: list) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {title}"), *cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture(scope="module")
def small_book(tmp_path_factory) -> Path:
    """Two executed notebooks as the runner leaves them, built as `make html` builds the book; returns the HTML
    folder. `tags`: the chapter's `parameters` cell tagged `remove-cell` beside papermill's injected one, then one
    cell per tag (its source `src_<tag>`, its output `out_<tag>`). `leaks`: one cell per kind of problem."""
    root = tmp_path_factory.mktemp("small_book")
    shutil.copy(REPO_ROOT / "_config.yml", root / "_config.yml")
    toc = "format: jb-book\nroot: book/notebooks/tags\nchapters:\n  - file: book/notebooks/leaks\n"
    (root / "_toc.yml").write_text(toc)
    notebooks = root / "book" / "notebooks"
    notebooks.mkdir(parents=True)
    tags = ["remove-cell", "remove-input", "remove-output", "hide-input", "hide-output"]
    nbformat.write(
        _page(
            "Tags",
            [
                _cell('profile = "chapter_default"', ["parameters", "remove-cell"]),
                _cell('# Parameters\nprofile = "injected_profile"', ["injected-parameters"]),
                *(_cell(f"src_{tag.replace('-', '_')}", [tag]) for tag in tags),
                _cell("src_untagged", []),
            ],
        ),
        notebooks / "tags.ipynb",
    )

    def stream(text, name="stdout"):
        return nbformat.v4.new_output("stream", name=name, text=text)

    nbformat.write(
        _page(
            "Leaks",
            [
                _cell("clean()", [], stream("42 features\n")),
                _cell("where()", [], stream("written to /tmp/leak/table.csv\n")),
                _cell("import lib", [], stream("lib/x.py:3: FutureWarning: old\n", "stderr")),
                _cell("fails()", [], nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[])),
                _cell("bar()", [], stream("\\rbar:  40%|####      | 2/5 [00:01<00:01]\n")),
            ],
        ),
        notebooks / "leaks.ipynb",
    )
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    done = subprocess.run(
        [str(jupyter_book), "build", "--all", "--warningiserror", "--keep-going", "."],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "_build" / "html"


def _folded(page: str) -> tuple[str, str]:
    """(what the page shows at once, what it folds into a `<details>` toggle)."""
    folded = re.findall(r"<details.*?</details>", page, re.DOTALL)
    return re.sub(r"<details.*?</details>", "", page, flags=re.DOTALL), "".join(folded)


def test_cell_tags_hide_plumbing_in_the_built_page(small_book):
    shown, folded = _folded((small_book / "book" / "notebooks" / "tags.html").read_text())
    everywhere = shown + folded
    assert "chapter_default" not in everywhere, "the chapter's own parameters cell is shown beside the injected one"
    assert shown.count("injected_profile") == 1
    assert "src_remove_cell" not in everywhere and "out_remove_cell" not in everywhere
    assert "src_remove_input" not in everywhere and "out_remove_input" in shown
    assert "src_remove_output" in shown and "out_remove_output" not in everywhere
    assert "src_hide_input" in folded and "src_hide_input" not in shown and "out_hide_input" in shown
    assert "src_hide_output" in shown and "out_hide_output" in folded and "out_hide_output" not in shown
    assert "src_untagged" in shown and "out_untagged" in shown


def test_scan_html_finds_nothing_on_a_clean_built_page(small_book):
    """The book was built under the temporary directory: a theme or Sphinx that wrote its build path into the page
    would show here."""
    assert scan_html((small_book / "book" / "notebooks" / "tags.html").read_text(), "tags.html") == []


def test_scan_html_finds_each_kind_of_problem_in_a_built_page(small_book):
    problems = scan_html((small_book / "book" / "notebooks" / "leaks.html").read_text(), "leaks.html")
    found = [(p.cell, p.source, p.kind) for p in problems]
    assert found == [
        (1, "where()", "absolute path"),
        (2, "import lib", "stderr output"),
        (2, "import lib", "warning"),
        (3, "fails()", "error output"),
        (4, "bar()", "progress bar"),
    ], found
    assert str(problems[0]) == "leaks.html, cell 1 (where()): absolute path: written to /tmp/leak/table.csv"
