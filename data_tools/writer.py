"""Atomic, reproducible shard files and their done markers.

A shard is written to ``NAME.tar.tmp`` and renamed into place; then ``NAME.stats.json`` (also
atomic) records what went in. A shard counts as done only when both exist and the stats match
the current plan, so a killed run leaves at worst a ``.tmp`` that the next run deletes and redoes.
Tar headers are fixed (mtime 0, uid/gid 0, user ``vdm``, mode 0444): same samples, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from webdataset import TarWriter

STATS_SUFFIX = ".stats.json"


def shard_name(split: str, index: int) -> str:
    """``train-000000.tar``."""
    return f"{split}-{index:06d}.tar"


def stats_path(root: Path, name: str) -> Path:
    return root / (name[: -len(".tar")] + STATS_SUFFIX)


def fingerprint(options: dict) -> str:
    """A short stable hash of the options that decide shard content."""
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def write_shard(path: Path, samples: list[dict]) -> int:
    """Write samples (dicts from ``encode_sample``) to ``path`` atomically; returns the tar's size in bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = TarWriter(f, user="vdm", group="vdm", mode=0o444, mtime=0, encoder=False, compress=False)
        for sample in samples:
            writer.write(sample)
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def load_done(root: Path, name: str, plan_hash: str) -> dict | None:
    """The stats of a finished shard written by the same plan, else None (the shard must be redone)."""
    stats_file = stats_path(root, name)
    if not (root / name).is_file() or not stats_file.is_file():
        return None
    try:
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stats.get("plan") != plan_hash or stats.get("bytes") != (root / name).stat().st_size:
        return None
    return stats


def clean_output(root: Path, split: str, keep: set[str], everything: bool) -> list[str]:
    """Delete leftovers of earlier runs in ``root``: temp files, and shards/stats of ``split`` not in ``keep``.

    Only files this tool names (``{split}-NNNNNN.tar``, ``.stats.json``, ``.tmp``, the manifest when
    ``everything``) are touched, never anything else in the folder.
    """
    if not root.is_dir():
        return []
    ours = re.compile(rf"^{re.escape(split)}-\d{{6}}(\.tar|{re.escape(STATS_SUFFIX)})(\.tmp)?$")
    removed = []
    for path in sorted(root.iterdir()):
        name = path.name
        stale_tmp = name.endswith(".tmp") and (ours.match(name) or name == "manifest.json.tmp")
        shard = ours.match(name)
        base = re.sub(rf"{re.escape(STATS_SUFFIX)}$", ".tar", name)
        if stale_tmp or (shard and (everything or base not in keep)) or (everything and name == "manifest.json"):
            path.unlink()
            removed.append(name)
    return removed
