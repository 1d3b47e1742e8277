"""Interrupted stages: never a half-written shard that looks complete; a rerun resumes or restarts cleanly
and ends with the same bytes as an uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megaseek.data.pipeline import prepare
from megaseek.data.shards import ShardWriter, shard_is_complete, write_shard
from megaseek.data.spec import DataSpec
from megaseek.data.tiers import read_manifest, verify_tier
from tests.test_data_common import data_config, prose, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def corpus(tmp_path, n=60):
    return {"w": {"path": str(write_jsonl(tmp_path / "src" / "w.jsonl", [{"text": prose(i)} for i in range(n)]))}}


def spec_at(root, sources):
    return DataSpec.from_config(data_config(root, sources, part_bytes=4000))


def test_interrupted_shard_write_leaves_nothing_that_looks_complete(tmp_path):
    path = tmp_path / "s.bin"

    def docs():
        yield np.array([5, 6, 0])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shard(path, docs(), 100, {})
    assert not shard_is_complete(path) and list(tmp_path.iterdir()) == []
    w = ShardWriter(path, 100)
    w.add(np.array([1, 2, 3, 0, 4, 0]), np.array([4, 2]))
    assert not shard_is_complete(path)           # written, not closed: only the .tmp exists
    w.close()
    assert shard_is_complete(path)
    path.write_bytes(path.read_bytes()[:-2])    # truncated after the fact
    assert not shard_is_complete(path)


def test_partial_tokenized_tier_resumes_keeping_finished_shards(tmp_path):
    sources = corpus(tmp_path)
    ref = prepare(spec_at(tmp_path / "ref", sources), log=lambda m: None)
    ref_digest = read_manifest(ref)["digest"]
    shards = sorted((ref / "w").glob("*.bin"))
    assert len(shards) >= 4
    # simulate a crash in the middle of tokenization: the tier is back to .partial, shard 2 half written
    root = tmp_path / "ref" / "tokenized"
    partial = root / "default.partial"
    os.replace(ref, partial)
    (partial / "FINGERPRINT").write_text(read_manifest(partial)["fingerprint"])
    (partial / "manifest.json").unlink()
    (partial / "index.json").unlink()
    victim = shards[2].name
    (partial / "w" / victim).rename(partial / "w" / (victim + ".tmp"))
    (partial / "w" / victim.replace(".bin", ".json")).unlink()
    kept = partial / "w" / shards[0].name
    before = kept.stat().st_mtime_ns
    logs = []
    out = prepare(spec_at(tmp_path / "ref", sources), log=logs.append)
    assert any("resumed with" in m for m in logs)
    assert (out / "w" / shards[0].name).stat().st_mtime_ns == before       # finished shard kept, not rewritten
    assert read_manifest(out)["digest"] == ref_digest and verify_tier(out) == []
    assert not partial.exists() and not list(out.rglob("*.tmp"))
    # a partial directory from other settings is discarded, not mixed in
    stale = root / "default.partial"
    stale.mkdir()
    (stale / "FINGERPRINT").write_text("something else")
    (stale / "w").mkdir()
    (stale / "w" / "junk.bin").write_bytes(b"xx")
    shutil.rmtree(out)
    out = prepare(spec_at(tmp_path / "ref", sources), log=lambda m: None)
    assert read_manifest(out)["digest"] == ref_digest and not (out / "w" / "junk.bin").exists()


def _run_until(code: str, condition, timeout: float = 120.0) -> bool:
    """Start `code` in a fresh interpreter; SIGKILL it as soon as `condition()` holds. True if it was killed
    while working (False: it had finished first)."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    end = time.time() + timeout
    while proc.poll() is None and not condition() and time.time() < end:
        time.sleep(0.005)
    hit = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return hit


def _check_invariants(root: Path) -> None:
    for tier_dir in root.glob("*/*"):
        if tier_dir.name.endswith(".partial"):
            for idx in tier_dir.rglob("part-*.json"):
                assert shard_is_complete(idx.with_suffix(".bin")), idx
            assert read_manifest(tier_dir) is None or tier_dir.parent.name == "raw"
        elif tier_dir.is_dir():
            assert read_manifest(tier_dir) is not None and verify_tier(tier_dir) == [], tier_dir


def test_killed_mid_cleaning_and_mid_tokenizing_then_rerun_gives_the_same_tiers(tmp_path):
    """SIGKILL real runs while they write Parquet parts, then token shards: no tier without a manifest is
    promoted, every shard with an index is whole, and the rerun equals an uninterrupted run."""
    sources = corpus(tmp_path, n=1500)
    ref = prepare(spec_at(tmp_path / "ref", sources), log=lambda m: None)
    run = tmp_path / "run"
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from megaseek.data.pipeline import prepare\nfrom megaseek.data.spec import DataSpec\n"
            "from tests.test_data_common import data_config\n"
            "prepare(DataSpec.from_config(data_config(%r, %r, part_bytes=4000)), log=lambda m: None)\n"
            % (str(REPO), str(run), sources))
    cleaning = run / "cleaned" / "default.partial" / "w"
    assert _run_until(code, lambda: len(list(cleaning.glob("part-*.parquet"))) >= 2)
    assert not (run / "cleaned" / "default").exists()
    _check_invariants(run)
    tokenizing = run / "tokenized" / "default.partial" / "w"
    assert _run_until(code, lambda: len(list(tokenizing.glob("part-*.json"))) >= 3)
    assert not (run / "tokenized" / "default").exists() and (run / "cleaned" / "default").is_dir()
    _check_invariants(run)
    out = prepare(spec_at(run, sources), log=lambda m: None)
    assert read_manifest(out)["digest"] == read_manifest(ref)["digest"]
    assert read_manifest(run / "cleaned" / "default")["digest"] == \
        read_manifest(tmp_path / "ref" / "cleaned" / "default")["digest"]
