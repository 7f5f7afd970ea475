"""`make lab` headless: the JupyterLab server it starts answers, lists the chapters and opens them as notebooks
(Jupytext), a kernel started for a chapter imports the library with chapters/ as its working directory, and a
chapter converted to .ipynb executes with a plain `jupyter nbconvert --execute`.

Needs requirements-lab.txt, which CI does not install: `make lab-check` installs it and runs this module with
REQUIRE_LAB=1. A plain `make test` deselects it (marker `lab`); run by hand without JupyterLab, it skips unless
REQUIRE_LAB=1. The server listens on 127.0.0.1 only, with a token, and is shut down through its API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lib.io.book import REPO_ROOT, toc_chapters

pytestmark = pytest.mark.lab

if importlib.util.find_spec("jupyterlab") is None:
    if os.environ.get("REQUIRE_LAB") == "1":
        raise RuntimeError("REQUIRE_LAB=1 but JupyterLab is not installed: run `make lab-check`")
    pytest.skip(
        "JupyterLab is not installed (requirements-lab.txt; `make lab-check` installs it)", allow_module_level=True
    )

VENV = Path(sys.prefix)
STAMPS = (VENV / ".installed", VENV / ".installed-lab")  # taken as current (`make -o`): the test installs nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, port: int, token: str, log: Path):
        self.base, self.token, self.log = f"http://127.0.0.1:{port}", token, log

    def get(self, path: str, timeout: float = 30):
        sep = "&" if "?" in path else "?"
        with urllib.request.urlopen(f"{self.base}{path}{sep}token={self.token}", timeout=timeout) as r:
            return r.status, r.read().decode()

    def post(self, path: str, body: dict | None = None):
        request = urllib.request.Request(
            f"{self.base}{path}",
            data=json.dumps(body or {}).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`make lab` on a free port with a token, its output in a log file; shut down through the API afterwards."""
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path_factory.mktemp("lab") / "lab.log"
    args = f"--no-browser --port={port} --ServerApp.port_retries=0 --IdentityProvider.token={token}"
    stamps = [a for stamp in STAMPS for a in ("-o", str(stamp))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAKEFLAGS", "MAKELEVEL")}
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", *stamps, "lab", f"VENV={VENV}", f"LAB_ARGS={args}"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the test can end exactly what it started
        )
    server = Lab(port, token, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if server.get("/api/status", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`make lab` did not answer on port {port}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield server
    finally:
        try:
            server.post("/api/shutdown")
            proc.wait(timeout=60)
        except Exception:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)


def test_lab_lists_the_chapters(lab):
    status, body = lab.get("/api/contents/chapters")
    assert status == 200
    names = {entry["name"] for entry in json.loads(body)["content"]}
    expected = {c.source.name for c in toc_chapters(REPO_ROOT)}
    assert expected <= names, f"missing from the listing: {sorted(expected - names)}"
    print("chapters listed by `make lab`:", ", ".join(sorted(expected)))


def test_lab_opens_a_chapter_as_a_notebook(lab):
    """Jupytext's contents manager serves the .py chapter as a notebook, with its parameters cell; the lab's default
    viewer for Python files is Jupytext's notebook (the overrides `make lab` installs)."""
    status, body = lab.get("/api/contents/chapters/01_world.py?type=notebook&content=1")
    model = json.loads(body)
    assert status == 200 and model["type"] == "notebook", model.get("type")
    cells = model["content"]["cells"]
    assert any("parameters" in c["metadata"].get("tags", []) for c in cells if c["cell_type"] == "code")
    assert cells[0]["cell_type"] == "markdown" and cells[0]["source"].startswith("# The spatial world")
    status, body = lab.get("/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
    assert status == 200 and '"python": "Jupytext Notebook"' in body.replace("\\", ""), body[:500]
    status, body = lab.get("/lab/api/extensions")
    assert status == 200 and "jupyterlab-jupytext" in body


def test_lab_kernel_for_a_chapter_imports_the_library(lab):
    """A session for chapters/01_world.py starts the kernel the lab would (cwd chapters/); connected through its
    connection file, it imports `lib` and reports its working directory."""
    from jupyter_client import BlockingKernelClient
    from jupyter_core.paths import jupyter_runtime_dir

    status, body = lab.post(
        "/api/sessions",
        {"path": "chapters/01_world.py", "type": "notebook", "name": "01_world.py", "kernel": {"name": "python3"}},
    )
    assert status == 201, body
    kernel_id = json.loads(body)["kernel"]["id"]
    client = BlockingKernelClient(connection_file=str(Path(jupyter_runtime_dir()) / f"kernel-{kernel_id}.json"))
    client.load_connection_file()
    client.start_channels()
    outputs: list[dict] = []
    try:
        client.wait_for_ready(timeout=120)
        code = "import os, lib.steps.study, lib.io.book as b; print(os.getcwd(), b.REPO_ROOT)"
        reply = client.execute_interactive(code, timeout=120, output_hook=outputs.append)
    finally:
        client.stop_channels()
    assert reply["content"]["status"] == "ok", reply["content"]
    text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    assert text.split() == [str(REPO_ROOT / "chapters"), str(REPO_ROOT)], text


def test_converted_chapter_executes_with_nbconvert(tmp_path):
    """`jupytext --to ipynb` then a plain `jupyter nbconvert --execute`, in a folder outside the checkout (the
    chapter's own parameters: the default profile; outputs and cache in temporary folders)."""
    notebook = tmp_path / "01_world.ipynb"
    bin_dir = VENV / "bin"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(SPATIAL_BOOK_OUTPUTS=str(tmp_path / "book"), SPATIAL_CACHE=str(tmp_path / "cache"))
    subprocess.run(
        [str(bin_dir / "jupytext"), "--to", "ipynb", str(REPO_ROOT / "chapters" / "01_world.py"), "-o", str(notebook)],
        check=True,
        capture_output=True,
        env=env,
    )
    done = subprocess.run(
        [str(bin_dir / "jupyter"), "nbconvert", "--to", "notebook", "--execute", "--inplace", str(notebook)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    executed = json.loads(notebook.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    assert (tmp_path / "book" / "figures" / "default" / "01_world" / "scene_grid.png").is_file()
