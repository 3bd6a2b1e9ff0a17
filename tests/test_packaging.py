"""A non-editable install carries the named configs, so `partial-fc train synthetic` works outside a checkout, and
the C row copies' source, so they build there too."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from partial_fc.heads.row_copy import native_rows_available
from partial_fc.heads.softmax_kernels import native_softmax_built
from tests.launchers import REPO

PROBE = """
import json
import partial_fc
from partial_fc.engine.config import CONFIGS_DIR, load_config
from partial_fc.heads.row_copy import native_rows_available
from partial_fc.heads.softmax_kernels import native_softmax_built
print(json.dumps({
    "native_rows": native_rows_available(),
    "native_softmax": native_softmax_built(),
    "package": partial_fc.__file__,
    "configs_dir": str(CONFIGS_DIR),
    "names": sorted(path.stem for path in CONFIGS_DIR.glob("*.py")),
    "synthetic": load_config("synthetic", environ={}).network,
    "by_path": load_config("configs/synthetic.py", environ={}).network,
}))
"""


def test_an_installed_package_loads_its_named_configs(tmp_path):
    source = tmp_path / "source"  # a copy, so that building leaves nothing in the checkout
    shutil.copytree(REPO / "partial_fc", source / "partial_fc", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(site),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(source)  # the installed copy must stand on its own
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert Path(found["package"]).resolve() == (site / "partial_fc" / "__init__.py").resolve()
    assert Path(found["configs_dir"]) == (site / "partial_fc" / "configs").resolve()
    assert {"ms1mv3_r50", "glint360k_r100", "wf42m_pfc02_r50", "synthetic"} <= set(found["names"])
    assert found["synthetic"] == found["by_path"] == "r10_nano"
    assert found["native_rows"] == native_rows_available()  # row_copy.c ships with the package and builds
    assert found["native_softmax"] == native_softmax_built()  # and softmax_kernels.c
