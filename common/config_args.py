"""Command-line flags built from a config dataclass, and the layered values behind them.

One grammar for every program of the project: each field ``some_name`` is ``--some-name VALUE``;
booleans are ``--augment`` / ``--no-augment``; tuples are comma lists (``--resolutions 160,240``).
The flag's help comes from the field's metadata, so the dataclass is the one place a setting, its
default and its meaning are written::

    lr_head: float = field(default=2.5e-3, metadata={"help": "stage-2 max LR of the head"})

Metadata keys read here (all optional): ``help``; ``choices``; ``metavar``; ``required`` (True, or
a phrase such as ``"to run"``: shown in --help, checked by the program); ``aliases`` (more
option strings, e.g. ``("--epochs",)``); ``parse`` (a function
text -> value replacing the type's parser, e.g. seed ranges); ``default_help`` (text shown instead
of the default, for defaults that mean "decide later"); ``cli`` (False: no flag).

Values come in layers, later wins: the dataclass defaults < a TOML file (keys = long flag names,
see :func:`find_config_file`) < environment variables ``PREFIX_FLAG_NAME`` < flags on the command
line. :func:`apply_layers` feeds the file and the environment through the same parsers as the
flags, so a bad value is reported with where it came from.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Callable, Iterable, Mapping

from common.cli import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: ``common.cli.run_cli`` prints them as one line
    (``prog: error: argument --seeds: '3-1' ...``) with exit code 2, like every other bad input."""

    def error(self, message: str):
        raise UserError(message)


def flag(name: str) -> str:
    """``lr_head`` -> ``--lr-head``."""
    return "--" + name.replace("_", "-")


# --- value parsers ----------------------------------------------------------------------------------
def parse_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true/false")


def _scalar_parser(hint: Any) -> Callable[[str], Any]:
    if hint is int:
        def parse_int(text: str) -> int:
            try:
                return int(str(text).strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        return parse_int
    if hint is float:
        def parse_float(text: str) -> float:
            try:
                return float(str(text).strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        return parse_float
    if hint is bool:
        return parse_bool
    if hint is str or hint is Any:
        return str
    raise TypeError(f"config_args: unsupported field type {hint!r}")   # a bug in a config class


def _unwrap_optional(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def value_parser(hint: Any) -> Callable[[str], Any]:
    """The text -> value function of a field type: scalars, ``X | None`` and tuples (comma lists)."""
    hint = _unwrap_optional(hint)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _scalar_parser(args[0])

            def parse_list(text: str) -> tuple:
                return tuple(item(v.strip()) for v in str(text).split(",") if v.strip())
            return parse_list
        items = [_scalar_parser(a) for a in args]

        def parse_fixed(text: str) -> tuple:
            parts = [v.strip() for v in str(text).split(",") if v.strip()]
            if len(parts) != len(items):
                raise argparse.ArgumentTypeError(f"{text!r}: expected {len(items)} comma-separated values")
            return tuple(p(v) for p, v in zip(items, parts))
        return parse_fixed
    return _scalar_parser(hint)


def _is_bool(hint: Any) -> bool:
    return _unwrap_optional(hint) is bool


def _show_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) if value else "none"
    if value is None or value == "":
        return "none"
    return str(value)


def _fields(config_cls: type, exclude: Iterable[str]) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(config_cls)
    skip = set(exclude)
    return [(f, hints[f.name]) for f in dataclasses.fields(config_cls)
            if f.name not in skip and f.metadata.get("cli", True) and f.init]


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:   # type: ignore[misc]
        return f.default_factory()                      # type: ignore[misc]
    return None


def _metavar(name: str, hint: Any, choices: Iterable[Any] | None) -> str:
    if choices is not None:
        return "{" + "|".join(map(str, choices)) + "}"
    hint = _unwrap_optional(hint)
    if typing.get_origin(hint) is tuple:
        return "LIST"
    if hint in (int, float):
        return "N"
    return "TEXT"


# --- building the flags -----------------------------------------------------------------------------
def add_config_arguments(parser: argparse.ArgumentParser | Any, config_cls: type, *,
                         exclude: Iterable[str] = ()) -> list[str]:
    """Add one flag per field of ``config_cls`` (minus ``exclude``) to ``parser`` (or a group).

    A flag not given leaves no attribute on the namespace (``argparse.SUPPRESS``), so
    :func:`config_values` returns exactly what the user set and the dataclass keeps its defaults.
    Returns the field names that got a flag.
    """
    names = []
    for f, hint in _fields(config_cls, exclude):
        meta = f.metadata
        text = str(meta.get("help", "")).strip()
        required = meta.get("required")
        if required:
            text += " (required" + ("" if required is True else f" {required}") + ")"
        else:
            shown = meta.get("default_help", _show_default(_default_of(f)))
            text += f" (default: {shown})"
        text = text.replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text.strip()}
        if _is_bool(hint) and "parse" not in meta:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta.get("parse") or value_parser(hint)
            if "choices" in meta:
                kwargs["choices"] = tuple(meta["choices"])
            kwargs["metavar"] = meta.get("metavar") or _metavar(f.name, hint, meta.get("choices"))
        parser.add_argument(flag(f.name), *meta.get("aliases", ()), **kwargs)
        names.append(f.name)
    return names


def config_values(args: argparse.Namespace, config_cls: type, *,
                  exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of ``config_cls`` set on the command line (or by a layer below it)."""
    return {f.name: getattr(args, f.name) for f, _ in _fields(config_cls, exclude)
            if hasattr(args, f.name)}


def config_from_args(args: argparse.Namespace, config_cls: type, *, base: Any = None,
                     exclude: Iterable[str] = (), **fixed: Any) -> Any:
    """A ``config_cls`` from ``base`` (default: its defaults) with the given flags and ``fixed``
    values applied; the class's own construction validates the result."""
    values = {**config_values(args, config_cls, exclude=exclude), **fixed}
    from_dict = getattr(config_cls, "from_dict", None)
    if from_dict is not None:
        return from_dict(values, base=base) if base is not None else from_dict(values)
    return dataclasses.replace(base, **values) if base is not None else config_cls(**values)


# --- layers below the command line ------------------------------------------------------------------
def find_config_file(filename: str, start: str | None = None) -> str | None:
    """``filename`` in ``start`` (default: the working folder) or the nearest parent holding it."""
    here = os.path.abspath(start or os.getcwd())
    while True:
        candidate = os.path.join(here, filename)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def read_toml(path: str) -> dict[str, Any]:
    import tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    return data


def env_values(prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{'store': ...}`` from ``CXR_SWEEP_STORE=...`` for ``prefix='CXR_SWEEP_'`` (keys as flags)."""
    environ = os.environ if environ is None else environ
    return {k[len(prefix):].lower().replace("_", "-"): v for k, v in environ.items()
            if k.startswith(prefix) and len(k) > len(prefix)}


def _actions_by_flag(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {}
    for action in parser._actions:   # argparse has no public list of actions
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:]] = action
    return out


def _layer_value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` (TOML-typed or environment text) through the same parser as the flag."""
    try:
        if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
            result = parse_bool(value)
            if isinstance(action, argparse._StoreFalseAction):   # --no-x stored as x = False
                result = not result
            return result
        parse = action.type or str
        if isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list) else [value]
            return [parse(str(v)) for v in items]
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        if isinstance(value, bool):
            text = str(value).lower()
        result = parse(text)
        if action.choices is not None and result not in action.choices:
            raise argparse.ArgumentTypeError(
                f"{result!r} is not one of {', '.join(map(str, action.choices))}")
        return result
    except (argparse.ArgumentTypeError, ValueError, UserError) as exc:
        raise UserError(f"{where}: {exc}") from None


def apply_layers(parser: argparse.ArgumentParser, layers: Iterable[tuple[str, Mapping[str, Any]]],
                 *, skip: Iterable[str] = ()) -> None:
    """Make each layer's values the parser's defaults, in order (later layers win, flags win
    over all). ``layers``: (where, {long flag name: value}); a key that is no flag of ``parser``
    is an error naming ``where`` (a typo in a config file must not be ignored)."""
    actions = _actions_by_flag(parser)
    skipped = set(skip)
    for where, values in layers:
        for key, value in values.items():
            key = str(key).replace("_", "-")
            if key in skipped:
                continue
            action = actions.get(key)
            if action is None or action.dest == "help":
                raise UserError(f"{where}: unknown setting {key!r} (settings are the long flag "
                                f"names of --help, without the dashes)")
            parser.set_defaults(**{action.dest: _layer_value(action, value, f"{where}: {key}")})
