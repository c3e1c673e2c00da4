"""The house rules ARCHITECTURE.md states, checked on the source: layers and inference reach the compute only through
the kernels' faces, files and functions stay readable, fused ops are chosen by the registry like the others."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import sepconv
from sepconv import kernels

PACKAGE = Path(sepconv.__file__).parent
BACKEND_MODULES = ("sepconv.kernels.cpu", "sepconv.kernels.reference", "sepconv.kernels.registry",
                   "sepconv.kernels.ops")


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return names


def test_layers_and_inference_import_no_backend():
    for folder in ("layers", "inference"):
        for path in (PACKAGE / folder).glob("*.py"):
            bad = {name for name in _imports(path) if name.startswith(BACKEND_MODULES)}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_no_source_file_over_600_lines_and_no_python_function_over_80():
    for path in PACKAGE.rglob("*"):
        if path.suffix in (".py", ".cpp", ".h"):
            assert len(path.read_text().splitlines()) <= 600, path
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    assert node.end_lineno - node.lineno < 80, f"{path}:{node.lineno} {node.name}"


def test_fused_modules_are_chosen_by_the_registry():
    model = sepconv.models.create_model("mobilenet_v2", num_classes=10, input_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    optimised = sepconv.optimize_for_inference(model, x, layout="channels_last")
    kernels.clear_choices()
    try:
        with torch.inference_mode():
            optimised(x)
        ops = {key[0] for key in kernels.choices()}
        assert {"pointwise_conv_act", "separable_conv_act"} <= ops, ops
    finally:
        kernels.clear_choices()
