"""The sharding run: discover -> plan shards -> decode in worker processes -> BERT in batches -> write.

Inputs are ordered (sorted, or shuffled by a seed), split into train/val by a hash of their path,
and assigned to shards by position, so a re-run plans the same shards, keeps the finished ones
and redoes the rest. The manifest of each split is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import random
import re
import time
import warnings
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_tools.decode import DecodeOptions, SkipInput, clip_count_bound, load_clips
from data_tools.sources import Item, discover
from data_tools.writer import clean_output, fingerprint, load_done, shard_name, stats_path, write_json_atomic, write_shard
from vdm.data.format import Manifest, encode_sample, write_manifest

log = logging.getLogger("data_tools")


@dataclass
class ShardConfig:
    """Everything one ``vdm-shard`` run needs."""

    input_dir: Path
    output_dir: Path
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    shard_size: int = 64  # samples per shard, a target: skipped inputs make shards smaller
    workers: int = 2  # decode processes; 0 decodes in this process
    decode_timeout: float = 300.0  # seconds one input may take in a worker (no limit when workers == 0)
    encoder: str = "packaged:minilm"
    no_text: bool = False
    allow_empty_captions: bool = False
    text_batch_size: int = 64
    max_tokens: int = 64
    device: str = "auto"
    text_dtype: str = "auto"  # BERT matmul precision (vdm.text.TEXT_DTYPES); the resolved one is recorded
    shuffle_seed: int | None = None
    val_fraction: float = 0.0
    split: str = "train"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        self.input_dir, self.output_dir = Path(self.input_dir), Path(self.output_dir)
        if self.shard_size < 1 or self.workers < 0 or self.text_batch_size < 1:
            raise ValueError("shard_size and text_batch_size must be >= 1 and workers >= 0, got "
                             f"{self.shard_size}, {self.text_batch_size}, {self.workers}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.split) or self.split == "val":
            raise ValueError(f"split must be letters, digits or _ and not 'val' (the validation split), "
                             f"got {self.split!r}")


@dataclass
class Summary:
    """What a run wrote, per split, and where the time went (seconds, decode/resize summed over workers)."""

    written: int = 0
    shards: int = 0
    skipped: int = 0
    resumed_shards: int = 0
    roots: list[str] = field(default_factory=list)
    timings: Counter = field(default_factory=Counter)
    bytes: int = 0


@dataclass
class _Shard:
    split: str
    index: int
    root: Path
    items: list[tuple[int, Item]]  # (position in the split, input)

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def _val_hash(source: str, seed: int | None) -> float:
    digest = hashlib.sha256(f"{seed or 0}:{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _plan(items: list[Item], cfg: ShardConfig) -> dict[str, list[_Shard]]:
    """Split inputs into train/val and cut each split into shards; same inputs and options, same plan."""
    if cfg.shuffle_seed is not None:
        items = items[:]
        random.Random(cfg.shuffle_seed).shuffle(items)
    splits: dict[str, list[Item]] = {cfg.split: [], "val": []}
    for item in items:
        val = cfg.val_fraction > 0 and _val_hash(item.source, cfg.shuffle_seed) < cfg.val_fraction
        splits["val" if val else cfg.split].append(item)
    per_shard = max(1, cfg.shard_size // clip_count_bound(cfg.decode))
    plan = {}
    for split, members in splits.items():
        if split == "val" and cfg.val_fraction == 0:
            continue
        root = _split_root(cfg, split)
        indexed = list(enumerate(members))
        plan[split] = [_Shard(split, k, root, indexed[s:s + per_shard])
                       for k, s in enumerate(range(0, len(indexed), per_shard))]
    return plan


def _split_root(cfg: ShardConfig, split: str) -> Path:
    # The train split sits at the output root so that OUT is always a dataset; validation in OUT/val.
    return cfg.output_dir / "val" if split == "val" else cfg.output_dir


def _content_options(cfg: ShardConfig, conditional: bool, text_dtype: str | None) -> dict:
    """The options that decide shard bytes (recorded in the manifest and hashed into the done markers).

    The text batch size is one of them: padding changes BERT's float rounding in the last bits.
    """
    return {"decode": asdict(cfg.decode), "encoder": cfg.encoder if conditional else None,
            "text_dtype": text_dtype if conditional else None,
            "max_tokens": cfg.max_tokens, "text_batch_size": cfg.text_batch_size, "shard_size": cfg.shard_size, "shuffle_seed": cfg.shuffle_seed,
            "val_fraction": cfg.val_fraction, "allow_empty_captions": cfg.allow_empty_captions}


def _init_worker() -> None:
    warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: we refuse by our own limit


def _decode_one(task: tuple[Item, DecodeOptions]):
    """Worker body: never raises, so one bad file cannot stop the run."""
    item, opts = task
    try:
        clips, timings = load_clips(item, opts)
        return clips, None, timings
    except SkipInput as err:
        return None, str(err), {}
    except Exception as err:  # a decoder bug on one odd file must not end a long run
        return None, f"unexpected error ({type(err).__name__}: {err})", {}


def _bounded(pool, tasks: list, ahead: int, timeout: float):
    """Results of ``tasks`` in order, at most ``ahead`` in flight; an input stuck past ``timeout`` s is skipped."""
    window: deque = deque()
    feed = iter(tasks)
    while True:
        while len(window) < ahead and (task := next(feed, None)) is not None:
            window.append(pool.apply_async(_decode_one, (task,)))
        if not window:
            return
        try:
            yield window.popleft().get(timeout=timeout)
        except multiprocessing.TimeoutError:
            # The worker stays busy with it until the pool is torn down; the run goes on with the others.
            yield None, f"decode timed out after {timeout:g}s (--decode-timeout)", {}


@contextlib.contextmanager
def _cpu_threads_left_for_bert(cfg: ShardConfig, captions: _Captions | None):
    """On CPU, give BERT the cores the decode workers leave: oversubscribed torch threads run several times slower."""
    if captions is None or captions.encoder.device.type != "cpu" or cfg.workers == 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _text_dtype(cfg: ShardConfig, encoder) -> str:
    """The concrete BERT dtype this run uses: the given encoder's, or ``cfg.text_dtype`` resolved for the device."""
    import torch

    from vdm.text import resolve_text_dtype

    wanted = resolve_text_dtype(cfg.text_dtype, torch.device(_resolve_device(cfg.device)))
    if encoder is not None and cfg.text_dtype != "auto" and encoder.dtype != wanted:
        raise ValueError(f"text_dtype={cfg.text_dtype} but the given encoder runs in {encoder.dtype}")
    return encoder.dtype if encoder is not None else wanted


class _Captions:
    """Encodes a shard's captions: each distinct caption once (TextEncoder batches them by length)."""

    def __init__(self, cfg: ShardConfig, text_dtype: str, encoder=None):
        from vdm.text import TextEncoder

        self.encoder = encoder or TextEncoder(cfg.encoder, max_tokens=cfg.max_tokens, device=_resolve_device(cfg.device),
                                              batch_size=cfg.text_batch_size, dtype=text_dtype)
        self.dim = self.encoder.dim

    def encode(self, captions: list[str]) -> dict:
        unique = sorted(set(captions))
        return dict(zip(unique, self.encoder.encode(unique)))


def _write(shard: _Shard, results: list, captions: _Captions | None, timings: Counter) -> dict:
    """Encode captions, write the tar, then its stats (the done marker); returns the stats."""
    skipped, good = [], []
    for (position, item), (clips, reason, t) in zip(shard.items, results):
        timings.update(t)
        if clips is None:
            skipped.append({"path": item.source, "reason": reason})
            continue
        for frames, meta in clips:
            key = f"{position:07d}" + (f"_{meta['clip']:02d}" if len(clips) > 1 else "")
            good.append((key, frames, item.caption, meta))
    t0 = time.perf_counter()
    embs = captions.encode([c for _, _, c, _ in good]) if captions and good else {}
    timings["bert_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = [encode_sample(key, frames, caption, embs.get(caption) if captions else None, meta)
               for key, frames, caption, meta in good]
    size = write_shard(shard.root / shard.name, samples)
    timings["write_s"] += time.perf_counter() - t0
    return {"name": shard.name, "samples": len(samples), "skipped": skipped, "bytes": size}


def _caption_filter(items: list[Item], cfg: ShardConfig, skipped: list[dict]) -> tuple[list[Item], bool]:
    """Decide conditional or not, and drop inputs without a caption from a conditional dataset."""
    captioned = sum(i.caption is not None for i in items)
    if cfg.no_text or not captioned:
        if not cfg.no_text and items:
            log.warning("no captions found in %s: writing an unconditional dataset (no embeddings)", cfg.input_dir)
        return items, False
    kept = []
    for item in items:
        if item.caption is None and not cfg.allow_empty_captions:
            skipped.append({"path": item.source, "reason": "missing caption (no NAME.txt or captions.csv/.jsonl "
                                                           "entry; --allow-empty-captions keeps it)"})
            continue
        if item.caption is None:
            item.caption = ""
        kept.append(item)
    return kept, True


def run(cfg: ShardConfig, text_encoder=None) -> Summary:
    """Shard ``cfg.input_dir`` into ``cfg.output_dir``; resumes unless ``overwrite``. Raises if the input is missing.

    ``text_encoder``: an already loaded ``vdm.text.TextEncoder`` for ``cfg.encoder`` (tests and benchmarks share one).
    """
    if not cfg.input_dir.is_dir():
        raise FileNotFoundError(f"input directory {cfg.input_dir} does not exist (or is not a directory)")
    found = discover(cfg.input_dir, exclude=cfg.output_dir)
    skipped = list(found.skipped)
    items, conditional = _caption_filter(found.items, cfg, skipped)
    text_dtype = _text_dtype(cfg, text_encoder) if conditional else None
    options = _content_options(cfg, conditional, text_dtype)
    plan_hash = fingerprint(options)
    plan = _plan(items, cfg)
    done, pending = _find_done(plan, cfg, plan_hash)
    summary = Summary(resumed_shards=len(done))
    if done:
        log.info("resuming: %d finished shard(s) kept, %d to write", len(done), len(pending))
    captions = _Captions(cfg, text_dtype, text_encoder) if conditional and pending else None
    encoder_dim = captions.dim if captions else next((s.get("encoder_dim") for s in done.values()), None)
    with _cpu_threads_left_for_bert(cfg, captions):
        _run_pending(pending, cfg, captions, done, plan_hash, summary)
    for split, shards in plan.items():  # manifests last: a dataset with a manifest is complete
        stats = [done[split, s.index] for s in shards]
        split_skipped = [x for st in stats for x in st["skipped"]] + (skipped if split == cfg.split else [])
        manifest = Manifest(frames=cfg.decode.frames, height=cfg.decode.height, width=cfg.decode.width,
                            encoder=cfg.encoder if conditional else None,
                            encoder_dim=encoder_dim if conditional else None, encoder_dtype=text_dtype,
                            max_tokens=cfg.max_tokens if conditional else None,
                            shards=[{"name": st["name"], "samples": st["samples"]} for st in stats],
                            skipped=sorted(split_skipped, key=lambda x: (x["path"], x["reason"])),
                            extra={"tool": "vdm-shard", "split": split, "inputs": sum(len(s.items) for s in shards),
                                   "options": options, "source_dir": str(cfg.input_dir.resolve()),
                                   "skipped_reasons": _reason_counts(split_skipped)})
        root = _split_root(cfg, split)
        write_manifest(root, manifest)
        summary.written += manifest.total_samples
        summary.shards += len(stats)
        summary.skipped += len(manifest.skipped)
        summary.bytes += sum(st["bytes"] for st in stats)
        summary.roots.append(str(root))
    return summary


def _find_done(plan: dict[str, list[_Shard]], cfg: ShardConfig, plan_hash: str) -> tuple[dict, list[_Shard]]:
    """Shards finished by an earlier run of the same plan (kept), and the rest (to write); clears leftovers."""
    done, pending = {}, []
    for split, shards in plan.items():
        root = _split_root(cfg, split)
        root.mkdir(parents=True, exist_ok=True)
        clean_output(root, split, set() if cfg.overwrite else {s.name for s in shards}, everything=cfg.overwrite)
        for shard in shards:
            stats = None if cfg.overwrite else load_done(shard.root, shard.name, plan_hash)
            if stats is not None and stats.get("inputs") == [i.source for _, i in shard.items]:
                done[split, shard.index] = stats
            else:
                pending.append(shard)
    val = cfg.output_dir / "val"
    if cfg.overwrite and "val" not in plan and val.is_dir():  # left by an earlier run with a val split
        clean_output(val, "val", set(), everything=True)
        if not any(val.iterdir()):
            val.rmdir()
    return done, pending


def _reason_counts(skipped: list[dict]) -> dict[str, int]:
    # Group reasons by their leading words so that "decode error (... file X ...)" variants add up.
    counts = Counter(x["reason"].split(" (")[0].split(":")[0] for x in skipped)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _run_pending(pending: list[_Shard], cfg: ShardConfig, captions: _Captions | None, done: dict,
                 plan_hash: str, summary: Summary) -> None:
    """Decode all pending inputs in order (in parallel when workers > 0), writing each shard once its inputs are in."""
    if not pending:
        return
    tasks = [(item, cfg.decode) for shard in pending for _, item in shard.items]
    pool = None
    if cfg.workers > 0:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(cfg.workers, initializer=_init_worker)
        # Look ahead about two shards so workers decode the next shard while BERT encodes this one,
        # without holding the whole dataset's clips in memory.
        results = _bounded(pool, tasks, max(8 * cfg.workers, 2 * len(pending[0].items)), cfg.decode_timeout)
    else:
        _init_worker()
        results = map(_decode_one, tasks)
    bar = tqdm(total=len(tasks), unit="clip", disable=not cfg.progress, desc="vdm-shard", dynamic_ncols=True)
    n_skipped = 0
    try:
        for shard in pending:
            got = []
            for _ in shard.items:
                got.append(next(results))
                n_skipped += got[-1][0] is None
                bar.update(1)
                bar.set_postfix(skipped=n_skipped, refresh=False)
            stats = _write(shard, got, captions, summary.timings)
            stats.update(plan=plan_hash, inputs=[i.source for _, i in shard.items],
                         encoder_dim=captions.dim if captions else None)
            write_json_atomic(stats_path(shard.root, shard.name), stats)
            done[shard.split, shard.index] = stats
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
