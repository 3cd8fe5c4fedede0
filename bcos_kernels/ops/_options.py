"""The options of a custom op, declared once.

Each op folder declares its options as a NamedTuple: its fields, in order and with their types, are the
keyword-only part of the op's custom-op schemas (:func:`custom_op` writes them), and the backends get them as one
object (``opts.stride``), so that adding an option is one field plus the code that reads it.
"""

import typing
from typing import List

import torch

from bcos_kernels.ops import _eager

# Python type -> schema type, as torch.library's schema inference writes them.
_SCHEMA_TYPES = {float: "float", int: "SymInt", bool: "bool", str: "str", List[int]: "SymInt[]", List[bool]: "bool[]"}


def schema_fields(options: type) -> str:
    """``"float b, SymInt[] stride, ..."`` for the fields of the NamedTuple ``options``; a field with a default
    gets it in the schema too (``str form="lowrank"``), so that direct calls of the op may leave it out."""
    defaults = options._field_defaults

    def field(name, t):
        if name not in defaults:
            return f"{_SCHEMA_TYPES[t]} {name}"
        value = defaults[name]
        literal = f'"{value}"' if isinstance(value, str) else str(value)
        return f"{_SCHEMA_TYPES[t]} {name}={literal}"

    return ", ".join(field(name, t) for name, t in typing.get_type_hints(options).items())


def custom_op(name: str, tensors: str, options: type, returns: str, extra: str = ""):
    """``torch.library.custom_op`` with the schema ``(tensors, *, options' fields, extra) -> returns``; the
    decorated function takes the tensors positionally and the options as keywords (``**options``). The function is
    also recorded for the eager fast path (_eager.py)."""
    fields = schema_fields(options) + (", " + extra if extra else "")
    decorate = torch.library.custom_op(name, mutates_args=(), schema=f"({tensors}, *, {fields}) -> {returns}")

    def register(fn):
        op = decorate(fn)
        _eager.register_impl(op, fn)
        return op

    return register
