"""The layers import only downwards: the engine (`platform/latentqa`) neither Ray nor MLflow nor
the platform layer; the platform layer (`platform/latentqa_platform`) neither `jobs/` nor `serve/`.
Every import counts, the ones inside functions too. And no two classes of the project share a name."""

import ast
from collections import defaultdict

import pytest

from latentqa.paths import PROJECT_ROOT

LAYERS = {
    "platform/latentqa": {"ray", "mlflow", "latentqa_platform", "jobs", "serve"},
    "platform/latentqa_platform": {"jobs", "serve"},
}


def imported_packages(path) -> dict[str, int]:
    """Top-level package -> first line importing it (absolute imports only: the layers have no relative ones)."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_nothing_above_it(layer):
    files = sorted((PROJECT_ROOT / layer).glob("*.py"))
    assert files
    breaches = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} imports {package}"
        for path in files
        for package, line in imported_packages(path).items()
        if package in LAYERS[layer]
    ]
    assert not breaches, "\n".join(breaches)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef f():\n    from serve.app import build_app\n    import ray.train\n")
    assert imported_packages(source) == {"os": 1, "serve": 4, "ray": 5}


def test_no_two_classes_share_a_name():
    """A name says which thing it is (the Serve replica was once a second `LatentQAModel`)."""
    where = defaultdict(list)
    for folder in ("platform/latentqa", "platform/latentqa_platform", "serve", "jobs"):
        for path in sorted((PROJECT_ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    where[node.name].append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert len(where) > 50
    assert not {name: places for name, places in where.items() if len(places) > 1}
