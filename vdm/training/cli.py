"""vdm-train: train a text-to-video diffusion model with DeepSpeed on streamed shards.

Run under a launcher for several ranks:
    deepspeed --num_gpus 2 $(which vdm-train) --config configs/demo.yaml train.steps=200
or use launch/single_node.sh, which checks the config before any process starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from vdm.config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vdm-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 data.shards=DIR")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the data, print the plan, and exit (no training)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not is_main:  # DeepSpeed's own INFO lines would repeat once per rank
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def check(config) -> int:
    """Validate what can be validated without processes: config, shards, manifest vs model."""
    from vdm.data.stream import build_loader
    from vdm.training.loop import build_val_loader_for, resolve_data_facts

    loader = build_loader(config.data, batch_size=config.train.micro_batch_size, rank=0, world_size=1,
                          seed=config.train.seed, expect_cond_dim=config.model.cond_dim or None)
    facts = resolve_data_facts(config, loader.manifest)
    if config.log.val_every:
        build_val_loader_for(config, facts, rank=0, world_size=1, cond_dim=config.model.cond_dim or None)
    print(f"config ok: {facts['frames']} frames {facts['image_size']}x{facts['image_size']}, "
          f"encoder {facts['encoder']} ({facts['encoder_dim']}), {config.train.steps} steps, "
          f"precision {config.train.precision}, ZeRO {config.train.zero_stage}, output {config.train.output_dir}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from vdm.training.engine import check_precision

    try:
        config = load_config(args.config, args.overrides)
        check_precision(config.train)  # before any process group: a device that cannot train in it
    except (ConfigError, FileNotFoundError) as err:
        print(f"vdm-train: {err}", file=sys.stderr)
        return 2
    if args.check:
        try:
            return check(config)
        except (ValueError, FileNotFoundError) as err:
            print(f"vdm-train: {err}", file=sys.stderr)
            return 2

    import torch

    from vdm.runtime import keep_freed_memory
    from vdm.training.engine import DistInfo, init_distributed, set_cpu_threads
    from vdm.training.loop import Trainer

    dist = DistInfo.from_env(os.environ)  # the launcher's variables, read once
    setup_logging(dist.is_main)
    log = logging.getLogger("vdm.train")
    threads = set_cpu_threads(dist, os.environ)
    if not torch.cuda.is_available():
        keep_freed_memory()  # no page faults for each step's large activations
    init_distributed()
    log.info("rank %d of %d (%d on this machine), %d CPU threads each", dist.rank, dist.world_size,
             dist.local_world_size, threads)
    start = time.perf_counter()
    trainer = Trainer(config, dist)
    summary = trainer.fit()
    if dist.is_main:
        first, last = summary["first_loss"], summary["last_loss"]
        losses = "no new steps" if first is None else f"loss {first:.4f} -> {last:.4f}"
        if summary["val_loss"] is not None:
            losses += f", val loss {summary['val_loss']:.4f}"
        log.info("done: step %d, %s, %.0fs, skipped samples %d; checkpoint %s; TensorBoard %s",
                 summary["step"], losses, time.perf_counter() - start, summary["loader"].get("skipped", 0),
                 summary["checkpoint"], trainer.out / "tb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
