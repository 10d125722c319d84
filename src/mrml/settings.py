"""Each setting declared once: a dataclass field whose metadata holds its help text and allowed values.

`setting(default, help, range=..., choices=...)` makes the field; from those fields come the checks
(`check_settings`: one-line `UsageError`s), the command-line options (`add_options`) and, through
`like`, the same declaration reused by another front end (e.g. `mrml bench memory`) with its own default.

A setting typed `X | None` also accepts None (the default chosen elsewhere, e.g. by the algorithm).
A `bool | None` setting with `no_help` gets a `--no-NAME` switch besides `--NAME`.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable

from .errors import UsageError
from .validation import Range

_KINDS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": bool}


def setting(default: Any = MISSING, help: str = "", *, range: Range | None = None, choices: tuple[str, ...] = (),
            hint: str = "", no_help: str | None = None, cli: bool = True,
            default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field declaring one setting: its default, help text and allowed values.

    Args:
        default: The value when not given.
        help: One line for `--help` (also the documentation of the field).
        range: Allowed numbers (`mrml.validation.ints`/`floats`); checked by `check_settings`.
        choices: Allowed strings; checked by `check_settings`.
        hint: How to fix a bad value, appended to the error.
        no_help: For a `bool | None` setting: help of its `--no-NAME` switch (which stores False).
        cli: False for a field that is not a command-line option.
        default_factory: Instead of `default`, for mutable defaults.

    Returns:
        A `dataclasses.field` carrying the metadata.

    Example:
        >>> from dataclasses import dataclass
        >>> from mrml.validation import ints
        >>> @dataclass
        ... class Opts:
        ...     steps: int = setting(3, "gradient steps", range=ints(0, 10))
        >>> Opts().steps, help_of(Opts, "steps")
        (3, 'gradient steps')
    """
    meta = {"help": help, "range": range, "choices": tuple(choices), "hint": hint, "no_help": no_help, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def like(cls: type, name: str, default: Any = MISSING, help: str | None = None) -> Any:
    """The declaration of setting `name` of dataclass `cls` again (help, range, choices), for another
    front end; `default` and `help` replace the original's where given.

    Example:
        >>> from mrml.algorithms.algo_config import AlgoConfig
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Bench:
        ...     cg_steps: int = like(AlgoConfig, "cg_steps", default=5)
        >>> Bench().cg_steps, help_of(Bench, "cg_steps") == help_of(AlgoConfig, "cg_steps")
        (5, True)
    """
    f = field_of(cls, name)
    meta = dict(f.metadata)
    if help is not None:
        meta["help"] = help
    if default is MISSING and f.default_factory is not MISSING:
        return field(default_factory=f.default_factory, metadata=meta)
    return field(default=f.default if default is MISSING else default, metadata=meta)


def field_of(cls: Any, name: str) -> Field:
    """The dataclass field `name` of `cls` (a class or an instance)."""
    for f in fields(cls):
        if f.name == name:
            return f
    raise KeyError(name)


def help_of(cls: Any, name: str) -> str:
    """The help text declared for setting `name` of `cls`."""
    return field_of(cls, name).metadata.get("help", "")


def is_setting(f: Field) -> bool:
    return "help" in f.metadata


def cli_settings(cls: Any) -> list[Field]:
    """The fields of `cls` that are command-line options, in declaration order."""
    return [f for f in fields(cls) if is_setting(f) and f.metadata["cli"]]


def kind(f: Field) -> tuple[str | None, bool]:
    """(base type name: int, float, str or bool -- None for anything else; whether None is allowed)."""
    parts = [p.strip() for p in str(f.type).split("|")]
    base = [p for p in parts if p != "None"]
    return (base[0] if len(base) == 1 and base[0] in _KINDS else None), "None" in parts


def flag(name: str) -> str:
    """The command-line option of setting `name`: `--inner-steps` for inner_steps."""
    return "--" + name.replace("_", "-")


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def check_setting(f: Field, value: Any) -> None:
    """One-line UsageError unless `value` fits setting `f` (type, range, choices)."""
    base, optional = kind(f)
    if value is None and optional:
        return
    meta = f.metadata
    hint = f"; {meta['hint']}" if meta.get("hint") else ""
    if value is None and base is not None:
        raise UsageError(f"{flag(f.name)} must be given a value (got None){hint}")
    if base in ("str", "bool") and not isinstance(value, _KINDS[base]):
        raise UsageError(f"setting {f.name} must be a {base} (got {value!r}){hint}")
    if base in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float) if base == "float" else int)):
        raise UsageError(f"{flag(f.name)} must be {'an integer' if base == 'int' else 'a number'} (got {value!r}){hint}")
    if meta.get("range") is not None:
        meta["range"].check(value, flag(f.name))
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        allowed = f"{choices[0]} or {choices[1]}" if len(choices) == 2 else "one of " + ", ".join(choices)
        raise UsageError(f"{flag(f.name)} must be {allowed} (got {value!r}){hint}")


def check_settings(obj: Any) -> None:
    """Check every declared setting of dataclass instance `obj`; the first bad one raises a one-line UsageError.

    Example:
        >>> from mrml.algorithms.algo_config import AlgoConfig
        >>> cfg = AlgoConfig()
        >>> cfg.__dict__["cg_steps"] = -2  # past AlgoConfig's own check on assignment
        >>> try:
        ...     check_settings(cfg)
        ... except UsageError as e:
        ...     print(e)
        --cg-steps must be >= 0 and <= 1000000 (an integer; got -2)
    """
    for f in fields(obj):
        if is_setting(f):
            check_setting(f, getattr(obj, f.name))


def add_options(parser: argparse.ArgumentParser, cls: Any, skip: tuple[str, ...] = (),
                defaults: bool = False, show_defaults: bool = False, only: tuple[str, ...] | None = None,
                suffix: str = "") -> list[str]:
    """Add one option per command-line setting of dataclass `cls` to `parser`; returns their dest names.

    Each option stores None unless given (`defaults=True`: the declared default), so that only the
    options a user gave override the layers below (preset, config file). A bool setting is a switch
    (`--NAME` stores True, plus `--no-NAME` storing False where the setting declares `no_help`; the two
    exclude each other: given both, argparse refuses in one line).
    `show_defaults` appends "[default: X]" to the help of settings with a default other than None and False.
    `only` keeps just those settings (e.g. a command that overrides a few saved ones); `suffix` is appended
    to every help text.

    Example:
        >>> from mrml.algorithms.algo_config import AlgoConfig
        >>> p = argparse.ArgumentParser()
        >>> names = add_options(p, AlgoConfig)
        >>> vars(p.parse_args(["--inner-steps", "5", "--no-prox"]))["inner_steps"], p.parse_args(["--no-prox"]).prox
        (5, False)
    """
    names = []
    for f in cli_settings(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        base, _ = kind(f)
        meta, opt = f.metadata, flag(f.name)
        default = default_of(f) if defaults else None
        help_ = meta["help"] + suffix
        if show_defaults and default_of(f) not in (None, False):
            help_ += f" [default: {default_of(f)}]"
        if base == "bool" and meta.get("no_help"):  # --NAME and --no-NAME: one or the other, not both
            pair = parser.add_mutually_exclusive_group()
            pair.add_argument(opt, dest=f.name, action="store_true", default=default, help=help_)
            pair.add_argument("--no-" + opt[2:], dest=f.name, action="store_false", help=meta["no_help"])
        elif base == "bool":
            parser.add_argument(opt, dest=f.name, action="store_true", default=default, help=help_)
        else:
            choices = meta.get("choices") or ()  # shown, checked by check_settings (one message for all front ends)
            parser.add_argument(opt, dest=f.name, type=_KINDS.get(base or "str", str), default=default,
                                help=help_, metavar="{" + ",".join(choices) + "}" if choices else None)
        names.append(f.name)
    return names


__all__ = ["add_options", "check_setting", "check_settings", "cli_settings", "default_of", "field_of", "flag",
           "help_of", "kind", "like", "setting"]
