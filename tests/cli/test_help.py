"""`funnelrec ... --help` of every command shows its help texts whole.

Typer renders help texts and docstrings as Rich markup, where `[name]` is a style tag and
vanishes; a help text that means the brackets literally escapes them (`\\[model]`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import typer
from typer.testing import CliRunner

from funnelrec.cli import app

runner = CliRunner()


def commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, (*path, name))


def help_texts(command: Any) -> list[str]:
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    # what the text means once its escapes are undone: the brackets shown literally
    return [t.split("\f")[0].replace("\\[", "[") for t in texts]


def test_every_bracketed_name_in_a_help_text_is_rendered() -> None:
    every = list(commands(typer.main.get_command(app)))
    assert len(every) > 20  # the walk reached the sub-apps' commands
    lost = []
    for path, command in every:
        result = runner.invoke(app, [*path, "--help"], terminal_width=250)
        assert result.exit_code == 0, result.output
        shown = " ".join(result.output.split())
        for text in help_texts(command):
            for bracketed in re.findall(r"\[[^\[\]]*\]", text):
                if bracketed not in shown:
                    lost.append(f"funnelrec {' '.join(path)} --help: {bracketed} of {text!r}")
    assert not lost, "\n".join(lost)


def test_the_config_option_names_its_sections() -> None:
    result = runner.invoke(app, ["train", "candidates", "--help"], terminal_width=250)
    assert "TOML config ([model] and [train] sections)" in " ".join(result.output.split())
