"""No behaviour change from the training-loop redesign: the default config's first 20 steps (tiny model on the
embedded corpus, fp32; one process and dp=2 ZeRO-1) reproduce the per-step losses and grad norms recorded with
the code before it (tests/baseline/default_20_steps.json, written by tests/baseline/record.py) within 1e-6."""
import json
from pathlib import Path

import pytest

from tests.baseline.record import record

RECORDED = json.loads((Path(__file__).parent / "baseline" / "default_20_steps.json").read_text())


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The embedded corpus at the default data settings (those the baseline was recorded with)."""
    from megaseek.data.pipeline import prepare
    from megaseek.data.spec import DataSpec
    from tests.helpers import compose
    root = tmp_path_factory.mktemp("default_data")
    cfg = compose([f"data.root={root}"])
    prepare(DataSpec.from_config(cfg.data, vocab_size=int(cfg.model.vocab_size)), log=lambda *a: None)
    return root


def test_default_20_steps_reproduce_the_recorded_run(default_data, tmp_path):
    got = record(str(default_data), str(tmp_path))
    for layout, want in RECORDED.items():
        for key in ("loss", "grad_norm"):
            assert len(got[layout][key]) == len(want[key]) == 20
            diffs = [abs(a - b) for a, b in zip(got[layout][key], want[key])]
            assert max(diffs) < 1e-6, (layout, key, diffs)
