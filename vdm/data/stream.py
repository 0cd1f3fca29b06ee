"""WebDataset shards -> batches on every rank, with a position that resumes exactly.

Epoch mode. Each epoch the shard list is shuffled with (seed, epoch), the same order on every
rank, and read as one sequence of T samples (counts from the manifest). Slot s = rank * W + worker
takes samples [s*q, (s+1)*q) of it, q = floor(T / (R*W*B)) * B, so every rank yields the same
``steps_per_epoch = W*q/B`` full batches; the last T - R*W*q samples of the order (fewer than
R*W*B, another tail every epoch) wait for a later epoch. A slot reads its shard pieces in order
through a shuffle buffer seeded by (seed, epoch, rank, worker).

Resumption. Every batch carries its worker and how many samples that worker had drawn from its
shuffle buffer; the main process keeps that count for the last batch the trainer took (not what
workers prefetched). On resume each worker rebuilds its deterministic stream and skips, without
decoding, what was consumed: exact to the sample, given the same shards, seed, world size,
workers and batch size. Resampled mode draws shards with replacement, seeded by (seed, resume
count, rank, worker), so a resumed run continues with new randomness instead of a replay.

Evaluation (``build_val_loader``). One pass over the validation shards in their listed order, no
shuffle, no flips: slot s of S reads samples [s*N//S, (s+1)*N//S) of the first N, so rank r reads
[r*N//R, (r+1)*N//R) whatever the workers; every sample once, the last batch of a slot short.

Bad data never stops a run: unreadable tars, bad members and wrong shapes are skipped and counted;
counts travel inside the batches to the main process, see ``ShardLoader.stats``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import signal
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from vdm.data.format import VAL_DIR, Manifest, SampleError, decode_sample
from vdm.data.spec import Shard, ShardSet, check_manifest, merged_manifest, resolve_shards, val_dirs_beside
from vdm.text import pad_embeddings

__all__ = ["Batch", "LoaderState", "ShardLoader", "build_loader", "build_val_loader", "resolve_shards"]
log = logging.getLogger(__name__)

_REASONS = (("no frames.npy", "missing frames.npy"), ("frames.npy: not a readable", "unreadable frames.npy"),
            ("emb.npy: not a readable", "unreadable emb.npy"), ("frames must be", "frames not uint8 (F, H, W, C)"),
            ("emb must be", "bad emb.npy"), ("frames shape", "frames shape != manifest"),
            ("embedding width", "embedding width != manifest"), ("bad txt/json", "bad txt/json"))
BAD_SHARD = "unreadable or truncated tar"


def _mix_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class Batch:
    """One training batch; video in [-1, 1], text padded to the batch's longest caption."""

    video: torch.Tensor  # float32 (b, c, f, h, w)
    text: torch.Tensor | None  # float32 (b, l, d); None for unconditional data
    mask: torch.Tensor | None  # bool (b, l), True = real token
    captions: list[str]
    keys: list[str]

    def pin_memory(self) -> "Batch":
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return dataclasses.replace(self, video=pin(self.video), text=pin(self.text), mask=pin(self.mask))


@dataclass
class _Packet:
    """What a worker sends: a batch (None for a final count-only packet), where it stands, what it skipped."""

    batch: Batch | None
    worker: int
    pos: int  # samples this worker drew from its shuffle buffer up to this batch's last one
    counts: dict

    def pin_memory(self) -> "_Packet":
        return dataclasses.replace(self, batch=self.batch and self.batch.pin_memory())


def _reason(err: SampleError) -> str:
    text = str(err)
    return next((name for needle, name in _REASONS if needle in text), "other bad sample")


def _read_shard(url: str, start: int, stop: int | None, counts: Counter):
    """Raw samples ``start:stop`` of one tar (all if stop is None); an unreadable tar is counted, not raised."""
    index, stream = 0, None
    try:
        stream = gopen(url, "rb")
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
        for raw in group_by_keys(files, handler=reraise_exception):
            if stop is not None and index >= stop:
                break
            if index >= start:
                yield raw
            index += 1
    except Exception as err:  # truncated tar, failed pipe, duplicate names: the shard ends here
        counts["bad_shards"] += 1
        lost = 0 if stop is None else max(0, stop - max(index, start))
        counts["skipped"] += lost
        counts[f"skipped:{BAD_SHARD}"] += lost
        log.warning("shard %s unreadable after %d samples (%s: %s); %d planned samples lost",
                    url, index, type(err).__name__, err, lost)
    finally:
        try:
            if stream is not None:
                stream.close()
        except Exception:  # a pipe closed early exits with SIGPIPE
            pass


def _shuffle(items, size: int, rng: random.Random):
    """Buffer shuffle: fill ``size`` items, then emit a random one for each new one."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _epoch_plan(shards: list[Shard], seed: int, epoch: int, lo: int, hi: int) -> list[tuple[str, int, int]]:
    """Pieces (url, start, stop) holding samples [lo, hi) of the epoch's shuffled shard sequence."""
    order = list(range(len(shards)))
    random.Random(_mix_seed(seed, "shards", epoch)).shuffle(order)
    return _pieces(shards, order, lo, hi)


def _pieces(shards: list[Shard], order, lo: int, hi: int) -> list[tuple[str, int, int]]:
    """Pieces (url, start, stop) holding samples [lo, hi) of the shards read in ``order``."""
    plan, offset = [], 0
    for i in order:
        n = shards[i].samples
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            plan.append((shards[i].url, a - offset, b - offset))
        offset += n
        if offset >= hi:
            break
    return plan


def _ignore_sigterm(_worker_id: int) -> None:
    # A scheduler's SIGTERM reaches the whole process group: the trainer saves a checkpoint and then
    # shuts its workers down itself, so a worker must not die first and take the step with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _SlotStream(IterableDataset):
    """The samples of one rank's worker (a slot), decoded and batched inside the worker."""

    def __init__(self, loader: "ShardLoader", epoch: int, skip: list[int], rotate: int = 0):
        self.rotate = rotate  # DataLoader worker 0 plays slot `rotate`, so a resume continues the round robin
        self.shards, self.probs = loader._shards, loader._probs
        self.mode, self.seed, self.epoch, self.skip = loader.mode, loader.seed, epoch, skip
        self.rank, self.slots_per_rank, self.quota = loader.rank, loader.slots_per_rank, loader._quota
        self.slots, self.limit = loader.world_size * loader.slots_per_rank, loader.limit
        self.batch_size, self.buffer, self.hflip = loader.batch_size, loader.shuffle_buffer, loader.hflip
        self.expect, self.want_text = loader.manifest, loader.want_text

    def _epoch_samples(self, worker: int, counts: Counter):
        slot = self.rank * self.slots_per_rank + worker
        if self.mode == "eval":
            lo, hi = slot * self.limit // self.slots, (slot + 1) * self.limit // self.slots
            plan = _pieces(self.shards, range(len(self.shards)), lo, hi)
        else:
            plan = _epoch_plan(self.shards, self.seed, self.epoch, slot * self.quota, (slot + 1) * self.quota)
        for url, start, stop in plan:
            yield from _read_shard(url, start, stop, counts)

    def _resampled_samples(self, rng: random.Random, counts: Counter):
        barren = 0
        while True:
            shard = rng.choices(self.shards, weights=self.probs)[0]
            got = 0
            for got, raw in enumerate(_read_shard(shard.url, 0, None, counts), 1):
                yield raw
            barren = 0 if got else barren + 1
            if barren > 20 + 2 * len(self.shards):
                raise RuntimeError(f"rank {self.rank}: {barren} shards in a row gave no samples; are the shards readable?")

    def __iter__(self):
        info = get_worker_info()
        worker = (info.id + self.rotate) % info.num_workers if info is not None else 0
        counts: Counter = Counter()
        rng = random.Random(_mix_seed(self.seed, self.mode, self.epoch, self.rank, worker))
        raw = self._resampled_samples(rng, counts) if self.mode == "resampled" else self._epoch_samples(worker, counts)
        pending, pos, skip, warned = [], 0, self.skip[worker], 0
        for sample in _shuffle(raw, self.buffer, rng):
            pos += 1
            if pos <= skip:  # consumed before the resume: counted then, not decoded now
                if pos == skip:
                    counts.clear()
                continue
            try:
                pending.append(decode_sample(sample, expect=self.expect))
            except SampleError as err:
                counts["skipped"] += 1
                counts[f"skipped:{_reason(err)}"] += 1
                if warned < 5:
                    warned += 1
                    log.warning("skipping sample: %s", err)
                continue
            if len(pending) == self.batch_size:
                counts["samples"] += len(pending)
                yield _Packet(self._collate(pending), worker, pos, dict(counts))
                pending = []
                counts.clear()  # in place: the shard reader holds this Counter too
        if pending and self.mode == "eval":  # evaluation reads every sample: a short last batch
            counts["samples"] += len(pending)
            yield _Packet(self._collate(pending), worker, pos, dict(counts))
            pending = []
            counts.clear()
        counts["dropped_partial"] += len(pending)  # only short when bad samples thinned this slot
        yield _Packet(None, worker, pos, dict(counts))

    def _collate(self, samples) -> Batch:
        frames = np.stack([s.frames for s in samples])  # (b, f, h, w, c) uint8
        if self.hflip:
            for i, s in enumerate(samples):
                if _mix_seed(self.seed, "hflip", self.epoch, s.key) & 1:
                    frames[i] = frames[i, :, :, ::-1]
        video = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)
        text = mask = None
        embs = [s.emb for s in samples]
        if self.want_text and any(e is not None for e in embs):
            dim = next(e for e in embs if e is not None).shape[1]
            text, mask = pad_embeddings([np.zeros((0, dim), np.float16) if e is None else e for e in embs])
        return Batch(video, text, mask, [s.caption for s in samples], [s.key for s in samples])


@dataclass
class LoaderState:
    """A loader's position, JSON-able. ``positions`` maps rank -> per-worker samples consumed this epoch."""

    mode: str = "epoch"
    epoch: int = 0
    step: int = 0  # batches yielded this epoch (epoch mode) or in all (resampled)
    positions: dict[str, list[int]] = field(default_factory=dict)
    resumes: int = 0
    seed: int = 0
    world_size: int = 1
    num_workers: int = 0
    batch_size: int = 1
    fingerprint: str = ""
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoaderState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def merge(cls, states: list[dict]) -> dict:
        """One dict holding every rank's positions (e.g. after all_gather_object), for any rank to resume from."""
        merged = cls.from_dict(states[0])
        for state in states[1:]:
            merged.positions.update(state.get("positions", {}))
        return merged.to_dict()


class ShardLoader:
    """Iterable over Batch forever; knows its manifest, its position (``state_dict``) and its counts (``stats``)."""

    def __init__(self, sets: list[ShardSet], manifest: Manifest, mode: str, batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int, shuffle_buffer: int, hflip: bool,
                 weights: list[float] | None, pin_memory: bool, want_text: bool, limit: int = 0):
        self.manifest, self.mode, self.batch_size, self.seed = manifest, mode, batch_size, seed
        self.limit = limit  # eval mode: how many samples, from the start of the shard list
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.slots_per_rank = max(num_workers, 1)
        self.shuffle_buffer, self.hflip, self.want_text = shuffle_buffer, hflip, want_text
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._shards = [shard for s in sets for shard in s.shards]
        weights = weights or [1.0] * len(sets)
        self._probs = [w / len(s.shards) for w, s in zip(weights, sets) for _ in s.shards]
        ident = [(s.url, s.samples) for s in self._shards]
        self._fingerprint = hashlib.sha256(repr(ident).encode()).hexdigest()[:16]
        self._quota, self.steps_per_epoch = 0, None
        if mode == "epoch":
            total = sum(s.samples for s in self._shards)
            slots = world_size * self.slots_per_rank
            self._quota = total // (slots * batch_size) * batch_size
            self.steps_per_epoch = self.slots_per_rank * self._quota // batch_size
        self.epoch, self.step, self.resumes = 0, 0, 0
        self._positions = [0] * self.slots_per_rank
        self._counts: Counter = Counter()

    def load_state_dict(self, data: dict) -> None:
        """Continue from ``state_dict()`` output (this rank's, or ``LoaderState.merge`` of all ranks')."""
        state = LoaderState.from_dict(data)
        self._counts = Counter(state.stats)
        self.resumes = state.resumes + 1
        if self.mode != "epoch" or state.mode != "epoch":
            self.epoch, self.step = state.epoch, state.step if state.mode == self.mode else 0
            return
        same = (state.seed, state.world_size, state.num_workers, state.batch_size, state.fingerprint) == \
               (self.seed, self.world_size, self.num_workers, self.batch_size, self._fingerprint)
        self.epoch, self.step = state.epoch, state.step
        if not same:
            log.warning("loader state was saved with other shards, seed, world size, workers or batch size; "
                        "resuming at the start of epoch %d instead of mid-epoch", state.epoch + 1 if state.step else state.epoch)
            self.epoch, self.step = (state.epoch + 1, 0) if state.step else (state.epoch, 0)
            return
        mine = state.positions.get(str(self.rank))
        if mine is None:  # another rank's state: derive from the round-robin order (exact unless samples were bad)
            w = self.slots_per_rank
            mine = [(self.step - i + w - 1) // w * self.batch_size for i in range(w)]
        self._positions = list(mine)

    def state_dict(self) -> dict:
        """This rank's position after the last batch the trainer took; JSON-able."""
        return LoaderState(self.mode, self.epoch, self.step, {str(self.rank): list(self._positions)}, self.resumes,
                           self.seed, self.world_size, self.num_workers, self.batch_size, self._fingerprint,
                           dict(self._counts)).to_dict()

    def stats(self) -> dict:
        """Counts over the batches consumed so far (including before a resume)."""
        c = self._counts
        reasons = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("skipped:")}
        return {"samples": c["samples"], "skipped": c["skipped"], "skipped_by_reason": reasons,
                "bad_shards": c["bad_shards"], "padded_batches": c["padded_batches"],
                "dropped_partial": c["dropped_partial"], "epoch": self.epoch, "step": self.step}

    def _batches(self, epoch: int, skip: list[int], rotate: int = 0):
        dataset = _SlotStream(self, epoch, skip, rotate)
        extra = {"prefetch_factor": 2} if self.num_workers else {}
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            worker_init_fn=_ignore_sigterm, **extra)
        for packet in loader:
            self._counts.update(packet.counts)
            if packet.batch is not None:
                self._positions[packet.worker] = packet.pos
                yield packet.batch

    def _epochs(self):
        while True:
            if self.step >= self.steps_per_epoch:
                self.epoch, self.step, self._positions = self.epoch + 1, 0, [0] * self.slots_per_rank
            last = None
            for batch in self._batches(self.epoch, list(self._positions), self.step % self.slots_per_rank):
                self.step += 1
                last = batch
                yield batch
                if self.step >= self.steps_per_epoch:
                    break
            while self.step < self.steps_per_epoch:  # bad data left this rank short: keep ranks in step
                if last is None:
                    raise RuntimeError(f"rank {self.rank}: no readable samples left in epoch {self.epoch}")
                self.step += 1
                self._counts["padded_batches"] += 1
                yield last

    def _resampled(self):
        for batch in self._batches(self.resumes, [0] * self.slots_per_rank):
            self.step += 1
            yield batch

    def __iter__(self):
        if self.mode == "eval":  # one pass each time
            return self._batches(0, [0] * self.slots_per_rank)
        return self._epochs() if self.mode == "epoch" else self._resampled()


def build_loader(cfg, batch_size: int, rank: int, world_size: int, seed: int, state: dict | None = None,
                 pin_memory: bool = False, expect_cond_dim: int | None = None) -> ShardLoader:
    """A loader for ``cfg`` (a DataConfig) on one rank; all checks that can fail do so here, before training."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if cfg.mode not in ("epoch", "resampled"):
        raise ValueError(f"data.mode: {cfg.mode!r} is not one of epoch, resampled")
    sets = resolve_shards(cfg.shards)
    weights = cfg.weights
    if weights is not None:
        if len(weights) != len(sets) or any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"data.weights {weights} must be {len(sets)} non-negative numbers (one per data.shards "
                             f"entry), not all zero")
        if cfg.mode == "epoch" and len(set(weights)) > 1:
            raise ValueError("data.weights mix datasets by sampling, which only data.mode=resampled does; "
                             "epoch mode reads every sample once")
    manifest = check_manifest(cfg, merged_manifest(sets), expect_cond_dim)
    shards = [s for ss in sets for s in ss.shards]
    slots = world_size * max(cfg.num_workers, 1)
    if cfg.mode == "epoch":
        unknown = [s.url for s in shards if s.samples is None]
        if unknown:
            raise ValueError(f"epoch mode needs each shard's sample count, and no manifest.json lists {unknown[0]} "
                             f"({len(unknown)} such shards); use data.mode=resampled or keep vdm-shard's manifest")
        if len(shards) < slots:
            raise ValueError(f"{len(shards)} shards for {world_size} ranks x {max(cfg.num_workers, 1)} workers = {slots} "
                             f"readers: each needs at least one shard; re-shard with a smaller --shard-size, or use "
                             f"fewer data.num_workers, or data.mode=resampled")
        total = sum(s.samples for s in shards)
        if total < slots * batch_size:
            raise ValueError(f"{total} samples cannot fill one batch of {batch_size} on each of {slots} readers "
                             f"({world_size} ranks x {max(cfg.num_workers, 1)} workers)")
    loader = ShardLoader(sets, manifest, cfg.mode, batch_size, rank, world_size, seed, cfg.num_workers,
                         cfg.shuffle_buffer, cfg.hflip, weights, pin_memory, want_text=expect_cond_dim != 0)
    if state:
        loader.load_state_dict(state)
    return loader


def build_val_loader(cfg, batch_size: int, rank: int, world_size: int, max_videos: int = 0,
                     pin_memory: bool = False, expect_cond_dim: int | None = None) -> ShardLoader:
    """One pass over the validation shards (``cfg.val_shards``, else the VAL_DIR folders beside
    ``cfg.shards``), this rank's share of the first ``max_videos`` (0: all) in listed order."""
    spec = cfg.val_shards
    if spec is None:
        spec, looked = val_dirs_beside(cfg.shards)
        if not spec:
            raise ValueError(f"no validation shards: data.val_shards is unset and there is no {VAL_DIR}/ folder "
                             f"beside data.shards (looked for {', '.join(looked) or 'nothing: no local data.shards'});"
                             f" write one with vdm-shard --val-fraction, or set data.val_shards")
    elif spec in ("", False):
        raise ValueError("data.val_shards is off (\"\")")
    sets = resolve_shards(spec)
    manifest = check_manifest(cfg, merged_manifest(sets), expect_cond_dim)
    unknown = [s.url for ss in sets for s in ss.shards if s.samples is None]
    if unknown:
        raise ValueError(f"data.val_shards: validation reads each sample once and needs each shard's sample count; "
                         f"no manifest.json lists {unknown[0]}; keep vdm-shard's manifest beside the shards")
    total = sum(ss.total_samples for ss in sets)
    limit = min(total, max_videos) if max_videos else total
    return ShardLoader(sets, manifest, "eval", batch_size, rank, world_size, seed=0, num_workers=cfg.num_workers,
                       shuffle_buffer=0, hflip=False, weights=None, pin_memory=pin_memory,
                       want_text=expect_cond_dim != 0, limit=limit)
