"""`benchmarks/kernels/table_source.py`: a sweep's winners replace exactly one measured table of an
`ops/` module, leaving the rest of the file as it was."""

from __future__ import annotations

import types

import pytest

from tokenmill.benchmarks.kernels import table_source

SOURCE = '''"""A configs module."""

_GPU_A: dict[tuple[int, int], int] = {
    (1, 2): 3,  # measured
}
_GPU_B: dict[tuple[int, int], int] = {
}
TUNED = {"GPU A": _GPU_A, "GPU B": _GPU_B}
'''


def test_replace_table_rewrites_only_the_named_table(tmp_path):
    path = tmp_path / "configs.py"
    path.write_text(SOURCE)
    new = "_GPU_B: dict[tuple[int, int], int] = {\n    (4, 5): 6,  # swept\n}"
    table_source.replace_table(path, "_GPU_B", new)
    text = path.read_text()
    assert text == SOURCE.replace("_GPU_B: dict[tuple[int, int], int] = {\n}", new)
    namespace = {}
    exec(compile(text, str(path), "exec"), namespace)
    assert namespace["TUNED"] == {"GPU A": {(1, 2): 3}, "GPU B": {(4, 5): 6}}


def test_replace_table_refuses_a_missing_table(tmp_path):
    path = tmp_path / "configs.py"
    path.write_text(SOURCE)
    with pytest.raises(AssertionError, match="_GPU_C is not a table"):
        table_source.replace_table(path, "_GPU_C", "_GPU_C = {\n}")
    assert path.read_text() == SOURCE


def test_table_variable_names_the_gpus_table():
    module = types.ModuleType("configs")
    exec(compile(SOURCE, "configs.py", "exec"), module.__dict__)
    assert table_source.table_variable(module, module.TUNED, "GPU B") == "_GPU_B"
    with pytest.raises(SystemExit, match="no table for 'GPU C'"):
        table_source.table_variable(module, module.TUNED, "GPU C")


def test_the_moe_gemv_tables_can_be_rewritten():
    """Each GPU's table of the token-by-token MoE path is one the sweep can find and replace."""
    from tokenmill.ops import fused_moe_configs

    for device_name in fused_moe_configs.TUNED_GEMV:
        variable = table_source.table_variable(fused_moe_configs, fused_moe_configs.TUNED_GEMV, device_name)
        source = open(fused_moe_configs.__file__).read()
        assert f"\n{variable}: dict[" in source
