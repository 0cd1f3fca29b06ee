"""``vdm-shard --inspect DIR``: summarise a sharded dataset and check every shard against its manifest."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from vdm.data.format import MANIFEST_NAME, SampleError, decode_sample, read_manifest

log = logging.getLogger("data_tools")


def _raw_samples(path: Path):
    """Raw samples of one tar through WebDataset, members left as bytes (nothing is decoded)."""
    import webdataset as wds

    return wds.WebDataset(str(path), shardshuffle=False, empty_check=False)


def verify_split(root: Path) -> list[str]:
    """Check ``root``'s shards: readable, sample counts as in the manifest, geometry, unique keys. Returns problems."""
    manifest = read_manifest(root)
    problems, keys = [], set()
    for shard in manifest.shards:
        path = root / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        count = 0
        try:
            for raw in _raw_samples(path):
                sample = decode_sample(raw, expect=manifest)
                if sample.key in keys:
                    problems.append(f"{shard['name']}: duplicate key {sample.key}")
                keys.add(sample.key)
                count += 1
        except SampleError as err:
            problems.append(f"{shard['name']}: {err}")
        except Exception as err:  # a truncated tar surfaces as tarfile/OSError/ValueError
            problems.append(f"{shard['name']}: unreadable ({type(err).__name__}: {err})")
        if count != shard["samples"]:
            problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
    return problems


def describe(root: Path) -> str:
    """A few lines about one split's manifest."""
    m = read_manifest(root)
    reasons = Counter(x["reason"].split(" (")[0].split(":")[0] for x in m.skipped)
    lines = [f"{root}: {m.total_samples} samples in {len(m.shards)} shards, clips {m.frames}x{m.height}x{m.width}"
             f"x{m.channels} uint8, " + (f"text {m.encoder} (dim {m.encoder_dim}, max {m.max_tokens} tokens, "
                                            f"{m.encoder_dtype or 'float32'})"
                                          if m.conditional else "unconditional (no text)"),
             f"  skipped {len(m.skipped)}" + "".join(f"\n    {n:5d}  {r}" for r, n in reasons.most_common(10))]
    return "\n".join(lines)


def inspect_dataset(root: Path) -> int:
    """Print the summary of ``root`` (and ``root/val``) and verify every shard; 0 when all match."""
    roots = [r for r in (root, root / "val") if (r / MANIFEST_NAME).is_file()]
    if not roots:
        log.error("no %s in %s: is it a directory written by vdm-shard?", MANIFEST_NAME, root)
        return 2
    bad = 0
    for r in roots:
        print(describe(r))
        problems = verify_split(r)
        for p in problems:
            print(f"  PROBLEM {p}")
        bad += len(problems)
        print(f"  verified: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if bad else 0
