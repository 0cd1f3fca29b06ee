"""``vdm-shard``: turn folders of captioned GIFs / videos (or WebDataset video shards) into training shards.

    vdm-shard INPUT_DIR OUTPUT_DIR [--frames 8] [--size 32] [--shard-size 64] [--workers 2]
              [--encoder packaged:minilm | bert-base-cased | FOLDER] [--no-text] ...
    vdm-shard --inspect OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_tools.decode import FRAME_POLICIES, RESIZE_MODES, SHORT_POLICIES, DecodeOptions
from vdm.text import TEXT_DTYPES

log = logging.getLogger("data_tools")


def _size(text: str) -> tuple[int, int]:
    """``32`` or ``48x64`` (height x width)."""
    try:
        h, _, w = text.lower().partition("x")
        height, width = int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be N or HxW (e.g. 32 or 48x64), got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also documents every option in ``--help``)."""
    p = argparse.ArgumentParser(prog="vdm-shard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input_dir", nargs="?", help="folder of GIFs/videos with captions, or of .tar WebDataset shards")
    p.add_argument("output_dir", nargs="?", help="where shards and manifest.json go (validation split in OUT/val)")
    p.add_argument("--inspect", metavar="DIR", help="summarise a sharded dataset and verify every shard, then exit")
    g = p.add_argument_group("clips")
    g.add_argument("--frames", type=int, default=8, help="frames per clip")
    g.add_argument("--size", type=_size, default=(32, 32), help="frame size: N or HxW")
    g.add_argument("--frame-policy", choices=FRAME_POLICIES, default="stride",
                   help="first N frames; N evenly strided over the clip; at --target-fps; or several clips per video")
    g.add_argument("--target-fps", type=float, default=None, help="for fps/clips policies (default: source rate)")
    g.add_argument("--max-clips", type=int, default=4, help="clips policy: most clips per source video")
    g.add_argument("--short-policy", choices=SHORT_POLICIES, default="loop",
                   help="sources with fewer frames than a clip needs: loop them, or skip them")
    g.add_argument("--resize-mode", choices=RESIZE_MODES, default="crop", help="center-crop or pad to the size")
    g.add_argument("--min-source-frames", type=int, default=2, help="skip sources with fewer frames (still images)")
    g.add_argument("--max-pixels", type=int, default=4096 * 4096,
                   help="refuse sources whose frame (from the header) is larger")
    t = p.add_argument_group("text")
    t.add_argument("--encoder", default="packaged:minilm", help="BERT-class encoder: hub name or local folder")
    t.add_argument("--no-text", action="store_true", help="unconditional dataset: no embeddings")
    t.add_argument("--allow-empty-captions", action="store_true",
                   help="keep inputs without a caption (empty caption) instead of skipping them")
    t.add_argument("--text-batch-size", type=int, default=64, help="captions per BERT batch")
    t.add_argument("--max-tokens", type=int, default=64, help="caption tokens kept")
    t.add_argument("--device", default="auto", help="device for BERT: auto, cpu, cuda, cuda:1 ...")
    t.add_argument("--text-dtype", choices=TEXT_DTYPES, default="auto",
                   help="BERT matmul precision; auto: bf16 on GPUs and on CPUs with AMX/AVX512-BF16 (~1.8x "
                        "faster than fp32 there), else fp32. Recorded in the manifest; prompts are encoded the "
                        "same way at sampling time. float32 makes the bytes independent of --workers")
    o = p.add_argument_group("output")
    o.add_argument("--shard-size", type=int, default=64, help="samples per shard (target)")
    o.add_argument("--workers", type=int, default=2, help="decode processes (0: decode in the main process)")
    o.add_argument("--decode-timeout", type=float, default=300.0,
                   help="seconds one input may take to decode before it is skipped (with --workers > 0)")
    o.add_argument("--shuffle-seed", type=int, default=None, help="shuffle inputs before sharding")
    o.add_argument("--val-fraction", type=float, default=0.0, help="fraction of inputs for OUT/val")
    o.add_argument("--split", default="train", help="name of the main split (shard name prefix)")
    o.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("-q", "--quiet", action="store_true", help="warnings and the summary only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vdm-shard``; returns the exit status (0 when samples were written or verified)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    if args.inspect:
        from data_tools.verify import inspect_dataset

        return inspect_dataset(Path(args.inspect))
    if not args.input_dir or not args.output_dir:
        parser.error("give INPUT_DIR and OUTPUT_DIR (or --inspect DIR)")
    from data_tools.pipeline import ShardConfig, run

    try:
        decode = DecodeOptions(frames=args.frames, height=args.size[0], width=args.size[1],
                               frame_policy=args.frame_policy, target_fps=args.target_fps, max_clips=args.max_clips,
                               short_policy=args.short_policy, resize_mode=args.resize_mode,
                               min_source_frames=args.min_source_frames, max_pixels=args.max_pixels)
        cfg = ShardConfig(input_dir=Path(args.input_dir), output_dir=Path(args.output_dir), decode=decode,
                          shard_size=args.shard_size, workers=args.workers, decode_timeout=args.decode_timeout,
                          encoder=args.encoder,
                          no_text=args.no_text, allow_empty_captions=args.allow_empty_captions,
                          text_batch_size=args.text_batch_size, max_tokens=args.max_tokens, device=args.device,
                          text_dtype=args.text_dtype,
                          shuffle_seed=args.shuffle_seed, val_fraction=args.val_fraction, split=args.split,
                          overwrite=args.overwrite, progress=not args.no_progress)
    except ValueError as err:
        parser.error(str(err))
    try:
        summary = run(cfg)
    except FileNotFoundError as err:
        log.error("%s", err)
        return 2
    t = summary.timings
    log.info("time: decode %.1fs, resize %.1fs (summed over workers), BERT %.1fs, write %.1fs",
             t["decode_s"], t["resize_s"], t["bert_s"], t["write_s"])
    print(f"vdm-shard: wrote {summary.written} samples in {summary.shards} shards to {', '.join(summary.roots)}, "
          f"skipped {summary.skipped}" + (f" ({summary.resumed_shards} shards kept from an earlier run)"
                                          if summary.resumed_shards else ""))
    if summary.written == 0:
        log.error("nothing was written: see the skipped list in %s/manifest.json", cfg.output_dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
