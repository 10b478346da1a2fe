"""The hub's recipe store: one immutable recipe per component version."""

from __future__ import annotations

import json
from pathlib import Path

from edgeloop.core.errors import RecipeError
from edgeloop.core.recipe import Recipe, parse_recipe
from edgeloop.edge.store import write_json_atomic


class RecipeStore:
    """Recipes the hub has accepted, as ``<name>@<version>.json`` files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        # Versions are immutable, so a recipe parsed once stays right: every deployment
        # resolves over all stored recipes and must not re-read and re-parse them all.
        self._parsed: dict[tuple[str, str], Recipe] = {}

    def _file(self, name: str, version: str) -> Path:
        return self.path / f"{name}@{version}.json"

    def get(self, name: str, version: str) -> Recipe | None:
        """The stored recipe of one version, or None."""
        cached = self._parsed.get((name, version))
        if cached is not None:
            return cached
        file = self._file(name, version)
        if not file.exists():
            return None
        recipe = parse_recipe(file.read_text(encoding="utf-8"), source=str(file), fmt="json")
        self._parsed[(name, version)] = recipe
        return recipe

    def all(self) -> dict[tuple[str, str], Recipe]:
        """Every stored recipe, by (name, version)."""
        out: dict[tuple[str, str], Recipe] = {}
        for file in sorted(self.path.glob("*.json")):
            name, _, version = file.stem.rpartition("@")
            recipe = self.get(name, version)
            if recipe is not None:
                out[(recipe.name, str(recipe.version))] = recipe
        return out

    def check_immutable(self, recipe: Recipe) -> None:
        """Refuse a recipe that changes a version the hub already has."""
        stored = self.get(recipe.name, str(recipe.version))
        if stored is not None and _canonical(stored.raw) != _canonical(recipe.raw):
            raise RecipeError(
                f"{recipe.name} {recipe.version} is already on this hub with a different "
                "recipe; component versions are immutable, so publish a new version",
                source=recipe.source,
                field="ComponentVersion",
            )

    def save(self, recipe: Recipe) -> None:
        """Store a recipe (idempotent for identical content)."""
        write_json_atomic(self._file(recipe.name, str(recipe.version)), dict(recipe.raw))
        self._parsed.pop((recipe.name, str(recipe.version)), None)

    def remove(self, name: str, version: str) -> None:
        """Forget one version's recipe."""
        self._file(name, version).unlink(missing_ok=True)
        self._parsed.pop((name, version), None)


def _canonical(raw: object) -> str:
    return json.dumps(raw, sort_keys=True, default=str)
