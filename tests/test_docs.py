"""Docs and schema stay together: every config key is in the reference file, every command has help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gated import cli
from gated import config as configmod

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "config" / "gated.example.toml"


def documented() -> set[tuple[str, str]]:
    """(section, key) pairs in the reference file, commented out or not; named tables become NAME."""
    pairs, section = set(), ""
    for line in EXAMPLE.read_text().splitlines():
        text = line.lstrip("# ").rstrip()
        if m := re.fullmatch(r"\[([a-z_.]+)\]", text):
            parts = m.group(1).split(".")
            if parts[0] in ("reader", "led", "input") and len(parts) == 2 and parts[0] != "input":
                parts[1] = "NAME"
            section = ".".join(parts)
        elif m := re.match(r"([a-z_]+) = ", text):
            pairs.add((section, m.group(1)))
    return pairs


def schema_keys() -> set[tuple[str, str]]:
    keys = {(name, k) for name, schema in configmod.FIXED.items() for k in schema}
    keys |= {("backend", k) for k in configmod.BACKEND}
    keys |= {("reader.NAME", k) for k in configmod.READER_COMMON}
    keys |= {("led.NAME", k) for k in configmod.LED}
    keys |= {("input.passage", k) for k in configmod.PASSAGE}
    keys |= {("input.emergency", k) for k in configmod.INPUT}
    for btype, module in configmod.AVAILABLE_BACKENDS.items():
        keys |= {(f"backend.{btype}", k) for k in configmod.module_schema(module)}
    for module in configmod.AVAILABLE_READERS.values():
        keys |= {("reader.NAME", k) for k in configmod.module_schema(module)}
    keys |= {(f"wallet.{name}", k) for name, schema in configmod.WALLET.items() for k in schema}
    return keys


def test_every_config_key_is_documented_in_the_reference_file():
    missing = sorted(schema_keys() - documented())
    assert missing == [], f"add these to {EXAMPLE.name}: {missing}"


def test_reference_file_documents_no_key_that_does_not_exist():
    extra = sorted(documented() - schema_keys())
    assert extra == [], f"{EXAMPLE.name} documents keys gated does not know: {extra}"


@pytest.mark.parametrize("command", sorted(cli.build_parser()._subparsers._group_actions[0].choices))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gated {command}") and len(out.splitlines()) > 3


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert ".venv/bin/gated run --config config/demo.toml" in first_block
    assert ".venv/bin/python -m pytest" in first_block
    assert ".venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()


def _readme_table(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def test_readme_backends_table_names_every_backend_and_no_other():
    rows = [line for line in _readme_table("Backends and readers").splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([a-z]+)`", row.split("|")[1])}
    assert named == set(configmod.AVAILABLE_BACKENDS)


def test_readme_names_an_example_config_for_every_backend_with_a_server():
    text = (ROOT / "README.md").read_text()
    for backend in set(configmod.AVAILABLE_BACKENDS) - {"local"}:
        assert (ROOT / "config" / f"{backend}.toml").exists()
        assert f"config/{backend}.toml" in text, backend


def test_readme_names_every_reader_type():
    text = _readme_table("Backends and readers")
    for reader in configmod.READER_TYPES:
        assert re.search(rf"\b{reader}\b", text, re.IGNORECASE), reader


def test_readme_commands_table_lists_every_command_and_no_other():
    rows = [line for line in _readme_table("Commands").splitlines() if line.startswith("| `gated ")]
    listed = {row.split("`gated ", 1)[1].split()[0].rstrip("`") for row in rows}
    assert listed == set(cli.build_parser()._subparsers._group_actions[0].choices)


def test_nothing_in_the_repository_cites_a_design_file_outside_it():
    cited = []
    for path in ROOT.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts) or not path.is_file() \
                or path.suffix not in (".py", ".md", ".toml", ".service", ".sh", "") or "egg-info" in str(path):
            continue
        if path.resolve() == Path(__file__).resolve():
            continue  # this test names what it looks for
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if "DESIGN.md" in text or "../shared" in text:
            cited.append(str(path.relative_to(ROOT)))
    assert cited == [], "cite docs/design.md instead"


def test_the_design_document_names_every_reason_and_no_other():
    from gated.model import Reason

    text = (ROOT / "docs" / "design.md").read_text()
    vocabulary = text.split("Reasons are one vocabulary", 1)[1].split("each decision keeps", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", vocabulary)) - {"Reason"} == {str(r) for r in Reason}
