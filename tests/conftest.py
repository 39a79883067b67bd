"""Shared test fixtures."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_TEXTS = sorted((FIXTURES / "text").glob("*.txt"))


def pytest_configure(config):
    config.addinivalue_line("markers", "network: fetches real packages from PyPI/npm (slow, needs the internet)")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A prepared data directory (byte-level BPE, vocab 512) built from the fixture texts in a few seconds."""
    from ponderlm.data import prepare

    out = tmp_path_factory.mktemp("tiny_data")
    prepare(out, source="files", files=FIXTURE_TEXTS, vocab_size=512, cache_dir=tmp_path_factory.mktemp("cache"))
    return out
