"""Hostile inputs end in a vlmkit error that names the value and a fix, or in the right result.

Every case of :mod:`tests.hostile.cases` runs in a forked child of one worker process
(``_worker.py``), two at a time, each bounded in memory (``RLIMIT_AS``: the worker's address
space + 1.5 GiB), CPU time (40 s) and wall time (45 s, then SIGKILL). A case that hangs, runs
out of memory or kills its process fails here with what happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.hostile.cases import CASES
from tests.unit._tiny_ckpt import tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
VLMKIT_ERRORS = {"VlmkitError"}


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    root = Path(tempfile.mkdtemp(prefix="vlmkit-hostile-"))
    args = {"cases": list(CASES), "root": str(root), "ckpt": str(tiny_checkpoint()), "jobs": 2}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("VLMKIT_MAX_")}
    proc = subprocess.run([sys.executable, "-m", "tests.hostile._worker", json.dumps(args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            found[row["case"]] = row
    assert found, f"the worker reported nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return found


def test_at_least_sixty_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_hostile(name: str, results):
    spec = CASES[name]
    got = results.get(name)
    assert got is not None, f"{name}: no result (the worker died?)"
    assert got["outcome"] not in ("timeout", "killed"), f"{name}: {got}"
    if spec.cli:
        assert got["outcome"] == "returned", f"{name}: the CLI raised {got.get('cls')}: {got.get('message')}"
        text = got["value"]
        assert text.startswith("rc=1"), f"{name}: expected exit 1:\n{text}"
        assert "error:" in text and "internal error" not in text and "hint:" in text, text
    elif spec.ok:
        assert got["outcome"] == "returned", f"{name}: raised {got.get('cls')}: {got.get('message')}\n{got.get('trace')}"
        text = got["value"]
    else:
        assert got["outcome"] == "raised", f"{name}: returned {got.get('value')!r} instead of raising {spec.error}"
        assert spec.error in got["mro"] and "VlmkitError" in got["mro"], (
            f"{name}: expected {spec.error}, got {got['cls']}: {got['message']}\n{got.get('trace')}"
        )
        text = got["message"]
        assert "hint:" in text, f"{name}: the message names no fix:\n{text}"
    for word in spec.words:
        assert word in text, f"{name}: {word!r} not in:\n{text}"
