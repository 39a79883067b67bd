"""`ponderlm data merge PART... --out DIR`: one data directory from several prepared apart.

For corpora that outgrow one machine: run `data prepare --tokenizer SHARED/tokenizer.json` on disjoint input
subsets (the split of a document depends only on its text and the seed, so it is the same on every machine), then
merge. Each split of the result is the parts' streams one after the other (where two parts meet, the leading EOS of
the second follows the closing EOS of the first). Shards are hard-linked into DIR (copied across file systems) and
checked against their sha256 on the way; nothing is re-tokenized.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ponderlm.data.outdir import TOKENIZER_FILE, building
from ponderlm.data.prepare import SPLITS
from ponderlm.data.shards import METADATA_FILE, read_metadata, write_json_atomic
from ponderlm.data.tokenizer import copy_tokenizer_files
from ponderlm.errors import PonderError
from ponderlm.files import atomic_path, sha256_file


def _check_parts(parts: list[Path]) -> list[dict]:
    if len(parts) < 2:
        raise PonderError("give at least two prepared data directories to merge")
    resolved = [part.resolve() for part in parts]
    if len(set(resolved)) < len(resolved):
        twice = next(part for part, path in zip(parts, resolved) if resolved.count(path) > 1)
        raise PonderError(f"{twice} is given twice; each part is merged once (its documents would be duplicated)")
    metas = [read_metadata(part) for part in parts]
    first = metas[0]["tokenizer"]
    for part, meta in zip(parts, metas):
        missing = [split for split in SPLITS if split not in meta["splits"]]
        if missing:
            raise PonderError(f"{part}/metadata.json has no {', '.join(missing)} split; prepare that part again")
        gone = [shard["file"] for split in SPLITS for shard in meta["splits"][split]["shards"]
                if not (part / shard["file"]).is_file()]
        if gone:
            raise PonderError(f"{part} lacks the shard {gone[0]} its metadata lists; prepare that part again")
    for part, meta in zip(parts[1:], metas[1:]):
        if meta["tokenizer"].get("sha256") != first.get("sha256"):
            raise PonderError(f"{part} was prepared with another tokenizer than {parts[0]}; prepare every part with "
                              f"--tokenizer {parts[0] / TOKENIZER_FILE}")
        if _split_settings(meta) != _split_settings(metas[0]):
            raise PonderError(f"{part} was split with another seed or other fractions than {parts[0]}")
    return metas


def _split_settings(meta: dict) -> tuple:
    """What decides a document's split: the seed and the rule (the documents a tiny part moved are its own)."""
    rule = {key: value for key, value in (meta.get("split_rule") or {}).items() if key != "moved"}
    return meta.get("seed"), rule


def _place(shard: Path, target: Path, sha256: str) -> None:
    if sha256_file(shard) != sha256:
        raise PonderError(f"shard {shard} fails its sha256 check (corrupt); prepare that part again")
    with atomic_path(target) as tmp:
        try:
            os.link(shard, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(shard, tmp)


def _merge_split(split: str, parts: list[Path], metas: list[dict], out: Path) -> dict:
    shards, tokens, documents = [], 0, 0
    for part, meta in zip(parts, metas):
        info = meta["splits"][split]
        for shard in info["shards"]:
            name = f"{split}_{len(shards):04d}.bin"
            _place(part / shard["file"], out / name, shard["sha256"])
            shards.append({**shard, "file": name})
        tokens, documents = tokens + info["tokens"], documents + info["documents"]
    return {"tokens": tokens, "documents": documents, "dtype": metas[0]["splits"][split]["dtype"], "shards": shards}


def merge(parts: list[Path], out: Path, overwrite: bool = False) -> dict:
    """Merge prepared data directories (same tokenizer, same split rule) into `out`; returns its metadata."""
    metas = _check_parts(parts)
    if any(out.resolve() == part.resolve() for part in parts):
        raise PonderError(f"--out {out} is one of the parts; merge into a new directory")
    with building(out, overwrite) as staging:
        splits = {split: _merge_split(split, parts, metas, staging) for split in SPLITS}
        copy_tokenizer_files(parts[0] / TOKENIZER_FILE, staging)
        metadata = {**{key: metas[0][key] for key in ("format", "tokenizer", "seed") if key in metas[0]},
                    "source": "merge", "split_rule": metas[0].get("split_rule"),
                    "parts": [{"path": str(part), "source": meta.get("source"), "sources": meta.get("sources", [])}
                              for part, meta in zip(parts, metas)],
                    "sources": [record for meta in metas for record in meta.get("sources", [])], "splits": splits}
        write_json_atomic(staging / METADATA_FILE, metadata)
    print(f"merged {len(parts)} parts into {out}: " + ", ".join(f"{s} {splits[s]['tokens']:,} tokens"
                                                                  for s in SPLITS), file=sys.stderr)
    return metadata
