"""Defaults live once, in the spec dataclasses: every `[default: X]` of convert's and train's help is the field's."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import typer

from upcycle.arch import GENERIC, targets
from upcycle.convert.methods import LAYOUTS
from upcycle.convert.spec import METHOD_DEFAULTS, ConvertSpec
from upcycle.train.spec import TrainSpec
from upcycle_cli.main import app
from upcycle_cli.render import shown_default

FIELD = {"train_what": "train", "compile_model": "compile"}  # parameter -> spec field, where the names differ


def _options(command: str) -> dict[str, str]:
    group = typer.main.get_command(app)
    return {p.name: p.help or "" for p in group.commands[command].params if isinstance(p, typer.core.TyperOption)}


@pytest.mark.parametrize(("command", "spec"), [("convert", ConvertSpec), ("train", TrainSpec)])
def test_every_shown_default_is_the_spec_default(command, spec):
    defaults = {f.name: f.default for f in fields(spec)}
    if spec is ConvertSpec:
        defaults |= METHOD_DEFAULTS
    checked = 0
    for param, text in _options(command).items():
        name = FIELD.get(param, param)
        shown = re.search(r"\[default: ([^\]]*)\]$", text)
        if name not in defaults or shown is None:
            continue
        if defaults[name] is None:  # a default worked out at run time ("10% of the steps"): said in words
            assert not re.fullmatch(r"[\w.\-]+", shown.group(1)) or shown.group(1) == "off", (param, shown.group(1))
        else:
            assert shown.group(1) == shown_default(defaults[name]), param
            checked += 1
    # every option with a fixed default shows it
    fixed = {p for p in _options(command) if defaults.get(FIELD.get(p, p)) not in (None, False)}
    assert checked >= len(fixed) > 10


def test_choices_come_from_the_tables_and_registries():
    options = _options("convert")
    assert all(name in options["target"] for name in [*targets(), GENERIC])
    assert all(name in options["init"] for name in LAYOUTS)
    shared = [name for name, target in targets().items() if target.shared]
    assert shared and all(name in options["shared_experts"] for name in shared)
    assert shown_default(1e-4) == "0.0001" and shown_default(False) == "off" and shown_default(1.0) == "1"
