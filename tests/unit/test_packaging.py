"""`pip install .` puts one import name into site-packages: mole_serve (no `server`, `clients`, `bench`)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_one_top_level_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mole_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"mole_serve"}, top
    assert "mole_serve/client.py" in names and "mole_serve/__main__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mole-serve = mole_serve.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
