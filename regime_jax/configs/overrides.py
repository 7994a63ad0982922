"""Changing a config from text: ``--config.<field>=<text>`` and a sweep's override mappings.

:func:`override` parses a field's text by the field's type (a placeholder's declared type when
its value is None) and answers a typo with a did-you-mean line; :func:`apply_overrides` sets
nested or dotted mappings in place (a sweep's settings). Every failure is a one-line
:class:`~regime_jax.configs.base.ConfigError`. :func:`describe` lists a config's fields for
``--help``, each with its one-line meaning: :func:`field_help` reads it from the comments of
:func:`~regime_jax.configs.base.base_config`, the one place where fields are documented.
"""

from __future__ import annotations

import ast
import decimal
import difflib
import functools
import inspect
import io
import re
import textwrap
import tokenize
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from regime_jax.configs.base import ConfigError, get_field


def _is_map(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def flatten(overrides: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """Nested and/or dotted override mappings as ``{"a.b.c": value}``.

    >>> flatten({"record": {"every_steps": 1}, "optimizer.name": "adam"})
    {'record.every_steps': 1, 'optimizer.name': 'adam'}
    """
    out = {}
    for key, value in (overrides or {}).items():
        if _is_map(value):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping, where: str) -> None:
    """Sets each dotted field in place; an unknown field or a bad type raises ConfigError."""
    for field, value in flatten(overrides).items():
        *parents, leaf = field.split(".")
        target = config
        for part in parents:
            target = target.get(part) if _is_map(target) else None
        if not _is_map(target) or leaf not in target:
            raise ConfigError(f"{where}: override {field!r} is not a field of the config")
        if isinstance(target[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            target[leaf] = value
        except TypeError as err:
            raise ConfigError(f"{where}: override {field}={value!r}: {err}") from err


def fields(c: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of every leaf field, in definition order."""
    for key, value in c.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def field_type(c: ml_collections.ConfigDict, key: str) -> type:
    """The type a field accepts (a placeholder's declared type when its value is None)."""
    value = c[key]
    if value is None:
        try:
            return c.get_ref(key).get_type()  # placeholders are references already
        except Exception:  # a plain None field: no declared type
            return type(None)
    return type(value)


_SCALARS = (bool, int, float, str)
_TRUE, _FALSE = ("true", "t", "yes", "y", "1", "on"), ("false", "f", "no", "n", "0", "off")


_INT_DIGITS_MAX = 4300  # Python's own limit on the digits of an int read from text


def _parse_int(text: str) -> int:
    """``int(text)``, or an integral value in exponent notation (``1e6``, ``2.5E3``) exactly.

    The exponent is read before the value is made, so ``1e999999999`` is refused at once
    instead of building a billion-digit int; the field's range is the validation's to check.

    >>> _parse_int("1e14"), _parse_int("-2.5e3"), _parse_int("12")
    (100000000000000, -2500, 12)
    """
    try:
        return int(text)
    except ValueError:
        if "e" not in text.lower():
            raise
    try:
        value = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        raise ValueError("not a number") from None
    if not value.is_finite() or value.adjusted() > _INT_DIGITS_MAX:
        raise ValueError("not a finite int")
    if value != value.to_integral_value():
        raise ValueError("not an integral value")
    return int(value)


def _parse_scalar(text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError("expected true or false")
    if kind is int:
        return _parse_int(text)
    if kind is float:
        return float(text)
    if kind is str:
        return text
    raise ValueError(f"fields of type {kind.__name__} cannot be set from the command line")


def _parse_tuple(text: str, default: tuple) -> tuple:
    """``(8, 8)``, ``[8, 8]``, ``8,8`` or ``8``; elements typed like the default's."""
    kind = type(default[0]) if default else None
    stripped = text.strip()
    if stripped[:1] in "([":
        value = ast.literal_eval(stripped)
        items = list(value) if isinstance(value, list | tuple) else [value]
    else:
        items = [_parse_scalar(t.strip(), kind or str) for t in stripped.split(",") if t.strip()]
    if kind is float:
        items = [float(i) if type(i) is int else i for i in items]
    if kind is not None and not all(type(i) is kind for i in items):
        raise ValueError(f"expected a tuple of {kind.__name__}")
    return tuple(items)


def _example(kind: type, default: Any) -> str:
    if kind is list:
        return ",".join(map(str, default or (0, 1)))
    if kind is tuple:
        return "'(" + ", ".join(map(str, default or (8, 8))) + ")'"
    if kind is bool:
        return str(default).lower() if isinstance(default, bool) else "true"
    if isinstance(default, kind):
        return str(default)
    return {int: "1", float: "0.1", str: "text"}.get(kind, "?")


def _resolve(c: ml_collections.ConfigDict, field: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding ``field`` and its last key; a did-you-mean ConfigError if absent."""
    parts, node = field.split("."), c
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            prefix = ".".join(parts[:i])
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"--config.{field}: {prefix!r} is a value, not a group of fields")
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
            hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            where = f"config.{prefix}" if prefix else "the config"
            raise ConfigError(
                f"--config.{field}: {where} has no field {part!r}; "
                + (hint or f"its fields: {', '.join(keys)}")
            )
        if i < len(parts) - 1:
            node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
        sub = ", ".join(sorted(node[parts[-1]].keys()))
        raise ConfigError(f"--config.{field} is a group of fields; set one of them: {sub}")
    return node, parts[-1]


def override(c: ml_collections.ConfigDict, field: str, text: str | None) -> None:
    """Sets ``field`` (dotted) from its command-line text, parsed by the field's type.

    ``text=None`` means a bare ``--config.<field>`` (true for a bool field). Raises a one-line
    :class:`ConfigError`: an unknown field (with a did-you-mean), a value of the wrong type.
    """
    node, key = _resolve(c, field)
    kind, default = field_type(node, key), node[key]
    if text is None:
        if kind is not bool:
            raise ConfigError(f"--config.{field} needs a value, e.g. --config.{field}=...")
        text = "true"
    # ConfigDict has no public "is this a placeholder" query; _fields holds the reference.
    nullable = isinstance(node._fields.get(key), config_dict.FieldReference)
    if (default is None or nullable) and text.lower() in ("none", "null"):
        node[key] = None  # a placeholder (e.g. dataset.data_dir) back to its default
        return
    if kind is list and not all(isinstance(v, _SCALARS) for v in default):
        raise ConfigError(
            f"--config.{field} is a list of {type(default[0]).__name__}s: it cannot be set "
            f"from the command line; edit the config file"
        )
    try:
        if kind is list:  # e.g. a sweep's seeds: like a tuple, items typed like the default's
            value = list(_parse_tuple(text, tuple(default)))
        elif kind is tuple:
            value = _parse_tuple(text, default)
        else:
            value = _parse_scalar(text, kind)
    except (ValueError, SyntaxError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else "malformed"
        if kind in (int, float, bool):
            reason = f"expected {'an' if kind is int else 'a'} {kind.__name__}"
        elif kind in (tuple, list):
            elem = type(default[0]).__name__ if default else "value"
            reason = f"expected a {kind.__name__} of {elem}"
        raise ConfigError(
            f"--config.{field}={text}: {reason}, e.g. --config.{field}={_example(kind, default)}"
        ) from None
    try:
        node[key] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--config.{field}={text}: {str(err).splitlines()[0]}") from None


# ------------------------------------------------------------------ --help: every field's meaning


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
    """``(trailing, alone)``: line number -> the comment ending a line of code, and -> the
    comment on a line of its own."""
    trailing, alone, code_lines = {}, {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            text = tok.string.lstrip("#").strip()
            (trailing if line in code_lines else alone)[line] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return trailing, alone


def _above(alone: Mapping[int, str], line: int) -> str:
    """The comment lines directly above ``line``, joined into one line."""
    texts = []
    while line - 1 in alone:
        line -= 1
        texts.insert(0, alone[line])
    return " ".join(texts)


def _is_dict_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict"


def comment_help(fn: Callable) -> dict[str, str]:
    """The meaning of each field ``fn`` (a ``get_config``-like function) sets, from its
    comments: ``{"optimizer.learning_rate": "peak learning rate", "optimizer": ..., ...}``.

    A field (``c.<name> = value`` or ``<key>=value`` inside ``c.<group> = dict(...)``, nested)
    is described by the comment ending its line, else by the comment lines directly above it;
    a group by the comment lines above it. Fields without either are left out.
    """
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):  # no source (a frozen or compiled build): no help
        return {}
    trailing, alone = _comments(source)
    out: dict[str, str] = {}

    def visit(name: str, value: ast.AST, line: int) -> None:
        text = trailing.get(line) or _above(alone, line)
        if text:
            out[name] = text
        if _is_dict_call(value):
            for kw in value.keywords:
                if kw.arg is not None:
                    visit(f"{name}.{kw.arg}", kw.value, kw.lineno)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            name = _dotted(node.targets[0])
            if name:
                visit(name, node.value, node.lineno)
    return out


def _dotted(target: ast.AST) -> str | None:
    """``"dataset.seq_len"`` for the target ``c.dataset.seq_len`` (the root name dropped);
    None for anything else (a tuple, a subscript, a bare name)."""
    parts = []
    while isinstance(target, ast.Attribute):
        parts.insert(0, target.attr)
        target = target.value
    return ".".join(parts) if parts and isinstance(target, ast.Name) else None


@functools.cache
def packaged_help() -> dict[str, str]:
    """The comments of every packaged config's ``get_config``: the meaning of fields a config
    adds beyond base_config (``dataset.seq_len`` of a text config)."""
    import importlib

    from regime_jax import configs

    out: dict[str, str] = {}
    for name in configs.names():
        try:
            module = importlib.import_module(f"regime_jax.configs.{name}")
        except ImportError:
            continue
        if callable(getattr(module, "get_config", None)):
            out = comment_help(module.get_config) | out
    return out


@functools.cache
def field_help() -> dict[str, str]:
    """:func:`comment_help` of :func:`~regime_jax.configs.base.base_config`: every field's
    one-line meaning (tested: none is missing), and each group's."""
    from regime_jax.configs.base import base_config

    return comment_help(base_config)


_ATTRIBUTE = re.compile(r"^  (\w+): (.*)$")


def attribute_help(cls: type) -> dict[str, str]:
    """``{attribute: one line}`` from the ``Attributes:`` section of ``cls``'s docstring."""
    doc, out, name = inspect.cleandoc(cls.__doc__ or ""), {}, None
    lines = doc.split("Attributes:", 1)[1].splitlines()[1:] if "Attributes:" in doc else []
    for line in lines:
        if line and not line.startswith("  "):
            break  # the next section
        m = _ATTRIBUTE.match(line)
        if m:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif name and line.strip():
            out[name] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in out.items()}


def model_help(name: str) -> dict[str, str]:
    """``model.<field>`` meanings of a registered model, from the ``Attributes:`` of the class
    its factory returns (``build_cnn`` returns ``CNN(...)``); {} when that cannot be found."""
    from regime_jax import registry

    try:
        factory = registry.MODELS.get(name)
        tree = ast.parse(textwrap.dedent(inspect.getsource(factory)))
    except (ValueError, OSError, TypeError, ImportError):
        return {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Call):
            cls = getattr(factory, "__globals__", {}).get(getattr(node.value.func, "id", None))
            if isinstance(cls, type):
                return {f"model.{k}": v for k, v in attribute_help(cls).items()}
    return {}


def help_for(c: ml_collections.ConfigDict) -> dict[str, str]:
    """The meaning of each of ``c``'s fields: :func:`field_help`; for ``model.*`` fields
    base_config does not have, the model's own (:func:`model_help`); for any other field a
    packaged config adds, that config's comment (:func:`packaged_help`)."""
    helps = dict(field_help())
    model = c.get("model")
    if isinstance(model, ml_collections.ConfigDict) and isinstance(model.get("name"), str):
        if any(f"model.{k}" not in helps for k in model.keys()):
            helps = model_help(model.name) | helps
    return packaged_help() | helps


HELP_COLUMN = 46  # where a field's meaning starts in --help, after --config.<name>=<default>
UNDOCUMENTED = "(a field of this config only; see its file)"


def _shown(c: ml_collections.ConfigDict, name: str, value: Any) -> str:
    if value is None:
        parent, _, key = name.rpartition(".")
        kind = field_type(get_field(c, parent) if parent else c, key).__name__
        return f"None   ({kind} or None)"
    if isinstance(value, list) and not all(isinstance(v, _SCALARS) for v in value):
        maps = (Mapping, ml_collections.ConfigDict)
        names = [str(v.get("name", "?")) if isinstance(v, maps) else "?" for v in value]
        kinds = type(value[0]).__name__
        return f"[{', '.join(names)}]   (a list of {kinds}s: edit the config file)"
    if isinstance(value, tuple | list | str):
        return f"'{value}'" if isinstance(value, str) else f"'{value}'".replace(",)", ")")
    return str(value)


def describe(c: ml_collections.ConfigDict, helps: Mapping[str, str] | None = None) -> str:
    """Every field as ``--config.<name>=<default>``, one per line (for ``--help``).

    With ``helps`` (``{field or group: text}``, e.g. :func:`help_for`), each field is followed
    by its meaning (:data:`UNDOCUMENTED` when it has none) and each documented group opens
    with a line of its own.
    """
    lines, groups = [], set()
    for name, value in fields(c):
        flag = f"  --config.{name}={_shown(c, name, value)}"
        if helps is None:
            lines.append(flag)
            continue
        parts = name.split(".")
        for i in range(1, len(parts)):
            group = ".".join(parts[:i])
            if group not in groups:
                groups.add(group)
                if helps.get(group):
                    head = f"[{group}] {helps[group]}"
                    lines += textwrap.wrap(head, 100, initial_indent="  ", subsequent_indent="    ")
        text = helps.get(name) or UNDOCUMENTED
        if len(flag) < HELP_COLUMN:
            lines.append(f"{flag.ljust(HELP_COLUMN)}{text}")
        else:
            lines += [flag, f"{' ' * HELP_COLUMN}{text}"]
    return "\n".join(lines)
