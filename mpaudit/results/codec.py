"""The one JSON codec of every result class: pydantic dataclasses, non-finite floats as strings.

Strict JSON has no NaN/Infinity literal, so results write them as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` (anywhere, evidence dictionaries included) and read them back as floats. A result survives
write → read → write byte for byte. The JSON Schema of a result admits those three strings wherever a float may
be non-finite (:data:`JsonFloat`).

Result classes are ``pydantic.dataclasses.dataclass(frozen=True, config=RESULT_CONFIG)``: plain frozen
dataclasses that validate on construction and ignore keys they do not know (older and newer readers). Numbers
derived from others are ``@computed_field`` properties: written for readers outside Python, never stored twice,
ignored on reading.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import (
    BeforeValidator,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import core_schema

NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""The strings written for non-finite floats, and the values they are read back as."""

RESULT_CONFIG = ConfigDict(ser_json_inf_nan="strings", extra="ignore", arbitrary_types_allowed=False)
"""The pydantic configuration of every result dataclass."""

FLOAT_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "number"}, {"enum": list(NONFINITE)}]}
"""JSON Schema of a float that may be non-finite."""


def encode_float(x: float) -> float | str:
    """``x`` itself when finite, else ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``."""
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def decode_float(x: Any) -> float:
    """A float from JSON: a number, one of the strings above, or null (read as NaN, "not measured")."""
    if isinstance(x, str):
        if x in NONFINITE:
            return NONFINITE[x]
        raise ValueError(f"not a number: {x!r}")
    return math.nan if x is None else float(x)


def _null_as_nan(x: Any) -> Any:
    return math.nan if x is None else x


JsonFloat = Annotated[float, BeforeValidator(_null_as_nan), WithJsonSchema(FLOAT_SCHEMA)]
"""A float field that may hold NaN or ±Inf (written as strings; a JSON null reads as NaN, "not measured")."""

T = TypeVar("T")
_PLAIN: TypeAdapter[Any] = TypeAdapter(Any, config=RESULT_CONFIG)


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def adapter(cls: type[T]) -> TypeAdapter[T]:
    """The (cached) pydantic adapter of a result class."""
    found = _ADAPTERS.get(cls)
    if found is None:
        found = _ADAPTERS[cls] = TypeAdapter(cls)
    return found


def to_plain(obj: Any) -> Any:
    """JSON-ready data (dicts, lists, numbers, strings) of a result object, derived numbers included."""
    return json.loads(adapter(type(obj)).dump_json(obj))


def dumps(obj: Any, indent: int | None = 1) -> str:
    """The JSON text of a result object: non-finite floats as strings, UTF-8 text kept as it is."""
    return json.dumps(to_plain(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def dumps_plain(data: Any, indent: int | None = 1) -> str:
    """JSON text of plain data (dicts, lists, numbers, result objects inside): non-finite floats as strings."""
    return json.dumps(json.loads(_PLAIN.dump_json(data)), indent=indent, allow_nan=False, ensure_ascii=False)


def from_plain(cls: type[T], data: Any) -> T:
    """A result object from JSON-ready data; ``ValueError`` (pydantic's ``ValidationError``) when malformed."""
    return adapter(cls).validate_python(data)


def json_schema(cls: type[Any]) -> dict[str, Any]:
    """The JSON Schema of what :func:`dumps` writes for ``cls``."""
    return adapter(cls).json_schema(mode="serialization")


__all__ = ["FLOAT_SCHEMA", "NONFINITE", "RESULT_CONFIG", "JsonFloat", "ValidationError", "decode_float", "dumps",
           "dumps_plain", "encode_float", "from_plain", "json_schema", "to_plain"]


class DictLayout(abc.ABC):
    """A value a result holds in a compact layout of its own (a trace's statistics): pydantic reads it with
    ``from_dict``, writes it with ``to_dict`` and describes it with ``json_schema()``, which subclasses define."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """The value from what :meth:`to_dict` wrote."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The value as JSON-ready data."""

    @classmethod
    @abc.abstractmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of what :meth:`to_dict` writes."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def validate(value: Any) -> Any:
            return value if isinstance(value, cls) else cls.from_dict(value)

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.to_dict())
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        return cls.json_schema()
