"""setup.cfg declares every third-party module the package imports (and `pip install .` brings it),
and the built wheel carries what an installed package reads: the bundled configs."""
import ast
import configparser
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = {"PIL": "pillow", "cv2": "opencv-python-headless", "yaml": "pyyaml"}  # import -> pip name


def _imported_modules() -> set[str]:
    modules = set()
    for path in (ROOT / "move_scale").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"move_scale"}


def test_every_third_party_import_is_declared():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    declared = {re.split(r"[<>=!~\[; ]", line.strip())[0].lower()
                for line in config["options"]["install_requires"].strip().splitlines()}
    imported = _imported_modules()
    assert {"torch", "braceexpand", "fsspec", "webdataset"} <= imported  # the scan sees imports at all
    missing = {DISTRIBUTION.get(module, module).lower() for module in imported} - declared
    assert not missing, f"imported by move_scale but not in setup.cfg install_requires: {sorted(missing)}"


@pytest.mark.slow
def test_the_wheel_ships_the_bundled_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300, cwd=tmp_path)
    wheel, = tmp_path.glob("move_scale-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "move_scale" / "configs").rglob("*")
               if p.is_file()}
    assert "move_scale/configs/demo.yaml" in shipped
    assert shipped <= names, sorted(shipped - names)
