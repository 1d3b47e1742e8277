"""The cleaning stage on its engines: data.engine=local (this machine's processes, in-memory dedup) and
data.engine=dask (Dask tasks, dedup by shuffles; a LocalCluster started inside the job) keep the same
documents at any worker count; near duplicates are caught through the whole pipeline on a messy file; the
Dask dedup's memory does not grow with the corpus."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from megaseek.config.schema import ConfigError
from megaseek.data.neardup_bench import boilerplate_docs, draw, substitute, text_of
from megaseek.data.pipeline import preflight, prepare
from megaseek.data.prepare import default_data_config
from megaseek.data.spec import DataSpec
from megaseek.data.stage_clean import build_cleaned
from megaseek.data.stage_raw import build_raw
from megaseek.data.tiers import read_manifest, verify_tier
from tests.test_data_common import HAN, data_config

REPO = Path(__file__).resolve().parents[1]


def kept(cleaned_dir: Path, column: str = "hash") -> list:
    out = []
    for p in sorted(cleaned_dir.rglob("part-*.parquet")):
        out += pq.read_table(p, columns=[column]).column(column).to_pylist()
    return out


def cleaned_default(root: Path, engine: str, workers: int, max_bytes: int) -> Path:
    d = default_data_config(root=str(root), max_bytes=max_bytes, workers=workers, engine=engine, unit_bytes=200_000)
    d["tokenizer"]["vocab_size"] = 400
    spec = DataSpec.from_config(d)
    return build_cleaned(spec, build_raw(spec, preflight(spec), log=lambda m: None), log=lambda m: None)


@pytest.mark.slow
def test_dask_and_local_keep_the_same_documents_of_the_default_corpus_at_1_2_4_workers(tmp_path):
    ref = cleaned_default(tmp_path / "local", "local", 1, 5_000_000)
    want = kept(ref)
    rep = json.loads((ref / "report.json").read_text())["sources"][0]
    assert rep["duplicates"]["near"] >= 2 and len(set(want)) == len(want)       # the dedup had work to do
    for workers in (1, 2, 4):
        got = cleaned_default(tmp_path / f"dask{workers}", "dask", workers, 5_000_000)
        assert set(kept(got)) == set(want), workers
        assert read_manifest(got)["digest"] == read_manifest(ref)["digest"]      # byte-identical tier
        assert json.loads((got / "report.json").read_text())["sources"][0]["duplicates"] == rep["duplicates"]


def _cjk(rng: np.random.Generator, n: int) -> str:
    return "".join(HAN[i] for i in rng.integers(0, len(HAN), n)) + "。"


def messy_jsonl(path: Path) -> dict:
    """Latin and CJK documents with exact and near copies (k = 1..3 substituted words / characters), distinct
    documents sharing a 30-word header, malformed lines and invalid UTF-8. Returns what must come out."""
    rng = np.random.default_rng(7)
    lines, expect = [], {"originals": [], "copies": [], "distinct": [], "cjk": [], "cjk_copies": []}

    def add(text, group=None):
        lines.append(json.dumps({"text": text, "id": len(lines)}, ensure_ascii=False).encode())
        if group:
            expect[group].append(len(lines))                              # 1-based line number

    originals = [draw(rng, 75) for _ in range(30)]
    for w in originals:
        add(text_of(w), "originals")
    for i, w in enumerate(originals):
        add(text_of(substitute(w, 1 + i % 3, rng)), "copies")
    for w in originals[:5]:
        add(text_of(w))                                                      # exact copies
    for t in boilerplate_docs(distinct=40, doc_words=75, header_words=30, seed=11):
        add(t, "distinct")
    cjk = [_cjk(rng, 150) for _ in range(8)]
    for t in cjk:
        add(t, "cjk")
    for i, t in enumerate(cjk):
        chars = list(t)
        for p in rng.choice(149, size=1 + i % 3, replace=False):
            chars[p] = "龍"
        add("".join(chars), "cjk_copies")
    lines += [b"{not json", b"[1, 2]", b'{"body": "no text field"}', b'{"text": null}']
    bad = json.dumps({"text": text_of(draw(rng, 75))}).encode()
    lines.append(bad[:20] + b"\xff" + bad[20:])                             # one undecodable byte: repaired
    expect["repaired"] = len(lines)
    lines.append(b'{"text": "' + b"\xff\xfe" * 100 + text_of(draw(rng, 75)).encode() + b'"}')   # dropped
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expect


def test_near_duplicates_caught_through_the_whole_pipeline_on_a_messy_file(tmp_path):
    src = tmp_path / "web.jsonl"
    expect = messy_jsonl(src)
    digests = {}
    for engine in ("local", "dask"):
        spec = DataSpec.from_config(data_config(tmp_path / engine, {"web": {"path": str(src)}}, engine=engine,
                                                workers=2, verify=True))
        tok = prepare(spec, log=lambda m: None)
        cleaned = spec.tier_dir("cleaned")
        lines = {int(o.rsplit(":", 1)[1]) for o in kept(cleaned, "origin")}
        for group in ("originals", "distinct", "cjk"):                     # precision: none of these removed
            assert set(expect[group]) <= lines, (engine, group, set(expect[group]) - lines)
        caught = 1 - len(set(expect["copies"]) & lines) / len(expect["copies"])
        assert caught >= 0.95 and not set(expect["cjk_copies"]) & lines, (engine, caught)
        assert expect["repaired"] in lines and expect["repaired"] + 1 not in lines
        rep = json.loads((cleaned / "report.json").read_text())["sources"][0]
        assert rep["duplicates"]["exact"] == 5 and rep["duplicates"]["near"] == 30 + 8
        assert rep["bad_input"]["counts"] == {"malformed_json": 1, "not_an_object": 1, "missing_field": 1,
                                              "null_text": 1, "invalid_utf8": 1}
        assert rep["docs_out"] == len(lines) == 30 + 40 + 8 + 1
        assert read_manifest(tok)["counts"]["web"]["docs"] == rep["docs_out"]
        assert all(verify_tier(spec.tier_dir(t)) == [] for t in ("raw", "cleaned", "tokenized"))
        digests[engine] = (read_manifest(cleaned)["digest"], read_manifest(tok)["digest"])
    assert digests["local"] == digests["dask"]


_RSS = r"""
import json, sys, threading, time
from pathlib import Path
import psutil
sys.path.insert(0, {repo!r})

def main():
    from megaseek.data.clean import CleanConfig
    from megaseek.data.dedup import DedupParams
    from megaseek.data.engine_dask import DaskEngine
    work = Path({work!r})
    files = [(int(p.stem[2:]), str(p)) for p in sorted(work.glob("u-*.parquet"))]
    eng = DaskEngine(2)
    me = psutil.Process()
    peak = {{"driver": 0, "worker": 0}}
    done = threading.Event()
    def sample():
        while not done.is_set():
            peak["driver"] = max(peak["driver"], me.memory_info().rss)
            for c in me.children(recursive=True):
                try:
                    peak["worker"] = max(peak["worker"], c.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.02)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = eng.dedup(files, DedupParams(CleanConfig()), work / "drop")
    done.set(); t.join()
    eng.close()
    print(json.dumps({{"peak": peak, "removed": out, "units": len(files)}}))

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_dask_dedup_memory_stays_flat_from_1x_to_4x_the_corpus(tmp_path):
    """Peak RSS of the driver and of the largest worker during the Dask dedup of the default corpus at
    max_bytes 1.5 MB and 4x that (4x the documents and signatures): within 1.5x."""
    from megaseek.data.units import clean_unit, plan_units
    res = {}
    for scale in (1, 4):
        d = default_data_config(root=str(tmp_path / f"r{scale}"), max_bytes=1_500_000 * scale, workers=1)
        d["tokenizer"]["vocab_size"] = 400
        spec = DataSpec.from_config(d)
        raw = build_raw(spec, preflight(spec), log=lambda m: None)
        work = tmp_path / f"work{scale}"
        work.mkdir()
        (work / "drop").mkdir()
        for u in plan_units(raw, read_manifest(raw), "stdlib", 200_000):
            clean_unit((u, "stdlib", "text", spec.sources[0].clean, str(work)))
        out = subprocess.run([sys.executable, "-c", _RSS.format(repo=str(REPO), work=str(work))],
                             capture_output=True, text=True, timeout=600, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
        res[scale] = json.loads(out.stdout.strip().splitlines()[-1])
        print(scale, res[scale])
    assert res[4]["units"] >= 3 * res[1]["units"]
    for k in ("driver", "worker"):
        assert res[4]["peak"][k] <= 1.5 * res[1]["peak"][k], (k, res)


def test_engine_config_is_checked():
    for bad, msg in (({"engine": "spark"}, r"data.engine='spark': choose one of \['local', 'dask'\]"),
                     ({"dask": {"adress": "x"}}, r"data.dask: unknown key\(s\) \['adress'\]"),
                     ({"unit_bytes": -1}, r"data.unit_bytes=-1 must be >= 1"),
                     ({"clean": {"lsh_bands": 20}}, r"give both or neither"),
                     ({"clean": {"lsh_bands": 20, "lsh_rows": 7}}, r"at most num_perm=128")):
        d = default_data_config(root="/tmp/x")
        d["tokenizer"]["vocab_size"] = 400
        for k, v in bad.items():
            if isinstance(v, dict) and isinstance(d.get(k), dict):
                d[k].update(v)
            else:
                d[k] = v
        with pytest.raises(ConfigError, match=msg):
            DataSpec.from_config(d)
