"""Unet3D training-step time of two git revisions, alternating steps in one process.

    .venv/bin/python bench/ab.py REV_A REV_B                        # fixed config, 4 frames on CPU
    .venv/bin/python bench/ab.py main HEAD --steps 10 --frames 16   # the fixed config at 16 frames
    .venv/bin/python bench/ab.py HEAD~1 HEAD --config tiny --steps 2 --frames 2 --no-kernels

A shared machine's speed drifts between runs by more than most changes gain, so the two revisions
are timed in the same process, step for step (A B, B A, A B, ...), and compared by their medians.
Prints the median step time of each and B/A (below 1: B is faster).

Each revision's `vdm/` is exported with `git archive` into a cache folder named by its tree
(~/.cache/vdm-ab, reused by later runs) and imported as the package `vdm`; the two revisions'
modules are swapped in and out of `sys.modules` around every build and step, so each revision's
imports, lazy ones included, resolve to its own code. Both models are built from bench/unet.py's
config with the same seed (same inputs), and B then takes A's initial weights wherever a
state-dict key and shape match.

vdm's fused CPU kernels (vdm/model/csrc) register their ops under one namespace, which a process
can register only once. Where the two revisions' csrc/ are the same, both use one build; where
they differ, B's export has its namespace renamed (`vdm_cpu` -> `vdm_cpu_b`) so that both sets
load. The builds are cached in ~/.cache/vdm-ab/torch_extensions (TORCH_EXTENSIONS_DIR, if set,
wins); the first run of a revision with kernels builds them (about 30 s). `--no-kernels` runs both
revisions on the PyTorch path (VDM_CPU_KERNELS=0; revisions older than that switch ignore it).
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vdm-ab"

sys.path.insert(0, str(ROOT / "bench"))
import unet as B  # noqa: E402  (bench/unet.py: CONFIGS, DTYPES, build, train_step, sync)

# bench/unet.py puts the working tree on the path; no `vdm` may come from there.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]


def git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def is_vdm(name: str) -> bool:
    return name == "vdm" or name.startswith("vdm.")


class Revision:
    """One revision's `vdm` package; `with revision:` makes it the `vdm` that imports resolve to."""

    def __init__(self, rev: str, commit: str, rename_ops: bool = False):
        self.rev, self.commit = rev, commit
        tree = git("rev-parse", f"{commit}:vdm")
        self.root = CACHE / (tree + ("-ops_b" if rename_ops else ""))
        if not self.root.is_dir():
            self._export(rename_ops)
        self.modules = {}

    def _export(self, rename_ops: bool):
        partial = self.root.with_name(self.root.name + f".partial{os.getpid()}")
        partial.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", self.commit, "vdm"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
        if rename_ops:
            for path in (partial / "vdm").rglob("*"):
                if path.suffix in (".py", ".cpp", ".h"):
                    path.write_text(path.read_text().replace("vdm_cpu", "vdm_cpu_b"))
        partial.rename(self.root)

    def __enter__(self):
        leaked = [n for n in sys.modules if is_vdm(n)]
        if leaked:
            raise RuntimeError(f"{leaked[0]} was imported outside a revision")
        sys.modules.update(self.modules)
        sys.path.insert(0, str(self.root))
        return self

    def __exit__(self, *exc):
        sys.path.remove(str(self.root))
        self.modules = {n: sys.modules.pop(n) for n in [n for n in sys.modules if is_vdm(n)]}
        package = self.modules.get("vdm")
        if package is not None and not package.__file__.startswith(str(self.root)):
            raise RuntimeError(f"{self.rev} imported vdm from {package.__file__}, not {self.root}")


def commit_of(rev: str) -> str:
    return git("rev-parse", "--short", "--verify", f"{rev}^{{commit}}")


def csrc_tree(commit: str):
    """The git tree of the revision's kernel sources, None where it has none."""
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q",
                          f"{commit}:vdm/model/csrc"], capture_output=True, text=True)
    return out.stdout.strip() or None


def timed_step(model, inputs, dtype, device) -> float:
    B.sync(device)
    start = time.perf_counter()
    B.train_step(model, inputs, dtype)
    B.sync(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev_a", metavar="REV_A", help="the reference revision (any git revision)")
    parser.add_argument("rev_b", metavar="REV_B", help="the revision compared against it")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per revision")
    parser.add_argument("--frames", type=int,
                        help="frames per video (default: 4 for `fixed` on CPU, else the config's)")
    parser.add_argument("--config", default="fixed", choices=sorted(B.CONFIGS),
                        help="bench/unet.py's configs: fixed = dim 64, dim_mults (1, 2, 4, 8), "
                             "batch 2, 64x64; tiny = dim 16, dim_mults (1, 2), 32x32")
    parser.add_argument("--dtype", default="bf16", choices=sorted(B.DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--no-kernels", action="store_true",
                        help="vdm's fused CPU kernels off in both revisions (VDM_CPU_KERNELS=0)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.no_kernels:
        os.environ["VDM_CPU_KERNELS"] = "0"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), B.DTYPES[args.dtype]
    cfg = B.CONFIGS[args.config]
    cfg["frames"] = args.frames or (4 if args.config == "fixed" and device.type == "cpu"
                                    else cfg["frames"])

    commit_a, commit_b = commit_of(args.rev_a), commit_of(args.rev_b)
    rename = not args.no_kernels and csrc_tree(commit_a) != csrc_tree(commit_b)
    a, b = Revision(args.rev_a, commit_a), Revision(args.rev_b, commit_b, rename_ops=rename)
    with a:
        with contextlib.suppress(ImportError):  # as vdm-train does on CPU, where the revision has it
            from vdm.runtime import keep_freed_memory
            keep_freed_memory()
        model_a, inputs = B.build(args.config, device)
    with b:
        model_b, _ = B.build(args.config, device)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    shared = {k: v for k, v in state_a.items() if k in state_b and state_b[k].shape == v.shape}
    model_b.load_state_dict(shared, strict=False)
    print(f"{args.config}, {cfg['frames']} frames, {args.dtype}, {device.type}, "
          f"{torch.get_num_threads()} threads; B starts from A's weights for {len(shared)} of its "
          f"{len(state_b)} tensors (A has {len(state_a)})"
          + ("; B's kernels under the op namespace vdm_cpu_b" if rename else ""), flush=True)

    runs = {"A": (a, model_a), "B": (b, model_b)}
    times = {"A": [], "B": []}
    for i in range(args.steps + 1):  # the first pair warms both up (allocator, kernel builds, caches)
        for label in ("A", "B") if i % 2 == 0 else ("B", "A"):
            revision, model = runs[label]
            with revision:
                seconds = timed_step(model, inputs, dtype, device)
            if i:
                times[label].append(seconds)
    med = {label: statistics.median(t) for label, t in times.items()}
    print(f"A {args.rev_a} ({a.commit}) median {med['A']:.3f} s/step, B {args.rev_b} ({b.commit}) "
          f"median {med['B']:.3f} s/step, B/A {med['B'] / med['A']:.3f} "
          f"({args.steps} alternating steps each)")


if __name__ == "__main__":
    main()
