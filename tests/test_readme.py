"""The README as a newcomer reads it: every Python block runs as written, and every command line names options
the parser has.

Python blocks run in a fresh namespace in a temporary folder. Each `moeless ...` (or `python -m moeless ...`) line
is checked against `moeless.cli.build_parser()`: its subcommand exists, every `--flag` is one of that
subcommand's options, and every `a|b|c` written after a flag with choices lists valid choices. A line without
placeholders (no `[...]`, no upper-case PATH) is parsed for real, and a `simulate` line is also built up to its
first iteration (`moeless.sim.build_setup`), which catches a routing that does not fit the model.
"""
import re
import shlex
from pathlib import Path

import pytest

from moeless.cli import build_parser, simulate_config

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```([a-z]*)\n(.*?)^```", re.S | re.M)


def _blocks(lang):
    return [body for kind, body in _BLOCK.findall(README.read_text(encoding="utf-8")) if kind == lang]


def _command_lines():
    lines = []
    for body in _blocks(""):
        for line in body.splitlines():
            line = line.split("#", 1)[0].strip()
            for prefix in ("moeless ", "python -m moeless "):
                if line.startswith(prefix):
                    lines.append(line[len(prefix):])
    return lines


def _subparsers(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def _command(words):
    """(subcommand parser, its name, the words after it) of a command line's words."""
    parser, names = build_parser(), []
    while words and not words[0].startswith("-"):
        subs = _subparsers(parser)
        assert words[0] in subs, f"unknown subcommand {words[0]!r} after {' '.join(names) or 'moeless'}"
        parser, names, words = subs[words[0]], names + [words[0]], words[1:]
        if not any(a.__class__.__name__ == "_SubParsersAction" for a in parser._actions):
            break
    return parser, " ".join(names), words


def test_readme_has_python_blocks_and_command_lines():
    assert len(_blocks("python")) >= 3
    assert len(_command_lines()) >= 6


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})


@pytest.mark.parametrize("line", _command_lines())
def test_command_line_matches_the_parser(line):
    parser, name, words = _command(shlex.split(line))
    options = parser._option_string_actions
    text = " ".join(words)
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
        assert flag in options, f"`moeless {name}` has no option {flag}"
    for flag, alternatives in re.findall(r"(--[a-z][a-z0-9-]*)[ =]([a-z0-9.:-]+(?:\|[a-z0-9.:-]+)+)", text):
        choices = options[flag].choices
        assert choices is not None, f"{flag} takes no fixed choices, the README lists {alternatives}"
        assert set(alternatives.split("|")) <= set(choices), f"{flag}: {alternatives} vs {sorted(choices)}"


CONCRETE = [ln for ln in _command_lines() if "[" not in ln and not re.search(r"\b[A-Z]{2,}\b", ln)]


@pytest.mark.parametrize("line", CONCRETE)
def test_concrete_command_line_parses_and_simulate_lines_build(line):
    args = build_parser().parse_args(shlex.split(line))
    from moeless.cli import _check_bounds

    _check_bounds(args.parser, args)
    if args.command == "simulate":
        from moeless.sim import build_setup

        setup = build_setup(simulate_config(args))
        assert len(setup.schedule) >= 1
