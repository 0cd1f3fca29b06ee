"""Shard sample format v1 and the dataset manifest: the one place that knows the shard layout.

A sample is one tar member per key, all sharing the WebDataset ``__key__``:

- ``frames.npy``  uint8 ``(F, H, W, C)``
- ``emb.npy``     float16 ``(L, D)``: the caption's token embeddings, real tokens only
                  (the padding mask is rebuilt at collation); absent for unconditional data
- ``txt``         the caption, UTF-8 (may be empty for unconditional data)
- ``json``        source path, original size and fps, chosen frame indices, format version

Arrays are ``.npy`` read with ``allow_pickle=False``: shard members are data, never code.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
FRAMES_KEY = "frames.npy"
EMB_KEY = "emb.npy"
TEXT_KEY = "txt"
META_KEY = "json"
SAMPLE_KEYS = (FRAMES_KEY, EMB_KEY, TEXT_KEY, META_KEY)
MANIFEST_NAME = "manifest.json"
VAL_DIR = "val"  # vdm-shard --val-fraction writes the validation split here, beside the training shards


class SampleError(ValueError):
    """A shard sample that cannot be used; the message is the reason recorded in counts and logs."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # numpy raises ValueError, EOFError, OSError... for bad bytes
        raise SampleError(f"{name}: not a readable .npy array ({type(err).__name__}: {err})") from None


def encode_sample(key: str, frames: np.ndarray, caption: str | None, emb: np.ndarray | None,
                  meta: dict) -> dict:
    """Build the dict ``webdataset.TarWriter.write`` takes for one sample (all values bytes)."""
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be uint8 (F, H, W, C), got {frames.dtype} {frames.shape}")
    sample = {
        "__key__": key,
        FRAMES_KEY: _npy_bytes(frames),
        TEXT_KEY: (caption or "").encode("utf-8"),
        META_KEY: json.dumps({**meta, "format_version": FORMAT_VERSION}, sort_keys=True).encode("utf-8"),
    }
    if emb is not None:
        if emb.ndim != 2:
            raise ValueError(f"emb must be (L, D), got shape {emb.shape}")
        sample[EMB_KEY] = _npy_bytes(emb.astype(np.float16))
    return sample


@dataclass
class DecodedSample:
    """One training sample as arrays, checked against the manifest's geometry."""

    key: str
    frames: np.ndarray  # uint8 (F, H, W, C)
    emb: np.ndarray | None  # float16 (L, D)
    caption: str
    meta: dict


def decode_sample(raw: dict, expect: "Manifest | None" = None) -> DecodedSample:
    """Decode the expected members of a raw WebDataset sample; anything else is ignored, never decoded.

    Raises SampleError with the reason when a member is missing, unreadable or of the wrong shape.
    """
    key = raw.get("__key__", "?")
    if FRAMES_KEY not in raw:
        raise SampleError(f"{key}: no {FRAMES_KEY} member (has {sorted(k for k in raw if not k.startswith('__'))})")
    frames = _npy_load(raw[FRAMES_KEY], f"{key}.{FRAMES_KEY}")
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise SampleError(f"{key}: frames must be uint8 (F, H, W, C), got {frames.dtype} {frames.shape}")
    emb = _npy_load(raw[EMB_KEY], f"{key}.{EMB_KEY}") if EMB_KEY in raw else None
    if emb is not None and (emb.ndim != 2 or emb.dtype != np.float16 or emb.shape[0] == 0):
        raise SampleError(f"{key}: emb must be float16 (L>0, D), got {emb.dtype} {emb.shape}")
    try:
        caption = raw.get(TEXT_KEY, b"").decode("utf-8")
        meta = json.loads(raw[META_KEY].decode("utf-8")) if META_KEY in raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError(f"{key}: bad txt/json member ({err})") from None
    if expect is not None:
        want = (expect.frames, expect.height, expect.width, expect.channels)
        if frames.shape != want:
            raise SampleError(f"{key}: frames shape {frames.shape} != manifest {want}")
        if expect.encoder_dim and (emb is None or emb.shape[1] != expect.encoder_dim):
            got = None if emb is None else emb.shape[1]
            raise SampleError(f"{key}: embedding width {got} != manifest encoder_dim {expect.encoder_dim}")
    return DecodedSample(key=key, frames=frames, emb=emb, caption=caption, meta=meta)


@dataclass
class Manifest:
    """What a sharded dataset holds: geometry, encoder, shards with counts, and every skipped input."""

    frames: int
    height: int
    width: int
    channels: int = 3
    encoder: str | None = None  # text encoder name or path; None for unconditional data
    encoder_dim: int | None = None
    encoder_dtype: str | None = None  # the encoder's matmul dtype (vdm.text.TEXT_DTYPES); None: float32
    max_tokens: int | None = None
    shards: list[dict] = field(default_factory=list)  # [{"name": "train-000000.tar", "samples": 64}]
    skipped: list[dict] = field(default_factory=list)  # [{"path": "...", "reason": "..."}]
    extra: dict = field(default_factory=dict)  # tool options, frame policy, split, timings
    format_version: int = FORMAT_VERSION

    @property
    def total_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    @property
    def conditional(self) -> bool:
        return self.encoder_dim is not None

    def to_json(self) -> str:
        data = asdict(self)
        data["total_samples"] = self.total_samples
        data["total_skipped"] = len(self.skipped)
        return json.dumps(data, indent=2, ensure_ascii=False)


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read ``root/manifest.json``; a clear error if it is missing, malformed or of another version."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {root}: is it a directory written by vdm-shard?")
    data = json.loads(path.read_text(encoding="utf-8"))
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (this vdm reads {FORMAT_VERSION})")
    data.pop("total_samples", None)
    data.pop("total_skipped", None)
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in data.items() if k in known})


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``root/manifest.json`` atomically (temporary file, then rename)."""
    path = Path(root) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return path
