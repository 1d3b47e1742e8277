"""The seam to the trainer (build_data) and the command line (launch/prepare_data.py), through Hydra."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megaseek.config.schema import ConfigError
from megaseek.data.api import build_data
from megaseek.data.loader import BatchPlan, InterleavedWindows
from tests.helpers import compose
from tests.test_data_common import chinese, prose, write_jsonl, write_parquet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def blend_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    web = write_jsonl(d / "web.jsonl.zst", [{"text": prose(i, 400)} for i in range(120)]
                      + [{"text": chinese(i, 800)} for i in range(20)], "zst")
    dom = write_parquet(d / "domain.parquet", [prose(1000 + i, 300) for i in range(40)])
    return d, [f"data.sources.web.path={web}", f"data.sources.domain.path={dom}",
               "data.sources.code.max_bytes=300000", "data.workers=1", "data.tokenizer_sample_bytes=300000",
               "model.vocab_size=1001"]


def test_build_data_blends_named_sources_exactly(blend_sources, tmp_path):
    _, overrides = blend_sources
    cfg = compose(["data=blend_example", f"data.root={tmp_path}"] + overrides)
    logs = []
    b = build_data(cfg, 0, BatchPlan(20, 5, 2, 1), 32, 1234, log=logs.append)
    assert b.dataset_dir == tmp_path / "tokenized" / "blend_example" and b.tokenizer_path.is_file()
    loader = b.train
    src, _ = loader.data.windows(np.arange(3000))
    for w in range(3):   # web 0.7, code 0.2, domain 0.1: exact in every window of 1000 samples
        counts = np.bincount(src[w * 1000:(w + 1) * 1000], minlength=3)
        assert dict(zip(loader.data.names, counts.tolist())) == {"web": 700, "code": 200, "domain": 100}
    mbs = loader.micro_batches()
    assert len(mbs) == 2 and all(ids.shape == (5, 32) and int(ids.max()) < 1001 for ids, _ in mbs)
    assert isinstance(b.valid, InterleavedWindows) and len(b.valid) > 0
    ids, labels = b.valid.batch([0, 1, 2])
    assert ids.shape == (3, 32) and torch.equal(ids[:, 1:], labels[:, :-1])
    assert any("blend (window 1000): web 700/1000" in m for m in logs)
    # a second build reuses the tiers and resumes the position from a checkpoint's state
    state = loader.state_dict()
    b2 = build_data(cfg, 0, BatchPlan(20, 5, 2, 1), 32, 1234, log=lambda m: None)
    b2.train.load_state_dict(state)
    nxt1, nxt2 = loader.micro_batches(), b2.train.micro_batches()
    assert all(torch.equal(x[0], y[0]) for x, y in zip(nxt1, nxt2))


def test_contract_override_form_and_default_corpus(tmp_path):
    f = write_jsonl(tmp_path / "web.jsonl", [{"text": prose(i, 300)} for i in range(60)])
    cfg = compose([f"data.sources={{web:{{path:{f},text_field:text,weight:1.0}}}}", f"data.root={tmp_path / 'd'}",
                   "data.workers=1", "model.vocab_size=1001", "data.tokenizer_sample_bytes=100000"])
    b = build_data(cfg, 0, BatchPlan(8, 4, 1, 0), 32, 1, log=lambda m: None)
    assert b.train.data.names == ["web"] and len(b.train.micro_batches()) == 2
    with pytest.raises(ConfigError, match="data.tokenizer.vocab_size=2000 > model.vocab_size=1001"):
        build_data(compose(["data.tokenizer.vocab_size=2000", "model.vocab_size=1001"]), 0,
                   BatchPlan(8, 4, 1, 0), 32, 1, log=lambda m: None)


def _cli(*args):
    return subprocess.run([sys.executable, "launch/prepare_data.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_prepare_data_command_line(blend_sources, tmp_path):
    _, overrides = blend_sources
    args = ["data=blend_example", f"data.root={tmp_path}"] + overrides
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    assert "[data] cleaned:" in first.stdout and "[data] tokenized:" in first.stdout
    for tier in ("raw", "cleaned", "tokenized"):
        assert (tmp_path / tier / "blend_example" / "manifest.json").is_file()
    again = _cli(*args, "data.verify=true")
    assert again.returncode == 0 and "[data] cleaned:" not in again.stdout and "verified blend_example" in again.stdout
    bad = _cli("data=blend_example", f"data.root={tmp_path}", "data.sources.web.path=/no/such/file.jsonl")
    assert bad.returncode == 2 and "config error: data.sources.web.path=/no/such/file.jsonl does not exist" in bad.stderr


def _two_ranks(rank, world, good, bad):
    """Each rank: build_data for a good config, then for one whose source path is missing."""
    from tests.helpers import init_gloo
    init_gloo(rank, world)
    out = {}
    b = build_data(compose(good), rank, BatchPlan(8, 2, world, rank), 32, 5, log=lambda m: None)
    out["batches"] = [[ids.tolist() for ids, _ in b.train.micro_batches()] for _ in range(2)]
    try:
        build_data(compose(bad), rank, BatchPlan(8, 2, world, rank), 32, 5, log=lambda m: None)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


@pytest.mark.slow
def test_two_ranks_prepare_once_and_read_disjoint_slices(tmp_path):
    from tests.helpers import run_world
    f = write_jsonl(tmp_path / "web.jsonl", [{"text": prose(i, 300)} for i in range(60)])
    common = [f"data.root={tmp_path / 'd'}", "data.workers=1", "model.vocab_size=1001",
              "data.tokenizer_sample_bytes=100000"]
    good = [f"data.sources={{web:{{path:{f},text_field:text,weight:1.0}}}}"] + common
    bad = ["data.sources={web:{path:/no/such.jsonl}}", "data.name=other"] + common
    r0, r1 = run_world(2, _two_ranks, good, bad, timeout=300)
    one = build_data(compose(good), 0, BatchPlan(8, 4, 1, 0), 32, 5, log=lambda m: None).train
    for k in range(2):
        whole = [row for ids, _ in one.micro_batches() for row in ids.tolist()]
        ranks = [row for mb in r0["batches"][k] + r1["batches"][k] for row in mb]
        assert ranks == whole                  # rank 0's slice then rank 1's: the global batch, no overlap
    assert r0["error"].startswith("ConfigError: data.sources.web.path=/no/such.jsonl does not exist")
    assert r1["error"].startswith("RuntimeError: data preparation failed on another rank: ConfigError: "
                                  "data.sources.web.path=/no/such.jsonl")
