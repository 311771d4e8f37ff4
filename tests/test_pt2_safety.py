"""A crafted .pt2 program is refused before torch.export.load sees it, and nothing of it runs (serving/pt2.py): each
case plants, in an export of a real checkpoint, one of the ways a program archive can carry code."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from onerank.cli import main
from onerank.serving import Ranker, pt2
from onerank.serving.export import export_checkpoint


class _CreatesAFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    checkpoint = tiny_checkpoint("mmoe")
    out = tmp_path_factory.mktemp("pt2") / "mmoe.pt2"
    export_checkpoint(checkpoint, "pt2", out)
    return checkpoint, out


def _rewrite(source: Path, target: Path, change: Callable[[str, bytes], bytes | None], add: dict | None = None) -> Path:
    """A copy of the archive with each entry passed through ``change`` (None drops it) and ``add``'s entries added."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        top = old.namelist()[0].split("/")[0]
        for name in old.namelist():
            data = change(name[len(top) + 1:], old.read(name))
            if data is not None:
                new.writestr(name, data)
        for inner, data in (add or {}).items():
            new.writestr(f"{top}/{inner}", data)
    return target


def _json_change(entry: str, edit: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def change(name: str, data: bytes) -> bytes:
        if name != entry:
            return data
        content = json.loads(data)
        edit(content)
        return json.dumps(content).encode()

    return change


def _first(node, key: str):
    """The first dict in a JSON tree that has ``key``."""
    if isinstance(node, dict):
        if key in node:
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _first(child, key)
        if found is not None:
            return found
    return None


def _pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_CreatesAFile(marker), buffer)
    return buffer.getvalue()


def _crafted(kind: str, source: Path, folder: Path, marker: Path) -> Path:
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    target = folder / f"{kind}.pt2"
    if kind == "guard":
        return _rewrite(source, target, _json_change("models/model.json",
                                                     lambda p: p["guards_code"].append(payload)))
    if kind == "shape_expression":
        return _rewrite(source, target, _json_change(
            "models/model.json", lambda p: _first(p, "expr_str").update(expr_str=payload)))
    if kind == "operator":
        return _rewrite(source, target, _json_change(
            "models/model.json", lambda p: _first(p["graph_module"], "target").update(target="torch.os.system")))
    if kind == "range_constraint":
        return _rewrite(source, target, _json_change(
            "models/model.json", lambda p: p["range_constraints"].update({payload: {"min_val": 1, "max_val": None}})))
    if kind == "pickled_weight":
        def change(name: str, data: bytes) -> bytes:
            if name == "data/weights/model_weights_config.json":
                config = json.loads(data)
                next(iter(config["config"].values())).update(use_pickle=True, path_name="weight_0")
                return json.dumps(config).encode()
            return _pickled(marker) if name == "data/weights/weight_0" else data

        return _rewrite(source, target, change)
    if kind == "sample_inputs":
        return _rewrite(source, target,
                        lambda name, data: _pickled(marker) if name == "data/sample_inputs/model.pt" else data)
    if kind == "compiled_code":
        return _rewrite(source, target, lambda name, data: data, {"data/aotinductor/model/model.so": b"\x7fELF"})
    if kind == "custom_object":
        return _rewrite(source, target, lambda name, data: data, {"data/constants/custom_obj_0": _pickled(marker)})
    raise AssertionError(kind)


KINDS = ["guard", "shape_expression", "operator", "range_constraint", "pickled_weight", "sample_inputs",
         "compiled_code", "custom_object"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_program_is_refused_and_runs_nothing(kind, exported, tmp_path):
    checkpoint, source = exported
    marker = tmp_path / "pwned"
    crafted = _crafted(kind, source, tmp_path, marker)
    with pytest.raises(pt2.UnsafeProgram):
        pt2.load_program(crafted)
    with pytest.raises(pt2.UnsafeProgram):
        Ranker(checkpoint, backend="pt2", export_path=crafted)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["guard", "pickled_weight"])
def test_serve_refuses_a_crafted_program_in_one_line(kind, exported, tmp_path, capsys):
    checkpoint, source = exported
    marker = tmp_path / "pwned"
    crafted = _crafted(kind, source, tmp_path, marker)
    code = main(["serve", "--checkpoint", str(checkpoint), "--backend", "pt2", "--export-file", str(crafted),
                 "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(crafted) in err, err
    assert not marker.exists()


def test_the_untouched_export_passes_the_check(exported):
    _, source = exported
    pt2.check_program_archive(source)
    assert pt2.read_metadata(source)["onerank.model"] == "mmoe"
