"""Shard specs as users write them -> lists of shard URLs with their sample counts.

A spec is a vdm-shard directory (or its ``manifest.json``), a brace pattern or glob of tar files,
a URL, or a ``pipe:`` command (braces expand inside it too). Per-shard counts come from the
``manifest.json`` beside the shards; for ``pipe:`` commands, from the manifest beside any local
path the command names (``pipe:cat data/train-000001.tar``). Remote sources without a local
manifest resolve with unknown counts, which only the resampled mode can stream, unless the spec is a
mapping ``{urls: SPEC, manifest: LOCAL_DIR}`` whose manifest names the shards (matched by file name). The datasets'
manifests are then merged and checked against the run's config, so mismatches fail at start.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from vdm.data.format import MANIFEST_NAME, VAL_DIR, Manifest, read_manifest

RAW_MEDIA = (".gif", ".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v")
_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://", "file:")


@dataclass
class Shard:
    """One tar shard: where to read it and how many samples it holds (None: unknown)."""

    url: str
    samples: int | None


@dataclass
class ShardSet:
    """The shards of one dataset spec, with the manifest that describes them (if one was found)."""

    spec: str
    shards: list[Shard]
    manifest: Manifest | None = None
    manifest_dir: str | None = field(default=None, repr=False)

    @property
    def total_samples(self) -> int | None:
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)


def _raw_media_error(root: Path, recursive: bool = True) -> ValueError | None:
    """A ValueError naming the vdm-shard command when ``root`` holds GIFs/videos and no shards."""
    files = itertools.islice(root.rglob("*") if recursive else root.iterdir(), 100_000)
    media = [p for p in files if p.suffix.lower() in RAW_MEDIA]
    if not media:
        return None
    return ValueError(f"{root} looks like raw videos ({len(media)} GIF/video files, no .tar shards); make shards "
                      f"first: vdm-shard {root} {root}_shards")


def _from_directory(root: Path, spec: str) -> ShardSet:
    if (root / MANIFEST_NAME).is_file():
        manifest = read_manifest(root)
        if not manifest.shards:
            raise ValueError(f"{root / MANIFEST_NAME} lists no shards: the dataset is empty")
        shards = [Shard(str(root / s["name"]), int(s["samples"])) for s in manifest.shards]
        missing = [s.url for s in shards if not os.path.isfile(s.url)]
        if missing:
            raise ValueError(f"{root / MANIFEST_NAME} lists {len(missing)} shard(s) that do not exist, "
                             f"e.g. {missing[0]}: was vdm-shard interrupted?")
        return ShardSet(spec, shards, manifest, str(root))
    tars = sorted(root.glob("*.tar"))
    if tars:
        return ShardSet(spec, [Shard(str(t), None) for t in tars])
    raise _raw_media_error(root) or ValueError(f"shard spec {spec!r}: directory {root} has no {MANIFEST_NAME} and "
                                               f"no .tar shards")


def _local_path(url: str) -> str | None:
    if url.startswith("file:"):
        return re.sub(r"^file://?", "", url)
    return None if url.startswith(_SCHEMES) else url


def _expand(spec: str) -> list[str]:
    urls = []
    for part in spec.split("::"):
        for url in braceexpand.braceexpand(part):
            local = _local_path(url)
            if local is not None and any(c in local for c in "*?[") and not url.startswith("pipe:"):
                urls.extend(sorted(glob.glob(local)))
            else:
                urls.append(url)
    return urls


def _manifest_near(paths: list[str], cache: dict) -> tuple[Manifest | None, str | None]:
    """The manifest beside the first of ``paths`` that has one."""
    for path in paths:
        root = str(Path(path).parent)
        if root not in cache:
            cache[root] = read_manifest(root) if (Path(root) / MANIFEST_NAME).is_file() else None
        if cache[root] is not None:
            return cache[root], root
    return None, None


def _tokens(url: str) -> list[str]:
    """The words of a URL: a pipe: command split as the shell would, else the URL itself."""
    if not url.startswith("pipe:"):
        return [_local_path(url) or url]
    try:
        return shlex.split(url[5:])
    except ValueError:
        return url[5:].split()


def _from_pattern(spec: str, manifest_at: str | None = None) -> ShardSet:
    urls = _expand(spec)
    locals_ = {u: _local_path(u) for u in urls if not u.startswith("pipe:")}
    missing = [u for u, p in locals_.items() if p is not None and not os.path.isfile(p)]
    if not urls or (missing and len(missing) == len(urls)):
        parent = Path(_local_path(spec.split("::")[0]) or ".").parent
        raw = _raw_media_error(parent, recursive=False) if parent.is_dir() and not list(parent.glob("*.tar")) else None
        raise raw or ValueError(f"shard spec {spec!r} matches nothing (first expansion: {urls[:1] or 'none'})")
    if missing:
        raise ValueError(f"shard spec {spec!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    fixed = None
    if manifest_at is not None:
        root = Path(manifest_at).parent if Path(manifest_at).name == MANIFEST_NAME else Path(manifest_at)
        fixed = (read_manifest(root), str(root))
    cache: dict = {}
    shards, manifest, root = [], None, None
    for url in urls:
        words = _tokens(url)
        found, where = fixed or _manifest_near([w for w in words if os.path.isfile(w)], cache)
        manifest, root = (found, where) if manifest is None else (manifest, root)
        counts = {s["name"]: int(s["samples"]) for s in found.shards} if found else {}
        names = [os.path.basename(w) for w in words]  # .../train-000001.tar in a path, s3:// or https:// URL
        shards.append(Shard(url, next((counts[n] for n in names if n in counts), None)))
    return ShardSet(spec, shards, manifest, root)


def resolve_shards(spec) -> list[ShardSet]:
    """Resolve ``DataConfig.shards`` (a spec or a list of specs, one dataset each) into shard sets.

    Raises ValueError with what was wrong when a spec matches nothing or names raw videos.
    """
    if isinstance(spec, (str, os.PathLike, Mapping)):
        spec = [spec]
    if not spec or any(not str(s).strip() for s in spec):
        raise ValueError(f"data.shards: empty shard spec {spec!r}; give a vdm-shard directory, a brace pattern "
                         f"such as data/train-{{000000..000009}}.tar, a list, or pipe: commands")
    sets = []
    for item in spec:
        if isinstance(item, Mapping):  # {urls: "pipe:aws s3 cp s3://b/train-{000..009}.tar -", manifest: local_dir}
            if "urls" not in item or set(item) - {"urls", "manifest"}:
                raise ValueError(f"data.shards entry {dict(item)!r}: a mapping takes keys urls and manifest")
            sets.append(_from_pattern(str(item["urls"]), item.get("manifest")))
            continue
        item = str(item)
        path = Path(item)
        if not item.startswith(_SCHEMES) and path.is_dir():
            sets.append(_from_directory(path, item))
        elif path.name == MANIFEST_NAME and path.is_file():
            sets.append(_from_directory(path.parent, item))
        else:
            sets.append(_from_pattern(item))
    return sets


def val_dirs_beside(spec) -> tuple[list[str], list[str]]:
    """The validation folders (VAL_DIR) beside the local datasets of a training spec: (existing, looked for).

    Remote and ``pipe:`` specs have no folder beside them, except a mapping's local ``manifest``.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike, Mapping)) else list(spec or [])
    looked = []
    for item in items:
        if isinstance(item, Mapping):
            item = item.get("manifest")
        local = None if item is None else _local_path(str(item))
        if not local:
            continue
        path = Path(local)
        if path.is_dir():
            root = path
        elif path.name == MANIFEST_NAME:
            root = path.parent
        else:  # a brace pattern or glob: the folder of its first shard
            root = Path(next(iter(braceexpand.braceexpand(local.split("::")[0])), local)).parent
        looked.append(str(root / VAL_DIR))
    looked = list(dict.fromkeys(looked))
    return [p for p in looked if Path(p).is_dir()], looked


def merged_manifest(sets: list[ShardSet]) -> Manifest | None:
    """The datasets' common manifest listing every shard; ValueError if their geometry or encoders differ."""
    found = [s for s in sets if s.manifest is not None]
    for other in found[1:]:
        a, b = found[0].manifest, other.manifest
        geo = lambda m: (m.frames, m.height, m.width, m.channels, m.encoder_dim)  # noqa: E731
        if geo(a) != geo(b):
            raise ValueError(f"datasets disagree: {found[0].spec} has (frames, height, width, channels, encoder_dim) "
                             f"{geo(a)}, {other.spec} has {geo(b)}; mix only datasets sharded alike")
    if not found:
        return None
    shards = [{"name": s.url, "samples": s.samples} for ss in sets for s in ss.shards]
    return dataclasses.replace(found[0].manifest, shards=shards)


def check_manifest(cfg, manifest: Manifest | None, expect_cond_dim: int | None) -> Manifest:
    """The manifest to decode against, after checking it against the model's config."""
    if manifest is None:
        if not (cfg.frames and cfg.image_size):
            raise ValueError(f"no manifest.json found for {cfg.shards!r}: set data.frames and data.image_size so "
                             f"samples can be checked, or point data.shards at a vdm-shard directory")
        return Manifest(cfg.frames, cfg.image_size, cfg.image_size, 3, encoder_dim=expect_cond_dim or None)
    if cfg.frames and cfg.frames != manifest.frames:
        raise ValueError(f"data.frames={cfg.frames} but the shards hold {manifest.frames} frames per clip; "
                         f"set data.frames={manifest.frames} or re-shard with --frames {cfg.frames}")
    if cfg.image_size and (manifest.height, manifest.width) != (cfg.image_size, cfg.image_size):
        raise ValueError(f"data.image_size={cfg.image_size} but the shards hold {manifest.height}x{manifest.width} "
                         f"frames; set data.image_size={manifest.height} or re-shard with --size {cfg.image_size}")
    if expect_cond_dim and manifest.encoder_dim != expect_cond_dim:
        raise ValueError(f"the model expects text embeddings of width {expect_cond_dim} but the shards hold "
                         f"{manifest.encoder_dim or 'none (unconditional data)'} (encoder {manifest.encoder!r}); "
                         f"set model.cond_dim={manifest.encoder_dim or 0} or re-shard with the model's encoder")
    return manifest
