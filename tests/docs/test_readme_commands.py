"""README.md's command table is what an operator types: each command it lists exists,
each option it writes is one the command takes, with the default it shows, and each
option one of our commands takes is written there. An operator creating an account read
``create-user NAME --role ROLE [--station CODE] [--password-stdin]`` and never learnt of
``--full-name``: the account had no name on the board and the pages."""

import re
from pathlib import Path

import click
import pytest
from flask import Flask

from courier_api.cli import serve

README = Path(__file__).resolve().parents[2] / "README.md"
OPTION = re.compile(r"(?<![\w-])(--?[a-z][a-z-]*)(?: ([^\s\[\]]+))?")


def documented_commands() -> list[str]:
    """Each command as the table's first column writes it (``db upgrade``, ``rejudge
    [--station CODE] [--batch 500]``): a row may list several, each in backticks."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Command line") : text.index("## Layout")]
    commands = []
    for first_cell in re.findall(r"^\| (`[^|]*`) \|", table, re.M):
        commands.extend(re.findall(r"`([^`]+)`", first_cell))
    return commands


def words_of(usage: str) -> list[str]:
    """The command's names: the words before its first argument or option."""
    words = []
    for word in usage.split():
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        words.append(word)
    return words


def resolve(app: Flask, words: list[str]) -> click.Command:
    group: click.Command = click.Group(commands={**app.cli.commands, "serve": serve})
    with click.Context(group) as context:
        for word in words:
            assert isinstance(group, click.Group), words
            found = group.get_command(context, word)
            assert found is not None, f"no command {' '.join(words)}"
            group = found
    return group


def test_the_readme_lists_the_commands() -> None:
    """The pattern still finds what it is for (else the test below checks nothing)."""
    assert {"rejudge", "audit verify", "create-user", "serve"} <= {
        " ".join(words_of(usage)) for usage in documented_commands()
    }


@pytest.mark.parametrize("usage", documented_commands())
def test_each_command_is_written_as_it_is_taken(app: Flask, usage: str) -> None:
    command = resolve(app, words_of(usage))
    options = {
        name: param
        for param in command.params
        if isinstance(param, click.Option)
        for name in param.opts
    }
    written = dict(OPTION.findall(usage))
    assert sorted(set(written) - set(options)) == [], "options the command does not take"
    unwritten = {
        param.opts[0]
        for param in options.values()
        if param.opts[0] != "--help" and not set(param.opts) & set(written)
    }
    if command.callback and command.callback.__module__.startswith("courier_api"):
        assert sorted(unwritten) == [], "options the README does not write"
    for name, value in written.items():
        default = options[name].default
        if isinstance(default, bool) or not isinstance(default, int | str) or default == "":
            continue  # a flag, or no default to show
        if value and not (value.isupper() and not str(default).isupper()):  # not a metavar
            assert value == str(default), f"{name}'s default is {default}"
