"""The training loop: build everything from the config, resume, step, log, checkpoint."""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from vdm.build import build_diffusion, build_unet
from vdm.config import Config, DataConfig
from vdm.training import checkpoint
from vdm.training.ema import EMA
from vdm.training.engine import DistInfo, all_reduce_mean, autocast, initialize
from vdm.training.metrics import make_writer

log = logging.getLogger("vdm.train")
RUN_CONFIG = "run_config.json"


def train_step(engine, batch, precision: str, prob_focus_present: float) -> torch.Tensor:
    """Loss of one micro-batch (fp32 scalar); the caller decides whether to backward it."""
    device = engine.device
    video = batch.video.to(device, non_blocking=True)
    text = batch.text.to(device, non_blocking=True) if batch.text is not None else None
    mask = batch.mask.to(device, non_blocking=True) if batch.mask is not None else None
    with autocast(device, precision):
        loss = engine(video, cond=text, cond_mask=mask, prob_focus_present=prob_focus_present)
    return loss.float()


def resolve_data_facts(config: Config, manifest) -> dict:
    """What the model must agree with the data on: geometry and text encoder; from manifest or config."""
    data: DataConfig = config.data
    facts = {"frames": data.frames, "image_size": data.image_size, "channels": config.model.channels,
             "encoder": None, "encoder_dim": None, "encoder_dtype": None, "max_tokens": None}
    if manifest is not None:
        if manifest.height != manifest.width:
            raise ValueError(f"shards hold {manifest.height}x{manifest.width} clips; vdm trains square clips")
        facts.update(frames=manifest.frames, image_size=manifest.height, channels=manifest.channels,
                     encoder=manifest.encoder, encoder_dim=manifest.encoder_dim,
                     encoder_dtype=manifest.encoder_dtype, max_tokens=manifest.max_tokens)
    if facts["frames"] is None or facts["image_size"] is None:
        raise ValueError("data.frames and data.image_size must be set when the shards have no manifest.json")
    return facts


def build_val_loader_for(config: Config, facts: dict, rank: int, world_size: int, cond_dim: int | None):
    """This rank's share of the validation shards, checked against the training data's geometry;
    a ValueError naming log.val_every and what was looked for when there are none."""
    from vdm.data.stream import build_val_loader

    data = replace(config.data, frames=facts["frames"], image_size=facts["image_size"])
    try:
        return build_val_loader(data, batch_size=config.train.micro_batch_size, rank=rank, world_size=world_size,
                                max_videos=config.log.val_max_videos, expect_cond_dim=cond_dim)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"log.val_every={config.log.val_every}: {err}") from None


class Trainer:
    """Owns the engine, EMA, loader and writer for one run; `fit()` trains to `train.steps`."""

    def __init__(self, config: Config, dist: DistInfo):
        from vdm.data.stream import build_loader

        self.config, self.dist = config, dist
        train = config.train
        self.out = Path(train.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        torch.manual_seed(train.seed + dist.rank)
        np.random.seed(train.seed + dist.rank)

        resume_tag = checkpoint.find_latest(self.ckpt_dir)
        rank_state = checkpoint.read_rank_state(self.ckpt_dir, resume_tag, dist) if resume_tag else {}
        self.loader = build_loader(config.data, batch_size=train.micro_batch_size, rank=dist.rank,
                                   world_size=dist.world_size, seed=train.seed, state=rank_state.get("loader"),
                                   expect_cond_dim=config.model.cond_dim or None)
        self.facts = resolve_data_facts(config, self.loader.manifest)
        cond_dim = config.model.cond_dim if config.model.cond_dim is not None else (self.facts["encoder_dim"] or 0)
        self.model_config = replace(config.model, cond_dim=cond_dim, channels=self.facts["channels"])
        self.val_loader = None
        if config.log.val_every:
            self.val_loader = build_val_loader_for(config, self.facts, dist.rank, dist.world_size, cond_dim)
            log.info("validation: %d videos every %d steps", self.val_loader.limit, config.log.val_every)

        self.unet = build_unet(self.model_config)
        diffusion = build_diffusion(self.unet, config.diffusion, self.facts["image_size"], self.facts["frames"],
                                    self.facts["channels"])
        self.engine = initialize(diffusion, train, dist.world_size)  # the schedule stays fp32 (GaussianDiffusion._apply)
        self.ema = EMA(self.unet, train.ema_decay, train.ema_update_every, train.ema_start_step)
        self.step = 0
        if resume_tag is not None:
            client, ema_state = checkpoint.load(self.engine, self.ckpt_dir, resume_tag, rank_state)
            self.step = int(client["step"])
            if ema_state is not None:
                self.ema.load_state_dict(ema_state)
            log.info("resumed from %s at step %d", self.ckpt_dir / resume_tag, self.step)
        self.writer = make_writer(self.out / "tb", config.log.tensorboard, dist.is_main)
        self.stop_requested = False
        if dist.is_main:
            self._write_run_config()
        n_params = sum(p.numel() for p in self.unet.parameters())
        log.info("Unet3D: %.2fM parameters; data: %s frames %sx%s, encoder %s (%s); %d ranks",
                 n_params / 1e6, self.facts["frames"], self.facts["image_size"], self.facts["image_size"],
                 self.facts["encoder"], self.facts["encoder_dim"], dist.world_size)

    def _write_run_config(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        resolved = self.config.to_dict()
        resolved["model"] = self.model_config.__dict__ | {"dim_mults": list(self.model_config.dim_mults)}
        resolved = json.loads(json.dumps(resolved, default=list))  # tuples -> lists, for YAML and JSON alike
        (self.out / RUN_CONFIG).write_text(json.dumps({"config": resolved, "data": self.facts}, indent=2))
        text = yaml.safe_dump(resolved)
        (self.out / "config.yaml").write_text(text)
        self.writer.add_text("config", "```\n" + text + "```")

    def _handle_sigterm(self, signum, frame) -> None:
        # Preemption: finish the current step, save, exit cleanly (the launcher only forwards the signal).
        self.stop_requested = True

    def fit(self) -> dict:
        """Train from the current step to `train.steps`; returns a summary dict."""
        train, logcfg = self.config.train, self.config.log
        signal.signal(signal.SIGTERM, self._handle_sigterm)
        batches = iter(self.loader)
        first_loss = last_loss = val_loss = None
        window = {"loss": 0.0, "n": 0, "data_time": 0.0, "videos": 0}
        bad_in_a_row = 0
        t_last = time.perf_counter()
        end = min(train.steps, train.stop_at or train.steps)
        while self.step < end:
            t0 = time.perf_counter()
            losses = []
            stop = False
            for _ in range(train.grad_accum):
                # DataLoader seeds its workers from the global RNG at every epoch: keep those draws out
                # of the noise and timestep stream, so a resumed run continues it exactly.
                with torch.random.fork_rng(devices=[]):
                    batch = next(batches)
                t_data = time.perf_counter()
                window["data_time"] += t_data - t0
                loss = train_step(self.engine, batch, train.precision, self.config.diffusion.prob_focus_present)
                # One small all-reduce lets every rank agree to skip a non-finite loss and to stop on SIGTERM.
                flags = all_reduce_mean(torch.tensor([loss.item(), float(not torch.isfinite(loss)),
                                                      float(self.stop_requested)], device=self.engine.device))
                stop = stop or flags[2].item() > 0
                if flags[1].item() > 0:
                    bad_in_a_row += 1
                    log.warning("non-finite loss at step %d (%d in a row); skipping the micro-batch",
                                self.step, bad_in_a_row)
                    if bad_in_a_row >= train.max_bad_steps:
                        raise FloatingPointError(f"{bad_in_a_row} non-finite losses in a row at step {self.step}")
                    t0 = time.perf_counter()
                    continue
                bad_in_a_row = 0
                self.engine.backward(loss)
                self.engine.step()
                losses.append(flags[0].item())
                window["videos"] += batch.video.shape[0] * self.dist.world_size
                t0 = time.perf_counter()
            if not losses:
                continue
            self.step += 1
            self.ema.update(self.unet, self.step)
            mean_loss = sum(losses) / len(losses)
            first_loss = mean_loss if first_loss is None else first_loss
            last_loss = mean_loss
            window["loss"] += mean_loss
            window["n"] += 1
            if self.step % logcfg.log_every == 0 or self.step == end:
                self._log(window, time.perf_counter() - t_last)
                window = {"loss": 0.0, "n": 0, "data_time": 0.0, "videos": 0}
                t_last = time.perf_counter()
            if logcfg.sample_every and self.step % logcfg.sample_every == 0:
                self._log_samples(batch)
            if self.val_loader is not None and (self.step % logcfg.val_every == 0 or self.step == end):
                val_loss = self.validate()
            if self.step % train.save_every == 0 or self.step == end or stop:
                self.save()
            if stop:
                log.warning("SIGTERM: saved step %d and stopping; rerun the same command to resume", self.step)
                break
        self.writer.close()
        return {"step": self.step, "first_loss": first_loss, "last_loss": last_loss, "val_loss": val_loss,
                "checkpoint": str(self.ckpt_dir / checkpoint.tag_for(self.step)), "loader": self.loader.stats()}

    def _log(self, window: dict, elapsed: float) -> None:
        loss = window["loss"] / max(1, window["n"])
        lr = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        stats = self.loader.stats()
        data_frac = window["data_time"] / max(elapsed, 1e-9)
        vps = window["videos"] / max(elapsed, 1e-9)
        log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %s  %.1f videos/s  data %.0f%%  skipped %d",
                 self.step, self.config.train.steps, loss, lr,
                 "n/a" if grad_norm is None else f"{float(grad_norm):.3f}", vps, 100 * data_frac,
                 stats.get("skipped", 0))
        w = self.writer
        w.add_scalar("train/loss", loss, self.step)
        w.add_scalar("train/lr", lr, self.step)
        if grad_norm is not None:
            w.add_scalar("train/grad_norm", float(grad_norm), self.step)
        w.add_scalar("perf/videos_per_s", vps, self.step)
        w.add_scalar("perf/videos_per_s_per_rank", vps / self.dist.world_size, self.step)
        w.add_scalar("perf/data_wait_fraction", data_frac, self.step)
        if self.config.train.precision == "fp16":
            w.add_scalar("train/loss_scale", float(self.engine.optimizer.cur_scale), self.step)
            w.add_scalar("train/skipped_steps", float(self.engine.skipped_steps), self.step)
        w.add_scalars_from("data", {k: v for k, v in stats.items() if not isinstance(v, dict)}, self.step)
        w.flush()

    def validate(self) -> float | None:
        """The validation loss of the engine's (raw, not EMA) weights, logged as val/loss at this step."""
        from vdm.training.validation import evaluate

        # The validation loader's workers are seeded from the global RNG: keep the training stream untouched.
        with torch.random.fork_rng(devices=[]):
            result = evaluate(self.engine.module, self.val_loader, self.engine.device, self.config.train.precision)
        if result["loss"] is None:
            log.warning("step %d: no readable validation videos", self.step)
            return None
        log.info("step %d val loss %.4f (%d videos)", self.step, result["loss"], result["videos"])
        self.writer.add_scalar("val/loss", result["loss"], self.step)
        for bucket, value in result["loss_t"].items():
            self.writer.add_scalar(f"val/loss_t{bucket}", value, self.step)
        self.writer.flush()
        return result["loss"]

    @torch.no_grad()
    def _log_samples(self, batch) -> None:
        """A few DDIM samples for the batch's first captions (every rank runs them: ZeRO 3 needs all)."""
        n = min(2, batch.video.shape[0])
        text = batch.text[:n].to(self.engine.device) if batch.text is not None else None
        mask = batch.mask[:n].to(self.engine.device) if batch.mask is not None else None
        with autocast(self.engine.device, self.config.train.precision):
            video = self.engine.module.sample(cond=text, cond_mask=mask, batch_size=n, sampler="ddim",
                                              steps=self.config.log.sample_steps, progress=False)
        video = (video.float() + 1) / 2  # the trainer's diffusion works in [-1, 1]
        self.writer.add_video_frames("samples", video, self.step)
        if text is not None:
            self.writer.add_text("samples/captions", " | ".join(batch.captions[:n]), self.step)

    def save(self) -> str:
        client = {"step": self.step}
        rank_state = {"loader": self.loader.state_dict(), "step": self.step}
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, self.dist, self.ema.state_dict(), rank_state,
                              client, self.config.train.keep_last)
        log.info("saved checkpoint %s", self.ckpt_dir / tag)
        return tag
