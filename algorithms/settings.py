"""Settings models: an algorithm's hyperparameters as one pydantic model, and the words used for them.

An algorithm on the off-policy core (WPO, EVE) declares each setting once, as a field of its settings
model (``algorithms.offpolicy.config.OffPolicySettings`` and subclasses): its default, its bounds or
allowed values (``Field(ge=...)``, ``Literal[...]``) and a one-line docstring under it (the field's
description). The RLlib config takes its defaults from the model, ``training(**kw)`` accepts the model's
fields, ``validate()`` checks the current values through the model, and the RLModules read their
fallbacks from it. ``orchestra validate --settings NAME`` prints :func:`settings_rows`.

Pure pydantic (no Ray, no torch), so the spec checker and the CLI can use it.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


class SettingError(ValueError):
    """A setting outside its allowed values: ``key: got value; allowed: ...`` (one line).

    The spec checker (orchestration/spec.py) reports it as ``FILE: config.<key>: got ...; allowed: ...``."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: got {value!r}; allowed: {allowed}")


def _bounds(metadata: list[Any]) -> str:
    """Bounds from annotated-types constraints: ``>= 1``, ``> 0``, ``in (0, 1]``, ``<= 1``."""
    lo = next(((">", m.gt) for m in metadata if getattr(m, "gt", None) is not None), None) or next(
        ((">=", m.ge) for m in metadata if getattr(m, "ge", None) is not None), None)
    hi = next((("<", m.lt) for m in metadata if getattr(m, "lt", None) is not None), None) or next(
        (("<=", m.le) for m in metadata if getattr(m, "le", None) is not None), None)
    if lo and hi:
        return f"in {'(' if lo[0] == '>' else '['}{lo[1]:g}, {hi[1]:g}{')' if hi[0] == '<' else ']'}"
    if lo or hi:
        op, value = lo or hi
        return f"{op} {value:g}"
    return ""


def _split(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """Unwrap ``Annotated[T, ...]`` (pydantic keeps nested constraints there) into T and its constraints."""
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata = [*metadata, *(item.metadata if isinstance(item, FieldInfo) else [item])]
    return annotation, metadata


def _min_length(metadata: list[Any]) -> int:
    return max([getattr(m, "min_length", 0) or 0 for m in metadata] or [0])


def describe_allowed(annotation: Any, metadata: list[Any] = ()) -> str:
    """The values a type with constraints allows, in words: ``an int >= 1``, ``a number in (0, 1]``,
    ``none, cube_root`` (a Literal), ``true, false``, ``None or a number > 0``, ``a list of ints >= 1``."""
    annotation, metadata = _split(annotation, list(metadata))
    origin = get_origin(annotation)
    if annotation is Any:
        return "any value"
    if origin is Literal:
        return ", ".join(str(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        words = " or ".join(describe_allowed(a, metadata) for a in rest)
        return f"None or {words}" if len(rest) < len(args) else words
    if origin is list:
        item, item_meta = _split(get_args(annotation)[0], [])
        item_words = describe_allowed(item, item_meta).removeprefix("an ").removeprefix("a ")
        noun, _, rest = item_words.partition(" ")
        plural = {"number": "numbers", "int": "ints", "string": "strings"}.get(noun, noun)
        return f"a {'non-empty ' if _min_length(metadata) >= 1 else ''}list of {' '.join([plural, rest]).strip()}"
    if annotation is bool:
        return "true, false"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a {annotation.__name__} or mapping"
    noun = {int: "an int", float: "a number", str: "a string"}.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return " ".join([noun, _bounds(metadata)]).strip()


def type_name(annotation: Any) -> str:
    """A short name of a field's type: ``int``, ``float | None``, ``list[int]``, ``str`` (Literals)."""
    annotation, _ = _split(annotation, [])
    origin = get_origin(annotation)
    if origin is Literal:
        return "str"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation))
    if origin is list:
        return f"list[{type_name(get_args(annotation)[0])}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def field_allowed(field: FieldInfo) -> str:
    """What a model field allows: ``json_schema_extra={"allowed": ...}`` when the type cannot say it (a
    cross-item rule), else :func:`describe_allowed` of its type and constraints."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return str(extra.get("allowed") or describe_allowed(field.annotation, field.metadata))


def check_settings(model: type[BaseModel], values: Mapping[str, Any]) -> BaseModel:
    """Validate ``values`` (every field of ``model``) through the model; the first bad one raises a
    :class:`SettingError` naming its key, its value and what the field allows."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as err:
        key = str(err.errors()[0]["loc"][0])
        field = model.model_fields.get(key)
        if field is None:  # not one of the model's settings: pydantic's own words
            raise SettingError(key, values.get(key), err.errors()[0]["msg"]) from None
        raise SettingError(key, values.get(key), field_allowed(field)) from None


def settings_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str, str]]:
    """(name, type, default, allowed, doc) for every field of ``model``, in declaration order."""
    rows = []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append((name, type_name(field.annotation), repr(default), field_allowed(field),
                     (field.description or "").strip().splitlines()[0] if field.description else ""))
    return rows
