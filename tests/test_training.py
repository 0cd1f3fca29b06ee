"""The trainer end to end on real parts: vdm-shard shards, the deepspeed launcher on 2 CPU ranks
(gloo, bf16, ZeRO 2), sharded checkpoints, TensorBoard events, resume, consolidation, sampling."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

TINY = ["model.dim=8", "model.dim_mults=[1,2]", "model.attn_heads=2", "model.attn_dim_head=8",
        "model.resnet_groups=4", "model.init_kernel_size=3", "diffusion.timesteps=50", "train.micro_batch_size=4",
        "train.warmup_steps=2", "train.lr=1e-3", "log.log_every=1", "data.num_workers=1", "data.shuffle_buffer=8",
        "train.ema_decay=0.9"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1"}


def shm_segments(port) -> list[str]:
    """DeepSpeed's CPU allreduce segments in /dev/shm for a run on this master port."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def deepspeed_train(out: Path, shards: Path, *overrides: str, ranks: int = 2, wait: bool = True):
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
           str(BIN / "vdm-train"), "--config", str(ROOT / "configs/demo.yaml"), f"data.shards={shards}",
           f"train.output_dir={out}", *TINY, *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # Each rank's ~66 MiB shared-memory segment is unlinked once all ranks have mapped it.
    assert shm_segments(port) == [], "DeepSpeed allreduce segments left in /dev/shm"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_tools.cli import main as shard_main
    from data_tools.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("data")
    gifs = make_demo_dataset(root / "gifs", n=48, size=16, frames=4, seed=1)
    assert shard_main([str(gifs), str(root / "shards"), "--frames", "4", "--size", "16", "--shard-size", "6",
                       "--workers", "1", "--val-fraction", "0.2"]) == 0  # shards/val: the validation split
    return root / "shards"


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory):
    """6 steps in one go, checkpoints and validation losses at 3 and 6."""
    out = tmp_path_factory.mktemp("straight")
    log = deepspeed_train(out, shards, "train.steps=6", "train.save_every=3", "train.keep_last=1", "log.val_every=3")
    return out, log


def scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_two_rank_run_writes_sharded_checkpoint_and_tensorboard(straight_run):
    out, log = straight_run
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000006"
    tag = ckpt / "step00000006"
    assert (tag / "COMPLETE").is_file() and (tag / "ema.safetensors").is_file()
    # ZeRO 2: one optimizer shard per rank, one per-rank state file per rank.
    assert len(list(tag.glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    assert {p.name for p in tag.glob("rank*.pt")} == {"rank00000.pt", "rank00001.pt"}
    assert not (ckpt / "step00000003").exists(), "keep_last=1 rotates older tags away"
    losses = scalars(out / "tb", "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(v == v and v > 0 for _, v in losses)
    assert [s for s, _ in scalars(out / "tb", "train/lr")] == [1, 2, 3, 4, 5, 6]
    assert "done: step 6" in log
    run = json.loads((out / "run_config.json").read_text())
    assert run["data"]["encoder_dim"] == 384 and run["config"]["model"]["cond_dim"] == 384


def test_resume_continues_to_the_same_state(straight_run, shards, tmp_path):
    """Stop at 3 of 6 steps, resume: the same losses, weights and EMA as 6 steps in one go (which
    also ran validation at step 3: it leaves the training's data, noise and weights alone).

    The first resumed step is bit-identical (same weights, Adam moments, LR, data, noise and
    timesteps). DeepSpeed's fused CPU Adam then rounds the fp32 master weights differently by about
    one ulp (seen: 1.2e-7) after a load; bf16 rounding of the weights can amplify that to about 1e-4
    of the loss a step later (seen: 1.01e-4), so later steps are compared to 1e-3 relative, still
    far below what a lost optimizer state, a replayed batch or a reset RNG would change (those move
    losses by 1e-2).
    """
    straight, _ = straight_run
    deepspeed_train(tmp_path, shards, "train.steps=6", "train.stop_at=3", "train.save_every=3", "train.keep_last=1")
    assert (tmp_path / "checkpoints/latest").read_text() == "step00000003"
    log = deepspeed_train(tmp_path, shards, "train.steps=6", "train.save_every=3", "train.keep_last=1")
    assert "resumed from" in log and "step00000003" in log
    losses_a = scalars(straight / "tb", "train/loss")
    losses_b = scalars(tmp_path / "tb", "train/loss")
    assert [s for s, _ in losses_b] == [1, 2, 3, 4, 5, 6]
    assert losses_a[:4] == losses_b[:4]
    for (_, a), (_, b) in zip(losses_a[4:], losses_b[4:]):
        assert abs(a - b) <= 1e-3 * abs(a), (losses_a, losses_b)
    a = load_file(str(straight / "checkpoints/step00000006/ema.safetensors"))
    b = load_file(str(tmp_path / "checkpoints/step00000006/ema.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3, msg=key)


def test_validation_loss_is_logged_and_does_not_depend_on_the_rank_count(straight_run, shards, tmp_path):
    """val/loss at steps 3 and 6 of the 2-rank run; step 6's equals the same raw weights' validation
    loss evaluated again in this one process (bf16 as in training): fixed timesteps and noise per video."""
    from vdm.config import DataConfig
    from vdm.data.stream import build_val_loader
    from vdm.sampling.consolidate import consolidate
    from vdm.sampling.pipeline import load_pipeline
    from vdm.training.validation import evaluate

    run, log = straight_run
    val = scalars(run / "tb", "val/loss")
    assert [s for s, _ in val] == [3, 6] and all(0 < v < float("inf") for _, v in val)
    n_val = json.loads((shards / "val/manifest.json").read_text())["total_samples"]
    assert f"step 6 val loss {val[1][1]:.4f} ({n_val} videos)" in log
    assert sum(len(scalars(run / "tb", f"val/loss_t{b}")) for b in ("low", "mid", "high")) >= 2

    diffusion = load_pipeline(consolidate(run, tmp_path / "raw", weights="model")).diffusion
    diffusion.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds it; the schedule stays fp32
    loader = build_val_loader(DataConfig(shards=str(shards), num_workers=0), batch_size=3, rank=0, world_size=1,
                              expect_cond_dim=384)
    again = evaluate(diffusion, loader, torch.device("cpu"), "bf16")
    assert again["videos"] == n_val
    assert abs(again["loss"] - val[1][1]) <= 1e-3 * val[1][1], (again, val)


def test_validation_without_val_shards_fails_at_start(shards):
    """No val/ beside the shards: vdm-train --check (what the launch scripts run first) names the key and the path."""
    proc = subprocess.run([str(BIN / "vdm-train"), "--config", str(ROOT / "configs/demo.yaml"), "--check",
                           f"data.shards={shards / 'val'}", "train.micro_batch_size=2", "log.val_every=5"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "log.val_every=5" in proc.stderr and str(shards / "val" / "val") in proc.stderr


def test_incomplete_tag_is_ignored_on_resume(straight_run, shards, tmp_path):
    from vdm.training.checkpoint import find_latest

    deepspeed_train(tmp_path, shards, "train.steps=2", "train.save_every=2")
    ckpt = tmp_path / "checkpoints"
    # A save that died midway: files of step 4 without the COMPLETE marker, and `latest` pointing at it.
    (ckpt / "step00000004").mkdir()
    (ckpt / "step00000004" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (ckpt / "latest").write_text("step00000004")
    assert find_latest(ckpt) == "step00000002"
    log = deepspeed_train(tmp_path, shards, "train.steps=3", "train.save_every=3")
    assert "step00000002" in log and "done: step 3" in log


def test_consolidate_then_sample_gif_and_mp4(straight_run, shards, tmp_path):
    from vdm.sampling.cli import main as sample_main
    from vdm.sampling.consolidate import main as consolidate_main
    from vdm.sampling.pipeline import load_pipeline

    run, _ = straight_run
    assert consolidate_main([str(run), "--out", str(tmp_path / "model")]) == 0
    weights = load_file(str(tmp_path / "model/model.safetensors"))
    ema = load_file(str(run / "checkpoints/step00000006/ema.safetensors"))
    for key, value in ema.items():
        torch.testing.assert_close(weights[key], value)
    config = json.loads((tmp_path / "model/model_config.json").read_text())
    assert config["encoder"]["dim"] == 384 and config["num_frames"] == 4 and config["image_size"] == 16
    # Prompts are encoded in the dtype the captions were (the manifest's, vdm-shard's "auto" resolved).
    manifest = json.loads((shards / "manifest.json").read_text())
    assert config["encoder"]["dtype"] == manifest["encoder_dtype"] and manifest["encoder_dtype"] in ("float32", "bfloat16")

    pipe = load_pipeline(tmp_path / "model")
    assert pipe.encoder.dtype == manifest["encoder_dtype"]
    a = pipe(["a red circle moving left"], cond_scale=3.0, sampler="ddim", steps=5, seed=3, progress=False)
    b = pipe(["a red circle moving left"], cond_scale=3.0, sampler="ddim", steps=5, seed=3, progress=False)
    assert a.shape == (1, 3, 4, 16, 16) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b)

    out = tmp_path / "samples"
    assert sample_main([str(tmp_path / "model"), "--prompt", "a blue square moving up", "--prompt", "a red circle",
                        "--steps", "4", "--cond-scale", "2", "--format", "gif", "--format", "mp4",
                        "--out", str(out), "--no-progress"]) == 0
    index = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in index["samples"]] == ["a blue square moving up", "a red circle"]
    gif = next(f for f in index["samples"][0]["files"] if f.endswith(".gif"))
    with Image.open(gif) as img:
        assert img.n_frames == 4 and img.size == (16, 16)
    assert all(Path(f).stat().st_size > 0 for s in index["samples"] for f in s["files"])


def test_consolidate_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    from vdm.sampling.consolidate import main as consolidate_main

    assert consolidate_main([str(tmp_path)]) == 2
    assert "run_config.json" in capsys.readouterr().err


def test_sigterm_saves_and_exits_cleanly(shards, tmp_path):
    proc = deepspeed_train(tmp_path, shards, "train.steps=1000", "train.save_every=1000", wait=False)
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if "step 2/1000" in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or Ctrl-C would: the launcher and every rank
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    from vdm.training.checkpoint import find_latest

    tag = find_latest(tmp_path / "checkpoints")
    assert tag is not None and 2 <= int(tag[4:]) < 1000, log[-3000:]
    assert "SIGTERM: saved step" in log


def test_launch_script_rejects_bad_config_before_starting_ranks(shards, tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "launch/single_node.sh"), str(ROOT / "configs/demo.yaml"),
                           f"data.shards={shards}", "train.precison=bf16"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "train.precison" in proc.stderr and "did you mean train.precision" in proc.stderr
    assert "deepspeed" not in proc.stdout.lower(), "no rank may start"


def test_two_nodes_on_loopback_with_torchrun(shards, tmp_path):
    """launch/torchrun.sh as two nodes (one rank each) on 127.0.0.1: the multi-node path without ssh."""
    port = str(free_port())
    procs = [subprocess.Popen(["bash", str(ROOT / "launch/torchrun.sh"), str(ROOT / "configs/demo.yaml"),
                               f"data.shards={shards}", f"train.output_dir={tmp_path}", "train.steps=2",
                               "train.save_every=2", *TINY],
                              cwd=ROOT, env={**env(), "NNODES": "2", "NODE_RANK": str(rank), "NPROC": "1",
                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert shm_segments(port) == []
    tag = tmp_path / "checkpoints/step00000002"
    assert json.loads((tag / "COMPLETE").read_text()) == {"step": 2, "world_size": 2}
    assert {p.name for p in tag.glob("rank*.pt")} == {"rank00000.pt", "rank00001.pt"}


@pytest.mark.parametrize("precision,stage", [("bf16", 3), ("fp16", 1)])
def test_other_zero_stages_and_fp16_train_save_and_consolidate(shards, tmp_path, precision, stage):
    """ZeRO 3 (parameters partitioned: EMA gathers them) and fp16 (dynamic loss scale) end to end; with
    one validation video, so one rank has none and must still join the other's forward calls."""
    from deepspeed.accelerator import get_accelerator

    from vdm.sampling.consolidate import consolidate
    from vdm.sampling.pipeline import load_pipeline

    args = ("train.steps=3", "train.save_every=3", f"train.precision={precision}", f"train.zero_stage={stage}",
            "log.val_every=3", "log.val_max_videos=1")
    if precision == "fp16" and torch.float16 not in get_accelerator().supported_dtypes():
        # DeepSpeed's CPU accelerator has no fp16 without oneDNN fp16 kernels (AMD Zen 4, for one):
        # the launch must stop at start, naming the key and what this machine allows.
        proc = deepspeed_train(tmp_path, shards, *args, wait=False)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0
        assert "train.precision: fp16 is not supported on this machine" in out and "allowed here: bf16, fp32" in out
        assert not (tmp_path / "checkpoints").exists()
        pytest.skip("fp16 training: DeepSpeed's accelerator has no fp16 here (the start-up error was checked)")
    log = deepspeed_train(tmp_path, shards, *args)
    assert "done: step 3" in log and "step 3 val loss" in log and "(1 videos)" in log
    assert len(list((tmp_path / "checkpoints/step00000003").glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    if precision == "fp16":
        assert [s for s, _ in scalars(tmp_path / "tb", "train/loss_scale")] == [1, 2, 3]
    for weights in ("ema", "model"):
        out = consolidate(tmp_path, tmp_path / weights, weights=weights)
        pipe = load_pipeline(out)
        video = pipe(["a red circle"], sampler="ddim", steps=2, cond_scale=2.0, progress=False)
        assert video.shape == (1, 3, 4, 16, 16) and torch.isfinite(video).all()
    ema, raw = load_file(str(tmp_path / "ema/model.safetensors")), load_file(str(tmp_path / "model/model.safetensors"))
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)
