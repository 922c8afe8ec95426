"""Real pip-installed plugins: a good one (a connector) and one that raises on import.

Both are written to tmp_path as ordinary distributions (pyproject + module + ``vlmkit`` entry
point) and pip-installed, offline, into a throwaway venv layered on this test venv: ``python -m
venv --system-site-packages --without-pip`` plus a ``.pth`` that runs ``site.addsitedir`` on the
test venv's site-packages, so vlmkit (editable), torch, pip and setuptools are importable there
while nothing is installed into -- or left behind in -- the test venv. Each check runs in a
subprocess of the throwaway venv's python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.plugins

GOOD_DIST, GOOD_EP, GOOD_NAME = "vlmkit-throwaway-good", "throwaway_good", "throwaway_pool"
BROKEN_DIST, BROKEN_EP = "vlmkit-throwaway-broken", "throwaway_broken"

GOOD_MODULE = '''
"""A throwaway vlmkit plugin: an average-pooling connector."""
import torch
from pydantic import BaseModel, ConfigDict, Field

import vlmkit
from vlmkit.keymap import KeyMap


class PoolParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: int = Field(2, ge=1)


class PoolConnector(torch.nn.Module):
    Params = PoolParams

    def __init__(self, params, *, in_features, grid, out_features):
        super().__init__()
        self.params, self.grid, self.pool = params, grid, params.pool
        self.out_features = out_features
        self.tokens_per_image = (grid // params.pool) ** 2
        self.proj = torch.nn.Linear(in_features, out_features)

    def forward(self, features):
        n, _, d = features.shape
        x = features.transpose(1, 2).reshape(n, d, self.grid, self.grid)
        return self.proj(torch.nn.functional.avg_pool2d(x, self.pool).flatten(2).transpose(1, 2))

    def key_map(self):
        return KeyMap.prefixed(self.state_dict().keys(), "model.connector.")


@vlmkit.hookimpl
def vlmkit_register_components(registry):
    registry.add_connector("throwaway_pool", PoolConnector)
'''

BROKEN_MODULE = '''
raise RuntimeError("boom: throwaway_broken cannot be imported")
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.0.1"
dependencies = ["vlmkit"]

[project.entry-points.vlmkit]
{ep} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]
'''

REPORT = textwrap.dedent(
    """
    import json, torch, vlmkit
    from vlmkit import plugins
    reg = plugins.get_registry()
    out = {
        "connectors": reg.names("connector"),
        "sources": plugins.plugin_sources(),
        "failures": [[f.name, f.distribution, f.error] for f in plugins.failures()],
    }
    if "throwaway_pool" in out["connectors"]:
        from vlmkit.testing import check_connector
        cls = reg.get("connector", "throwaway_pool").cls
        check_connector(cls, {"pool": 2}, name="throwaway_pool")  # conformance kit, tiny model included
        model = vlmkit.build({
            "vision_tower": {"name": "siglip", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "image_size": 16, "patch_size": 4},
            "connector": {"name": "throwaway_pool", "pool": 2},
            "packer": {"name": "image_packer", "image_token_id": 9},
            "backbone": {"name": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
                         "num_hidden_layers": 1, "num_attention_heads": 2},
        }, load_weights=False)
        ids = torch.tensor([[1] + [9] * model.packer.tokens_per_image + [2]])
        logits = model(ids, pixel_values=torch.randn(1, 1, 3, 16, 16)).logits
        out["tokens_per_image"] = model.packer.tokens_per_image
        out["logits"] = list(logits.shape)
    print("REPORT" + json.dumps(out))
    """
)


def _write_dist(root: Path, dist: str, ep: str, module: str, code: str) -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, ep=ep, module=module), encoding="utf-8")
    (root / f"{module}.py").write_text(code, encoding="utf-8")
    return root


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pip-plugins")
    good = _write_dist(tmp / "good", GOOD_DIST, GOOD_EP, GOOD_EP, GOOD_MODULE)
    broken = _write_dist(tmp / "broken", BROKEN_DIST, BROKEN_EP, BROKEN_EP, BROKEN_MODULE)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=120)
    python = _venv_python(venv)
    site_dir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    Path(site_dir, "_vlmkit_test_parent_venv.pth").write_text(lines, encoding="utf-8")
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", str(good), str(broken)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"offline pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return python


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLMKIT_BLOCK_PLUGINS", "VLMKIT_DISABLE_ENTRYPOINTS")}
    env.update(COLUMNS="200", HF_HUB_OFFLINE="1", **extra)
    return env


def _report(python: Path, **env: str) -> dict:
    proc = subprocess.run([str(python), "-c", REPORT], capture_output=True, text=True, env=_env(**env), timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def test_installed_into_the_throwaway_venv_only(venv_python):
    import importlib.metadata

    code = "import importlib.metadata as m; print(sorted(e.dist.name for e in m.entry_points(group='vlmkit')))"
    names = subprocess.run([str(venv_python), "-c", code], capture_output=True, text=True, check=True).stdout
    assert GOOD_DIST in names and BROKEN_DIST in names
    here = {e.dist.name for e in importlib.metadata.entry_points(group="vlmkit") if e.dist is not None}
    assert GOOD_DIST not in here and BROKEN_DIST not in here, "the test venv must stay clean"


def test_vlmkit_plugins_reports_both(venv_python):
    proc = subprocess.run([str(venv_python), "-m", "vlmkit.cli", "plugins"], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    row = next(line for line in out.splitlines() if GOOD_NAME in line)
    assert "connector" in row and GOOD_EP in row and GOOD_DIST in row
    failed = next(line for line in out.splitlines() if "failed" in line and BROKEN_EP in line)
    assert BROKEN_DIST in failed and "RuntimeError" in failed and "boom" in failed
    assert "navit" in out  # built-ins unaffected


def test_good_plugin_works_next_to_the_broken_one(venv_python):
    report = _report(venv_python)
    assert GOOD_NAME in report["connectors"]
    assert report["sources"][GOOD_EP] == GOOD_DIST
    assert report["tokens_per_image"] == 4 and report["logits"] == [1, 6, 16]
    assert [f[:2] for f in report["failures"]] == [[BROKEN_EP, BROKEN_DIST]]
    assert report["failures"][0][2].startswith("RuntimeError: boom")


def test_block_and_disable_switches(venv_python):
    blocked = _report(venv_python, VLMKIT_BLOCK_PLUGINS=BROKEN_EP)
    assert GOOD_NAME in blocked["connectors"] and blocked["failures"] == []
    by_dist = _report(venv_python, VLMKIT_BLOCK_PLUGINS=f"{GOOD_DIST}, {BROKEN_DIST}")
    assert GOOD_NAME not in by_dist["connectors"] and by_dist["failures"] == []
    off = _report(venv_python, VLMKIT_DISABLE_ENTRYPOINTS="1")
    assert GOOD_NAME not in off["connectors"] and off["failures"] == []
    assert set(off["sources"].values()) == {"vlmkit"}, "only built-ins load with entry points disabled"
