"""Fixtures shared by every test package (keep this small)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real-data folder ``../shared/data`` next to the repository (see its PROVENANCE.md)."""
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"real test data missing at {path}: the tests need ../shared/data")
    return path.resolve()
