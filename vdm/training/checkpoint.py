"""Sharded training checkpoints: save on every rank, commit once all ranks are done, find, load, rotate.

Layout of `<output_dir>/checkpoints/`:

    step00000500/            DeepSpeed's files (model states, one ZeRO optimizer shard per rank)
        ema.safetensors      EMA weights of the denoiser (rank 0)
        rank00000.pt         per-rank state: RNG states, loader position (tensors and plain data only)
        COMPLETE             written by rank 0 after every rank finished: only then the tag counts
    latest                   the newest complete tag, replaced atomically
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vdm.training.engine import DistInfo, barrier

TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = "COMPLETE"
EMA_FILE = "ema.safetensors"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def is_complete(ckpt_dir: Path, tag: str) -> bool:
    return (ckpt_dir / tag / COMPLETE).is_file()


def find_latest(ckpt_dir: str | os.PathLike) -> str | None:
    """The newest complete tag: the `latest` file when it names a complete tag, else a scan."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if TAG_RE.match(tag) and is_complete(ckpt_dir, tag):
            return tag
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if TAG_RE.match(p.name) and is_complete(ckpt_dir, p.name))
    return tags[-1] if tags else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": json.dumps(_numpy_state()), "python": repr(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(ast.literal_eval(state["python"]))


def save(engine, ckpt_dir: Path, step: int, dist: DistInfo, ema_state: dict | None, rank_state: dict,
         client_state: dict, keep_last: int) -> str:
    """Save tag `stepNNNNNNNN` on every rank (all must call), commit it, then drop old tags."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if dist.is_main:
        if tag_dir.exists():  # a partial save of this step from an interrupted run
            shutil.rmtree(tag_dir)
        tag_dir.mkdir(parents=True)
    barrier()
    torch.save({**rank_state, "rng": rng_state()}, tag_dir / f"rank{dist.rank:05d}.pt")
    if dist.is_main and ema_state is not None:
        save_file(ema_state, str(tag_dir / EMA_FILE), metadata={"step": str(step)})
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank has written all its files
    if dist.is_main:
        (tag_dir / COMPLETE).write_text(json.dumps({"step": step, "world_size": dist.world_size}))
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        rotate(ckpt_dir, keep_last)
    barrier()
    return tag


def rotate(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Remove all but the newest `keep_last` complete tags, and incomplete tags older than those."""
    complete = sorted(p.name for p in ckpt_dir.glob("step*") if TAG_RE.match(p.name) and is_complete(ckpt_dir, p.name))
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else ""
    removed = []
    for path in ckpt_dir.glob("step*"):
        if TAG_RE.match(path.name) and path.name not in keep and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def read_rank_state(ckpt_dir: Path, tag: str, dist: DistInfo) -> dict:
    """This rank's saved state (loader position, RNG); refuses a checkpoint of another world size."""
    complete = json.loads((ckpt_dir / tag / COMPLETE).read_text())
    if complete["world_size"] != dist.world_size:
        raise RuntimeError(
            f"checkpoint {ckpt_dir / tag} was written by {complete['world_size']} ranks, this run has "
            f"{dist.world_size}: ZeRO optimizer shards cannot be re-partitioned here. Resume with "
            f"{complete['world_size']} ranks, or start a new run from consolidated weights.")
    return torch.load(ckpt_dir / tag / f"rank{dist.rank:05d}.pt", weights_only=True)


def load(engine, ckpt_dir: Path, tag: str, rank_state: dict) -> tuple[dict, dict | None]:
    """Load `tag` into `engine` and restore this rank's RNG; returns (client_state, EMA state or None)."""
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    set_rng_state(rank_state["rng"])
    ema_path = ckpt_dir / tag / EMA_FILE
    ema_state = load_file(str(ema_path)) if ema_path.is_file() else None
    return client_state or {}, ema_state
