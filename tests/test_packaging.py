"""setup.cfg declares every third-party module the package imports (and `pip install .` brings it)."""
import ast
import configparser
import re
import sys
from pathlib import Path

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
