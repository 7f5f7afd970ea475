"""The GitHub Actions workflow that rebuilds and publishes the book (.github/workflows/book.yml): what it runs and
caches, checked from its YAML, and actionlint (pinned in requirements.txt, as `make lint` runs it) finds it clean
and finds the mistakes planted in a copy of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from lib.io.book import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "book.yml"
BIN = Path(sys.prefix) / "bin"


def _load() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_builds_tests_caches_and_deploys():
    wf = _load()
    on = wf[True]  # YAML 1.1 reads the key `on` as True
    assert on["push"] == {"branches": ["main"]} and "workflow_dispatch" in on
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    runs = [s.get("run", "") for s in build["steps"]]
    assert runs.index("make test") < runs.index("make book PROFILE=default RUNNER_ARGS=--verbose")
    uses = {s["uses"].split("@")[0]: s for s in build["steps"] if "uses" in s}
    assert uses["actions/setup-python"]["with"]["python-version"] == "3.11"
    cache = uses["actions/cache"]["with"]
    assert cache["path"] == ".cache/artifacts"
    for glob in ("'lib/**'", "'lib/profiles/*.toml'", "'requirements.txt'", "'artifacts/**'"):
        assert glob in cache["key"], f"the artifact cache key does not hash {glob}"
    assert uses["actions/upload-pages-artifact"]["with"]["path"] == "_build/html"
    assert build["env"]["HF_HUB_OFFLINE"] == "1", "the book builds offline on the runner too"
    assert deploy["needs"] == "build" and deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["steps"][0]["uses"].startswith("actions/deploy-pages@")
    assert deploy["environment"]["name"] == "github-pages"


def _actionlint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "actionlint"), f"-shellcheck={BIN / 'shellcheck'}", "-pyflakes=", "-oneline", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_actionlint_finds_the_workflow_clean_and_a_broken_copy_not(tmp_path):
    clean = _actionlint(WORKFLOW)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    broken = tmp_path / "book.yml"
    text = WORKFLOW.read_text()
    text = text.replace('python-version: "3.11"', 'python-versio: "3.11"')  # an input the action does not have
    text = text.replace("run: make test", "run: cd $HOME/x && make test")  # unquoted variable: shellcheck SC2086
    text = text.replace("steps.deployment.outputs.page_url", "steps.deploy.outputs.page_url")  # no such step
    broken.write_text(text)
    found = _actionlint(broken)
    assert found.returncode == 1
    assert 'input "python-versio" is not defined' in found.stdout
    assert "SC2086" in found.stdout
    assert 'property "deploy" is not defined' in found.stdout, found.stdout
