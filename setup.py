"""Build hook (everything else is in pyproject.toml): the wheel carries the repository's ``configs/`` and
``benchmarks/suites/`` as ``onerank/configs`` and ``onerank/suites``, so that an installed onerank finds its shipped
configs and benchmark suites (``onerank.resources``) without a checkout."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE_DATA = {"configs": ROOT / "configs", "suites": ROOT / "benchmarks" / "suites"}


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout
        for name, source in PACKAGE_DATA.items():
            target = Path(self.build_lib) / "onerank" / name
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithData})
