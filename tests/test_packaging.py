"""The package installs anywhere: every import declared, one version, a wheel that carries its data and runs alone."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
import shutil
import zipfile
from pathlib import Path

import pytest

import onerank
from onerank.cli import main

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "sklearn": "scikit-learn", "prometheus_client": "prometheus-client",
                "mlflow": "mlflow-skinny", "torch_geometric": "torch-geometric", "fbgemm_gpu": "fbgemm-gpu"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def _third_party_imports(folder: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "onerank":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_import_of_the_package_is_declared():
    project = PYPROJECT["project"]
    core = _requirement_names(project["dependencies"])
    extras = set().union(*(_requirement_names(v) for v in project["optional-dependencies"].values()))
    undeclared = {name: where for name, where in _third_party_imports(ROOT / "src" / "onerank").items()
                  if DISTRIBUTION.get(name, name).lower() not in core | extras}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    # the core (no extra) must be enough for the modules every user imports: config validation and the ranker
    assert "pydantic" in core


def test_torch_is_a_tested_range_and_the_version_has_one_source(capsys):
    torch_req = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    assert "==" not in torch_req and "<" in torch_req and ">=" in torch_req, torch_req
    import torch

    # the range admits the torch the suite runs on, whatever its build (+cpu, +cu126, ...)
    low, high = re.findall(r"(\d+\.\d+)", torch_req)[:2]
    running = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert tuple(map(int, low.split("."))) <= running < tuple(map(int, high.split(".")))
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "onerank.__version__"}
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"onerank {onerank.__version__}"
    assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    assert (ROOT / "src" / "onerank" / "py.typed").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout gets no build/ or egg-info folders); no download:
    the build uses this environment's setuptools."""
    work = tmp_path_factory.mktemp("build")
    tree = work / "tree"
    for name in ("src", "configs", "benchmarks/suites", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md",
                 "LICENSE"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(work / "dist"), str(tree)], check=True, capture_output=True, timeout=600)
    (built,) = (work / "dist").glob("onerank-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_carries_configs_suites_license_and_types(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("onerank/configs/demo.yaml", "onerank/suites/census.yaml", "onerank/py.typed"):
        assert shipped in names
    assert {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")} == {
        n.removeprefix("onerank/configs/") for n in names if n.startswith("onerank/configs/")}
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Version: {onerank.__version__}" in metadata and "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: pydantic" in metadata and "Requires-Dist: torch<" in metadata


@pytest.mark.slow
def test_the_wheel_installs_into_a_clean_venv_and_runs(wheel, tmp_path):
    """A fresh virtual environment, the wheel installed without its dependencies (those come from this environment's
    site-packages through a path file, so nothing is downloaded), then the installed command run from elsewhere."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # a plain path entry: the .pth files of this environment (its editable onerank) are not processed from there
    Path(purelib, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    models = subprocess.run([str(venv / "bin" / "onerank"), "models"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert models.returncode == 0, models.stderr
    assert {"mmoe", "ple", "onerank"} <= set(models.stdout.split())
    where = subprocess.run(
        [str(python), "-c", "import onerank, onerank.resources as r; print(onerank.__file__); "
         "print(r.shipped('configs') / 'demo.yaml'); print(r.shipped('suites') / 'census.yaml')"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(purelib) and Path(p).exists() for p in where), where


EXTRA_MODULES = {  # import names each extra brings
    "serve": ["fastapi", "uvicorn", "onnx", "onnxruntime", "onnxscript", "prometheus_client"],
    "fusion": ["sklearn", "cmaes", "matplotlib"],
    "bench": ["matplotlib", "scipy"],
    "tracking": ["tensorboard", "mlflow"],
    "rl": ["d3rlpy", "gymnasium", "structlog", "sklearn"],
    "graph": ["torch_geometric"],
    "torchrec": ["torchrec", "fbgemm_gpu"],
}


def test_dev_composes_the_extras_instead_of_repeating_them():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["all"] == ["onerank[serve,fusion,bench,tracking,rl,graph]"]
    assert "onerank[all,torchrec-cpu]" in extras["dev"]
    repeated = _requirement_names(extras["dev"]) & set().union(
        *(_requirement_names(extras[name]) for name in ("serve", "fusion", "bench", "tracking", "rl", "graph",
                                                         "torchrec-cpu")))
    assert not repeated, f"dev repeats what its extras bring: {repeated}"
    core = _requirement_names(PYPROJECT["project"]["dependencies"])
    heavy = {"scipy", "matplotlib", "scikit-learn", "cmaes", "tensorboard", "mlflow-skinny", "httpx"}
    assert not core & heavy, f"the default install pulls in {core & heavy}"


def _without_extras(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where no extra is importable (as after a plain ``pip install onerank``)."""
    blocked = sorted({m for modules in EXTRA_MODULES.values() for m in modules} | {"httpx"})
    prelude = (
        "import sys, importlib.abc, importlib.util\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED: raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] in BLOCKED else _find(n, *a)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_the_default_install_trains_exports_and_ranks_and_names_each_missing_extra(tmp_path):
    cache = str(tmp_path / "cache")
    small = ["--dataset", "synthetic", "--dataset-option", "num_users=60", "--dataset-option", "num_items=40",
             "--epochs", "1", "--batch-size", "256", "--no-progress", "--cache-dir", cache]
    run = tmp_path / "run"
    code = (
        "from onerank.cli import main\n"
        f"assert main(['train', *{small!r}, '--model', 'mmoe', '--out', {str(run)!r}]) == 0\n"
        f"assert main(['evaluate', '--checkpoint', {str(run / 'checkpoint.pt')!r}, '--cache-dir', {cache!r}]) == 0\n"
        f"assert main(['export', '--checkpoint', {str(run / 'checkpoint.pt')!r}, '--format', 'pt2']) == 0\n"
        "import onerank\n"
        f"ranker = onerank.Ranker({str(run / 'checkpoint.pt')!r}, backend='pt2')\n"
        "assert len(ranker.rank(ranker.example_request(3)).order) == 3\n"
        "print('trained, evaluated, exported and ranked')\n"
    )
    proc = _without_extras(code, tmp_path)
    assert proc.returncode == 0 and "ranked" in proc.stdout, proc.stderr[-3000:]
    checkpoint = str(run / "checkpoint.pt")
    for extra, argv in [
        ("serve", ["serve", "--checkpoint", checkpoint]),
        ("serve", ["export", "--checkpoint", checkpoint, "--format", "onnx"]),
        ("fusion", ["fuse", "--checkpoint", checkpoint, "--value", "order", "--cache-dir", cache]),
        ("bench", ["benchmark", "--suite", "census", "--report-only"]),
        ("tracking", ["train", *small, "--model", "mmoe", "--mlflow", "--out", str(tmp_path / "tracked")]),
        ("tracking", ["train", *small, "--model", "mmoe", "--tensorboard", "--out", str(tmp_path / "tracked")]),
        ("rl", ["simulate", "--checkpoint", checkpoint, "--out", str(tmp_path / "sessions.npz")]),
        ("rl", ["fuse", "--method", "batch-rl", "--checkpoint", checkpoint, "--sessions", str(tmp_path / "s.npz")]),
    ]:
        proc = _without_extras(f"import sys\nfrom onerank.cli import main\nsys.exit(main({argv!r}))", tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (argv, proc.stderr[-2000:])
        assert f"onerank[{extra}]" in lines[0] and f"pip install 'onerank[{extra}]'" in lines[0], lines[0]
