"""Request bodies to JSON, with bounds checked before the parser can hurt the server.

`json.loads` trusts its input in ways a server cannot: a body of 100,000
nested brackets recurses until RecursionError, an integer of 5,000 digits
raises ValueError (Python's int-string limit) and one of 4,000 digits costs
quadratic time, and `NaN`/`1e999` become floats no sampling setting can use.
`parse_json_body` refuses each of these with an `ApiError` (400) that says
what to change:

    depth      the C parser stops cleanly (RecursionError) at Python's recursion limit,
               and the parsed value is then walked without recursion: deeper than
               MAX_DEPTH is refused before any validator recurses into it
    integers   parse_int sees each integer's digits before converting them
    floats     non-finite numbers (NaN, Infinity, 1e999) are refused
"""

from __future__ import annotations

import json
import math

from scribelm.serve.errors import ApiError

MAX_DEPTH = 32  # the deepest real body (messages -> content parts -> part) is 4 levels
MAX_INTEGER_DIGITS = 32  # uint64 seeds have 20 digits

class _Refused(ValueError):
    pass


def _depth_exceeds(value, limit: int) -> bool:
    """Whether arrays/objects in `value` nest deeper than `limit` (an explicit stack: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _integer(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise _Refused(f"an integer of {digits} digits is too long (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number")


def parse_json_body(raw: bytes) -> dict:
    """A request body -> the JSON object it holds; ApiError(400) for anything else."""
    too_deep = ApiError(400, f"the JSON body is nested more than {MAX_DEPTH} levels deep; send a flatter request")
    try:
        data = json.loads(raw, parse_int=_integer, parse_float=_float, parse_constant=_constant)
    except _Refused as err:
        raise ApiError(400, f"We could not parse the JSON body of your request: {err}.") from None
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise ApiError(400, f"We could not parse the JSON body of your request ({err}).") from None
    if _depth_exceeds(data, MAX_DEPTH):
        raise too_deep
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data
