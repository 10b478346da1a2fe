"""Fixtures for CLI tests: the real hub from the hub tests."""

from __future__ import annotations

# Re-exported so that CLI tests can run a real agent; pytest_plugins is not allowed in a
# conftest below the root folder.
from tests.edge.conftest import hub, hub_factory

__all__ = ["hub", "hub_factory"]
