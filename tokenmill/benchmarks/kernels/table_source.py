"""Writing a sweep's winners into the measured-configuration table of an `ops/` module, so the
engine runs them (in the same device call, for a benchmark after the sweep)."""

from __future__ import annotations

import pathlib
import re


def replace_table(path: pathlib.Path, variable: str, table: str) -> None:
    """Replace the module-level `variable[: annotation] = {...}` (closed by a `}` at the start of a
    line) in `path` with `table`, the new assignment's source."""
    source = path.read_text()
    pattern = re.compile(rf"^{re.escape(variable)}(: [^=]*)? = \{{\n.*?^\}}", re.MULTILINE | re.DOTALL)
    assert pattern.search(source), f"{variable} is not a table in {path}"
    path.write_text(pattern.sub(lambda _: table, source, count=1))


def table_variable(module, tables: dict, device_name: str) -> str:
    """The name of `module`'s private table that `tables` maps `device_name` to."""
    if device_name not in tables:
        raise SystemExit(f"{module.__name__} has no table for {device_name!r}: add an empty one first")
    return next(name for name, value in vars(module).items() if value is tables[device_name] and name.startswith("_"))


def write_table(module, tables: dict, device_name: str, annotation: str, entries: dict) -> str:
    """Replace this GPU's table among `module`'s `tables` (device name -> table) with `entries`
    ({key: (config, note)}: a NamedTuple configuration and a trailing comment, "" for none), its
    entries typed `annotation`; returns the new table's source."""
    variable = table_variable(module, tables, device_name)
    lines = [f"{variable}: {annotation} = {{"]
    lines += [f"    {key}: {type(config).__name__}{tuple(config)},{'  # ' + note if note else ''}"
              for key, (config, note) in entries.items()]
    table = "\n".join(lines + ["}"])
    replace_table(pathlib.Path(module.__file__), variable, table)
    return table
