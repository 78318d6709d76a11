"""
The whole SF-V story at toy scale on a laptop CPU: train an SVD-style teacher on synthetic videos, distil it into a
one-step generator with the real SF-V trainer, then measure the paper's Table 1 / Table 2 rows.

    python toy.py                  # full run (~50 min on a 2-core CPU): out/toy/{table.md,compare.png,compare.gif}, assets/
    python toy.py --resume         # continue an interrupted full run: finished stages are kept, the rest resumes
    python toy.py --ladder         # the sanity ladder (static videos, then 8 moving clips overfitted): out/toy_ladder/
    python toy.py --smoke          # a few steps of every stage (CI, < 2 min), into out/toy_smoke, assets untouched

The task (data.SyntheticVideos, style "simple"): 8 frames of 16x16, one disc or square moving at a random speed in a
uniformly random direction over a flat background. The first frame does not say where the shape goes, so the
one-step teacher (the conditional mean) is a blurred smear of all directions, while a good sampler picks one sharp
future: the gap SF-V closes in one step. The model (model.CONFIGS["toy"]) works in pixel space: its latent is the 3
whitened colour components of each pixel (LinearPatchLatent with 1x1 patches).

Stages (each is `python train.py ...` called in-process, the same code path as full scale):
  1. teacher: --mode diffusion --init toy: EDM diffusion training (Karras et al. 2022) with SVD's conditioning, in
     chunks; after each chunk the teacher is sampled on held-out clips (1 step and 25 steps + CFG): the learning curve
  2. SF-V:    --mode sfv --init <teacher bundle>, discriminator with both head types, and the two Table 2 ablations
     (--disc-heads spatial: no temporal heads; --disc-heads temporal: no spatial heads)
  3. evaluation on held-out clips (another dataset seed), every row conditioned on the same first frames with the same
     noise, sampled with SVD.condition and SVD.sample (model.py); metrics from evaluate.py with bootstrap standard errors.
     The reference row compares a second, independent set of real clips (the noise floor).
Outputs: <out>/table.md, results.json, compare.png and compare.gif (rows: real, teacher 25 steps, teacher 1 step,
SF-V 1 step, SF-V without temporal heads, SF-V without spatial heads); for the full run also assets/: toy_teacher and
toy_sfv .safetensors (fp16 bundles; toy_sfv is sample.py's fallback model), toy_results.json, example*.png (held-out
first frames, upscaled to 64x64), toy_compare.png and toy_compare.gif.
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
import torch.nn.functional as F

import evaluate
import load_svd
import train
import cli
import data
from cli import pick_device
from model import CONFIGS
from data import to_uint8, write_gif, write_png

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# recipe: every number of the run (flags of train.py)

DATA = ["--data", "synthetic"]                 # + --synthetic-style simple (static for the ladder's first rung)
TEACHER_FLAGS = ["--optimizer", "adamw", "--lr-g", "2e-3", "--beta1", "0.9", "--beta2", "0.99", "--warmup", "50",
                 "--lr-final", "0.1", "--ema", "0.99", "--train-p-mean", "-1.2", "--train-p-std", "1.2",
                 "--high-sigma-frac", "0.3"]
FULL = dict(
    teacher_steps=5000, teacher_batch=8, curve=(500, 1000, 2000, 3500, 5000), n_curve=32,
    sfv_steps=300, sfv_batch=8, n_eval=128, n_latency=4,
    sfv_flags=["--lr-g", "1e-4", "--lr-d", "1e-3", "--head-channels", "64"],
    ladder_steps=2500, ladder_clips=8, ladder_overfit_steps=1500,
)
SMOKE = dict(FULL, teacher_steps=4, teacher_batch=4, curve=(2, 4), n_curve=4, sfv_steps=2, sfv_batch=2, n_eval=8,
             n_latency=1, ladder_steps=2, ladder_overfit_steps=2)
HELD_OUT_SEED = 10_000                       # held-out clips: SyntheticVideos(seed=HELD_OUT_SEED + seed), never trained on
REFERENCE_SEED = 20_000                      # a second, independent real set for the reference row
PIC_SCALE = 4                                # pictures and example images: 16x16 frames shown at 64x64 (nearest)

ROWS = [  # (row key in toy_results.json, table name, model, steps, CFG)
    ("teacher_25", "teacher, 25 steps + CFG", "teacher", 25, True),
    ("teacher_1", "teacher, 1 step", "teacher", 1, False),
    ("sfv_1", "SF-V, 1 step", "sfv_both", 1, False),
    ("sfv_no_temporal", "SF-V w/o temporal heads, 1 step", "sfv_spatial", 1, False),
    ("sfv_no_spatial", "SF-V w/o spatial heads, 1 step", "sfv_temporal", 1, False),
]
N_BOOT = 200                                 # bootstrap resamples of the held-out clips for the FD intervals

# -----------------------------------------------------------------------------
# sampling (SVD.condition and SVD.sample, batched) and metrics


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


def clips(n, seed, style="simple"):
    """n toy clips (n, T, 3, H, W) in [-1, 1] of dataset seed `seed` at the toy config's size."""
    c = CONFIGS["toy"]
    ds = data.SyntheticVideos(n, c.num_frames, c.height, seed, style=style)
    return torch.stack([ds.video(i) for i in range(n)])


def bootstrap_fd(rf, ff, generator, dims=slice(None), n_boot=N_BOOT):
    """evaluate.toy_fd over clips resampled with replacement (the same clip indices for the real and the generated
    set: clip i of both shares its first frame). -> (standard error, [2.5%, 97.5%] percentiles). The resampled FDs
    sit above the point estimate (duplicated clips shrink the covariances), so the table shows the standard error."""
    n = len(rf)
    fds = []
    for _ in range(n_boot):
        i = torch.randint(0, n, (n,), generator=generator)
        fds.append(evaluate.toy_fd(rf[i], ff[i], dims))
    return float(np.std(fds)), [float(np.percentile(fds, 2.5)), float(np.percentile(fds, 97.5))]


def metrics_with_intervals(fake, real, images, rf, seed):
    """evaluate.evaluate_videos plus bootstrap intervals of fd, fd_app and fd_motion (same resamples for every row)."""
    m = evaluate.evaluate_videos(fake, real, images, rf)
    ff = evaluate.video_features(fake)
    for key, dims in (("fd", slice(None)), ("fd_app", slice(0, evaluate.APPEARANCE_DIMS)),
                      ("fd_motion", slice(evaluate.APPEARANCE_DIMS, None))):
        m[key + "_se"], m[key + "_ci"] = bootstrap_fd(rf, ff, torch.Generator().manual_seed(seed), dims)
    return m


def psnr(a, b):
    """Mean PSNR (dB, pixel range [0, 1]) of a vs b, both (N, ...) in [-1, 1], per clip then averaged."""
    mse = ((a.float() - b.float()) / 2).square().flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()

# -----------------------------------------------------------------------------
# stages 1 and 2: train.py


def train_stage(out, argv, resume):
    """Run train.main(argv) into `out` (with --resume: continue its train_state, or skip it if its bundle is final).
    -> (bundle path, seconds)."""
    path = os.path.join(out, "model.safetensors")
    steps = int(argv[argv.index("--max-steps") + 1])
    if resume and os.path.exists(path) and bundle_step(path) == steps:
        print(f"reusing {path} (step {steps})")
        return path, 0.0
    argv = argv + ["--resume"] if resume else argv
    print("python train.py " + " ".join(argv), flush=True)
    t = time.perf_counter()
    train.main(argv)
    return path, time.perf_counter() - t


def bundle_step(path):
    """The training step a bundle was saved at (train.py writes it in the metadata; read without the tensors)."""
    return int(load_svd.bundle_metadata(path).get("train_step", -1))


def base_flags(a, style="simple"):
    return DATA + ["--synthetic-style", style, "--seed", str(a.seed), "--device", a.device, "--workers", "0",
                   "--no-grad-ckpt", "--sample-every", "0", "--log-every", "25"]


def train_teacher(a, r, curve_images, curve_real):
    """The teacher in chunks ending at r["curve"] (one cosine schedule over teacher_steps, --resume between chunks);
    after each chunk its EMA bundle is sampled on the curve clips and the point is saved to teacher/curve.json
    (--resume keeps the points already there). -> (path, seconds, learning-curve rows)."""
    out = os.path.join(a.out, "teacher")
    path, curve_path = os.path.join(out, "model.safetensors"), os.path.join(out, "curve.json")
    done = {}
    if a.resume and os.path.exists(curve_path):
        with open(curve_path) as f:
            done = {c["step"]: c for c in json.load(f)}
    secs, curve = 0.0, []
    rf = evaluate.video_features(curve_real)
    seeds = [HELD_OUT_SEED + i for i in range(len(curve_images))]
    for k, steps in enumerate(r["curve"]):
        if steps in done:
            print(f"reusing learning-curve point at step {steps} ({curve_path})")
            curve.append(done[steps])
            secs = done[steps]["train_seconds"]
            continue
        argv = base_flags(a) + ["--mode", "diffusion", "--init", "toy", "--out", out, "--max-steps", str(steps),
                                "--lr-decay-steps", str(r["teacher_steps"]), "--save-every", str(r["teacher_steps"]),
                                "--batch-size", str(r["teacher_batch"])] + TEACHER_FLAGS
        path, s = train_stage(out, argv, a.resume or k > 0)
        secs += s
        svd = load_svd.load(path).eval()
        row = {"step": steps, "train_seconds": secs}
        for name, steps_, cfg in (("1", 1, False), ("25", 25, True)):
            fake = generate(svd, curve_images, seeds, steps_, cfg)
            m = evaluate.evaluate_videos(fake, curve_real, curve_images, rf)
            row.update({f"{key}_{name}": m[key] for key in ("fd", "fd_app", "fd_motion", "psnr0", "warp", "motion")})
        curve.append(row)
        cli.write_json(curve_path, curve)
        print("learning curve: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    return path, secs, curve


def train_sfv(a, r, teacher):
    """SF-V with both / spatial-only / temporal-only discriminator heads. -> (paths, seconds)."""
    paths, secs = {}, {}
    for heads in ("both", "spatial", "temporal"):
        out = os.path.join(a.out, f"sfv_{heads}")
        paths[f"sfv_{heads}"], secs[f"sfv_{heads}"] = train_stage(out, base_flags(a) + [
            "--mode", "sfv", "--init", teacher, "--disc-heads", heads, "--out", out,
            "--max-steps", str(r["sfv_steps"]), "--save-every", str(r["sfv_steps"]),
            "--batch-size", str(r["sfv_batch"])] + r["sfv_flags"], a.resume)
    return paths, secs

# -----------------------------------------------------------------------------
# stage 3: evaluation


def evaluate_all(a, r, paths, real, ref):
    """-> (rows of metric dicts, sample videos for the pictures {row: (k, T, 3, H, W)})."""
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
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if not k.endswith(("_ci", "_se"))),
              flush=True)
    return rows, pics

# -----------------------------------------------------------------------------
# outputs: table, pictures (PNG and GIF written with av), assets


COLUMNS = [  # (header, key, format)
    ("FD toy ↓", "fd", "{:.1f}"), ("FD appearance ↓", "fd_app", "{:.1f}"), ("FD motion ↓", "fd_motion", "{:.1f}"),
    ("frame-0 PSNR dB ↑", "psnr0", "{:.1f}"), ("motion (× real)", "motion", "{:.2f}"),
    ("warp error", "warp", "{:.4f}"), ("histogram drift", "drift", "{:.3f}"),
    ("UNet evals", "evals", "{}"), ("s / clip", "s_clip", "{:.3f}")]


def table_markdown(rows):
    """Markdown table of the rows; FD columns carry their bootstrap standard error."""
    lines = ["| | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = []
        for _, k, fmt in COLUMNS:
            v = r.get(k, "")
            cell = "—" if v == "" or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)
            if k + "_se" in r:
                cell += " ± " + fmt.format(r[k + "_se"])
            cells.append(cell)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_markdown(curve):
    lines = ["| teacher step | train s | FD 1 step | FD 25 steps + CFG | frame-0 PSNR 1 / 25 | warp 1 / 25 |",
             "|---|---|---|---|---|---|"]
    for c in curve:
        lines.append(f"| {c['step']} | {c['train_seconds']:.0f} | {c['fd_1']:.1f} | {c['fd_25']:.1f} | "
                     f"{c['psnr0_1']:.1f} / {c['psnr0_25']:.1f} | {c['warp_1']:.4f} / {c['warp_25']:.4f} |")
    return "\n".join(lines)


def grid(pics, t, gap=2):
    """Frame t of every clip: rows = entries of pics, columns = clips, upscaled PIC_SCALE x (nearest), on white.
    -> (3, H, W) in [0, 1]."""
    rows = [F.interpolate((v[:, t] + 1) / 2, scale_factor=PIC_SCALE, mode="nearest") for v in pics.values()]
    k, _, H, W = rows[0].shape
    canvas = torch.ones(3, len(rows) * (H + gap) - gap, k * (W + gap) - gap)
    for ri, v in enumerate(rows):
        for c in range(k):
            canvas[:, ri * (H + gap):ri * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = v[c]
    return canvas


def pictures(pics, png, gif, fps=4):
    """compare.png: clip 0 of each row, frames left to right; compare.gif: every clip, animated."""
    strip = grid({k: v[0][:, None] for k, v in pics.items()}, 0)          # clip 0's frames as the columns
    write_png(to_uint8(strip), png)
    T = next(iter(pics.values())).shape[1]
    frames = torch.stack([grid(pics, t) for t in range(T)])
    write_gif(F.pad(frames, (0, frames.shape[-1] % 2, 0, frames.shape[-2] % 2), value=1.0), gif, fps)


def save_fp16(src, dst):
    """Copy a bundle with its floating-point tensors in fp16 (load_svd.load casts back to fp32)."""
    svd = load_svd.load(src)
    load_svd.save(svd.half(), dst, {"train_step": svd.load_info["metadata"].get("train_step", "")})

# -----------------------------------------------------------------------------
# the sanity ladder


def ladder(a, r):
    """(a) static videos: the teacher recipe on clips whose every frame is the conditioning frame, sampled at 1 and
    25 steps (+ CFG) on held-out static clips: PSNR of all frames, motion (mean |frame difference|, 0 when static);
    (b) the teacher recipe on ladder_clips moving clips only, sampled from their own first frames: PSNR of all
    frames and of frame 0, motion vs the clips'. -> {rung: metrics}, also written to <out>/ladder.json."""
    out = {}
    for rung, style, n, steps in (("static", "static", 100000, r["ladder_steps"]),
                                  ("overfit", "simple", r["ladder_clips"], r["ladder_overfit_steps"])):
        d = os.path.join(a.out, rung)
        argv = base_flags(a, style) + ["--synthetic-size", str(n), "--mode", "diffusion", "--init", "toy", "--out", d,
                                       "--max-steps", str(steps), "--save-every", str(steps),
                                       "--batch-size", str(r["teacher_batch"])] + TEACHER_FLAGS
        path, secs = train_stage(d, argv, a.resume)
        svd = load_svd.load(path).eval()
        real = clips(32, HELD_OUT_SEED + a.seed, style) if rung == "static" else clips(n, a.seed, style)
        res = {"steps": steps, "train_seconds": secs, "clips": len(real)}
        for name, k, cfg in (("1", 1, False), ("25", 25, True)):
            fake = generate(svd, real[:, 0], list(range(len(real))), k, cfg)
            res[f"psnr_{name}"] = psnr(fake, real)
            res[f"psnr0_{name}"] = evaluate.first_frame_psnr(fake, real[:, 0]).mean().item()
            if rung == "static":                                    # mean |frame difference|: 0 when static
                res[f"motion_abs_{name}"] = evaluate.motion_amount(fake).mean().item()
            else:
                res[f"motion_{name}"] = (evaluate.motion_amount(fake).mean() / evaluate.motion_amount(real).mean()).item()
        out[rung] = res
        print(f"ladder {rung}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)
    cli.write_json(os.path.join(a.out, "ladder.json"), out, indent=1)
    return out

# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default out/toy, out/toy_smoke with --smoke, out/toy_ladder with "
                                 "--ladder)")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI)")
    p.add_argument("--ladder", action="store_true", help="run the sanity ladder instead of the reproduction")
    p.add_argument("--resume", action="store_true", help="keep finished stages and resume unfinished ones from their "
                                                         "train_state.pt (after an interruption)")
    p.add_argument("--seed", type=int, default=0, help="seed of every training run and of the held-out sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--assets", default=None, help="write the bundles, results and pictures here (default: assets/ for "
                                                  "the full run, nothing for --smoke or --ladder)")
    p.add_argument("--pic-clips", type=int, default=6, help="clips in compare.gif (compare.png shows the first)")
    a = p.parse_args(argv)
    a.out = a.out or os.path.join("out", "toy_smoke" if a.smoke else "toy_ladder" if a.ladder else "toy")
    if a.assets is None and not a.smoke and not a.ladder:
        a.assets = os.path.join(HERE, "assets")
    return a


def main(argv=None):
    a = parse_args(argv)
    r = SMOKE if a.smoke else FULL
    os.makedirs(a.out, exist_ok=True)
    if a.ladder:
        return ladder(a, r)
    t0 = time.perf_counter()
    real = clips(r["n_eval"], HELD_OUT_SEED + a.seed)
    ref = clips(r["n_eval"], REFERENCE_SEED + a.seed)
    teacher, t_teacher, curve = train_teacher(a, r, real[:r["n_curve"], 0], real[:r["n_curve"]])
    paths, secs = train_sfv(a, r, teacher)
    paths["teacher"], secs = teacher, {"teacher": t_teacher, **secs}
    t1 = time.perf_counter()
    rows, pics = evaluate_all(a, r, paths, real, ref)
    t2 = time.perf_counter()
    pictures(pics, os.path.join(a.out, "compare.png"), os.path.join(a.out, "compare.gif"))
    cmd = "python toy.py" + (" --smoke" if a.smoke else "")
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()) + f", evaluation {t2 - t1:.0f} s, total {t2 - t0:.0f} s"
    c = CONFIGS["toy"]
    md = (f"{table_markdown(rows)}\n\nFD columns: point estimate ± bootstrap standard error over the clips. Made by "
          f"`{cmd}` ({r['n_eval']} held-out clips of {c.num_frames} frames at {c.height}x{c.width}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'GPU' if pick_device(a.device).type == 'cuda' else 'CPU'}). Wall time: {timing}.\n\n"
          f"Teacher learning curve ({r['n_curve']} held-out clips):\n\n{curve_markdown(curve)}\n")
    cli.write_text(os.path.join(a.out, "table.md"), md)
    results = {"rows": rows, "curve": curve, "train_seconds": secs, "eval_seconds": t2 - t1, "total_seconds": t2 - t0,
               "recipe": {**r, "data": base_flags(a), "teacher_flags": TEACHER_FLAGS}}
    cli.write_json(os.path.join(a.out, "results.json"), results, indent=1)
    print("\n" + md)
    if a.assets:
        os.makedirs(a.assets, exist_ok=True)
        save_fp16(paths["teacher"], os.path.join(a.assets, "toy_teacher.safetensors"))
        save_fp16(paths["sfv_both"], os.path.join(a.assets, "toy_sfv.safetensors"))
        cli.write_json(os.path.join(a.assets, "toy_results.json"), results, indent=1)
        for i, name in enumerate(("example.png", "example2.png", "example3.png")):
            big = F.interpolate((real[i, :1] + 1) / 2, scale_factor=PIC_SCALE, mode="nearest")[0]
            write_png(to_uint8(big), os.path.join(a.assets, name))
        shutil.copyfile(os.path.join(a.out, "compare.png"), os.path.join(a.assets, "toy_compare.png"))
        shutil.copyfile(os.path.join(a.out, "compare.gif"), os.path.join(a.assets, "toy_compare.gif"))
        print(f"wrote {a.assets}/: toy_teacher.safetensors, toy_sfv.safetensors, toy_results.json, example*.png, "
              f"toy_compare.png, toy_compare.gif")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
