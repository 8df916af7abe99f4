"""A frozen config dataclass -> a Typer command whose options are its fields.

Every command is generated the same way (`config_command`): one option per field, named
``--field-name``, its help text the docstring written under the field, its default the
field's default (required when the field has none). Types map as follows:

| field type                 | on the command line                          |
|----------------------------|----------------------------------------------|
| str, int, float, Path      | the value                                     |
| X | None                   | the value, or nothing for None                |
| bool                       | ``--name/--no-name``                          |
| Literal["a", "b"]          | one of the choices                            |
| tuple[str, ...] / [int,..] | comma-separated (``a,b,c``)                   |
| tuple[float, float]        | two values (``--crop-scale 0.2 0.25``)        |

`Opt` overrides one field: other flags, a repeatable option, an argument, a parser from the
typed text to the field's value. The command builds the config (a config's own check raises
`UsaeError` or ValueError: a usage error, exit 2) and calls `run(cfg)`; a `UsaeError` from the
run is printed on one line and exits with `USER_ERROR_EXIT`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import typer

from usae.errors import USER_ERROR_EXIT, UsaeError


class Opt(NamedTuple):
    """How one config field appears on the command line (defaults: derived from its type)."""

    flags: tuple[str, ...] = ()
    """Option names, e.g. ("--concept",); default ("--field-name",)."""
    parse: Callable[[Any], Any] | None = None
    """Typed text (or list of texts when `multiple`) -> the field's value."""
    multiple: bool = False
    """A repeatable option (``--weights A=f --weights B=g``) giving a list to `parse`."""
    argument: bool = False
    """A positional argument instead of an option."""
    hidden: bool = False
    """Left out of --help (testing aids)."""
    extra_help: str = ""
    """Appended to the field's docstring."""
    metavar: str | None = None
    """Placeholder of the value in --help."""
    show: Callable[[Any], str] | None = None
    """The default as --help shows it (and as the option would be typed), e.g. 14x14 for a grid."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, whitespace folded."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        except (OSError, TypeError):  # installed without sources: no help texts, still works
            continue
        for a, b in zip(body, body[1:], strict=False):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for T | None, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def literal_choices(tp: Any) -> tuple[str, ...] | None:
    tp, _ = _optional(tp)
    if typing.get_origin(tp) is Literal:
        return tuple(str(a) for a in typing.get_args(tp))
    return None


def split_list(text: str, kind: type = str, what: str = "value") -> tuple:
    """'a, b,c' -> ('a', 'b', 'c') (items converted with `kind`; empty items dropped)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise typer.BadParameter(
            f"{what} must be comma-separated {kind.__name__} values, got {text!r}"
        ) from None


class _Param(NamedTuple):
    name: str
    annotation: Any
    info: Any
    to_field: Callable[[Any], Any]


def _param(f: dataclasses.Field, tp: Any, opt: Opt, doc: str) -> _Param:
    flags = opt.flags or (f"--{f.name.replace('_', '-')}",)
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = (
        ...
        if required
        else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
    )
    help_ = (doc + (" " + opt.extra_help if opt.extra_help else "")).strip()
    inner, optional = _optional(tp)
    choices = literal_choices(tp)
    kw: dict[str, Any] = dict(help=help_, hidden=opt.hidden, metavar=opt.metavar)
    to_field: Callable[[Any], Any] = opt.parse or (lambda v: v)
    if opt.multiple:
        annotation, cli_default = list[str], [] if default is ... or not default else list(default)
    elif choices is not None:
        annotation, cli_default = inner, default
    elif inner is bool:
        annotation, cli_default = bool, default
        if not opt.flags:
            flags = (f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}",)
    elif (
        typing.get_origin(inner) is tuple
        and len(typing.get_args(inner)) == 2
        and typing.get_args(inner)[1] is Ellipsis
    ):
        kind = typing.get_args(inner)[0]
        annotation = str
        cli_default = default if default in (..., None) else ",".join(map(str, default))
        if opt.parse is None:
            to_field = _list_parser(kind, flags[0])
    elif opt.parse is not None:
        shown = opt.show or _text
        annotation, cli_default = str, default if default in (..., None) else shown(default)
    else:
        annotation, cli_default = (inner | None) if optional else inner, default
    if opt.argument:
        info = typer.Argument(cli_default, **{k: v for k, v in kw.items() if k != "hidden"})
    else:
        info = typer.Option(cli_default, *flags, **kw)
    return _Param(f.name, annotation, info, to_field)


def _list_parser(kind: type, flag: str) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        return None if v is None else split_list(v, kind, flag)

    return parse


def _text(default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


def config_params(
    cls: type, opts: dict[str, Opt] | None = None, exclude: tuple[str, ...] = ()
) -> list[_Param]:
    """The command-line parameters of a config dataclass, one per field (in field order)."""
    opts = opts or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    return [
        _param(f, hints[f.name], opts.get(f.name, Opt()), docs.get(f.name, ""))
        for f in dataclasses.fields(cls)
        if f.name not in exclude
    ]


def config_command(
    app: typer.Typer,
    name: str,
    cls: type,
    run: Callable[[Any], Any],
    *,
    opts: dict[str, Opt] | None = None,
    exclude: tuple[str, ...] = (),
    fixed: dict[str, Any] | None = None,
    help: str | None = None,
) -> Callable[..., None]:
    """Register `usae NAME`: options generated from `cls`'s fields, then ``run(cls(**values))``.

    exclude: fields that are not options (they keep their default, or the value in `fixed`).
    """
    params = config_params(cls, opts, exclude)
    fixed = dict(fixed or {})

    def command(**values: Any) -> None:
        try:
            kw = {p.name: p.to_field(values[p.name]) for p in params}
            cfg = cls(**kw, **fixed)
        except (UsaeError, ValueError) as e:
            raise typer.BadParameter(str(e)) from None
        try:
            run(cfg)
        except UsaeError as e:
            fail(e)

    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                p.name, inspect.Parameter.KEYWORD_ONLY, default=p.info, annotation=p.annotation
            )
            for p in params
        ]
    )
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = f"{name}_cmd"
    command.__doc__ = help or (cls.__doc__ or "").strip()
    command.config_class = cls  # type: ignore[attr-defined]
    command.config_opts = dict(opts or {})  # type: ignore[attr-defined]
    command.config_exclude = tuple(exclude) + tuple(fixed)  # type: ignore[attr-defined]
    app.command(name)(command)
    return command


def fail(e: BaseException, details: Any = None) -> None:
    """Print a user's error on one line (and `details`, a rich renderable) and exit."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    if details is not None:
        console.print(details)
    console.print(f"error: {e}", style="red", markup=False, highlight=False)
    raise typer.Exit(USER_ERROR_EXIT)


def path_or_empty(v: Any) -> str:
    """For str fields that name a path: None -> ''."""
    return "" if v is None else str(v)


__all__ = ["Opt", "config_command", "config_params", "field_docs", "fail", "split_list", "Path"]
