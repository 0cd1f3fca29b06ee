"""Input discovery: GIF and video files with their captions, and samples inside existing WebDataset shards.

Captions come from a sidecar ``NAME.txt`` beside ``NAME.gif``, or from a ``captions.csv`` /
``captions.jsonl`` in the same or a parent folder mapping file names to captions; WebDataset
samples carry theirs in a ``txt`` member (or ``caption`` in the ``json`` member).
Every input that cannot be used is returned with its reason instead of stopping the walk.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("data_tools.sources")

GIF_EXTS = {".gif"}
VIDEO_EXTS = {".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v"}
TAR_EXTS = {".tar"}
# Files that belong to a dataset folder without being inputs themselves.
SIDE_EXTS = {".txt", ".csv", ".jsonl", ".json", ".md"}
CAPTION_FILES = ("captions.csv", "captions.jsonl")
_NAME_FIELDS = ("file", "filename", "file_name", "path", "name", "video")
_CAPTION_FIELDS = ("caption", "text", "prompt")


@dataclass
class Item:
    """One input video: a file, or a member of a tar shard (``offset``/``size`` of its bytes)."""

    source: str  # relative posix path; "shard.tar#key" for a WebDataset member
    path: str  # absolute path of the file that holds the bytes
    kind: str  # "gif" | "video"
    caption: str | None = None
    offset: int | None = None
    size: int | None = None

    def read_bytes(self) -> bytes | None:
        """The member's bytes for tar inputs; None for plain files (decoders open the path)."""
        if self.offset is None:
            return None
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class Discovery:
    """What a walk of the input folder found."""

    items: list[Item]
    skipped: list[dict]  # {"path": source, "reason": ...}
    captioned: int  # items that came with a caption


def decode_caption(data: bytes, where: str) -> str:
    """Caption bytes -> stripped text; ValueError naming the file when it is not UTF-8."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"caption is not valid UTF-8 ({where}: byte {err.start})") from None
    return " ".join(text.split())


def _read_caption_table(path: Path) -> dict[str, str]:
    """``captions.csv`` (header with a file and a caption column, or two columns) or ``captions.jsonl``."""
    text = decode_caption_file(path)
    table: dict[str, str] = {}
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            name = next((row[k] for k in _NAME_FIELDS if k in row), None)
            caption = next((row[k] for k in _CAPTION_FIELDS if k in row), None)
            if name is None or caption is None:
                raise ValueError(f"{path}:{n}: need one of {_NAME_FIELDS} and one of {_CAPTION_FIELDS}")
            table[str(name)] = " ".join(str(caption).split())
        return table
    rows = list(csv.reader(io.StringIO(text)))
    if rows and any(h.strip().lower() in _CAPTION_FIELDS for h in rows[0]):
        header = [h.strip().lower() for h in rows[0]]
        name_col = next((header.index(k) for k in _NAME_FIELDS if k in header), 0)
        cap_col = next(header.index(k) for k in _CAPTION_FIELDS if k in header)
        rows = rows[1:]
    else:
        name_col, cap_col = 0, 1
    for row in rows:
        if len(row) > max(name_col, cap_col):
            table[row[name_col].strip()] = " ".join(row[cap_col].split())
    return table


def decode_caption_file(path: Path) -> str:
    """A whole caption table as text; ValueError when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 (byte {err.start})") from None


class _CaptionTables:
    """Caption tables found while walking, looked up from a file's folder upwards to the root."""

    def __init__(self, root: Path):
        self.root = root
        self.tables: dict[Path, dict[str, str]] = {}

    def load(self, folder: Path, skipped: list[dict]) -> None:
        for name in CAPTION_FILES:
            path = folder / name
            if path.is_file():
                try:
                    self.tables.setdefault(folder, {}).update(_read_caption_table(path))
                except (ValueError, json.JSONDecodeError, csv.Error) as err:
                    skipped.append({"path": _rel(path, self.root), "reason": f"unreadable caption table: {err}"})

    def lookup(self, path: Path) -> str | None:
        folder = path.parent
        while True:
            table = self.tables.get(folder)
            if table:
                for key in (path.relative_to(folder).as_posix(), path.name, path.stem):
                    if key in table:
                        return table[key]
            if folder == self.root or folder == folder.parent:
                return None
            folder = folder.parent


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _sidecar_caption(path: Path) -> str | None:
    side = path.with_suffix(".txt")
    return decode_caption(side.read_bytes(), side.name) if side.is_file() else None


def _tar_items(path: Path, root: Path) -> tuple[list[Item], list[dict]]:
    """Samples of a WebDataset shard: one video member each, caption from ``txt`` or ``json``."""
    rel = _rel(path, root)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    blobs: dict[tuple[str, str], bytes] = {}
    skipped: list[dict] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                groups.setdefault(key, {})[ext.lower()] = info
                if ext.lower() in ("txt", "json"):
                    blobs[key, ext.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = f"unreadable tar ({type(err).__name__}: {err})"
        if not groups:
            return [], [{"path": rel, "reason": reason}]
        skipped.append({"path": rel, "reason": f"{reason}; kept the {len(groups)} samples before the error"})
    items = []
    for key, members in groups.items():
        source = f"{rel}#{key}"
        video_ext = next((e for e in members if f".{e}" in VIDEO_EXTS | GIF_EXTS), None)
        if video_ext is None:
            skipped.append({"path": source, "reason": f"no video member (has {sorted(members)})"})
            continue
        caption = None
        try:
            if (key, "txt") in blobs:
                caption = decode_caption(blobs[key, "txt"], f"{source}.txt")
            elif (key, "json") in blobs:
                meta = json.loads(blobs[key, "json"].decode("utf-8"))
                caption = meta.get("caption") if isinstance(meta, dict) else None
        except (ValueError, json.JSONDecodeError) as err:
            skipped.append({"path": source, "reason": str(err)})
            continue
        info = members[video_ext]
        kind = "gif" if video_ext == "gif" else "video"
        items.append(Item(source=source, path=str(path), kind=kind, caption=caption or None,
                          offset=info.offset_data, size=info.size))
    return items, skipped


def discover(root: str | Path, exclude: str | Path | None = None) -> Discovery:
    """Walk ``root`` in sorted order and list every input with its caption (None when it has none)."""
    root = Path(root).resolve()
    exclude = Path(exclude).resolve() if exclude else None
    tables = _CaptionTables(root)
    items: list[Item] = []
    skipped: list[dict] = []
    for folder, dirs, files in os.walk(root):
        folder_path = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (folder_path / d).resolve() != exclude)
        tables.load(folder_path, skipped)
        for name in sorted(files):
            path = folder_path / name
            ext = path.suffix.lower()
            if name.startswith(".") or name in CAPTION_FILES or ext in SIDE_EXTS or ext == ".tmp":
                continue
            if ext in TAR_EXTS:
                found, bad = _tar_items(path, root)
                items.extend(found)
                skipped.extend(bad)
                continue
            if ext not in GIF_EXTS | VIDEO_EXTS:
                skipped.append({"path": _rel(path, root), "reason": f"not a video file (extension {ext or 'none'!r})"})
                continue
            try:
                caption = _sidecar_caption(path)
            except (ValueError, OSError) as err:
                skipped.append({"path": _rel(path, root), "reason": str(err)})
                continue
            if caption is None:
                caption = tables.lookup(path)
            kind = "gif" if ext in GIF_EXTS else "video"
            items.append(Item(source=_rel(path, root), path=str(path), kind=kind, caption=caption or None))
    captioned = sum(item.caption is not None for item in items)
    return Discovery(items=items, skipped=skipped, captioned=captioned)
