"""One declaration per setting: a settings dataclass's field carries its default, help text, cryoSPARC key and
command-line name (`setting`), so the CLI builds its options from the dataclass (flexplugin/cli/common.py) and
the Scipion protocols build the engine's arguments from it (`option_args`). Torch-free, standard library only."""
from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any

__all__ = ["cli_fields", "help_text", "option_args", "option_name", "setting"]


def setting(default: Any, help: str, cryosparc: str | None = None, cli: bool = True,
            default_text: str | None = None, option: str | None = None, choices: tuple | None = None,
            required: bool = False, positive: bool = False) -> Any:
    """A dataclass field with its `default` and its description: `help` (what it does, units), `cryosparc` (the
    key of the cryoSPARC parameter it mirrors), `cli` (False: an internal setting without a command-line option),
    `default_text` (how the help states the default, e.g. 'automatic' for None; None: the value itself), `option`
    (a command-line name other than the field's), `choices` (the values allowed), `required` (the command line
    must give it) and `positive` (the command line refuses values <= 0 as it parses them)."""
    return field(default=default, metadata={"help": help, "cryosparc": cryosparc, "cli": cli,
                                            "default_text": default_text, "option": option, "choices": choices,
                                            "required": required, "positive": positive})


def option_name(f: Field) -> str:
    """The command-line option of a field: its name in kebab case (`extra_epochs` -> `--extra-epochs`); a boolean
    that defaults to True is turned off by `--no-<name>`."""
    if f.metadata.get("option"):
        return f.metadata["option"]
    name = "--" + f.name.replace("_", "-")
    return "--no-" + name[2:] if f.default is True else name


def cli_fields(cls: type) -> list[Field]:
    """The fields of settings dataclass `cls` that are command-line options, in declaration order."""
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def help_text(f: Field) -> str:
    """The option's help: the field's help text, then its cryoSPARC key and its default in parentheses (a boolean
    defaulting to True is helped as 'skip <help>', its option being `--no-<name>`)."""
    if f.default is MISSING:
        raise TypeError(f"setting {f.name} has no default")
    meta = f.metadata
    if isinstance(f.default, bool):  # `--no-<name>` skips what the help names
        return ("skip " if f.default else "") + meta["help"] + (f" ({meta['cryosparc']})" if meta.get("cryosparc")
                                                                else "")
    default = meta.get("default_text") or (None if f.default is None else f"{f.default:g}"
                                           if isinstance(f.default, float) else str(f.default))
    said = ("" if meta.get("required") else "default ") + default if default else None
    notes = [n for n in (meta.get("cryosparc"), said) if n]
    return meta["help"] + (f" ({'; '.join(notes)})" if notes else "")


def option_args(cls: type, values: dict[str, Any]) -> list:
    """The command-line arguments that set the fields of `cls` named in `values` (field name -> value): `--name
    value` for each value that is not None (None keeps the engine's default), `--no-name` for a switched-off
    boolean. A name that is not a command-line field of `cls` is a KeyError (a typo must not pass silently)."""
    known = {f.name: f for f in cli_fields(cls)}
    args: list = []
    for name, value in values.items():
        f = known[name]
        if value is None:
            continue
        if isinstance(f.default, bool):
            if bool(value) != f.default:
                args.append(option_name(f))
        else:
            args += [option_name(f), value]
    return args
