"""The environment is read at the entry points only (pillsnap.environment) and never by the library."""
import ast
from pathlib import Path

import pytest

import pillsnap
from pillsnap.environment import overrides_from_environment, prepare_process

ALLOWED = {"environment.py"}  # the one module that reads the process environment


def test_the_oom_drill_variable_becomes_a_config_override():
    assert overrides_from_environment({"PILLSNAP_INJECT_OOM": "3, 7"}) == ["train.oom.inject_at_steps=[3,7]"]
    assert overrides_from_environment({}) == []
    with pytest.raises(ValueError, match="PILLSNAP_INJECT_OOM"):
        overrides_from_environment({"PILLSNAP_INJECT_OOM": "3,x"})
    assert overrides_from_environment({"PILLSNAP_NPROC_PER_NODE": "auto"}) == ["train.distributed.nproc_per_node=auto"]


def test_process_defaults_never_override_what_the_user_set(tmp_path):
    env = {}
    prepare_process(tmp_path, env)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["YOLO_CONFIG_DIR"] == str(tmp_path.resolve() / "ultralytics_settings")
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128", "YOLO_CONFIG_DIR": "/elsewhere"}
    prepare_process(tmp_path, env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128", "YOLO_CONFIG_DIR": "/elsewhere"}


def _environment_reads(tree: ast.AST):
    """os.environ[...] / .get / `in os.environ` / os.getenv: every read of the process environment."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = ast.unparse(node.func)
            if target in ("os.getenv", "os.environ.get", "environ.get"):
                yield node.lineno
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" and \
                isinstance(node.ctx, ast.Load):
            yield node.lineno
        if isinstance(node, ast.Compare) and any(ast.unparse(c) == "os.environ" for c in node.comparators):
            yield node.lineno


def test_the_library_reads_no_environment_variable_for_settings():
    root = Path(pillsnap.__file__).parent
    found = [f"{path.relative_to(root)}:{line}" for path in sorted(root.rglob("*.py")) if path.name not in ALLOWED
             for line in _environment_reads(ast.parse(path.read_text()))]
    assert found == []
