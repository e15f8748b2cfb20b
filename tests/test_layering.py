"""Layers point one way: kernels <- ops <- {moe, integrations} <- public API. Parsed from the sources (ast)."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "fp8_deep"

# layer -> fp8_deep sub-packages/modules it must not import
FORBIDDEN = {
    "kernels": {"ops", "moe", "integrations", "api", "testing", "reference"},
    "ops": {"moe", "integrations", "api", "testing"},
    "moe": {"integrations", "api", "testing"},
    "integrations": {"moe", "api", "testing"},
    "reference": {"ops", "moe", "integrations", "api", "testing", "kernels"},
    "export": {"moe", "integrations", "api", "testing", "kernels", "reference"},  # fp8_deep/export.py: ops only
}
OPTIONAL = {"vllm", "deep_gemm"}


def _imports(path):
    """(fp8_deep-relative first component, top-level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    rel_pkg = path.relative_to(PKG).parts[:-1]
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(rel_pkg[: len(rel_pkg) - (node.level - 1)]) if node.level > 1 else list(rel_pkg)
                mod = ".".join(["fp8_deep", *base, *(node.module.split(".") if node.module else [])])
                if not node.module:
                    for a in node.names:
                        yield f"{mod}.{a.name}", id(node) in top_level
                    continue
            else:
                mod = node.module
            yield mod, id(node) in top_level


def _layer(path):
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


FILES = sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_imports_point_one_way(path):
    layer = _layer(path)
    for mod, top in _imports(path):
        parts = mod.split(".")
        if parts[0] == "fp8_deep" and len(parts) > 1:
            target = parts[1]
            assert target not in FORBIDDEN.get(layer, set()), f"{path.name} ({layer}) imports fp8_deep.{target}"
            if layer not in ("testing", "__main__"):
                assert target != "testing", f"library code {path.name} imports fp8_deep.testing"
        if parts[0] in OPTIONAL:
            assert layer == "integrations", f"{path.name} imports optional dependency {parts[0]} outside integrations/"
            assert not top, f"{path.name} imports {parts[0]} at module level; import it lazily"
