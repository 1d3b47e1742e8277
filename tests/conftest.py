import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: launches the deepspeed launcher or many processes (kept in CI)")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The embedded corpus, tokenized once for the small test model (vocab 1001)."""
    from megaseek.data.prepare import ensure_default_dataset
    root = tmp_path_factory.mktemp("data")
    ensure_default_dataset(root, 1001, 1_500_000, 1_000_000, log=lambda *a: None)
    return root
