"""TensorBoard on rank 0; every other rank gets a writer that does nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from einops import rearrange

log = logging.getLogger("vdm.train")


class NullWriter:
    """Stands in for SummaryWriter on ranks that do not log."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_scalars_from(self, *args, **kwargs) -> None:
        pass

    def add_text(self, *args, **kwargs) -> None:
        pass

    def add_video_frames(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Writer(NullWriter):
    """A thin layer over SummaryWriter with the few calls the trainer makes."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.tb = SummaryWriter(str(log_dir))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.tb.add_scalar(tag, value, step)

    def add_scalars_from(self, prefix: str, values: dict, step: int) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        self.tb.add_text(tag, text, step)

    def add_video_frames(self, tag: str, video: torch.Tensor, step: int) -> None:
        """Log a video (b, c, f, h, w) in [0, 1] as one image per sample: its frames side by side."""
        strip = rearrange(video, "b c f h w -> b c h (f w)")  # frames left to right
        self.tb.add_images(tag, strip.clamp(0, 1).float().cpu(), step)

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def make_writer(log_dir: Path, enabled: bool, is_main: bool) -> NullWriter:
    if enabled and is_main:
        log.info("TensorBoard logs: %s  (tensorboard --logdir %s)", log_dir, log_dir)
        return Writer(log_dir)
    return NullWriter()
