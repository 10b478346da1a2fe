"""Greengrass v2 component recipes (RecipeFormatVersion 2020-01-25): parse, validate, select.

Recipes are read the way the Greengrass nucleus reads them, so components written for
Greengrass load unchanged:

- Recipe keys (``ComponentName``, ``Manifests``, ``Lifecycle``, ``Run``, ``Script``,
  ``Setenv`` ...) match case-insensitively: ``run``, ``setEnv`` and ``SetEnv`` all work.
  Keys the user names (``DefaultConfiguration`` contents, ``Setenv`` variables, dependency
  names, platform attributes' values) keep their case.
- Unknown keys are ignored, as the nucleus does; a known key with the wrong type is an
  error that names the file, the field path (``Manifests[0].Lifecycle.Run.Timeout``, keys
  spelled as written in the file) and the reason.
- A manifest with a non-empty ``Lifecycle`` uses it; otherwise it takes the recipe-level
  ``Lifecycle`` filtered by its ``Selections`` (the older form; ``all`` is implied).
- YAML is read without timestamp conversion, so an unquoted ``2020-01-25`` stays a string.

Nothing here touches the disk except ``load_recipe`` and ``load_recipe_dir``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast

from edgeloop.core.errors import RecipeError
from edgeloop.core.semver import Range, Version

if TYPE_CHECKING:
    from edgeloop.core.resolver import Candidate

__all__ = [
    "COMPONENT_TYPES",
    "RECIPE_FORMAT_VERSION",
    "STEP_TIMEOUT_DEFAULTS",
    "Artifact",
    "Dependency",
    "Lifecycle",
    "Manifest",
    "Recipe",
    "SkipIf",
    "Step",
    "StepName",
    "current_platform",
    "load_recipe",
    "load_recipe_dir",
    "parse_recipe",
]

RECIPE_FORMAT_VERSION = "2020-01-25"
GENERIC_TYPE = "aws.greengrass.generic"
COMPONENT_TYPES = frozenset(
    {GENERIC_TYPE, "aws.greengrass.lambda", "aws.greengrass.plugin", "aws.greengrass.nucleus"}
)

# The limits Greengrass's recipe model enforces on names and versions.
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_NAME_MAX = 128
_VERSION_MAX = 64
_VERSION_PART_MAX = 999_999
_RELEASE = re.compile(r"(\d+)\.(\d+)\.(\d+)")

_SKIPIF = re.compile(r"(exists|onpath) +(.+)")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_SIMPLE_LABEL = re.compile(r"[A-Za-z0-9]")
_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}

# Greengrass's artifact digest algorithms, by their Java names, and hashlib's name for each.
_ALGORITHMS = {"SHA-256": "sha256", "SHA-384": "sha384", "SHA-512": "sha512", "SHA-1": "sha1"}
_DIGEST_SIZES = {"SHA-256": 32, "SHA-384": 48, "SHA-512": 64, "SHA-1": 20}

Permission = Literal["NONE", "OWNER", "ALL"]
_PERMISSIONS: tuple[Permission, ...] = ("NONE", "OWNER", "ALL")


class StepName(StrEnum):
    """A lifecycle step, by the (lower-case) name the nucleus keeps it under."""

    BOOTSTRAP = "bootstrap"
    INSTALL = "install"
    STARTUP = "startup"
    RUN = "run"
    SHUTDOWN = "shutdown"
    RECOVER = "recover"


# Seconds a step may run before the nucleus stops it when the recipe gives no Timeout;
# None: Run has no timeout.
STEP_TIMEOUT_DEFAULTS: Mapping[StepName, float | None] = {
    StepName.BOOTSTRAP: 120.0,
    StepName.INSTALL: 120.0,
    StepName.STARTUP: 120.0,
    StepName.RUN: None,
    StepName.SHUTDOWN: 15.0,
    StepName.RECOVER: 60.0,
}


@dataclass(frozen=True)
class SkipIf:
    """A step's skip check: ``onpath git`` (an executable on PATH) or ``exists /a/file``.

    ``negate`` is the nucleus's ``!`` prefix (``! onpath git``): skip when the check fails.
    """

    kind: Literal["onpath", "exists"]
    target: str
    negate: bool = False


@dataclass(frozen=True)
class Step:
    """One lifecycle step; ``timeout`` in seconds with Greengrass's default filled in."""

    script: str
    timeout: float | None = None
    requires_privilege: bool = False
    setenv: Mapping[str, str] = field(default_factory=dict)
    skipif: SkipIf | None = None


@dataclass(frozen=True)
class Lifecycle:
    """The steps a manifest runs, and environment variables for all of them."""

    setenv: Mapping[str, str] = field(default_factory=dict)
    steps: Mapping[StepName, Step] = field(default_factory=dict)


@dataclass(frozen=True)
class Artifact:
    """A file the component needs, fetched from ``uri`` and checked against ``digest``."""

    uri: str
    digest: str | None = None
    algorithm: str = "SHA-256"
    unarchive: Literal["NONE", "ZIP"] = "NONE"
    read: Permission = "OWNER"
    execute: Permission = "NONE"

    @property
    def file_name(self) -> str:
        """The last path segment of the URI, whatever its scheme."""
        scheme, _, rest = self.uri.partition(":")
        if scheme.lower() in ("http", "https"):
            rest = rest.split("#", 1)[0].split("?", 1)[0]
        return rest.rsplit("/", 1)[-1]

    @property
    def hash_name(self) -> str:
        """The ``hashlib`` name of ``algorithm``."""
        return _ALGORITHMS[self.algorithm]


@dataclass(frozen=True)
class Manifest:
    """What to install and run on the platforms that ``platform`` matches."""

    platform: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    artifacts: tuple[Artifact, ...] = ()
    selections: tuple[str, ...] = ()

    def matches(self, target: Mapping[str, str]) -> bool:
        """Whether a device with platform attributes ``target`` may use this manifest."""
        labels = {key.casefold(): value for key, value in target.items()}
        return all(
            _platform_value_matches(key, template, labels.get(key.casefold()))
            for key, template in self.platform.items()
        )


@dataclass(frozen=True)
class Dependency:
    """A dependency on another component: which versions, and HARD (restart) or SOFT."""

    name: str
    requirement: Range
    hard: bool = True


@dataclass(frozen=True)
class Recipe:
    """A validated component recipe."""

    format_version: str
    name: str
    version: Version
    type: str = GENERIC_TYPE
    description: str = ""
    publisher: str = ""
    default_configuration: Mapping[str, Any] = field(default_factory=dict)
    dependencies: Mapping[str, Dependency] = field(default_factory=dict)
    manifests: tuple[Manifest, ...] = ()
    source: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)

    def select_manifest(
        self, os: str, architecture: str, *, attributes: Mapping[str, str] | None = None
    ) -> Manifest | None:
        """The first manifest whose Platform matches the device, as Greengrass picks it.

        ``attributes`` are further platform attributes (Greengrass's platform overrides).
        """
        target = {"os": os, "architecture": architecture, **(attributes or {})}
        return next((m for m in self.manifests if m.matches(target)), None)

    def to_candidate(self) -> Candidate:
        """This recipe as a candidate for dependency resolution."""
        from edgeloop.core.resolver import Candidate, DependencySpec

        return Candidate(
            self.name,
            self.version,
            {
                name: DependencySpec(requirement=dep.requirement, hard=dep.hard)
                for name, dep in self.dependencies.items()
            },
        )


# --- platform matching ----------------------------------------------------------------


def _is_regex(template: str) -> bool:
    return len(template) > 2 and template.startswith("/") and template.endswith("/")


def _platform_value_matches(key: str, template: str, label: str | None) -> bool:
    # Follows Greengrass's PlatformHelper, plus the documented "*" (matches even absence).
    if template == "*":
        return True
    if label is None:
        return False
    if template == "//":
        return True
    if _is_regex(template):
        return re.fullmatch(template[1:-1], label) is not None
    if key.casefold() in ("os", "architecture") and template.lower() in ("all", "any"):
        return True
    # Greengrass keeps labels that start with a symbol for future syntax; they never match.
    if not _SIMPLE_LABEL.match(template):
        return False
    return template == label


def current_platform(*, system: str | None = None, machine: str | None = None) -> tuple[str, str]:
    """This machine's ``(os, architecture)`` under Greengrass's names.

    ``system`` and ``machine`` (as ``platform.system()`` / ``platform.machine()`` report
    them) are for tests.
    """
    system = (system if system is not None else _platform.system()).lower()
    machine = (machine if machine is not None else _platform.machine()).lower()
    os_name = {"linux": "linux", "darwin": "darwin", "windows": "windows"}.get(system, "unknown")
    if machine in ("x86_64", "amd64", "x64"):
        arch = "amd64"
    elif machine in ("i386", "i486", "i586", "i686", "x86"):
        arch = "x86"
    elif machine in ("aarch64", "arm64", "armv8b", "aarch64_be"):
        arch = "aarch64"
    elif machine.startswith("arm"):
        arch = "arm"
    else:
        arch = "unknown"
    return os_name, arch


# --- reading documents ----------------------------------------------------------------


@functools.cache
def _yaml_loader() -> type[Any]:
    """SafeLoader without timestamps: Greengrass's YAML reader keeps dates as strings.

    Built on first use: the agent reads its stored recipes as JSON, and importing PyYAML
    costs its start time and resident memory (both are benchmark targets).
    """
    import yaml

    class RecipeYamlLoader(yaml.SafeLoader):
        pass

    RecipeYamlLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return RecipeYamlLoader


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _load_document(data: str | bytes, *, source: str, fmt: Literal["json", "yaml"] | None) -> Any:
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise RecipeError(
                f"the recipe is not UTF-8 text (bad byte at offset {err.start})", source=source
            ) from err
    else:
        text = data.removeprefix("\ufeff")
    if fmt is None:
        fmt = "json" if text.lstrip().startswith("{") else "yaml"
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(
                f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}", source=source
            ) from err
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.MarkedYAMLError as err:
        reason = f"invalid YAML{_at(err.problem_mark)}: {err.problem or 'syntax error'}"
        if err.context:
            reason += f" ({err.context}{_at(err.context_mark)})"
        raise RecipeError(reason, source=source) from err
    except yaml.YAMLError as err:
        raise RecipeError(f"invalid YAML: {err}", source=source) from err


# --- the parser -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    """A parsed value and the field path it came from; mappings hold _Nodes by key."""

    value: Any
    path: str


def _child_path(path: str, key: str) -> str:
    if not _PLAIN_KEY.fullmatch(key):
        return f"{path}[{json.dumps(key, ensure_ascii=False)}]"
    return f"{path}.{key}" if path else key


def _wrap(value: Any, path: str) -> _Node:
    if isinstance(value, Mapping):
        return _Node({str(k): _wrap(v, _child_path(path, str(k))) for k, v in value.items()}, path)
    if isinstance(value, list | tuple):
        return _Node([_wrap(v, f"{path}[{i}]") for i, v in enumerate(value)], path)
    return _Node(value, path)


def _unwrap(node: _Node) -> Any:
    if isinstance(node.value, dict):
        return {k: _unwrap(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [_unwrap(v) for v in node.value]
    return node.value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _select(node: _Node, keywords: frozenset[str], selectors: tuple[str, ...]) -> _Node | None:
    """Filter a recipe-level lifecycle by a manifest's selections, as the nucleus does.

    At a level where any key is a selection keyword, only the first of the manifest's
    selections present (else ``all``) survives, unwrapped; other keys there are dropped.
    """
    if not isinstance(node.value, dict):
        return None if node.value is None else node
    items: dict[str, _Node] = node.value
    if any(key in keywords for key in items):
        for selector in (*selectors, "all"):
            chosen = items.get(selector)
            if chosen is not None and chosen.value is not None:
                return _select(chosen, keywords, selectors)
        return None
    kept = {}
    for key, child in items.items():
        selected = _select(child, keywords, selectors)
        if selected is not None:
            kept[key] = selected
    return _Node(kept, node.path)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str | None, reason: str) -> NoReturn:
        raise RecipeError(reason, source=self.source, field=path or None)

    # generic shapes

    def mapping(self, node: _Node, what: str = "a mapping") -> dict[str, _Node]:
        if not isinstance(node.value, dict):
            self.fail(node.path, f"must be {what}, not {_kind(node.value)}")
        return cast(dict[str, _Node], node.value)

    def sequence(self, node: _Node, what: str) -> list[_Node]:
        if not isinstance(node.value, list):
            self.fail(node.path, f"must be {what}, not {_kind(node.value)}")
        return cast(list[_Node], node.value)

    def get(self, parent: _Node, name: str) -> _Node | None:
        """The child ``name`` (any case) of a mapping node; None if absent or null."""
        items = self.mapping(parent)
        keys = [key for key in items if key.casefold() == name.casefold()]
        if len(keys) > 1:
            spelled = ", ".join(repr(k) for k in keys)
            self.fail(
                _child_path(parent.path, name),
                f"{name} is given more than once ({spelled}); recipe keys ignore case",
            )
        if not keys or items[keys[0]].value is None:
            return None
        return items[keys[0]]

    def where(self, parent: _Node, name: str) -> str:
        """The path of the child ``name``, spelled as the file spells it if present."""
        for key, child in cast(dict[str, _Node], parent.value).items():
            if key.casefold() == name.casefold():
                return child.path
        return _child_path(parent.path, name)

    def text(self, node: _Node) -> str:
        """A string; numbers are accepted as text, as Greengrass's reader does."""
        value = node.value
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        self.fail(node.path, f"must be a string, not {_kind(value)}")

    def required_text(self, parent: _Node, name: str) -> tuple[str, _Node]:
        node = self.get(parent, name)
        if node is None:
            self.fail(self.where(parent, name), f"{name} is required")
        if not isinstance(node.value, str):
            self.fail(node.path, f"must be a string, not {_kind(node.value)}")
        if not node.value.strip():
            self.fail(node.path, "must not be empty")
        return node.value, node

    def optional_text(self, parent: _Node, name: str, default: str = "") -> str:
        node = self.get(parent, name)
        return default if node is None else self.text(node)

    # the recipe

    def recipe(self, document: Any) -> Recipe:
        if not isinstance(document, Mapping):
            self.fail(None, f"a recipe must be a mapping at the top level, not {_kind(document)}")
        root = _wrap(document, "")
        format_version, node = self.required_text(root, "RecipeFormatVersion")
        if format_version != RECIPE_FORMAT_VERSION:
            self.fail(
                node.path,
                f"unsupported recipe format {format_version!r}: "
                f"the only format is {RECIPE_FORMAT_VERSION!r}",
            )
        name, node = self.required_text(root, "ComponentName")
        self.check_name(name, node.path)
        component_type = self.optional_text(root, "ComponentType", GENERIC_TYPE)
        if component_type not in COMPONENT_TYPES:
            self.fail(
                self.where(root, "ComponentType"),
                f"unknown component type {component_type!r}: "
                f"use one of {', '.join(sorted(COMPONENT_TYPES))}",
            )
        return Recipe(
            format_version=format_version,
            name=name,
            version=self.version(root),
            type=component_type,
            description=self.optional_text(root, "ComponentDescription"),
            publisher=self.optional_text(root, "ComponentPublisher"),
            default_configuration=self.default_configuration(root),
            dependencies=self.dependencies(root),
            manifests=self.manifests(root),
            source=self.source,
            raw=dict(document),
        )

    def check_name(self, name: str, path: str) -> None:
        if len(name) > _NAME_MAX:
            self.fail(path, f"a component name must be at most {_NAME_MAX} characters")
        if not _NAME.fullmatch(name):
            self.fail(
                path,
                f"{name!r} is not a valid component name: use letters, digits, '.', '-', '_'",
            )

    def version(self, root: _Node) -> Version:
        node = self.get(root, "ComponentVersion")
        if node is None:
            self.fail(self.where(root, "ComponentVersion"), "ComponentVersion is required")
        if not isinstance(node.value, str):
            self.fail(
                node.path,
                f"must be a string such as '1.0.0', not {_kind(node.value)} "
                "(quote it in YAML: 1.0 is read as a number)",
            )
        text = node.value
        if len(text) > _VERSION_MAX:
            self.fail(node.path, f"a component version must be at most {_VERSION_MAX} characters")
        try:
            version = Version.parse(text)
        except ValueError as err:
            self.fail(node.path, f"not a semantic version MAJOR.MINOR.PATCH: {err}")
        release = _RELEASE.match(text)
        if release and any(int(part) > _VERSION_PART_MAX for part in release.groups()):
            self.fail(node.path, f"major, minor and patch must each be at most {_VERSION_PART_MAX}")
        return version

    def default_configuration(self, root: _Node) -> dict[str, Any]:
        node = self.get(root, "ComponentConfiguration")
        if node is None:
            return {}
        self.mapping(node)
        defaults = self.get(node, "DefaultConfiguration")
        if defaults is None:
            return {}
        self.mapping(defaults, "a mapping (a JSON object)")
        return cast(dict[str, Any], _unwrap(defaults))

    def dependencies(self, root: _Node) -> dict[str, Dependency]:
        node = self.get(root, "ComponentDependencies")
        if node is None:
            return {}
        result = {}
        for name, dep in self.mapping(node, "a mapping of component name to dependency").items():
            self.check_name(name, dep.path)
            self.mapping(dep, "a mapping with VersionRequirement")
            req = self.get(dep, "VersionRequirement")
            if req is None:
                self.fail(self.where(dep, "VersionRequirement"), "VersionRequirement is required")
            try:
                requirement = Range.parse(self.text(req))
            except ValueError as err:
                self.fail(req.path, f"not an npm-style version range: {err}")
            dep_type = self.optional_text(dep, "DependencyType", "HARD").upper()
            if dep_type not in ("HARD", "SOFT"):
                self.fail(
                    self.where(dep, "DependencyType"),
                    f"must be HARD or SOFT, not {dep_type!r}",
                )
            result[name] = Dependency(name, requirement, dep_type == "HARD")
        return result

    # manifests

    def manifests(self, root: _Node) -> tuple[Manifest, ...]:
        node = self.get(root, "Manifests")
        if node is None:
            self.fail(
                self.where(root, "Manifests"),
                "Manifests is required: list at least one (a manifest without Platform "
                "matches every device)",
            )
        items = self.sequence(node, "a list of manifests")
        if not items:
            self.fail(node.path, "must list at least one manifest")
        for item in items:
            if item.value is None:
                self.fail(item.path, "a manifest must not be empty (null)")
            self.mapping(item)
        global_lifecycle = self.get(root, "Lifecycle")
        if global_lifecycle is not None:
            self.mapping(global_lifecycle)
        selections = [self.selections(item) for item in items]
        keywords = frozenset({"all"}.union(*selections))
        return tuple(
            self.manifest(item, chosen, global_lifecycle, keywords)
            for item, chosen in zip(items, selections, strict=True)
        )

    def selections(self, manifest: _Node) -> tuple[str, ...]:
        node = self.get(manifest, "Selections")
        if node is None:
            return ()
        return tuple(self.text(s) for s in self.sequence(node, "a list of selection keys"))

    def manifest(
        self,
        node: _Node,
        selections: tuple[str, ...],
        global_lifecycle: _Node | None,
        keywords: frozenset[str],
    ) -> Manifest:
        name_node = self.get(node, "Name")
        lifecycle_node = self.get(node, "Lifecycle")
        if lifecycle_node is not None:
            self.mapping(lifecycle_node)
        if lifecycle_node is not None and lifecycle_node.value:
            lifecycle = self.lifecycle(lifecycle_node)
        elif global_lifecycle is not None:
            selected = _select(global_lifecycle, keywords, selections)
            lifecycle = self.lifecycle(selected) if selected is not None else Lifecycle()
        else:
            lifecycle = Lifecycle()
        return Manifest(
            platform=self.platform(self.get(node, "Platform")),
            name=None if name_node is None else self.text(name_node),
            lifecycle=lifecycle,
            artifacts=self.artifacts(self.get(node, "Artifacts")),
            selections=selections,
        )

    def platform(self, node: _Node | None) -> dict[str, str]:
        if node is None:
            return {}
        result = {}
        for key, child in self.mapping(node).items():
            value = child.value
            if value is None:
                continue
            if isinstance(value, str):
                template = value
            elif isinstance(value, list):
                template = self.alternatives(key, child)
            else:
                self.fail(child.path, f"must be a string or a list of strings, not {_kind(value)}")
            if _is_regex(template):
                try:
                    re.compile(template[1:-1])
                except re.error as err:
                    self.fail(child.path, f"invalid regular expression {template!r}: {err}")
            result[key] = template
        return result

    def alternatives(self, key: str, node: _Node) -> str:
        # Greengrass accepts a list of alternatives; fold it into one /regex/ so that
        # Manifest.platform stays a mapping of strings.
        parts = []
        for item in self.sequence(node, "a list of strings"):
            if not isinstance(item.value, str):
                self.fail(item.path, f"must be a string, not {_kind(item.value)}")
            value = item.value
            if value == "*":
                return "*"
            if value == "//":
                parts.append(".+")
            elif _is_regex(value):
                parts.append(f"(?:{value[1:-1]})")
            elif key.casefold() in ("os", "architecture") and value.lower() in ("all", "any"):
                parts.append(".*")
            else:
                parts.append(re.escape(value))
        return "/" + ("|".join(parts) if parts else "(?!)") + "/"

    # lifecycle

    def lifecycle(self, node: _Node) -> Lifecycle:
        self.mapping(node)
        steps = {}
        for step in StepName:
            child = self.get(node, step.name.title())
            if child is not None:
                steps[step] = self.step(child, step)
        return Lifecycle(setenv=self.setenv(self.get(node, "Setenv")), steps=steps)

    def step(self, node: _Node, step: StepName) -> Step:
        default_timeout = STEP_TIMEOUT_DEFAULTS[step]
        if isinstance(node.value, str):
            return Step(script=node.value, timeout=default_timeout)
        if not isinstance(node.value, dict):
            self.fail(
                node.path,
                f"a lifecycle step must be a script (a string) or a mapping with Script, "
                f"not {_kind(node.value)}",
            )
        script = self.get(node, "Script")
        if script is None:
            self.fail(self.where(node, "Script"), "Script is required in a lifecycle step")
        if not isinstance(script.value, str):
            self.fail(script.path, f"must be a string, not {_kind(script.value)}")
        return Step(
            script=script.value,
            timeout=self.timeout(self.get(node, "Timeout"), default_timeout),
            requires_privilege=self.boolean(self.get(node, "RequiresPrivilege")),
            setenv=self.setenv(self.get(node, "Setenv")),
            skipif=self.skipif(self.get(node, "Skipif")),
        )

    def timeout(self, node: _Node | None, default: float | None) -> float | None:
        if node is None:
            return default
        value = node.value
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = float(value.strip())
            except ValueError:
                seconds = None
        if seconds is None:
            self.fail(node.path, f"must be a number of seconds, not {_kind(value)} {value!r}")
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(node.path, f"must be a positive number of seconds, not {value!r}")
        return seconds

    def boolean(self, node: _Node | None) -> bool:
        if node is None:
            return False
        value = node.value
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        self.fail(node.path, f"must be true or false, not {value!r}")

    def setenv(self, node: _Node | None) -> dict[str, str]:
        if node is None:
            return {}
        result = {}
        for name, child in self.mapping(node, "a mapping of variable name to value").items():
            if not name or "=" in name or "\0" in name:
                self.fail(child.path, f"{name!r} is not a valid environment variable name")
            value = child.value
            if value is None:
                result[name] = ""
            elif isinstance(value, bool):
                result[name] = "true" if value else "false"
            elif isinstance(value, str | int | float):
                result[name] = str(value)
            else:
                self.fail(
                    child.path, f"an environment variable must be a string, not {_kind(value)}"
                )
        return result

    def skipif(self, node: _Node | None) -> SkipIf | None:
        if node is None:
            return None
        if not isinstance(node.value, str):
            self.fail(node.path, f"must be a string, not {_kind(node.value)}")
        expression = node.value.strip()
        negate = expression.startswith("!")
        if negate:
            expression = expression[1:].strip()
        match = _SKIPIF.fullmatch(expression)
        if match is None:
            self.fail(
                node.path,
                f"{node.value!r} is not a skip check: use 'onpath <executable>' or 'exists <file>'",
            )
        kind = cast(Literal["onpath", "exists"], match.group(1))
        return SkipIf(kind=kind, target=match.group(2), negate=negate)

    # artifacts

    def artifacts(self, node: _Node | None) -> tuple[Artifact, ...]:
        if node is None:
            return ()
        result = []
        seen: dict[str, str] = {}
        for item in self.sequence(node, "a list of artifacts"):
            if item.value is None:
                self.fail(item.path, "an artifact must not be empty (null)")
            self.mapping(item)
            artifact = self.artifact(item)
            uri_path = self.where(item, "URI")
            if not artifact.file_name:
                self.fail(uri_path, f"{artifact.uri!r} names no file")
            if artifact.file_name in seen:
                self.fail(
                    uri_path,
                    f"file name {artifact.file_name!r} is already used by "
                    f"{seen[artifact.file_name]}: artifact file names must be unique",
                )
            seen[artifact.file_name] = item.path
            result.append(artifact)
        return tuple(result)

    def artifact(self, node: _Node) -> Artifact:
        uri, uri_node = self.required_text(node, "URI")
        if not _URI_SCHEME.match(uri):
            self.fail(
                uri_node.path,
                f"{uri!r} has no scheme: write s3://bucket/key, greengrass:name, docker:image ...",
            )
        algorithm_node = self.get(node, "Algorithm")
        algorithm = "SHA-256" if algorithm_node is None else self.text(algorithm_node).upper()
        if algorithm not in _ALGORITHMS:
            self.fail(
                self.where(node, "Algorithm"),
                f"unsupported digest algorithm {algorithm!r}: use one of {', '.join(_ALGORITHMS)}",
            )
        digest_node = self.get(node, "Digest")
        digest: str | None = None
        if digest_node is not None:
            digest = self.text(digest_node)
            try:
                raw = base64.b64decode(digest, validate=True)
            except (binascii.Error, ValueError) as err:
                self.fail(digest_node.path, f"must be base64 text: {err}")
            if len(raw) != _DIGEST_SIZES[algorithm]:
                self.fail(
                    digest_node.path,
                    f"a {algorithm} digest is {_DIGEST_SIZES[algorithm]} bytes, "
                    f"this one decodes to {len(raw)}",
                )
        unarchive = self.optional_text(node, "Unarchive", "NONE").upper()
        if unarchive not in ("NONE", "ZIP"):
            self.fail(self.where(node, "Unarchive"), f"must be NONE or ZIP, not {unarchive!r}")
        read: Permission = "OWNER"
        execute: Permission = "NONE"
        permission = self.get(node, "Permission")
        if permission is not None:
            self.mapping(permission)
            read = self.permission(permission, "Read", read)
            execute = self.permission(permission, "Execute", execute)
        return Artifact(
            uri=uri,
            digest=digest,
            algorithm=algorithm,
            unarchive=cast(Literal["NONE", "ZIP"], unarchive),
            read=read,
            execute=execute,
        )

    def permission(self, node: _Node, name: str, default: Permission) -> Permission:
        value = self.optional_text(node, name, default).upper()
        for allowed in _PERMISSIONS:
            if value == allowed:
                return allowed
        self.fail(self.where(node, name), f"must be NONE, OWNER or ALL, not {value!r}")


# --- public entry points --------------------------------------------------------------


def parse_recipe(
    data: str | bytes | Mapping[str, Any],
    *,
    source: str,
    fmt: Literal["json", "yaml"] | None = None,
) -> Recipe:
    """Parse and validate a recipe; ``source`` names it in errors (usually the file path).

    ``fmt`` None guesses from the text: JSON if it starts with ``{``, else YAML.
    Raises RecipeError naming the source, the field path and the reason.
    """
    document = data if isinstance(data, Mapping) else _load_document(data, source=source, fmt=fmt)
    return _Parser(source).recipe(document)


def load_recipe(path: Path) -> Recipe:
    """Read and parse one ``.json``, ``.yaml`` or ``.yml`` recipe file."""
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise RecipeError(
            f"unsupported recipe file type {path.suffix!r}: use .json, .yaml or .yml",
            source=str(path),
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(
            f"cannot read the recipe: {err.strerror or err}", source=str(path)
        ) from err
    return parse_recipe(data, source=str(path), fmt=cast(Literal["json", "yaml"], fmt))


def load_recipe_dir(path: Path) -> list[Recipe]:
    """Every recipe file directly in a folder, sorted by file name.

    Two files defining the same name@version is an error that names both.
    """
    if not path.is_dir():
        raise RecipeError("not a folder of recipes", source=str(path))
    recipes: list[Recipe] = []
    seen: dict[tuple[str, str], Recipe] = {}
    for file in sorted(path.iterdir()):
        if file.name.startswith(".") or file.suffix.lower() not in _SUFFIXES:
            continue
        if not file.is_file():
            continue
        recipe = load_recipe(file)
        key = (recipe.name, str(recipe.version))
        if key in seen:
            raise RecipeError(
                f"{recipe.name}@{recipe.version} is defined twice: here and in "
                f"{seen[key].source}; keep one",
                source=recipe.source,
                field="ComponentVersion",
            )
        seen[key] = recipe
        recipes.append(recipe)
    return recipes
