"""The report of bench/learn.py: RESULTS.md, the loss curves and a grid of sampled frames as PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PROPS = ("colour", "shape", "direction", "all")


def scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one TensorBoard scalar, read back from the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path, size=(720, 420)) -> Path:
    """Line plot of each curve (step, value) on shared axes, drawn with Pillow."""
    colours = {"train/loss": (40, 90, 200), "val/loss": (220, 90, 30)}
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 60, 20, size[0] - 20, size[1] - 40
    points = [p for c in curves.values() for p in c]
    if not points:
        draw.text((left, top), "no scalars logged", fill="black")
        img.save(path)
        return path
    x_max = max(s for s, _ in points) or 1
    y_max = max(v for _, v in points) * 1.05
    draw.rectangle((left, top, right, bottom), outline="black")
    for i in range(5):
        y = y_max * i / 4
        py = bottom - (bottom - top) * i / 4
        draw.line((left - 4, py, left, py), fill="black")
        draw.text((5, py - 6), f"{y:.3f}", fill="black")
        px = left + (right - left) * i / 4
        draw.text((px - 10, bottom + 6), f"{int(x_max * i / 4)}", fill="black")
    draw.text(((left + right) // 2 - 20, bottom + 22), "step", fill="black")
    for n, (name, curve) in enumerate(curves.items()):
        xy = [(left + (right - left) * s / x_max, bottom - (bottom - top) * v / y_max) for s, v in curve]
        colour = colours.get(name, (0, 0, 0))
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) < 40 else []:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((right - 110, top + 10 + 16 * n), name, fill=colour)
    img.save(path)
    return path


def sample_grid(sample_dir: Path, path: Path, scale: int = 3) -> Path:
    """One row per prompt (its first sample), frames across, scaled up, the prompt written beside it."""
    from vdm.sampling.video_io import read_gif

    index = json.loads((sample_dir / "samples.json").read_text())
    rows, seen = [], set()
    for record in index["samples"]:
        if record["prompt"] in seen:
            continue
        seen.add(record["prompt"])
        frames = read_gif(next(f for f in record["files"] if f.endswith(".gif")))
        strip = np.concatenate(list(frames), axis=1)
        rows.append((record["prompt"], np.kron(strip, np.ones((scale, scale, 1), dtype=np.uint8))))
    label_w = 230
    h, w = rows[0][1].shape[:2]
    grid = Image.new("RGB", (label_w + w, (h + 4) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (prompt, strip) in enumerate(rows):
        grid.paste(Image.fromarray(strip), (label_w, i * (h + 4)))
        draw.text((6, i * (h + 4) + h // 2 - 6), prompt, fill="black")
    grid.save(path)
    return path


def _row(name: str, s: dict) -> str:
    return f"| {name} | " + " | ".join(f"{s[p]:.2f}" for p in PROPS) + \
        f" | {s['background_error']:.1f} | {s['jitter']:.2f} | {s['count']} |"


def _findings(results: dict) -> list[str]:
    """What the measurements say about why samples do or do not follow the caption's direction."""
    probe = results["probe"]
    tags = list(probe)
    last = probe[tags[-1]]
    enc = results.get("encoder")
    lines = ["", "## What the measurements say", ""]
    if enc:
        lines += ["How far one changed word moves the caption's encoding (packaged MiniLM; cosine between",
                  "each held-out caption and the same caption with one word swapped; 1 = no change):", "",
                  "| word swapped | at its token | mean over tokens |", "|---|---|---|"]
        lines += [f"| {w} | {v['token_cosine']:.2f} | {v['mean_cosine']:.2f} |" for w, v in enc.items()]
        lines.append("")
    change = last["x0_change"]
    if results.get("streamed"):
        st = results["streamed"]
        lines.append(f"- The data reaches the model right: the checker reads {st['count']} training clips, as "
                     f"vdm.data.stream delivers them, against their captions: colour {st['colour']:.2f}, shape "
                     f"{st['shape']:.2f}, direction {st['direction']:.2f}.")
    lines += [
        f"- Text sensitivity at high noise (last checkpoint): swapping the colour word moves the model's "
        f"x0 by {change['colour']:.3f}, the shape word by {change['shape']:.3f}, the direction word by "
        f"{change['direction']:.3f}; the conditional mean moves the prompted way for "
        f"{last['mean_x0_direction']:.2f} of the {len(results['held_out'])} held-out captions (chance 0.25).",
        "- Time-order probe: " + ", ".join(f"{t} {p['true_order_wins']:.2f}" for t, p in probe.items())
        + " (0.5 = blind to direction).",
        "- Budget: held-out background error by checkpoint "
        + ", ".join(f"{t} {results['budget'][t]['scores']['held_out']['background_error']:.1f}"
                    for t in tags if t in results["budget"])
        + f" (real clips {results['ceiling']['background_error']:.1f}); see the probe table for the scores.",
    ]
    if enc:
        first = probe[tags[0]]["x0_change"]
        lines.append(
            f"- So: the direction word moves the caption's mean encoding {(1 - enc['direction']['mean_cosine']):.2f} "
            f"(1 - cosine) against {(1 - enc['colour']['mean_cosine']):.2f} for a colour word, and the model's x0 "
            f"responds to it {change['colour'] / max(change['direction'], 1e-9):.0f}x less than to the colour word; "
            f"that response went {first['direction']:.3f} -> {change['direction']:.3f} over the run while the "
            f"colour's went {first['colour']:.3f} -> {change['colour']:.3f}. The model learns the words that change "
            "the encoding a lot and, in this budget, not the one that changes it little.")
    samplers = results["samplers"]
    lines.append("- Samplers on the same weights, held-out background error: "
                 + ", ".join(f"{n} {e['scores']['held_out']['background_error']:.1f}" for n, e in samplers.items())
                 + ".")
    return lines


def _targets(results: dict) -> list[str]:
    """The goals set for this benchmark against what the run measured, each with yes or no."""
    best = results["best_guidance"]
    held = results["guidance"][best]["scores"]["held_out"]
    one = results["guidance"][1.0]["scores"]["held_out"]["all"] if 1.0 in results["guidance"] else None
    above = max((g for g in results["guidance"] if g > 1), default=None,
                key=lambda g: results["guidance"][g]["scores"]["held_out"]["all"])
    above_all = results["guidance"][above]["scores"]["held_out"]["all"] if above is not None else None
    probe = list(results["probe"].values())[-1]["true_order_wins"]
    real_bg = results["ceiling"]["background_error"]
    rows = [("colour on held-out prompts >= 0.95", f"{held['colour']:.2f}", held["colour"] >= 0.95),
            ("direction on held-out prompts >= 0.9", f"{held['direction']:.2f}", held["direction"] >= 0.9),
            ("shape on held-out prompts >= 0.8", f"{held['shape']:.2f}", held["shape"] >= 0.8),
            ("guidance > 1 beats guidance 1 (all three, held-out)",
             f"{above_all:.2f} at {above:g} against {one:.2f} at 1" if None not in (one, above) else "n/a",
             None not in (one, above) and above_all > one),
            ("background error within 2x of real clips (+1 grey level for uint8 rounding)",
             f"{held['background_error']:.1f} against {real_bg:.1f}", held["background_error"] <= 2 * real_bg + 1),
            ("time-order probe >= 0.95 (last checkpoint)", f"{probe:.2f}", probe >= 0.95),
            ("whole run under 40 minutes", f"{results['total_seconds'] / 60:.1f} min", results["total_seconds"] < 2400)]
    lines = ["", f"## Goals against this run (guidance {best:g})", "", "| goal | measured | reached |", "|---|---|---|"]
    lines += [f"| {goal} | {value} | {'yes' if ok else 'no'} |" for goal, value, ok in rows]
    return lines


def write_report(results: dict, out: Path, report: Path) -> Path:
    """RESULTS.md (and results/*.png beside it) from bench/learn.py's results dict."""
    pictures = report.parent / "results"
    pictures.mkdir(parents=True, exist_ok=True)
    tb = out / "run" / "tb"
    plot_losses({"train/loss": scalars(tb, "train/loss"), "val/loss": scalars(tb, "val/loss")},
                pictures / "loss.png")
    best = results["best_guidance"]
    sample_grid(Path(results["guidance"][best]["dir"]), pictures / "samples.png")
    rel = pictures.relative_to(report.parent)
    head = "| | colour | shape | direction | all three | background error | jitter | videos |\n" \
           "|---|---|---|---|---|---|---|---|"
    lines = [
        "# Does a trained model follow its text?",
        "",
        "Written by `bench/learn.py` (`make learn`): synthetic clips of coloured shapes moving in named",
        "directions, trained and sampled with the real commands, scored by a program",
        "(`data_tools/shape_checker.py`). Held-out colour x shape x direction triples never appear in",
        "training: " + ", ".join(f"\"{c}\"" for c in results["held_out"]) + ".",
        "",
        f"- Command: `{results['command']}` (config `{results['config']}`, {results['clips']} training clips "
        f"before the 10% validation split, {results['steps']} steps, 2 ranks x micro-batch from the config, "
        f"precision {results['precision']}, ZeRO 2)",
        f"- Machine: {results['machine']}",
        f"- Wall time: {results['total_seconds'] / 60:.1f} min in all; per stage: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in results["stage_seconds"].items()),
        "",
        "## Scores of sampled videos (DPM-Solver++, 20 steps)",
        "",
        "Accuracy per property: the fraction of videos in which the checker reads what the prompt names.",
        "Background error: mean absolute difference of background pixels from the background colour",
        "(0-255). Jitter: how far the object's path strays from a straight line and its size varies, frame",
        "to frame, in units of the object's size (real clips: pixel rounding only).",
        "",
        head,
        _row("checker on real held-out clips (ceiling)", results["ceiling"]),
        _row("checker on uniform noise (chance)", results["chance"]),
    ]
    for g, entry in results["guidance"].items():
        for split in ("seen", "held_out"):
            if split in entry["scores"]:
                lines.append(_row(f"guidance {float(g):g}, {split.replace('_', '-')} prompts", entry["scores"][split]))
    lines += ["", f"Chance for a guess: colour 1/6, shape 1/3, direction 1/4. Best guidance on held-out prompts: {best:g}.",
              "", "## The time-order probe, per checkpoint", "",
              "Each real held-out clip under its own caption, forwards and played backwards (which moves",
              "the other way), at the same timesteps (10-90% of the schedule) and noise: the fraction of",
              "clips whose loss is lower in the true order (a model blind to direction scores 0.5).",
              "Beside it, without a sampler: the direction in which the model's conditional mean x0 moves at",
              "95% of the schedule (from pure noise, four draws) for each held-out caption (chance 0.25), and",
              "how much that x0 changes (mean absolute, [-1, 1] scale) when one word of the caption changes.",
              "", "| checkpoint | true order wins | loss forwards | loss backwards | mean x0 direction | x0 change: "
              "colour / shape / direction word | held-out scores, dpmpp-20 (colour / shape / direction) "
              "| background error |", "|---|---|---|---|---|---|---|---|"]
    for tag, p in results["probe"].items():
        s = results["budget"].get(tag, {}).get("scores", {}).get("held_out")
        scores = f"{s['colour']:.2f} / {s['shape']:.2f} / {s['direction']:.2f} | {s['background_error']:.1f}" \
            if s else "| "
        change = " / ".join(f"{p['x0_change'][w]:.3f}" for w in ("colour", "shape", "direction"))
        lines.append(f"| {tag} | {p['true_order_wins']:.2f} | {p['loss_forward']:.4f} | {p['loss_backward']:.4f} "
                     f"| {p['mean_x0_direction']:.2f} | {change} | {scores} |")
    lines += ["", f"## Samplers on the same weights (held-out prompts, guidance {best:g})", "",
              "| sampler | colour | shape | direction | all three | background error | jitter | s/video |",
              "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["samplers"].items():
        s = entry["scores"]["held_out"]
        lines.append(f"| {name} | " + " | ".join(f"{s[p]:.2f}" for p in PROPS)
                     + f" | {s['background_error']:.1f} | {s['jitter']:.2f} | {entry['seconds_per_video']:.2f} |")
    lines += _findings(results)
    lines += _targets(results)
    lines += ["", "## Loss curves", "", f"![train and validation loss]({rel}/loss.png)", "",
              f"## Sampled frames (guidance {best:g}, first seed of each prompt)", "",
              f"![sampled frames]({rel}/samples.png)", ""]
    report.write_text("\n".join(lines))
    return report


def load_results(path: Path) -> dict:
    """results.json as bench/learn.py held it in memory (JSON turned the guidance scales into strings)."""
    results = json.loads(Path(path).read_text())
    results["guidance"] = {float(g): v for g, v in results["guidance"].items()}
    results["best_guidance"] = float(results["best_guidance"])
    return results


if __name__ == "__main__":
    import sys

    # python bench/learn_report.py OUT/results.json REPORT.md: the report again from a finished run.
    results_path, report_path = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    write_report(load_results(results_path), results_path.parent, report_path)
    print(f"wrote {report_path}")
