"""The architecture's import boundaries, checked by parsing every module's imports."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}"
    return files


@pytest.mark.parametrize("package", ["vdm/model", "vdm/diffusion"])
def test_model_and_diffusion_import_only_torch_einops_stdlib(package):
    import sys

    allowed_roots = {"torch", "einops", "vdm", "tqdm", "__future__"} | set(sys.stdlib_module_names)
    for path in modules(package):
        for name in imports_of(path):
            root = name.split(".")[0]
            assert root in allowed_roots, f"{path.relative_to(ROOT)} imports {name}"
            if root == "vdm":
                assert name.startswith(("vdm.model", "vdm.diffusion")), f"{path.relative_to(ROOT)} imports {name}"
            assert name != "torch.distributed", f"{path.relative_to(ROOT)} imports torch.distributed"
        assert ".cuda(" not in path.read_text(), f"{path.relative_to(ROOT)} calls .cuda()"


def test_only_training_imports_deepspeed():
    for path in ROOT.joinpath("vdm").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        for name in imports_of(path):
            if name.split(".")[0] == "deepspeed":
                ok = rel.startswith("vdm/training/") or (rel == "vdm/sampling/consolidate.py"
                                                          and name == "deepspeed.utils.zero_to_fp32")
                assert ok, f"{rel} imports {name}"


def test_training_never_uses_the_text_encoder():
    for path in modules("vdm/training"):
        assert "vdm.text" not in imports_of(path), f"{path} imports vdm.text"


def test_only_vdm_data_knows_the_shard_layout():
    # The member names of the format live in vdm/data/format.py; writers and readers import them.
    for package in ("vdm/training", "vdm/sampling", "vdm/model", "vdm/diffusion", "data_tools"):
        for path in modules(package):
            text = path.read_text()
            assert '"frames.npy"' not in text and '"emb.npy"' not in text, f"{path} spells out the shard layout"
