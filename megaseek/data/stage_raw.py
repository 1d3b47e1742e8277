"""Stage 1, raw/<name>/<source>/...: the input files as received (byte copies), with their sha256.

The stage's fingerprint is the sources' identity plus the listing (relative path, size, mtime) of
their files, so a changed input is received again; the weights, text fields and cleaning settings do
not matter here. Each file is copied under a temporary name and renamed, so a resumed copy keeps the
files that were finished.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from megaseek.data.readers import list_files
from megaseek.data.spec import DataSpec
from megaseek.data.tiers import PIPELINE_VERSION, PartialTier, content_digest, fingerprint, is_current, \
    output_entry, sha256_file


def listing(spec: DataSpec) -> dict:
    """source name -> [(path, relpath, size, mtime_ns)] (stat only: cheap)."""
    out = {}
    for src in spec.sources:
        rows = []
        for path, rel in list_files(src):
            st = path.stat()
            rows.append((str(path), rel, st.st_size, st.st_mtime_ns))
        out[src.name] = rows
    return out


def raw_fingerprint(spec: DataSpec, files: dict) -> str:
    return fingerprint({"stage": "raw", "version": PIPELINE_VERSION,
                        "sources": [s.identity() for s in spec.sources],
                        "files": {k: [r[1:] for r in v] for k, v in files.items()}})


def _copy(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, dst)
    return digest


def build_raw(spec: DataSpec, files: dict, force: bool = False, log=print) -> Path:
    final = spec.tier_dir("raw")
    fp = raw_fingerprint(spec, files)
    if is_current(final, fp) and not force:
        return final
    work = PartialTier(final, fp, fresh=force)
    outputs, inputs, nbytes = [], [], 0
    kept = 0
    for src in spec.sources:
        for path, rel, size, _ in files[src.name]:
            dst = work.dir / src.name / rel
            if work.resumed and dst.is_file() and dst.stat().st_size == size:
                digest = sha256_file(dst)
                kept += 1
            else:
                digest = _copy(Path(path), dst)
            outputs.append(output_entry(work.dir, dst, sha256=digest, source=src.name, origin=path))
            inputs.append({"source": src.name, "path": path, "bytes": size})
            nbytes += size
    if kept:
        log(f"[data] raw: resumed, kept {kept} files already copied")
    log(f"[data] raw: {len(outputs)} files, {nbytes / 1e6:.1f} MB -> {final}")
    return work.finish({"tier": "raw", "name": spec.name, "inputs": inputs, "outputs": outputs,
                        "digest": content_digest(outputs),
                        "counts": {s.name: len(files[s.name]) for s in spec.sources}, "bytes": nbytes,
                        "config": {"sources": [s.identity() for s in spec.sources]}})
