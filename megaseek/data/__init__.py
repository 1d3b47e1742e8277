"""The data pipeline: named sources -> raw/ -> cleaned/ -> tokenized/ under `data.root` -> the loader.

    python launch/prepare_data.py data=NAME [data.sources.x.path=...]      (or the trainer, on first use)

Modules, in the order data flows:
  spec.py           the `data` config, checked (ConfigError naming the field) before any work
  corpus.py         the embedded default corpus (this Python's standard library)
  readers.py        files of a source, records with file:line origins, the pre-flight probe
  stage_raw.py      raw/<name>/: input files as received, sha256 each
  clean.py          decode, normalize (NFKC), regex rules, quality filters (CJK-aware)
  dedup.py          exact (content hash) and near-duplicate math: MinHash (datasketch), LSH bands, pairs,
                    verification, connected components; the in-memory reference of the local engine
  units.py          the cleaning stage's units and their tasks (clean a unit, write a unit's kept documents)
  engine.py         data.engine=local: this machine's process pool, in-memory dedup; open_engine()
  engine_dask.py    data.engine=dask: Dask tasks, dedup by DataFrame shuffles on disk, components by rounds
  parallel.py       ordered, bounded process pool (streaming)
  stage_clean.py    cleaned/<name>/<source>/part-*.parquet + report.json (clean -> dedup -> write, on an engine)
  neardup_bench.py  the built-in near-duplicate benchmark (synthetic copies, shared boilerplate)
  report.py         per-step funnel, duplicates, top reasons, bad inputs with file and line
  tokenizer.py      byte-level BPE (Hugging Face tokenizers), loadable by PreTrainedTokenizerFast
  stage_tokenize.py tokenized/<name>/: tokenizer.json, token shards (EOS after every document), index.json
  shards.py         memory-mapped shards written atomically; TokenStream reads several as one
  tiers.py          manifests, fingerprints (skip / resume / rebuild), verification, locks
  pipeline.py       preflight, then the three stages
  blend.py          the global sample stream: exact weights per window, seeded, layout-independent
  loader.py         packed windows, per-rank micro-batches, resumable position, validation split
  api.py            build_data(): the trainer's only entry point
"""
