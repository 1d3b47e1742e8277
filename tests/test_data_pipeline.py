"""The three tiers on crafted sources: manifests, the cleaning report, bad input, idempotence, verification."""
import json
import os
import unicodedata

import numpy as np
import pyarrow.parquet as pq
import pytest

from megaseek.config.schema import ConfigError
from megaseek.data.pipeline import prepare
from megaseek.data.shards import doc_ends, open_shard
from megaseek.data.spec import DataSpec
from megaseek.data.tiers import read_manifest, sha256_file, verify_tier
from megaseek.data.tokenizer import load_tokenizer
from tests.test_data_common import change_words, chinese, data_config, prose, write_jsonl, write_parquet


def make_sources(tmp_path):
    """Three sources with known bad input; returns (sources config, expectations)."""
    d = tmp_path / "src"
    (d / "text" / "sub").mkdir(parents=True)
    (d / "text" / "a.txt").write_text(prose(1))
    (d / "text" / "b.md").write_text("# Title\n\n" + prose(2))
    (d / "text" / "sub" / "c.py").write_text("def f(x):\n    return x + 1\n\n# " + prose(3))
    (d / "text" / "zh.txt").write_text(chinese(4))
    (d / "text" / "empty.txt").write_bytes(b"")
    (d / "text" / "blob.txt").write_bytes(b"\x00\x01\x02binary" * 50)
    (d / "text" / "latin1.txt").write_bytes(prose(5).encode("latin-1") + "ÿ".encode("latin-1") * 40)
    (d / "text" / "fixable.txt").write_bytes(prose(6).encode() + b"\xff" + prose(7).encode())   # one bad byte
    (d / "text" / "skipped.json").write_text("{}")                     # not a source extension
    base = prose(10, 300)
    web = [{"text": prose(11)}, {"text": base}, "{not json", {"body": prose(12)}, {"text": 42},
           {"text": None}, {"text": prose(11)}, {"text": change_words(base, [5, 150, 280])}, [1, 2],
           {"meta": 1, "text": chinese(13)}]
    write_jsonl(d / "web.jsonl.zst", web, "zst")
    bad_utf8 = d / "web.jsonl.zst"
    dom = write_parquet(d / "domain.parquet", [prose(20), None, "tiny", prose(21)])
    sources = {"text": {"path": str(d / "text"), "weight": 0.5}, "web": {"path": str(bad_utf8), "weight": 0.3},
               "domain": {"path": str(dom), "text_field": "text", "weight": 0.2}}
    return sources


def spec_of(tmp_path, sources, **over):
    return DataSpec.from_config(data_config(tmp_path / "data", sources, **over))


def test_tiers_manifests_report_and_tokens(tmp_path):
    sources = make_sources(tmp_path)
    spec = spec_of(tmp_path, sources)
    logs = []
    tok_dir = prepare(spec, log=logs.append)

    raw = read_manifest(spec.tier_dir("raw"))
    assert raw["counts"] == {"text": 8, "web": 1, "domain": 1}          # .json is not a source file
    for o, i in zip(raw["outputs"], raw["inputs"]):                    # byte copies, hashed
        assert sha256_file(spec.tier_dir("raw") / o["path"]) == o["sha256"] == sha256_file(i["path"])
    assert set(raw["tools"]) >= {"python", "pyarrow", "tokenizers", "datasketch", "numpy"}

    cleaned = read_manifest(spec.tier_dir("cleaned"))
    assert cleaned["counts"] == {"text": {"docs_in": 8, "docs_out": 5}, "web": {"docs_in": 10, "docs_out": 3},
                                 "domain": {"docs_in": 4, "docs_out": 2}}
    assert cleaned["config"]["web"]["clean"]["near_threshold"] == 0.6
    rows = {o["source"]: o["docs"] for o in cleaned["outputs"]}
    assert rows == {"text": 5, "web": 3, "domain": 2}
    report = {s["source"]: s for s in json.loads((spec.tier_dir("cleaned") / "report.json").read_text())["sources"]}
    web = report["web"]
    bad = {(e["origin"].rsplit("/", 1)[-1], e["reason"]) for e in web["bad_input"]["examples"]}
    assert bad == {("web.jsonl.zst:3", "malformed_json"), ("web.jsonl.zst:4", "missing_field"),
                   ("web.jsonl.zst:5", "field_not_text"), ("web.jsonl.zst:6", "null_text"),
                   ("web.jsonl.zst:9", "not_an_object")}
    assert web["duplicates"] == {"exact": 1, "near": 1}
    steps = {s["step"]: (s["docs_in"], s["docs_out"]) for s in web["steps"]}
    assert steps["input"] == (10, 5) and steps["exact_dedup"] == (5, 4) and steps["near_dedup"] == (4, 3)
    text = report["text"]
    # the latin-1 file has too many undecodable bytes to repair: dropped and reported
    assert text["bad_input"]["counts"] == {"empty_file": 1, "binary_file": 1, "invalid_utf8": 1}
    # the file with one undecodable byte is repaired (the byte removed), kept, and reported
    assert text["repaired_utf8"]["docs"] == 1 and text["repaired_utf8"]["bytes_removed"] == 1
    assert text["repaired_utf8"]["examples"][0].endswith("text/fixable.txt")
    assert report["domain"]["removed"]["null_text"]["docs"] == 1 and report["domain"]["removed"]["too_short"]
    # the CJK document survives cleaning: only NFKC touches it (full-width comma -> ',')
    web_texts = pq.read_table(spec.tier_dir("cleaned") / "web" / "part-00000-000.parquet").column("text").to_pylist()
    assert unicodedata.normalize("NFKC", chinese(13)) in web_texts and "，" in chinese(13)

    index = json.loads((tok_dir / "index.json").read_text())
    tok = load_tokenizer(tok_dir / "tokenizer.json")
    eos = index["eos_id"]
    assert eos == tok.token_to_id("<|endoftext|>") and tok.get_vocab_size() <= 400
    shard = tok_dir / index["sources"]["web"]["shards"][0]["path"]
    tokens, ends = open_shard(shard), doc_ends(shard)
    assert len(ends) == 3 and ends[-1] == len(tokens) and (tokens[ends - 1] == eos).all()
    first = tok.decode(tokens[:ends[0] - 1].tolist())
    assert first == web_texts[0]                                       # lossless byte-level BPE
    tm = read_manifest(tok_dir)
    assert tm["counts"]["web"] == {"tokens": len(tokens), "docs": 3}
    assert tm["inputs"]["cleaned_digest"] == cleaned["digest"] and cleaned["inputs"]["raw_digest"] == raw["digest"]
    for tier in ("raw", "cleaned", "tokenized"):
        assert verify_tier(spec.tier_dir(tier)) == []


def test_rerun_does_nothing_and_changes_rebuild_only_later_tiers(tmp_path):
    sources = make_sources(tmp_path)
    spec = spec_of(tmp_path, sources)
    prepare(spec, log=lambda m: None)
    stamp = {t: os.stat(spec.tier_dir(t) / "manifest.json").st_mtime_ns for t in ("raw", "cleaned", "tokenized")}
    logs = []
    prepare(spec_of(tmp_path, sources), log=logs.append)
    assert [m for m in logs if m.startswith("[data] ") and "ready" not in m] == []
    assert stamp == {t: os.stat(spec.tier_dir(t) / "manifest.json").st_mtime_ns for t in stamp}
    # a cleaning setting changes: raw is kept, cleaned and tokenized are rebuilt
    d = data_config(tmp_path / "data", sources)
    d["clean"]["min_chars"] = 2
    prepare(DataSpec.from_config(d), log=lambda m: None)
    assert os.stat(spec.tier_dir("raw") / "manifest.json").st_mtime_ns == stamp["raw"]
    assert read_manifest(spec.tier_dir("cleaned"))["counts"]["domain"]["docs_out"] == 3   # "tiny" passes now
    # data.rebuild=[cleaned] rebuilds that tier and the next, not raw
    d["rebuild"] = ["cleaned"]
    before = os.stat(spec.tier_dir("cleaned") / "manifest.json").st_mtime_ns
    prepare(DataSpec.from_config(d), log=lambda m: None)
    assert os.stat(spec.tier_dir("cleaned") / "manifest.json").st_mtime_ns != before
    assert os.stat(spec.tier_dir("raw") / "manifest.json").st_mtime_ns == stamp["raw"]
    d["rebuild"] = []
    # a changed input file is received again
    (tmp_path / "src" / "text" / "a.txt").write_text(prose(99))
    logs = []
    prepare(DataSpec.from_config(d), log=logs.append)
    assert any(m.startswith("[data] raw:") for m in logs)


def test_verify_finds_a_changed_file(tmp_path):
    sources = make_sources(tmp_path)
    tok_dir = prepare(spec_of(tmp_path, sources), log=lambda m: None)
    shard = next((tok_dir / "web").glob("*.bin"))
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    problems = verify_tier(tok_dir)
    assert len(problems) == 1 and "sha256" in problems[0] and shard.name in problems[0]
    with pytest.raises(RuntimeError, match="do not match their manifests"):
        prepare(spec_of(tmp_path, sources, verify=True), log=lambda m: None)


def test_bad_config_and_sources_fail_before_any_work(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"content": prose(1), "id": 1}])
    cases = [
        ({"web": {"path": str(tmp_path / "nope.jsonl")}}, r"data.sources.web.path=.*nope.jsonl does not exist"),
        ({"web": {"path": str(good)}}, r"text_field='text'.*fields there: \['content', 'id'\].*text_field"),
        ({"web": {"path": str(good), "weight": 0}}, r"data.sources.web.weight=0.0 must be > 0"),
        ({"web": {"path": str(good), "txt_field": "content"}}, r"unknown key\(s\) \['txt_field'\]"),
        ({"web": {"path": str(good), "text_field": "content", "clean": {"min_char": 3}}}, r"unknown key\(s\) \['min_char'\]"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_bytes(b"")
    (empty / "b.txt").write_bytes(b"\x00\xff" * 10)
    cases.append(({"e": {"path": str(empty)}}, r"data.sources.e: nothing to read in 2 file\(s\)"))
    (tmp_path / "nofiles").mkdir()
    cases.append(({"e": {"path": str(tmp_path / "nofiles")}}, r"data.sources.e.path=.*: no files ending in"))
    cases.append(({"p": {"path": str(write_parquet(tmp_path / "p.parquet", ["x"], column="body"))}},
                  r"p.parquet has no such column; columns: \['body', 'id'\]"))
    for sources, message in cases:
        with pytest.raises(ConfigError, match=message):
            prepare(spec_of(tmp_path, sources), log=lambda m: None)
    assert not (tmp_path / "data" / "raw").exists()                  # nothing was built
    # a source that cleans down to nothing names itself and the reasons
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "hi"}, {"text": "yo"}])
    with pytest.raises(ConfigError, match=r"data.sources.t: no document is left after cleaning.*too_short 2"):
        prepare(spec_of(tmp_path, {"t": {"path": str(tiny)}}), log=lambda m: None)


def test_json_lines_plain_gz_zst_and_workers_agree(tmp_path):
    recs = [{"text": prose(i)} for i in range(30)] + ["{broken"]
    texts, digests = [], []
    for comp, workers in (("", 1), ("gz", 1), ("zst", 1), ("zst", 2)):
        f = write_jsonl(tmp_path / f"in{comp}" / ("w.jsonl" + (f".{comp}" if comp else "")), recs, comp)
        spec = spec_of(tmp_path / f"{comp}{workers}", {"w": {"path": str(f)}}, workers=workers)
        prepare(spec, log=lambda m: None)
        m = read_manifest(spec.tier_dir("cleaned"))
        assert m["counts"]["w"] == {"docs_in": 31, "docs_out": 30}
        part = spec.tier_dir("cleaned") / "w" / "part-00000-000.parquet"
        texts.append(pq.read_table(part).column("text").to_pylist())
        digests.append(m["digest"])
    assert texts[0] == texts[1] == texts[2] == texts[3]     # same content from any compression
    assert digests[2] == digests[3]                         # byte-identical tier with 1 or 2 worker processes


def test_tokenizer_loads_in_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast
    spec = spec_of(tmp_path, {"mix": {"path": str(write_jsonl(
        tmp_path / "m.jsonl", [{"text": prose(i)} for i in range(20)] + [{"text": chinese(i)} for i in range(5)]))}})
    tok_dir = prepare(spec, log=lambda m: None)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), eos_token="<|endoftext|>",
                                 pad_token="<|pad|>")
    text = "The river runs. 中文字符 and code: def f(x): return x"
    ids = hf(text)["input_ids"]
    assert hf.decode(ids) == text and hf.eos_token_id == 0 and hf.pad_token_id == 1
    assert max(ids) < 400 and len(hf) <= 400
    # an existing tokenizer file is used as is
    spec2 = spec_of(tmp_path / "b", {"mix": {"path": str(tmp_path / "m.jsonl")}},
                    tokenizer={"path": str(tok_dir / "tokenizer.json"), "vocab_size": 400,
                               "special_tokens": ["<|endoftext|>"]})
    tok2 = prepare(spec2, log=lambda m: None)
    assert sha256_file(tok2 / "tokenizer.json") == sha256_file(tok_dir / "tokenizer.json")
    assert np.array_equal(open_shard(next((tok2 / "mix").glob("*.bin"))),
                          open_shard(next((tok_dir / "mix").glob("*.bin"))))


def _square(x):
    return x * x


def _no_init():
    pass


def test_worker_pool_streams_in_order_with_a_bounded_window():
    """Memory does not grow with the input: at most `window` batches are read ahead of the results."""
    from megaseek.data.parallel import ordered_map
    for workers in (1, 2):
        consumed = []

        def items():
            for i in range(60):
                consumed.append(i)
                yield i

        for k, r in enumerate(ordered_map(_square, items(), workers, _no_init, (), window=4)):
            assert r == k * k                                  # in input order
            assert len(consumed) <= k + 1 + 4                  # bounded read-ahead
        assert len(consumed) == 60
