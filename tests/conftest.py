"""Fixtures shared by every test package (keep this small).

Tests use only data inside the repository: ``examples/`` (the bundled example, see its PROVENANCE.md) and
``tests/data/`` (small fixtures derived from public data, see ``tests/data/PROVENANCE.md``). A user's clone
has nothing beside it, so :func:`_no_reads_outside_the_repository` fails any test that opens a file in the
repository's parent folder outside the repository (a sibling data folder, say).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TEST_DATA = REPO / "tests" / "data"

_outside_reads: list[str] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    """Record opens of files that lie beside the repository (in its parent folder, outside it)."""
    if event != "open" or not isinstance(args[0], (str, os.PathLike)):
        return
    path = os.path.abspath(os.fspath(args[0]))
    parent = str(REPO.parent) + os.sep
    if path.startswith(parent) and not path.startswith(str(REPO) + os.sep):
        _outside_reads.append(path)


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _no_reads_outside_the_repository() -> Iterator[None]:
    """Fail a test that read a file beside the repository: a fresh clone has nothing there."""
    start = len(_outside_reads)
    yield
    read = _outside_reads[start:]
    if read:
        pytest.fail(f"the test opened files outside the repository, which a user's clone does not have: {read[:3]}")


@pytest.fixture(scope="session")
def examples() -> Path:
    """The repository's ``examples/`` folder (bundled real data, see its PROVENANCE.md)."""
    return EXAMPLES


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The repository's ``tests/data/`` folder (small committed fixtures, see its PROVENANCE.md)."""
    return TEST_DATA
