"""A request body's bytes as JSON values: the one place both APIs (/generate and /v1) decode
JSON, with the limits that keep any body a 400 rather than an error deep in the stack.

What the standard library alone lets through, and where it would fail later: lone surrogates
(`"\\ud800"` is valid JSON but no tokenizer takes it), nesting deep enough to exhaust the
interpreter's recursion, integers of thousands of digits (Python refuses to convert them) or
past 64 bits (torch's seed cannot hold them), and `NaN`/`Infinity`, which are not JSON at all.
Each is refused here with the field's path, so the message can name it.
"""

from __future__ import annotations

import json

MAX_DEPTH = 32  # objects and arrays within each other; real bodies use 4
INT_BITS = 64  # the widest integer any field takes (seed: a signed 64-bit integer)


class BodyError(ValueError):
    """A body that is not acceptable JSON; `param` is the path of the field at fault, if one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _OutOfRange:
    """An integer too wide for any field, kept unconverted until its path is known."""

    def __init__(self, digits: str):
        self.digits = digits


def load(body: bytes) -> object:
    """The JSON value of `body`; BodyError says what is wrong, and where."""
    try:
        text = body.decode("utf-8")  # explicit: json.loads(bytes) would also guess UTF-16/32
    except UnicodeDecodeError:
        raise BodyError("The body is not UTF-8 text.") from None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except RecursionError:
        raise BodyError(f"The body is nested too deeply (at most {MAX_DEPTH} levels of objects "
                        "and arrays).") from None
    except ValueError as err:  # json.JSONDecodeError, or a NaN/Infinity
        raise BodyError(f"The body is not valid JSON ({err}).") from None
    _check(value)
    return value


def _parse_int(digits: str) -> int | _OutOfRange:
    # Checked by length first: int() itself refuses over 4,300 digits, with a ValueError.
    if len(digits) > 21:
        return _OutOfRange(digits)
    number = int(digits)
    return number if -(2 ** (INT_BITS - 1)) <= number < 2 ** INT_BITS else _OutOfRange(digits)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check(value: object) -> None:
    """Depth, strings and integers of every value, without recursion (the depth is the
    input's to choose)."""
    stack: list[tuple[object, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, path or None)
        elif isinstance(item, _OutOfRange):
            size = len(item.digits.lstrip("-"))
            raise BodyError(f"{path or 'The body'}: the integer {_abridged(item.digits)} "
                            f"({size} digits) is out of range for any field (64-bit integers "
                            "at most).", path or None)
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise BodyError(f"The body is nested too deeply (at most {MAX_DEPTH} levels of "
                                "objects and arrays).", path or None)
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key, path or None, key=True)
                    stack.append((child, f"{path}.{key}" if path else key, depth + 1))
            else:
                stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def _check_text(text: str, path: str | None, key: bool = False) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        what = "a field name" if key else (path or "The body")
        raise BodyError(f"{what} holds a lone UTF-16 surrogate ({text[err.start]!a} at "
                        f"character {err.start}), which is not text: encode the string as "
                        "UTF-8 (or escape a character beyond U+FFFF as a surrogate pair).",
                        path) from None


def _abridged(digits: str) -> str:
    return digits if len(digits) <= 24 else f"{digits[:10]}...{digits[-6:]}"
