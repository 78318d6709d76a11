"""
The whole SF-V story at toy scale on a laptop CPU: train an SVD-style teacher on synthetic videos, distil it into a
one-step generator with the real SF-V trainer, then measure the paper's Table 1 / Table 2 rows.

    python toy.py --lesson           # ~7 min on 2 CPU cores: distil the bundled teacher into a student (SF-V), compare
                                     #   it with the bundled rows: out/toy_lesson/{table.md,compare.png,compare.gif,curves.png}
    python toy.py --evaluate-assets  # ~5 min: the whole table from the bundled models, no training: out/toy_evaluate/
    python toy.py                    # the full run from scratch (~70 min on 2 cores): out/toy/ (assets/ untouched)
    python toy.py --resume           # continue an interrupted full run: finished stages are kept, the rest resumes
    python toy.py --assets           # the full run (or --evaluate-assets), then also refresh the shipped files in assets/
    python toy.py --ladder           # the sanity ladder (static videos, then 8 moving clips overfitted): out/toy_ladder/
    python toy.py --speed            # seconds per teacher / SF-V step at 1 and 2 threads, share of the CPU's peak FLOPs
    python toy.py --smoke            # a few steps of every stage (CI, < 2 min): out/toy_smoke/

The task (data.SyntheticVideos, style "simple"): 8 frames of 16x16, one disc or square moving at a random speed in a
uniformly random direction over a flat background. The first frame does not say where the shape goes, so the
one-step teacher (the conditional mean) is a blurred smear of all directions, while a good sampler picks one sharp
future: the gap SF-V closes in one step. The model (model.CONFIGS["toy"]) works in pixel space: its latent is the 3
whitened colour components of each pixel (LinearPatchLatent with 1x1 patches).

Stages (each is `python train.py ...` called in-process, the same code path as full scale):
  1. teacher: --mode diffusion --init toy: EDM diffusion training (Karras et al. 2022) with SVD's conditioning, in
     chunks; after each chunk the teacher is sampled on held-out clips (1 step and 25 steps + CFG): the learning curve
  2. SF-V:    --mode sfv --init <teacher bundle>, discriminator with both head types (R1 exact), the two Table 2
     ablations (--disc-heads spatial: no temporal heads; --disc-heads temporal: no spatial heads) and the other R1
     variants of train.py (--r1 fd, --r1 approx: one student each)
  3. evaluation on held-out clips (another dataset seed), every row conditioned on the same first frames with the same
     noise, sampled with SVD.condition and SVD.sample (model.py; a student bundle refines at its trained levels for
     steps > 1); metrics from evaluate.py with bootstrap standard errors: the Frechet distances and the toy's
     interpretable measures (shape solidity, centroid speed, displacement, off-colour, background noise, frame-0
     PSNR). The reference row compares a second, independent set of real clips (the noise floor).
Outputs: <out>/table.md, results.json, compare.png (clip 0 of every row, labelled; needs matplotlib, else unlabelled),
curves.png (the teacher's learning curve, the SF-V runs' D/G logs and, per frame, where the student's trained D
sees fakes; needs matplotlib) and compare.gif (every row, top to bottom in the table's order, one clip per column).
With --assets also assets/: the fp16 bundles (toy_sfv is sample.py's fallback model), toy_results.json, example*.png
(held-out first frames, upscaled to 64x64), toy_compare.png, toy_compare.gif and toy_curves.png.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import evaluate
import load_svd
import train
import cli
import data
from cli import UserError, pick_device
from discriminator import Discriminator
from model import CONFIGS
from data import to_uint8, write_gif, write_png

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")

# -----------------------------------------------------------------------------
# recipe: every number of the run (flags of train.py)

DATA = ["--data", "synthetic"]                 # + --synthetic-style simple (static for the ladder's first rung)
TEACHER_FLAGS = ["--optimizer", "adamw", "--lr-g", "2e-3", "--beta1", "0.9", "--beta2", "0.99", "--warmup", "50",
                 "--lr-final", "0.1", "--ema", "0.99", "--train-p-mean", "-1.2", "--train-p-std", "1.2",
                 "--high-sigma-frac", "0.3"]
SFV_FLAGS = ["--lr-g", "1e-4", "--lr-d", "1e-3", "--head-channels", "64", "--grad-clip", "1.0"]
FULL = dict(
    teacher_steps=5000, teacher_batch=8, curve=(500, 1000, 2000, 3500, 5000), n_curve=32,
    sfv_steps=300, sfv_batch=8, n_eval=128, n_latency=4, sfv_flags=SFV_FLAGS,
    ladder_steps=2500, ladder_clips=8, ladder_overfit_steps=1500,
)
SMOKE = dict(FULL, teacher_steps=4, teacher_batch=4, curve=(2, 4), n_curve=4, sfv_steps=2, sfv_batch=2, n_eval=8,
             n_latency=1, ladder_steps=2, ladder_overfit_steps=2)
LESSON = dict(FULL, sfv_steps=300, n_eval=64, n_latency=2)   # the bundled student's recipe, fewer evaluation clips
HELD_OUT_SEED = 10_000                       # held-out clips: SyntheticVideos(seed=HELD_OUT_SEED + seed), never trained on
REFERENCE_SEED = 20_000                      # a second, independent real set for the reference row
PIC_SCALE = 4                                # pictures and example images: 16x16 frames shown at 64x64 (nearest)

# the R1 variants train.py offers besides the default (exact): one SF-V student each
R1_VARIANTS = [v for v in next(f[2] for f in train.FLAGS if f[0] == "r1") if v not in ("exact", "off")]
MODELS = {  # model key -> (stage folder under --out, file in assets/, train.py flags of its SF-V stage)
    "teacher": ("teacher", "toy_teacher.safetensors", None),
    "sfv_both": ("sfv_both", "toy_sfv.safetensors", ["--disc-heads", "both"]),
    "sfv_spatial": ("sfv_spatial", "toy_sfv_no_temporal.safetensors", ["--disc-heads", "spatial"]),
    "sfv_temporal": ("sfv_temporal", "toy_sfv_no_spatial.safetensors", ["--disc-heads", "temporal"]),
    **{f"sfv_r1_{v}": (f"sfv_r1_{v}", f"toy_sfv_r1_{v}.safetensors", ["--disc-heads", "both", "--r1", v])
       for v in R1_VARIANTS},
}
ROWS = [  # (row key in toy_results.json, table name, model, steps, CFG)
    ("teacher_25", "teacher, 25 steps + CFG", "teacher", 25, True),
    ("teacher_1", "teacher, 1 step", "teacher", 1, False),
    ("sfv_1", "SF-V, 1 step", "sfv_both", 1, False),
    ("sfv_2", "SF-V, 2 steps (refined)", "sfv_both", 2, False),      # only if the bundle is a student (refinement)
    ("sfv_3", "SF-V, 3 steps (refined)", "sfv_both", 3, False),
    ("sfv_no_temporal", "SF-V w/o temporal heads, 1 step", "sfv_spatial", 1, False),
    ("sfv_no_spatial", "SF-V w/o spatial heads, 1 step", "sfv_temporal", 1, False),
    *[(f"sfv_r1_{v}", f"SF-V with R1 {v}, 1 step", f"sfv_r1_{v}", 1, False) for v in R1_VARIANTS],
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


def refines(svd, steps):
    """Whether SVD.sample(steps=steps) on this bundle is SF-V refinement (model.py): a student bundle (config sampler
    "student") with at least `steps` trained levels."""
    c = svd.cfg
    return getattr(c, "sampler", "euler") == "student" and len(getattr(c, "student_levels", ())) >= steps


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
    """evaluate.evaluate_videos plus bootstrap intervals of fd, fd_app and fd_motion (same resamples for every row),
    plus evaluate.toy_measures (the interpretable ones, with bootstrap standard errors as <name>_se)."""
    m = evaluate.evaluate_videos(fake, real, images, rf)
    ff = evaluate.video_features(fake)
    for key, dims in (("fd", slice(None)), ("fd_app", slice(0, evaluate.APPEARANCE_DIMS)),
                      ("fd_motion", slice(evaluate.APPEARANCE_DIMS, None))):
        m[key + "_se"], m[key + "_ci"] = bootstrap_fd(rf, ff, torch.Generator().manual_seed(seed), dims)
    for k, (v, se) in evaluate.toy_measures(fake, images, real, N_BOOT, seed).items():
        m[k], m[k + "_se"] = v, se
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


def read_json(path):
    """A JSON file this script wrote earlier; UserError if it is damaged (cut by a kill, edited)."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"--resume: {path} is damaged ({type(e).__name__}: {str(e)[:60]}); delete it and run again") from None


def read_curve(path):
    """teacher/curve.json of an earlier run -> {step: point}; UserError if it is damaged (cut by a kill, edited)."""
    try:
        with open(path) as f:
            points = json.load(f)
        return {int(c["step"]): dict(c) for c in points}
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"--resume: {path} is damaged ({type(e).__name__}: {str(e)[:60]}); delete it to measure the "
                        f"learning curve again (the teacher's checkpoints are kept)") from None


def train_teacher(a, r, curve_images, curve_real):
    """The teacher in chunks ending at r["curve"] (one cosine schedule over teacher_steps, --resume between chunks);
    after each chunk its EMA bundle is sampled on the curve clips and the point is saved to teacher/curve.json
    (--resume keeps the points already there). -> (path, seconds, learning-curve rows)."""
    out = os.path.join(a.out, "teacher")
    path, curve_path = os.path.join(out, "model.safetensors"), os.path.join(out, "curve.json")
    done = read_curve(curve_path) if a.resume and os.path.exists(curve_path) else {}
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


def train_sfv(a, r, teacher, keys):
    """The SF-V students `keys` of MODELS (both head types; the ablations; the R1 variants), each from `teacher`.
    -> (paths, seconds)."""
    paths, secs = {}, {}
    for key in keys:
        out = os.path.join(a.out, MODELS[key][0])
        paths[key], secs[key] = train_stage(out, base_flags(a) + [
            "--mode", "sfv", "--init", teacher, "--out", out, "--max-steps", str(r["sfv_steps"]),
            "--save-every", str(r["sfv_steps"]), "--batch-size", str(r["sfv_batch"])] + MODELS[key][2] + r["sfv_flags"],
            a.resume)
    return paths, secs


def read_logs(folder, keys, every=1):
    """The SF-V runs' log.jsonl (every `every`-th line; damaged lines skipped) -> {model key: [records]}."""
    logs = {}
    for key in keys:
        path = os.path.join(folder, MODELS[key][0], "log.jsonl")
        if MODELS[key][2] is None or not os.path.exists(path):          # the teacher: its curve is plotted instead
            continue
        recs = []
        with open(path) as f:
            for line in f:
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass
        logs[key] = [{k: v for k, v in rec.items() if k in ("step", "loss_g", "loss_d", "r1_share", "d_real",
                                                            "d_fake", "grad_norm_g", "grad_norm_d")}
                     for rec in recs[every - 1::every] or recs]
    return logs

# -----------------------------------------------------------------------------
# stage 3: evaluation


def evaluate_all(a, r, paths, real, ref, rows=ROWS):
    """-> (rows of metric dicts, sample videos for the pictures {row: (k, T, 3, H, W)}). Rows whose model is not in
    `paths`, or refinement rows of a bundle that is not a student, are left out (with a note)."""
    images, seeds = real[:, 0], [HELD_OUT_SEED + i for i in range(len(real))]
    rf = evaluate.video_features(real)
    m = metrics_with_intervals(ref, real, None, rf, a.seed)
    for k, (v, se) in evaluate.toy_measures(ref, None, real, N_BOOT, a.seed).items():   # the reference set's own
        m[k], m[k + "_se"] = v, se
    out = [{"row": "real", "name": "real clips (independent set)", "evals": "", "s_clip": float("nan"), **m}]
    pics = {"real clips": real[:a.pic_clips]}
    models = {}
    device = pick_device(a.device)
    cache_path = os.path.join(a.out, "rows_cache.json")          # --resume: rows of unchanged bundles are kept
    cache = read_json(cache_path) if a.resume and os.path.exists(cache_path) else {}
    for row, name, key, steps, cfg in rows:
        if key not in paths:
            continue
        if key not in models:
            models[key] = load_svd.load(paths[key], device=device).eval()
        svd = models[key]
        if key != "teacher" and steps > 1 and not refines(svd, steps):
            print(f"note: row '{name}' left out: {paths[key]} is not a student bundle with {steps} trained levels")
            continue
        st = os.stat(paths[key])
        stamp = [paths[key], st.st_size, st.st_mtime_ns, len(real), a.seed]
        if cache.get(row, {}).get("stamp") == stamp:
            print(f"reusing row '{name}' ({cache_path}: {paths[key]} unchanged)")
            a.reused = getattr(a, "reused", 0) + 1
            out.append(cache[row]["metrics"])
            pics[name] = generate(svd, images[:a.pic_clips], seeds[:a.pic_clips], steps, cfg)
            continue
        t = time.perf_counter()
        fake = generate(svd, images, seeds, steps, cfg)
        t_batch = (time.perf_counter() - t) / len(images)
        m = metrics_with_intervals(fake, real, images, rf, a.seed)
        evals = steps * (2 if cfg and steps > 1 else 1)
        out.append({"row": row, "name": name, "evals": evals,
                    "s_clip": latency(svd, images[:r["n_latency"]], steps, cfg), "s_clip_batched": t_batch, **m})
        pics[name] = fake[:a.pic_clips]
        cache[row] = {"stamp": stamp, "metrics": out[-1]}
        cli.write_json(cache_path, cache)
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if not k.endswith(("_ci", "_se"))),
              flush=True)
    return out, pics


def frame_scores(D, logits, T):
    """D's per-location logits (discriminator.heads order: per level, spatial then temporal) -> {"spatial" |
    "temporal": (B, T) the mean logit over that kind's heads and each frame's locations}."""
    kinds = [k for _ in D.backbone.level_ends for k, h in (("spatial", D.spatial), ("temporal", D.temporal)) if h]
    out = {}
    for kind, lg in zip(kinds, logits):                      # spatial (B, T*H*W) frame-major; temporal (B, H*W*T)
        B = lg.shape[0]
        pf = lg.view(B, T, -1).mean(2) if kind == "spatial" else lg.view(B, -1, T).mean(1)
        out.setdefault(kind, []).append(pf)
    return {k: torch.stack(v).mean(0) for k, v in out.items()}


@torch.no_grad()
def d_gaps(run, teacher, real, seed=0, frozen=(1, 2, 3)):
    """What the trained discriminator of the SF-V run in folder `run` (train_state.pt) sees, frame by frame:
    D(real) - D(x) per frame and head type, mean over the clips `real` (N, T, 3, H, W), for x = the run's 1-step
    samples and x = the real clips with the frames `frozen` held at frame 0 (a frozen start); real and x noised with
    the same sigma' (drawn as in training) and eps'. -> {"student" | "frozen": {"spatial" | "temporal": [T]}}, or
    None (a note) without a train_state.pt."""
    path = os.path.join(run, "train_state.pt")
    if not os.path.exists(path):
        print(f"note: no {path}: no per-frame D scores")
        return None
    st = torch.load(path, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**json.loads(st["args"]))
    svd = load_svd.load(teacher).eval()                          # the D backbone is the generator's init, frozen
    D = Discriminator(svd.unet, args.disc_heads, args.head_channels, args.cmap_dim, args.cond_embed_dim, args.disc_tap)
    D.load_head_state_dict(st["disc"])
    D.eval()
    N, T = real.shape[:2]
    images, seeds = real[:, 0], [HELD_OUT_SEED + i for i in range(N)]
    g = torch.Generator().manual_seed(seed)
    cond = svd.condition(images, [torch.Generator().manual_seed(s) for s in seeds])
    sf = svd.cfg.vae.scale_factor

    def latent(v):
        zz = svd.vae.encode(v.flatten(0, 1))[0]                                        # (N*T, C, h, w)
        return zz.view(N, T, *zz.shape[1:]) * sf
    z = latent(real)                                                                       # (N, T, C, h, w)
    still = z.clone()
    still[:, list(frozen)] = z[:, :1]
    fake = latent(generate(load_svd.load(os.path.join(run, "model.safetensors")).eval(), images, seeds, 1, False))
    s = train.sample_disc_sigma(N, g, args.p_mean, abs(args.p_std), args.disc_levels, args.sigma_min, args.sigma_max,
                                args.rho)
    eps = torch.randn(z.shape, generator=g)
    score = lambda x: frame_scores(D, D(x + s.view(-1, 1, 1, 1, 1) * eps, s, cond["cond_latent"],
                                        cond["image_embeds"], cond["added_time_ids"]), T)
    ref = score(z)
    return {name: {k: (ref[k] - v).mean(0).tolist() for k, v in score(x).items()}
            for name, x in (("student", fake), ("frozen", still))}

# -----------------------------------------------------------------------------
# outputs: tables, pictures (PNG and GIF written with av; labelled PNGs with matplotlib if installed), assets


COLUMNS = [  # (header, key, format): the Frechet distances and the summary metrics
    ("FD toy ↓", "fd", "{:.1f}"), ("FD appearance ↓", "fd_app", "{:.1f}"), ("FD motion ↓", "fd_motion", "{:.1f}"),
    ("motion (× real)", "motion", "{:.2f}"), ("warp error", "warp", "{:.4f}"), ("histogram drift", "drift", "{:.3f}"),
    ("UNet evals", "evals", "{}"), ("s / clip", "s_clip", "{:.3f}")]
MEASURES = [  # (header, key, format): evaluate.toy_measures, the shape tracked by its colour
    ("solid at last frame ↑", "solid_last", "{:.2f}"), ("centroid speed × real", "speed_x_real", "{:.2f}"),
    ("displacement frame 1 (px)", "disp1", "{:.2f}"), ("off-colour, last frame ↓", "off_colour_last", "{:.3f}"),
    ("background noise ↓", "background", "{:.3f}"), ("frame-0 PSNR dB ↑", "psnr0", "{:.1f}")]


def table_markdown(rows, columns=COLUMNS):
    """Markdown table of the rows; a cell with a bootstrap standard error (<key>_se) shows it after ±."""
    lines = ["| | " + " | ".join(h for h, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        cells = []
        for _, k, fmt in columns:
            v = r.get(k, "")
            cell = "—" if v == "" or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)
            if k + "_se" in r and cell != "—":
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


def pyplot():
    """matplotlib.pyplot (Agg backend), or None with a note: the labelled pictures are optional (requirements-dev)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib): compare.png without row labels, no "
              "curves.png")
        return None


def save_figure(fig, path):
    cli.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def pictures(pics, png, gif, fps=4):
    """compare.png: clip 0 of each row, frames left to right, rows labelled (matplotlib; else unlabelled pixels);
    compare.gif: every clip (columns) of every row (top to bottom in the table's order), animated, unlabelled."""
    plt = pyplot()
    T = next(iter(pics.values())).shape[1]
    if plt is None:
        write_png(to_uint8(grid({k: v[0][:, None] for k, v in pics.items()}, 0)), png)
    else:
        fig, axes = plt.subplots(len(pics), T, figsize=(2.2 + 0.9 * T, 0.95 * len(pics)), squeeze=False)
        for ri, (name, v) in enumerate(pics.items()):
            for t in range(T):
                ax = axes[ri, t]
                ax.imshow(to_uint8((v[0, t] + 1) / 2), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if ri == 0:
                    ax.set_title(f"frame {t}", fontsize=8)
            axes[ri, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        fig.subplots_adjust(left=2.0 / (2.2 + 0.9 * T), right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.08)
        save_figure(fig, png)
        plt.close(fig)
    frames = torch.stack([grid(pics, t) for t in range(T)])
    write_gif(F.pad(frames, (0, frames.shape[-1] % 2, 0, frames.shape[-2] % 2), value=1.0), gif, fps)


def curves_png(curve, logs, path, gaps=None):
    """curves.png: the teacher's learning curve (toy FD of 1 step and of 25 steps + CFG vs training step), per SF-V
    run what D and G do over training (hinge L_D, L_G, D's mean score on real and fake, R1's share of L_D) and, with
    `gaps` (d_gaps), where the student's trained D sees fakes, frame by frame."""
    plt = pyplot()
    if plt is None:
        return None
    panels = [("loss_d", "L_D (hinge)"), ("loss_g", "L_G"), ("d_real", "D score: real (solid) / fake (dashed)"),
              ("r1_share", "gamma R1 / L_D")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.8))
    axes = axes.flatten()                                           # 6 panels: the last is the per-frame D scores
    ax = axes[0]
    if curve:
        steps = [c["step"] for c in curve]
        ax.plot(steps, [c["fd_1"] for c in curve], "o-", label="1 step")
        ax.plot(steps, [c["fd_25"] for c in curve], "s-", label="25 steps + CFG")
        ax.set_yscale("log"), ax.legend(fontsize=8)
    ax.set_title("teacher: toy FD (held-out)", fontsize=9), ax.set_xlabel("teacher step")
    names = {key: name for _, name, key, steps, _ in ROWS if steps == 1}
    for ax, (k, title) in zip(axes[1:], panels):
        for i, (key, recs) in enumerate(logs.items()):
            xs = [rec["step"] for rec in recs if k in rec]
            line, = ax.plot(xs, [rec[k] for rec in recs if k in rec], label=names.get(key, key).replace(", 1 step", ""))
            if k == "d_real":
                ax.plot(xs, [rec["d_fake"] for rec in recs if k in rec], "--", color=line.get_color())
        ax.set_title("SF-V: " + title, fontsize=9), ax.set_xlabel("SF-V step")
    if logs:
        axes[1].legend(fontsize=7)
    if gaps:
        ax = axes[-1]
        for name, style in (("student", "-"), ("frozen", "--")):
            for kind, colour in (("spatial", "C0"), ("temporal", "C3")):
                what = "SF-V 1 step" if name == "student" else "real, frames 1-3 = frame 0"
                ax.plot(gaps[name][kind], style, color=colour, label=f"{kind} heads: {what}")
        ax.axhline(0, color="grey", lw=0.5), ax.legend(fontsize=6)
        ax.set_title("SF-V, its D after training: score(real) - score(x)", fontsize=9), ax.set_xlabel("frame")
    else:
        axes[-1].axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def save_fp16(src, dst):
    """Copy a bundle with its floating-point tensors in fp16 (load_svd.load casts back to fp32), keeping its
    metadata (the training step, the mode)."""
    svd = load_svd.load(src)
    meta = {k: v for k, v in load_svd.bundle_metadata(src).items() if k not in ("format", "config")}
    load_svd.save(svd.half(), dst, meta)

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
# speed: seconds per training step, FLOPs per step, share of the CPU's peak


def cpu_ghz():
    """The CPU's clock in GHz as the kernel reports it (/proc/cpuinfo 'cpu MHz'; nominal under a hypervisor)."""
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else float("nan")
    except OSError:
        return float("nan")


def speed(a):
    """Seconds per teacher step and per SF-V step (toy recipe, batch 8) at 1 and 2 threads, from train.py's own
    it/s log over steps 6-10 (the first five warm up); FLOPs of one step counted by torch.utils.flop_counter (matmuls
    and convolutions, forward and backward: the arithmetic that matters), as the difference of a 2-step and a 1-step
    run (so set-up work cancels); peak = cores x GHz x fp32 FLOPs per cycle per core (--flops-per-cycle: 32 for two
    256-bit FMA pipes, e.g. AMD Zen 2-4 and Intel client cores: 2 pipes x 8 lanes x 2 for multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode
    teacher = os.path.join(ASSETS, "toy_teacher.safetensors")
    kinds = {"teacher": ["--mode", "diffusion", "--init", "toy", "--batch-size", "8"] + TEACHER_FLAGS,
             "sfv": ["--mode", "sfv", "--init", teacher, "--batch-size", "8"] + SFV_FLAGS}
    threads, res = torch.get_num_threads(), {}
    peak = os.cpu_count() * cpu_ghz() * a.flops_per_cycle * 1e9
    with tempfile.TemporaryDirectory() as tmp:
        def run(kind, steps, log_every, flops=False):
            d = os.path.join(tmp, f"{kind}_{steps}_{time.time_ns()}")
            argv = base_flags(a) + kinds[kind] + ["--out", d, "--max-steps", str(steps), "--log-every", str(log_every),
                                                  "--save-every", "100000"]
            counter = FlopCounterMode(display=False)
            with counter if flops else contextlib.nullcontext():
                train.main(argv)
            with open(os.path.join(d, "log.jsonl")) as f:
                last = json.loads(f.read().splitlines()[-1])
            return counter.get_total_flops() if flops else 1 / last["it_s"]
        for kind in kinds:
            flops = run(kind, 2, 1, True) - run(kind, 1, 1, True)
            res[kind] = {"flops_per_step": flops}
            for n in (1, 2):
                torch.set_num_threads(n)
                s = run(kind, 10, 5)
                res[kind][f"s_per_step_{n}t"] = s
                res[kind][f"peak_share_{n}t"] = flops / s / (n * peak / os.cpu_count())
            torch.set_num_threads(threads)
    lines = [f"CPU: {os.cpu_count()} cores x {cpu_ghz():.2f} GHz x {a.flops_per_cycle} FLOPs/cycle = "
             f"{peak / 1e9:.0f} GFLOP/s fp32 peak (cores x GHz x FLOPs/cycle; the share at 1 thread is of one core's)",
             "| step (batch 8) | GFLOP / step | s / step, 1 thread | s / step, 2 threads | share of peak 1 / 2 threads |",
             "|---|---|---|---|---|"]
    for kind, v in res.items():
        lines.append(f"| {kind} | {v['flops_per_step'] / 1e9:.1f} | {v['s_per_step_1t']:.3f} | "
                     f"{v['s_per_step_2t']:.3f} | {100 * v['peak_share_1t']:.1f}% / {100 * v['peak_share_2t']:.1f}% |")
    md = "\n".join(lines)
    cli.write_text(os.path.join(a.out, "speed.md"), md + "\n")
    cli.write_json(os.path.join(a.out, "speed.json"), {"peak_flops": peak, "cpu_ghz": cpu_ghz(), **res}, indent=1)
    print(md)
    return res

# -----------------------------------------------------------------------------
# main


MODES = ("smoke", "ladder", "lesson", "evaluate_assets", "speed")
DEFAULT_OUT = {None: "toy", "smoke": "toy_smoke", "ladder": "toy_ladder", "lesson": "toy_lesson",
               "evaluate_assets": "toy_evaluate", "speed": "toy_speed"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Modes (one at most; none: the full run from scratch, ~70 min on 2 CPU cores, "
                                       "into out/toy/; assets/ is written only with --assets)")
    p.add_argument("--out", help="output folder (default out/toy, or out/toy_<mode> for a mode)")
    p.add_argument("--lesson", action="store_true", help="~7 min: distil the bundled teacher into a student with the "
                                                         "SF-V recipe; compare it with the bundled rows (out/toy_lesson)")
    p.add_argument("--evaluate-assets", action="store_true", help="~5 min, no training: the whole table and the "
                                                                  "pictures from the bundled models (out/toy_evaluate)")
    p.add_argument("--smoke", action="store_true", help="< 2 min: a few steps of every stage (CI; out/toy_smoke)")
    p.add_argument("--ladder", action="store_true", help="~25 min: the sanity ladder instead (out/toy_ladder)")
    p.add_argument("--speed", action="store_true", help="~2 min: s per teacher / SF-V step at 1 and 2 threads and the "
                                                        "share of the CPU's peak FLOP rate (out/toy_speed)")
    p.add_argument("--assets", action="store_true", help="the full run or --evaluate-assets only: also write the "
                                                         "bundles, toy_results.json and the pictures into assets/ "
                                                         "(the shipped files; off: assets/ is never touched)")
    p.add_argument("--resume", action="store_true", help="keep finished stages and resume unfinished ones from their "
                                                         "train_state.pt (after an interruption); keep the evaluated "
                                                         "rows of unchanged bundles")
    p.add_argument("--seed", type=int, default=0, help="seed of every training run and of the held-out sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--pic-clips", type=int, default=6, help="clips in compare.gif (compare.png shows the first; default 6)")
    p.add_argument("--flops-per-cycle", type=int, default=32, help="--speed: fp32 FLOPs per cycle per core of this "
                                                                   "CPU (default 32: two 256-bit FMA pipes)")
    a = p.parse_args(argv)
    modes = [m for m in MODES if getattr(a, m)]
    if len(modes) > 1:
        p.error("pick one mode: " + " or ".join("--" + m.replace("_", "-") for m in modes))
    a.mode = modes[0] if modes else None
    a.out = a.out or os.path.join("out", DEFAULT_OUT[a.mode])
    return a


def check_args(a, r):
    """Every flag checked before any work (training takes minutes to an hour)."""
    if a.assets and a.mode not in (None, "evaluate_assets"):
        raise UserError(f"--assets works with the full run or --evaluate-assets; drop it with --{a.mode.replace('_', '-')}")
    if not 1 <= a.pic_clips <= r["n_eval"]:
        raise UserError(f"bad --pic-clips {a.pic_clips}: must be 1 to {r['n_eval']} (the held-out clips)")
    if a.flops_per_cycle < 1:
        raise UserError(f"bad --flops-per-cycle {a.flops_per_cycle}: must be at least 1")
    cli.check_folder("--out", a.out)
    pick_device(a.device)
    need = {"lesson": ["teacher"], "speed": ["teacher"], "evaluate_assets": ["teacher", "sfv_both"]}.get(a.mode, [])
    for key in need:                           # the other bundles are optional: their rows are left out with a note
        if not os.path.exists(os.path.join(ASSETS, MODELS[key][1])):
            raise UserError(f"{os.path.join(ASSETS, MODELS[key][1])} is missing; restore it (git checkout assets/) or "
                            f"make it with `python toy.py --assets`")


def bundled_paths():
    """{model key: assets/ file} of the bundles that are there (the teacher and toy_sfv always are)."""
    return {k: os.path.join(ASSETS, f) for k, (_, f, _) in MODELS.items() if os.path.exists(os.path.join(ASSETS, f))}


def bundled_results():
    """assets/toy_results.json -> dict ({} if absent or unreadable: the bundled rows are then not shown)."""
    try:
        with open(os.path.join(ASSETS, "toy_results.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def report(a, r, rows, pics, curve, logs, gaps, timing, cmd, extra=""):
    """Write <out>/table.md, compare.png, compare.gif, curves.png; -> the markdown."""
    pictures(pics, os.path.join(a.out, "compare.png"), os.path.join(a.out, "compare.gif"))
    curves_png(curve, logs, os.path.join(a.out, "curves.png"), gaps)
    c = CONFIGS["toy"]
    md = (f"{table_markdown(rows)}\n\nThe toy's measures (the shape tracked by its colour; mean ± bootstrap standard "
          f"error over the clips):\n\n{table_markdown(rows, MEASURES)}\n\nFD columns: point estimate ± bootstrap "
          f"standard error over the clips. Made by `{cmd}` ({r['n_eval']} held-out clips of {c.num_frames} frames at "
          f"{c.height}x{c.width}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'GPU' if pick_device(a.device).type == 'cuda' else 'CPU'}). Wall time: {timing}.\n{extra}")
    if curve:
        md += f"\nTeacher learning curve ({r['n_curve']} held-out clips):\n\n{curve_markdown(curve)}\n"
    cli.write_text(os.path.join(a.out, "table.md"), md)
    print("\n" + md)
    return md


def run(a):
    r = SMOKE if a.smoke else LESSON if a.lesson else FULL
    check_args(a, r)
    os.makedirs(a.out, exist_ok=True)
    if a.ladder:
        return ladder(a, r)
    if a.speed:
        return speed(a)
    t0 = time.perf_counter()
    real = clips(r["n_eval"], HELD_OUT_SEED + a.seed)
    ref = clips(r["n_eval"], REFERENCE_SEED + a.seed)
    bundled = bundled_results()
    if a.mode is None or a.smoke:                                   # train everything
        teacher, t_teacher, curve = train_teacher(a, r, real[:r["n_curve"], 0], real[:r["n_curve"]])
        paths, secs = train_sfv(a, r, teacher, [k for k in MODELS if k != "teacher"])
        paths["teacher"], secs = teacher, {"teacher": t_teacher, **secs}
        logs, rows_ = read_logs(a.out, paths), ROWS
    elif a.lesson:                                                  # one student from the bundled teacher
        paths, secs = train_sfv(a, r, os.path.join(ASSETS, MODELS["teacher"][1]), ["sfv_both"])
        paths["teacher"] = os.path.join(ASSETS, MODELS["teacher"][1])
        paths["sfv_bundled"] = os.path.join(ASSETS, MODELS["sfv_both"][1])
        curve, logs = bundled.get("curve", []), read_logs(a.out, ["sfv_both"])
        rows_ = [("teacher_25", "teacher (bundled), 25 steps + CFG", "teacher", 25, True),
                 ("teacher_1", "teacher (bundled), 1 step", "teacher", 1, False),
                 ("sfv_bundled", "SF-V (bundled), 1 step", "sfv_bundled", 1, False),
                 ("sfv_1", "your SF-V student, 1 step", "sfv_both", 1, False)]
    else:                                                           # evaluate_assets: the bundled models
        paths, secs = bundled_paths(), {}
        curve, logs = bundled.get("curve", []), bundled.get("logs", {})
        logs = read_logs(os.path.join("out", "toy"), paths) or logs        # the full run's logs, if this machine has them
        rows_ = ROWS
    t1 = time.perf_counter()
    rows, pics = evaluate_all(a, r, paths, real, ref, rows_)
    run_dir = os.path.join(os.path.join("out", "toy") if a.mode == "evaluate_assets" else a.out, MODELS["sfv_both"][0])
    if a.mode == "evaluate_assets" and not os.path.isdir(run_dir):   # no full run on this machine: the bundled ones
        gaps = bundled.get("d_gaps")
    else:                                                            # the student's own D, end of its training
        gaps = d_gaps(run_dir, paths["teacher"], real[:r["n_curve"]], a.seed)
    t2 = time.perf_counter()
    cmd = "python toy.py" + {None: "", "smoke": " --smoke", "lesson": " --lesson",
                             "evaluate_assets": " --evaluate-assets"}[a.mode]
    timing = ", ".join([f"{k} {v:.0f} s" for k, v in secs.items()] + [f"evaluation {t2 - t1:.0f} s",
                                                                       f"total {t2 - t0:.0f} s"])
    extra = (f"\n{a.reused} rows were measured by an earlier run (--resume: their bundles are unchanged); the wall "
             f"time counts only this run's.\n" if getattr(a, "reused", 0) else "")
    if a.lesson and bundled.get("rows"):
        extra += (f"\nThe bundled rows (assets/toy_results.json, {bundled['recipe']['n_eval']} clips, made by "
                 f"`{bundled.get('command', 'python toy.py')}`):\n\n{table_markdown(bundled['rows'])}\n\n"
                 f"{table_markdown(bundled['rows'], MEASURES)}\n")
    report(a, r, rows, pics, curve, logs, gaps, timing, cmd, extra)
    results = {"rows": rows, "curve": curve, "logs": logs, "d_gaps": gaps, "train_seconds": secs,
               "eval_seconds": t2 - t1, "total_seconds": t2 - t0, "command": cmd,
               "recipe": {**r, "data": base_flags(a), "teacher_flags": TEACHER_FLAGS}}
    if a.mode == "evaluate_assets":                                   # what only the training runs knew
        results["train_seconds"] = bundled.get("train_seconds", {})
        results.update({k: bundled[k] for k in ("teacher_continued",) if k in bundled})
    cli.write_json(os.path.join(a.out, "results.json"), results, indent=1)
    if a.assets:
        write_assets(a, paths, results, real)
    return rows


def write_assets(a, paths, results, real):
    """--assets: the fp16 bundles (the full run), toy_results.json, example*.png and the pictures into assets/."""
    os.makedirs(ASSETS, exist_ok=True)
    written = []
    if a.mode is None:
        for key, path in paths.items():
            save_fp16(path, os.path.join(ASSETS, MODELS[key][1]))
            written.append(MODELS[key][1])
    cli.write_json(os.path.join(ASSETS, "toy_results.json"), results, indent=1)
    for i, name in enumerate(("example.png", "example2.png", "example3.png")):
        big = F.interpolate((real[i, :1] + 1) / 2, scale_factor=PIC_SCALE, mode="nearest")[0]
        write_png(to_uint8(big), os.path.join(ASSETS, name))
    written += ["toy_results.json", "example*.png"]
    for name in ("compare.png", "compare.gif", "curves.png"):
        if os.path.exists(os.path.join(a.out, name)):
            shutil.copyfile(os.path.join(a.out, name), os.path.join(ASSETS, "toy_" + name))
            written.append("toy_" + name)
    print(f"wrote {ASSETS}/: " + ", ".join(written))


def main(argv=None):
    """CLI entry: a bad flag or file is one line `error: <what>; <fix>` (exit 2), Ctrl-C one line (exit 130).
    -> exit status."""
    a = parse_args(argv)
    try:
        run(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; finished stages and checkpoints are in {a.out}/ (python toy.py --resume continues a "
              f"full run)" if a.mode in (None, "smoke") else f"interrupted; {a.out}/ may hold partial results",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
