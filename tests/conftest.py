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
    """The embedded corpus, prepared once (in this process) for the small test model (vocab 1001);
    training runs in spawned ranks find it whole and reuse it."""
    from megaseek.data.pipeline import prepare
    from megaseek.data.spec import DataSpec
    from tests.helpers import SMALL_DATA, SMALL_MODEL, compose
    root = tmp_path_factory.mktemp("data")
    cfg = compose(SMALL_MODEL + SMALL_DATA + [f"data.root={root}"])
    prepare(DataSpec.from_config(cfg.data, vocab_size=int(cfg.model.vocab_size)), log=lambda *a: None)
    return root
