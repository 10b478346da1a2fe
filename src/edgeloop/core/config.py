"""Component configuration trees, RFC 6901 JSON pointers and Greengrass configuration updates.

A configuration tree is a JSON value (dict / list / str / int / float / bool / None) whose
root is an object. Every function here returns a new tree and never mutates its inputs.

Semantics, as the Greengrass nucleus applies them:

- ``deep_merge``: objects merge key by key, recursively; anything else (a list, a scalar,
  ``null``) replaces what was there. Lists are never merged element by element.
- ``reset``: each pointer's value goes back to its value in the defaults, or is removed
  when the defaults lack it; ``""`` resets the whole tree. Pointing inside a list is an
  error, as Greengrass refuses to reset one element of a list.
- ``apply_update``: RESET first, then MERGE.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeloop.core.errors import ConfigurationError

_INDEX = re.compile(r"0|[1-9][0-9]*")
_BAD_ESCAPE = re.compile(r"~(?![01])")
_MISSING: Any = object()


# --- JSON pointers (RFC 6901) ---------------------------------------------------------


def parse_pointer(pointer: str) -> tuple[str, ...]:
    """Split a JSON pointer into its unescaped reference tokens; ``""`` is the whole document."""
    if not isinstance(pointer, str):
        raise ConfigurationError(f"a JSON pointer must be a string, got {type(pointer).__name__}")
    if pointer == "":
        return ()
    if not pointer.startswith("/"):
        raise ConfigurationError(
            f'JSON pointer {pointer!r} must start with "/" (or be "" for the whole document)'
        )
    if _BAD_ESCAPE.search(pointer):
        raise ConfigurationError(
            f'JSON pointer {pointer!r} has a "~" that is not "~0" (for "~") or "~1" (for "/")'
        )
    # RFC 6901 section 4: "~1" before "~0", so "~01" decodes to "~1" and not to "/".
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/"))


def format_pointer(tokens: Iterable[str]) -> str:
    """Build a JSON pointer from reference tokens (the inverse of ``parse_pointer``)."""
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def _tokens(pointer: str | tuple[str, ...]) -> tuple[str, ...]:
    return pointer if isinstance(pointer, tuple) else parse_pointer(pointer)


def _child(node: Any, token: str) -> Any:
    """The child of ``node`` named by ``token``, or _MISSING."""
    if isinstance(node, dict):
        return node.get(token, _MISSING)
    if isinstance(node, list) and _INDEX.fullmatch(token) and int(token) < len(node):
        return node[int(token)]
    return _MISSING


def get_pointer(tree: Any, pointer: str | tuple[str, ...]) -> Any:
    """The value at ``pointer`` (a string or parsed tokens); KeyError if there is none."""
    node = tree
    for token in _tokens(pointer):
        node = _child(node, token)
        if node is _MISSING:
            shown = pointer if isinstance(pointer, str) else format_pointer(pointer)
            raise KeyError(shown)
    return node


def has_pointer(tree: Any, pointer: str | tuple[str, ...]) -> bool:
    """Whether ``tree`` has a value at ``pointer``."""
    try:
        get_pointer(tree, pointer)
    except KeyError:
        return False
    return True


# --- JSON values ------------------------------------------------------------------------


def _json_problem(value: Any, where: tuple[str, ...] = ()) -> str | None:
    """Describe the first part of ``value`` that is not plain JSON, or return None."""
    if value is None or isinstance(value, bool | int | str):
        return None
    at = format_pointer(where) or "the top level"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} at {at} is not a JSON number"
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = _json_problem(item, (*where, str(index)))
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"key {key!r} at {at} is not a string"
            problem = _json_problem(item, (*where, key))
            if problem:
                return problem
        return None
    return f"{type(value).__name__} at {at} is not a JSON value"


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: like ``==`` but ``true`` is not ``1`` (Python says ``True == 1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict | list) or isinstance(b, dict | list):
        return False
    return bool(a == b)


# --- tree operations --------------------------------------------------------------------


def deep_merge(base: Any, update: Any) -> Any:
    """Merge ``update`` into ``base``: objects recursively, any other value replaces."""
    if not (isinstance(base, dict) and isinstance(update, dict)):
        return copy.deepcopy(update)
    merged = copy.deepcopy(base)
    for key, value in update.items():
        merged[key] = deep_merge(merged[key], value) if key in merged else copy.deepcopy(value)
    return merged


def _reject_list_path(tree: Any, tokens: tuple[str, ...], pointer: str) -> None:
    node = tree
    for token in tokens[:-1]:
        node = _child(node, token)
        if isinstance(node, list):
            raise ConfigurationError(
                "cannot reset one element of a list; reset the whole list instead",
                field=pointer,
            )
        if node is _MISSING:
            return


def reset(
    tree: dict[str, Any], defaults: dict[str, Any], pointers: Iterable[str]
) -> dict[str, Any]:
    """Put each pointed-to value back to its default, or remove it if it has none.

    A pointer beneath a value that is not an object in ``tree`` (say ``/a/b`` where
    ``a`` is ``5``) changes nothing: restoring it would overwrite a customised ancestor,
    which Greengrass does not do either.
    """
    parsed = [(p, parse_pointer(p)) for p in pointers]  # all valid, or nothing changes
    for pointer, tokens in parsed:
        _reject_list_path(tree, tokens, pointer)
        _reject_list_path(defaults, tokens, pointer)
    result = copy.deepcopy(tree)
    for _, tokens in parsed:
        if not tokens:
            result = copy.deepcopy(defaults)
            continue
        default = get_pointer(defaults, tokens) if has_pointer(defaults, tokens) else _MISSING
        parent: Any = result
        for token in tokens[:-1]:
            if token not in parent:
                if default is _MISSING:
                    break  # nothing there to remove
                parent[token] = {}
            parent = parent[token]
            if not isinstance(parent, dict):
                break
        else:
            if isinstance(parent, dict):
                if default is _MISSING:
                    parent.pop(tokens[-1], None)
                else:
                    parent[tokens[-1]] = copy.deepcopy(default)
    return result


@dataclass(frozen=True)
class ConfigurationUpdate:
    """A Greengrass ``configurationUpdate``: pointers to reset, then an object to merge."""

    merge: dict[str, Any] | None = None
    reset: tuple[str, ...] = field(default=())


def apply_update(
    tree: dict[str, Any], defaults: dict[str, Any], update: ConfigurationUpdate
) -> dict[str, Any]:
    """Apply ``update`` to ``tree``: RESET first, then MERGE, as Greengrass does.

    For a component new to the device, pass its defaults as ``tree``.
    """
    result = reset(tree, defaults, update.reset)
    if update.merge is not None:
        merged: dict[str, Any] = deep_merge(result, update.merge)
        return merged
    return result


def upgrade_defaults(
    tree: dict[str, Any], old_defaults: dict[str, Any], new_defaults: dict[str, Any]
) -> dict[str, Any]:
    """Carry ``tree`` across a version change whose default configuration changed.

    The rule, applied at every path:

    - the value equals (as JSON) the old default there: it was never customised, so it
      follows the new default, and is removed if the new defaults no longer have it;
    - both the value and the new default are objects: recurse, key by key;
    - the path is absent from the tree but present in the new defaults: it is added;
    - otherwise the value was customised (or added by the user) and is kept.

    Greengrass itself keeps every existing value and only fills in keys that are absent
    (it merges the new defaults under the old tree), so an uncustomised old default
    outlives the version that defined it (aws-greengrass-nucleus issue #1470). We do
    better where we can tell, and "equal to the old default" is the only signal a pure
    function has: a user who set a value equal to the old default sees it follow the new
    one, which is the rarer surprise.
    """
    result: dict[str, Any] = _upgrade(tree, old_defaults, new_defaults)
    return result


def _upgrade(value: Any, old: Any, new: Any) -> Any:
    # Checked by identity before any deepcopy, which would turn _MISSING into a new object.
    if value is _MISSING or (old is not _MISSING and json_equal(value, old)):
        return _MISSING if new is _MISSING else copy.deepcopy(new)
    if not isinstance(value, dict):
        return copy.deepcopy(value)
    old_map = old if isinstance(old, dict) else {}
    new_map = new if isinstance(new, dict) else {}
    result: dict[str, Any] = {}
    for key in [*value, *(k for k in new_map if k not in value)]:
        child = _upgrade(
            value.get(key, _MISSING), old_map.get(key, _MISSING), new_map.get(key, _MISSING)
        )
        if child is not _MISSING:
            result[key] = child
    return result


# --- parsing deployment input -----------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(text: str, *, source: str, field_name: str | None, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise ConfigurationError(
            f"{what} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
            source=source,
            field=field_name,
        ) from err
    except ValueError as err:
        raise ConfigurationError(
            f"{what} is not valid JSON: {err}", source=source, field=field_name
        ) from err


def _join(prefix: str | None, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parse_update(obj: Any, *, source: str, prefix: str | None) -> ConfigurationUpdate:
    if obj is None:
        return ConfigurationUpdate()
    if not isinstance(obj, Mapping):
        raise ConfigurationError(
            f'must be an object with "MERGE" and/or "RESET", got {type(obj).__name__}',
            source=source,
            field=prefix,
        )
    values: dict[str, Any] = {}
    for key, value in obj.items():
        name = key.upper() if isinstance(key, str) else key
        if name not in ("MERGE", "RESET"):
            raise ConfigurationError(
                f'unknown key {key!r}; a configuration update has only "MERGE" and "RESET"',
                source=source,
                field=_join(prefix, str(key)),
            )
        if name in values:
            raise ConfigurationError(
                f"{name} is given twice (keys are case-insensitive)",
                source=source,
                field=_join(prefix, name),
            )
        values[name] = value
    return ConfigurationUpdate(
        merge=_parse_merge(values.get("MERGE"), source=source, field_name=_join(prefix, "MERGE")),
        reset=_parse_reset(values.get("RESET"), source=source, field_name=_join(prefix, "RESET")),
    )


def _parse_merge(value: Any, *, source: str, field_name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        # The Greengrass API and CLI carry MERGE as serialized JSON.
        value = _load_json(value, source=source, field_name=field_name, what="the MERGE string")
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"must be a JSON object (or a string holding one), got {type(value).__name__}",
            source=source,
            field=field_name,
        )
    merge = copy.deepcopy(dict(value))  # the caller's object stays theirs
    problem = _json_problem(merge)
    if problem:
        raise ConfigurationError(problem, source=source, field=field_name)
    return merge


def _parse_reset(value: Any, *, source: str, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigurationError(
            f'must be a list of JSON pointers such as ["/a/b", ""], got {type(value).__name__}',
            source=source,
            field=field_name,
        )
    pointers: list[str] = []
    for index, pointer in enumerate(value):
        where = f"{field_name}[{index}]"
        if not isinstance(pointer, str):
            raise ConfigurationError(
                f"must be a JSON pointer string, got {type(pointer).__name__}",
                source=source,
                field=where,
            )
        try:
            parse_pointer(pointer)
        except ConfigurationError as err:
            raise ConfigurationError(err.reason, source=source, field=where) from err
        pointers.append(pointer)
    return tuple(pointers)


def parse_configuration_update(obj: Any, *, source: str) -> ConfigurationUpdate:
    """Validate a ``{"MERGE": {...} | "json", "RESET": ["/a", ""]}`` object (keys any case)."""
    return _parse_update(obj, source=source, prefix=None)


def parse_update_config_document(obj: Any, *, source: str) -> dict[str, ConfigurationUpdate]:
    """Validate the Greengrass CLI's ``--update-config`` document (an object or its JSON text)."""
    if isinstance(obj, str):
        obj = _load_json(obj, source=source, field_name=None, what="the document")
    if not isinstance(obj, Mapping):
        raise ConfigurationError(
            "must be an object mapping component names to "
            f'{{"MERGE": ..., "RESET": [...]}}, got {type(obj).__name__}',
            source=source,
        )
    updates: dict[str, ConfigurationUpdate] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(
                f"component name {name!r} must be a non-empty string", source=source
            )
        updates[name] = _parse_update(value, source=source, prefix=name)
    return updates
