"""The NAB development split, loaded once; tests that need it skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeloop.ml.nab_corpus import NabCorpus, default_root, load_corpus


@pytest.fixture(scope="session")
def nab_root() -> Path:
    root = default_root()
    if root is None:
        pytest.skip("no NAB corpus: set EDGELOOP_NAB or place it at ../shared/nab")
    return root


@pytest.fixture(scope="session")
def nab_corpus(nab_root: Path) -> NabCorpus:
    return load_corpus(nab_root)
