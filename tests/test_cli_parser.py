"""cli_parser.py declares the sub-commands, cli.py runs them: the two lists must be the same."""

import argparse

import pytest

from magistune.cli import COMMANDS, main
from magistune.cli_parser import build_parser


def sub_commands(parser: argparse.ArgumentParser) -> set[str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_every_declared_sub_command_has_a_handler_and_no_handler_is_undeclared():
    assert sub_commands(build_parser()) == set(COMMANDS)


def test_a_sub_command_reaches_its_handler(capsys):
    assert main(["config-schema"]) == 0
    assert '"properties"' in capsys.readouterr().out


def test_no_sub_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err
