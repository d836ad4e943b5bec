"""The layer contracts (import-linter, pyproject.toml) hold on the tree and catch a new back-edge.

The check runs on a copy of the packages so that the deliberate back-edge never touches the
checkout; lint-imports reads the copy because PYTHONPATH comes before the editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("shards", "ingest", "trainer", "cluster")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the dev extra)")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def add_import(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_tree_keeps_every_contract(tree):
    proc = lint(tree)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " BROKEN" not in proc.stdout and "KEPT" in proc.stdout


@pytest.mark.parametrize("where, line, said", [
    ("shards/format.py", "import ingest.records  # noqa", "shards.format -> ingest.records"),
    ("trainer/model/network.py", "import ray  # noqa", "trainer.model.network -> ray"),
    ("shards/stream/mixture.py", "import shards.stream.dataset  # noqa", "No cycles are allowed in shards.stream."),
])
def test_a_new_back_edge_breaks_its_contract(tree, tmp_path, where, line, said):
    """Each edge is named in the broken contract's report (a store that imports ingest, a network that
    imports Ray, a cycle inside the stream)."""
    broken = tmp_path / "tree"
    shutil.copytree(tree, broken)
    add_import(broken / where, line)
    proc = lint(broken)
    assert proc.returncode != 0
    assert said in proc.stdout.split("Broken contracts", 1)[-1], proc.stdout[-3000:]
    assert said not in lint(tree).stdout  # the unbroken tree does not say it
