"""Run import-linter over hetflow's layers (the contracts in pyproject.toml, [tool.importlinter]).

The repository maps each layer's folder onto a subpackage (pyproject's package-dir:
ir/ is hetflow.ir, passes/ is hetflow.passes...). import-linter reads a package
from one directory tree, so this lays the folders out as that tree in a temporary
directory (a copy of the .py files) and runs ``lint-imports`` on it. Exit status:
lint-imports'. Usage: ``python .ci/lint_imports.py [--extra-module DOTTED=SOURCE]``
(the tests add a deliberate back-edge that way, to see the contract fail).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lay_out(target: Path) -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = config["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items(), key=lambda item: item[0].count(".")):
        destination = target.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, destination, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def main(argv: list[str]) -> int:
    extra = [a.split("=", 1) for a in argv[argv.index("--extra-module") + 1:][:1]] if "--extra-module" in argv else []
    with tempfile.TemporaryDirectory(prefix="hetflow-layers-") as tmp:
        lay_out(Path(tmp))
        for dotted, source in extra:
            Path(tmp, *dotted.split(".")).with_suffix(".py").write_text(source)
        env = dict(os.environ, PYTHONPATH=tmp + os.pathsep + os.environ.get("PYTHONPATH", ""))
        lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
        return subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache"], env=env,
                              cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
