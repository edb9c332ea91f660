"""``[model] backend`` picks the model: the embedded toy, an entry point, or ``module:factory``.

The out-of-tree backend is ``tests/backends/tiny_backend``, a package of its
own. It is installed for real (pip, into a temporary directory put on
``PYTHONPATH``, so the entry point is discovered through its metadata) and,
separately, named as ``tiny_backend:backend`` with its source on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppstage.config import ConfigError, PPStageConfig
from ppstage.model.loader import load_backend
from ppstage.model.reference import ReferencePipeline, StreamScript, run_reference

TINY_SRC = Path(__file__).resolve().parent / "backends" / "tiny_backend"
SCRIPT = StreamScript(prompt="a red fox", prompt_at={2: "a grey wolf"}, cut_at=(4,))

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def tiny_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TINY_SRC))
    return PPStageConfig().with_overrides({"model.backend": "tiny_backend:backend"})


@pytest.mark.parametrize(
    "name, words",
    [("no-such-model", "unknown backend"), ("no_such_module:factory", "cannot import"),
     ("os:no_such_factory", "no callable"), ("os:getcwd", "not a ppstage.model.loader.ModelBackend")],
)
def test_a_backend_that_cannot_be_loaded_is_a_config_error_naming_model_backend(name, words):
    with pytest.raises(ConfigError, match="model.backend") as info:
        load_backend(PPStageConfig().with_overrides({"model.backend": name}))
    assert words in str(info.value)


def test_a_malformed_backend_name_is_refused_at_load():
    with pytest.raises(ConfigError, match="model.backend"):
        PPStageConfig.from_dict({"model": {"backend": "a:b:c"}})


def test_the_configured_backend_is_the_model_that_runs(tiny_on_path):
    tiny = run_reference(tiny_on_path, 6, SCRIPT)
    toy = run_reference(PPStageConfig(), 6, SCRIPT)
    assert all(a.output_digest != b.output_digest for a, b in zip(tiny, toy))
    # The tiny model split over stages gives the same bytes, as the pipeline needs.
    split = ReferencePipeline(tiny_on_path, layer_ranges=[(0, 3), (3, 5), (5, 8)])
    whole = ReferencePipeline(tiny_on_path)
    from ppstage.core.planner import Planner, StreamStart

    planner = Planner(tiny_on_path)
    planner.submit(StreamStart("a red fox"))
    for _ in range(4):
        plan = planner.next_chunk()
        assert split.run_chunk(plan).output_digest == whole.run_chunk(plan).output_digest


def run_demo(tmp_path, backend: str, pythonpath: Path) -> subprocess.CompletedProcess:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f'[model]\nbackend = "{backend}"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "ppstage.cli", "demo", "--config", str(cfg), "--chunks", "3",
           "--quiet", "--timeout", "120", "--out", str(tmp_path / "run")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def test_demo_runs_a_backend_named_module_colon_factory(tmp_path):
    proc = run_demo(tmp_path, "tiny_backend:backend", TINY_SRC)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend tiny_backend:backend" in proc.stdout
    assert "3/3 match (ALL MATCH, bitwise)" in proc.stdout


def test_demo_runs_an_installed_backend_found_by_its_entry_point(tmp_path):
    site, src = tmp_path / "site", tmp_path / "src"
    shutil.copytree(TINY_SRC, src, ignore=shutil.ignore_patterns("__pycache__"))  # builds leave files behind
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--target", str(site), str(src)]
    subprocess.run(pip, check=True, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert list(site.glob("ppstage_tiny_backend-*.dist-info"))  # installed with its metadata
    proc = run_demo(tmp_path, "tiny", site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend tiny," in proc.stdout
    assert "3/3 match (ALL MATCH, bitwise)" in proc.stdout
