"""Recipe variables (``{artifacts:path}``, ``{configuration:/x}`` ...), filled in like Greengrass.

The forms, for the component itself and, prefixed with a component name, for a component
it can see (itself or a direct dependency)::

    {artifacts:path}            {dep.Name:artifacts:path}
    {artifacts:decompressedPath} {dep.Name:artifacts:decompressedPath}
    {configuration:/a/b}        {dep.Name:configuration:/a/b}
    {work:path}                 {dep.Name:work:path}
    {kernel:rootPath}           {iot:thingName}

They are matched with the nucleus's own patterns (namespace ``[.\\w]+``; key anything but
``:`` and ``}``), and everything else is left exactly as written, so shell text such as
``awk '{print $1}'`` and ``${VAR:-x}`` passes through. A variable that cannot be resolved
is also left verbatim, as the nucleus does (it logs and moves on): an unknown namespace or
key, a JSON pointer with no value behind it, a component that is not visible, or a path
that is not known. Configuration values render as the nucleus renders them: strings as
they are, ``null`` as ``null``, other values as compact JSON with object keys sorted.

Greengrass fills these in when a deployment is applied, from the configuration that
deployment produces, not when a recipe is parsed or when configuration later changes at
run time; callers should do the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from edgeloop.core.config import get_pointer
from edgeloop.core.errors import ConfigurationError
from edgeloop.core.recipe import Lifecycle, Step

__all__ = ["InterpolationContext", "interpolate", "interpolate_lifecycle"]

# The nucleus's patterns. Java's \w is ASCII-only, hence re.ASCII.
_SAME_COMPONENT = re.compile(r"\{([.\w]+):([^:}]+)\}", re.ASCII)
_CROSS_COMPONENT = re.compile(r"\{([.\w]+):([.\w]+):([^:}]+)\}", re.ASCII)


@dataclass(frozen=True)
class InterpolationContext:
    """What recipe variables resolve to for one component.

    ``artifacts_path``, ``decompressed_path`` and ``configuration`` are keyed by component
    name and cover the component and its dependencies; ``visible`` names the components
    the ``{name:...}`` forms may read (the component itself and its direct dependencies).
    ``work_paths`` holds other components' work folders, for ``{name:work:path}``.
    """

    component: str
    artifacts_path: Mapping[str, str]
    decompressed_path: Mapping[str, str]
    work_path: str
    kernel_root: str
    thing_name: str
    configuration: Mapping[str, Mapping[str, Any]]
    visible: frozenset[str]
    work_paths: Mapping[str, str] = field(default_factory=dict)


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _resolve(ctx: InterpolationContext, component: str, namespace: str, key: str) -> str | None:
    """The text for one variable, or None to leave it as written."""
    if namespace == "configuration":
        tree = ctx.configuration.get(component)
        if tree is None:
            return None
        try:
            return _render(get_pointer(tree, key))
        except (KeyError, ConfigurationError):
            return None
    if namespace == "artifacts":
        if key == "path":
            return ctx.artifacts_path.get(component)
        if key == "decompressedPath":
            return ctx.decompressed_path.get(component)
        return None
    if namespace == "work" and key == "path":
        return ctx.work_path if component == ctx.component else ctx.work_paths.get(component)
    # The nucleus answers these two the same whichever component is named.
    if namespace == "kernel" and key == "rootPath":
        return ctx.kernel_root
    if namespace == "iot" and key == "thingName":
        return ctx.thing_name
    return None


def interpolate(text: str, ctx: InterpolationContext) -> str:
    """Fill in the recipe variables in ``text``; anything else is returned as written."""
    if "{" not in text:
        return text

    def same(match: re.Match[str]) -> str:
        value = _resolve(ctx, ctx.component, match.group(1), match.group(2))
        return match.group(0) if value is None else value

    def cross(match: re.Match[str]) -> str:
        component, namespace, key = match.groups()
        if component not in ctx.visible:
            return match.group(0)
        value = _resolve(ctx, component, namespace, key)
        return match.group(0) if value is None else value

    # Two passes in the nucleus's order: own variables first, then other components'.
    return _CROSS_COMPONENT.sub(cross, _SAME_COMPONENT.sub(same, text))


def _interpolate_env(env: Mapping[str, str], ctx: InterpolationContext) -> dict[str, str]:
    return {name: interpolate(value, ctx) for name, value in env.items()}


def _interpolate_step(step: Step, ctx: InterpolationContext) -> Step:
    skipif = step.skipif
    if skipif is not None:
        skipif = replace(skipif, target=interpolate(skipif.target, ctx))
    return replace(
        step,
        script=interpolate(step.script, ctx),
        setenv=_interpolate_env(step.setenv, ctx),
        skipif=skipif,
    )


def interpolate_lifecycle(lifecycle: Lifecycle, ctx: InterpolationContext) -> Lifecycle:
    """A lifecycle with variables filled in: scripts, Setenv values and Skipif targets."""
    return Lifecycle(
        setenv=_interpolate_env(lifecycle.setenv, ctx),
        steps={name: _interpolate_step(step, ctx) for name, step in lifecycle.steps.items()},
    )
