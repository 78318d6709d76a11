"""
The whole SF-V story at toy scale on a laptop CPU: train an SVD-style teacher on synthetic videos, distil it into a
one-step generator with the real SF-V trainer, then measure the paper's Table 1 / Table 2 rows.

    python toy.py                  # full run (~30 min on 2 CPU cores): out/toy/table.md, out/toy/compare.png, assets/
    python toy.py --smoke          # a few steps of every stage (CI, < 2 min), into out/toy_smoke, assets untouched
    python toy.py --reuse          # skip training stages whose model.safetensors exists (re-evaluate only)

Stages (each is `python train.py ...` called in-process, the same code path as full scale):
  1. teacher: --mode diffusion --init toy: EDM v-prediction diffusion on train.SyntheticVideos (model.CONFIGS["toy"]:
     the tiny spatiotemporal UNet on a linear latent, 4x4 patches -> 12 whitened principal components, which
     train.py fits on the first 64 clips; 8 frames of 64x64)
  2. SF-V:    --mode sfv --init <teacher bundle>, discriminator with both head types, and the two Table 2 ablations
     (--disc-heads spatial: no temporal heads; --disc-heads temporal: no spatial heads)
  3. evaluation on held-out synthetic clips (another dataset seed), every row conditioned on the same first frames
     with the same noise, sampled with SVD.condition and SVD.sample (model.py); metrics from evaluate.py. The reference row compares a second, independent set of real clips.
Outputs: <out>/table.md, <out>/compare.png (rows: real, teacher 25 steps, teacher 1 step, SF-V 1 step, SF-V without
temporal heads, SF-V without spatial heads; columns: frames), and with --assets: assets/toy_sfv.safetensors (the SF-V
EMA bundle, sample.py's fallback), assets/example.png (a first frame from the toy generator) and
assets/toy_compare.png (a copy of compare.png for the README).
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

import evaluate
import load_svd
import train
from load_svd import pick_device
from model import CONFIGS
from sample import to_uint8, write_png

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# recipe: every number of the run (flags of train.py; the full run is sized for <= 30 min on 2 CPU cores)

FULL = dict(
    teacher_steps=1700, teacher_batch=4, sfv_steps=80, sfv_batch=8, n_eval=64, n_latency=4,
    teacher_flags=["--optimizer", "adamw", "--lr-g", "2e-3", "--beta1", "0.9", "--beta2", "0.99", "--warmup", "100",
                   "--ema", "0.99"],
    sfv_flags=["--lr-g", "1e-4", "--lr-d", "1e-3", "--head-channels", "64"],
)
SMOKE = dict(FULL, teacher_steps=4, teacher_batch=4, sfv_steps=2, sfv_batch=2, n_eval=8, n_latency=1)
HELD_OUT_SEED = 10_000                       # held-out clips: SyntheticVideos(seed=HELD_OUT_SEED + seed), never trained on
REFERENCE_SEED = 20_000                      # a second, independent real set for the reference row

ROWS = [  # (row key in toy_results.json, table name, model, steps, CFG)
    ("teacher_25", "teacher, 25 steps + CFG", "teacher", 25, True),
    ("teacher_1", "teacher, 1 step", "teacher", 1, False),
    ("sfv_1", "SF-V, 1 step", "sfv_both", 1, False),
    ("sfv_no_temporal", "SF-V w/o temporal heads, 1 step", "sfv_spatial", 1, False),
    ("sfv_no_spatial", "SF-V w/o spatial heads, 1 step", "sfv_temporal", 1, False),
]
N_BOOT = 200                                 # bootstrap resamples of the held-out clips for the FD intervals

# -----------------------------------------------------------------------------
# stages 1 and 2: train.py


def train_stage(out, argv, reuse):
    """Run train.main(argv) into `out` unless reuse and its bundle exists. -> (bundle path, seconds)."""
    path = os.path.join(out, "model.safetensors")
    if reuse and os.path.exists(path):
        print(f"reusing {path}")
        return path, 0.0
    print("python train.py " + " ".join(argv), flush=True)
    t = time.perf_counter()
    train.main(argv)
    return path, time.perf_counter() - t


def train_all(a, r):
    """Teacher, then SF-V with both / spatial-only / temporal-only discriminator heads. -> (paths, seconds)."""
    base = ["--data", "synthetic", "--seed", str(a.seed), "--device", a.device, "--workers", "0", "--no-grad-ckpt",
            "--sample-every", "0", "--log-every", "10"]
    paths, secs = {}, {}
    out = os.path.join(a.out, "teacher")
    paths["teacher"], secs["teacher"] = train_stage(out, base + [
        "--mode", "diffusion", "--init", "toy", "--out", out, "--max-steps", str(r["teacher_steps"]),
        "--save-every", str(r["teacher_steps"]), "--batch-size", str(r["teacher_batch"])] + r["teacher_flags"], a.reuse)
    for heads in ("both", "spatial", "temporal"):
        out = os.path.join(a.out, f"sfv_{heads}")
        paths[f"sfv_{heads}"], secs[f"sfv_{heads}"] = train_stage(out, base + [
            "--mode", "sfv", "--init", paths["teacher"], "--disc-heads", heads, "--out", out,
            "--max-steps", str(r["sfv_steps"]), "--save-every", str(r["sfv_steps"]),
            "--batch-size", str(r["sfv_batch"])] + r["sfv_flags"], a.reuse)
    return paths, secs

# -----------------------------------------------------------------------------
# stage 3: sampling (SVD.condition and SVD.sample, batched) and evaluation


@torch.no_grad()
def generate(svd, images, seeds, steps, cfg, batch=32):
    """images (N, 3, H, W) in [-1, 1] -> videos (N, T, 3, H, W) in [-1, 1]: the conditioning and sampler of
    sample.sample_video (per-frame linear CFG min_cfg..max_cfg when cfg), clip i's noise from its own generator
    seeded seeds[i], so a clip's video does not depend on the batch."""
    c = svd.cfg
    out = []
    for i in range(0, len(images), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        cond = svd.condition(images[i:i + batch], gens)
        x = svd.sample(cond, gens, steps=steps, min_cfg=c.min_cfg if cfg else 1.0, max_cfg=c.max_cfg if cfg else 1.0)
        out.append(svd.vae.decode(x).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def latency(svd, images, steps, cfg):
    """Median wall seconds of one clip, batch 1, end to end (encode, denoise, decode)."""
    ts = []
    for i in range(len(images)):
        t = time.perf_counter()
        generate(svd, images[i:i + 1], [i], steps, cfg, batch=1)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def held_out(n, seed, T, size):
    ds = train.SyntheticVideos(n, T, size, seed)
    return torch.stack([ds.video(i) for i in range(n)])


def bootstrap_fd(rf, ff, generator, dims=slice(None), n_boot=N_BOOT):
    """95% percentile interval of evaluate.toy_fd over clips resampled with replacement (the same clip indices for
    the real and the generated set: clip i of both shares its first frame). -> [lo, hi]."""
    n = len(rf)
    fds = []
    for _ in range(n_boot):
        i = torch.randint(0, n, (n,), generator=generator)
        fds.append(evaluate.toy_fd(rf[i], ff[i], dims))
    return [float(np.percentile(fds, 2.5)), float(np.percentile(fds, 97.5))]


def metrics_with_intervals(fake, real, images, rf, seed):
    """evaluate.evaluate_videos plus bootstrap intervals of fd, fd_app and fd_motion (same resamples for every row)."""
    m = evaluate.evaluate_videos(fake, real, images, rf)
    ff = evaluate.video_features(fake)
    for key, dims in (("fd", slice(None)), ("fd_app", slice(0, evaluate.APPEARANCE_DIMS)),
                      ("fd_motion", slice(evaluate.APPEARANCE_DIMS, None))):
        m[key + "_ci"] = bootstrap_fd(rf, ff, torch.Generator().manual_seed(seed), dims)
    return m


def evaluate_all(a, r, paths, T, size):
    """-> (rows of metric dicts, sample videos for the pictures {row: (k, T, 3, H, W)}, real videos)."""
    real = held_out(r["n_eval"], HELD_OUT_SEED + a.seed, T, size)
    ref = held_out(r["n_eval"], REFERENCE_SEED + a.seed, T, size)
    images, seeds = real[:, 0], [HELD_OUT_SEED + i for i in range(len(real))]
    rf = evaluate.video_features(real)
    rows = [{"row": "real", "name": "real clips (independent set)", "evals": "", "s_clip": float("nan"),
             **metrics_with_intervals(ref, real, None, rf, a.seed)}]
    pics = {"real": real[:a.pic_clips]}
    models = {}
    device = pick_device(a.device)
    for row, name, key, steps, cfg in ROWS:
        if key not in models:
            models[key] = load_svd.load(paths[key], device=device).eval()
        svd = models[key]
        t = time.perf_counter()
        fake = generate(svd, images, seeds, steps, cfg)
        t_batch = (time.perf_counter() - t) / len(images)
        m = metrics_with_intervals(fake, real, images, rf, a.seed)
        evals = steps * (2 if cfg and steps > 1 else 1)
        rows.append({"row": row, "name": name, "evals": evals,
                     "s_clip": latency(svd, images[:r["n_latency"]], steps, cfg), "s_clip_batched": t_batch, **m})
        pics[row] = fake[:a.pic_clips]
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if not k.endswith("_ci")), flush=True)
    return rows, pics, real

# -----------------------------------------------------------------------------
# outputs: table, picture (PNG written with av), assets


COLUMNS = [  # (header, key, format)
    ("FD toy ↓", "fd", "{:.1f}"), ("FD appearance ↓", "fd_app", "{:.1f}"), ("FD motion ↓", "fd_motion", "{:.1f}"),
    ("frame-0 PSNR dB ↑", "psnr0", "{:.1f}"), ("motion (× real)", "motion", "{:.2f}"),
    ("warp error", "warp", "{:.4f}"), ("histogram drift", "drift", "{:.3f}"),
    ("UNet evals", "evals", "{}"), ("s / clip", "s_clip", "{:.3f}")]


def table_markdown(rows):
    lines = ["| | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = []
        for _, k, fmt in COLUMNS:
            v = r.get(k, "")
            cells.append("—" if v == "" or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def picture(pics, path, gap=2):
    """Grid: one row per entry of pics (clip 0 of each: frames left to right), clips stacked below each other
    with a wider gap, on white."""
    rows = list(pics.values())
    k, T, _, H, W = rows[0].shape
    R = len(rows)
    canvas = np.full((k * (R * (H + gap) + 3 * gap), T * (W + gap) - gap, 3), 255, np.uint8)
    for c in range(k):
        for ri, v in enumerate(rows):
            y = c * (R * (H + gap) + 3 * gap) + ri * (H + gap)
            for t in range(T):
                canvas[y:y + H, t * (W + gap):t * (W + gap) + W] = to_uint8((v[c, t] + 1) / 2)
    return write_png(canvas[:-3 * gap - gap], path)

# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default out/toy, or out/toy_smoke with --smoke)")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI)")
    p.add_argument("--reuse", action="store_true", help="skip training stages whose model.safetensors exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--assets", default=None, help="copy the SF-V bundle and an example image here "
                                                  "(default: assets/ for the full run, nothing for --smoke)")
    p.add_argument("--pic-clips", type=int, default=2, help="clips in compare.png")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the training steps of every stage (e.g. 10 on a "
                                                            "GPU: a longer-trained teacher, the table's main limit)")
    a = p.parse_args(argv)
    a.out = a.out or os.path.join("out", "toy_smoke" if a.smoke else "toy")
    if a.assets is None and not a.smoke:
        a.assets = os.path.join(HERE, "assets")
    return a


def main(argv=None):
    a = parse_args(argv)
    r = SMOKE if a.smoke else FULL
    r = dict(r, **{k: max(1, round(r[k] * a.scale)) for k in ("teacher_steps", "sfv_steps")})
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    paths, secs = train_all(a, r)
    t1 = time.perf_counter()
    c = CONFIGS["toy"]
    rows, pics, real = evaluate_all(a, r, paths, c.num_frames, c.height)
    t2 = time.perf_counter()
    picture(pics, os.path.join(a.out, "compare.png"))
    cmd = "python toy.py" + (" --smoke" if a.smoke else "") + (f" --scale {a.scale:g}" if a.scale != 1 else "")
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()) + f", evaluation {t2 - t1:.0f} s, total {t2 - t0:.0f} s"
    md = (f"{table_markdown(rows)}\n\nMade by `{cmd}` ({r['n_eval']} held-out clips of 8 frames at 64x64, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'GPU' if torch.cuda.is_available() and a.device != 'cpu' else 'CPU'}). "
          f"Wall time: {timing}.\n")
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "train_seconds": secs, "eval_seconds": t2 - t1, "recipe": r}, f, indent=1)
    print("\n" + md)
    if a.assets:
        os.makedirs(a.assets, exist_ok=True)
        shutil.copyfile(paths["sfv_both"], os.path.join(a.assets, "toy_sfv.safetensors"))
        with open(os.path.join(a.assets, "toy_results.json"), "w") as f:
            json.dump({"rows": rows, "train_seconds": secs, "eval_seconds": t2 - t1, "recipe": r}, f, indent=1)
        write_png(to_uint8((real[0, 0] + 1) / 2), os.path.join(a.assets, "example.png"))
        shutil.copyfile(os.path.join(a.out, "compare.png"), os.path.join(a.assets, "toy_compare.png"))
        print(f"wrote {a.assets}/toy_sfv.safetensors, example.png and toy_compare.png (the README picture)")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
