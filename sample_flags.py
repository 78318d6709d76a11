"""
sample.py's flags: their limits and the checks they pass before anything expensive (each failure one line, a
cli.UserError), and what they resolve to: the checkpoint's sampling defaults that the flags override, the dtype of
--dtype auto, and the --compile warm-up (with the device sync that sample.py's timings also use).
"""
import math
import os
import time

import torch

from cli import UserError
from model import added_time_ids, cfg_scales, make_denoiser

MAX_FRAMES = 128
MAX_STEPS = 1000
MAX_CFG = 100                                   # |guidance| above this is refused (SVD samples with 1-3)
FPS_RANGE = (0.001, 1000)                       # output frame rate (mp4); a GIF's frame delays are in 1/100 s
GIF_MAX_FPS = 100
OUT_EXTS = (".mp4", ".gif")                     # --out: H.264 mp4 or GIF
SAMPLING_KEYS = ("num_frames", "steps", "min_cfg", "max_cfg", "fps_id", "motion_bucket_id", "cond_aug", "height",
                 "width")

# -----------------------------------------------------------------------------
# checks


def check_numbers(args):
    """Every numeric flag, before anything expensive. A rule is (flags, fails(value), why); the first broken one is
    the error."""
    rules = [
        ("frames steps decode_chunk", lambda v: v < 1, "must be at least 1"),
        ("frames", lambda v: v > MAX_FRAMES, f"at most {MAX_FRAMES} (SVD is trained on 14/25)"),
        ("steps", lambda v: v > MAX_STEPS, f"at most {MAX_STEPS} (Euler sampling uses 25-50)"),
        ("height width", lambda v: v < 1, "must be positive (a multiple of the model's size step: 64 for SVD, 4 "
                                          "for the toy)"),
        ("fps_id motion_bucket_id", lambda v: v < 0, "must be at least 0"),
        ("fps_id", lambda v: args.fps is None and v + 1 > FPS_RANGE[1],
         lambda v: f"the video would play at fps-id + 1 = {v + 1} fps, over {FPS_RANGE[1]:g}; pass --fps too"),
        ("fps min_cfg max_cfg cond_aug", lambda v: not math.isfinite(v), "must be a finite number"),
        ("min_cfg max_cfg", lambda v: abs(v) > MAX_CFG,
         f"guidance from -{MAX_CFG} to {MAX_CFG} (SVD samples with 1-3)"),
        ("fps", lambda v: v <= 0, "must be positive"),
        ("fps", lambda v: not FPS_RANGE[0] <= v <= FPS_RANGE[1], f"must be from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}"),
        ("cond_aug", lambda v: v < 0, "must be at least 0 (it is a noise level)"),
        ("seed", lambda v: not 0 <= v < 2 ** 64, "must be an integer from 0 to 2^64-1"),
    ]
    for names, fails, why in rules:
        for name in names.split():
            v = getattr(args, name)
            if v is not None and fails(v):
                shown = f"{v:g}" if isinstance(v, float) else v         # ints in full (--seed up to 2^64-1)
                raise UserError(f"bad --{name.replace('_', '-')} {shown}: {why(v) if callable(why) else why}")


def check_out(path, image, gif):
    """Fail before any work if the output (and the .gif of --gif) cannot be written or would overwrite the image."""
    folder, ext = os.path.dirname(os.path.abspath(path)), os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        raise UserError(f"output path {path} is a folder; pass a file name such as --out "
                        f"{os.path.join(path, 'video.mp4')}")
    if ext not in OUT_EXTS:
        raise UserError(f"cannot write {path}: unsupported output type '{ext or '(no extension)'}'; name it "
                        f"{' or '.join(OUT_EXTS)}")
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: folder {folder} does not exist; create it or pass another --out")
    probe = os.path.join(folder, f".sfv-write-test-{os.getpid()}")
    try:
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; pass --out to a writable folder") from None
    for o in [path] + ([os.path.splitext(path)[0] + ".gif"] if gif else []):
        if os.path.isdir(o):
            raise UserError(f"cannot write {o}: a folder of that name is in the way; remove it or pass another --out")
        if os.path.exists(o) and os.path.samefile(o, image):
            raise UserError(f"the output {o} is the input image {image} (it would be overwritten); pass "
                            f"another --out, e.g. --out {os.path.splitext(image)[0]}_sfv.mp4")


def check_gif_fps(fps, out, gif):
    if fps > GIF_MAX_FPS and (out.lower().endswith(".gif") or gif):
        raise UserError(f"a GIF plays at most {GIF_MAX_FPS} fps (its frame delays are in 1/100 s), not {fps:g}; pass "
                        f"--fps {GIF_MAX_FPS} or lower, or write only an .mp4")


def check_sampler(svd, d, path):
    """An SF-V student takes one step per trained level, without guidance; a teacher's one step has no guidance."""
    c = svd.cfg
    if c.sampler == "student":
        n = len(c.student_levels)
        if d["steps"] > n:
            raise UserError(f"bad --steps {d['steps']}: the SF-V student {path} takes at most {n} steps (one per "
                            f"trained noise level: {', '.join(f'{s:.4g}' for s in c.student_levels)}); pass --steps "
                            f"1 to {n}")
        if (d["min_cfg"], d["max_cfg"]) != (1.0, 1.0):
            print(f"note: an SF-V student samples without guidance (SF-V trains no unconditional branch); "
                  f"--min-cfg/--max-cfg ({d['min_cfg']:g}/{d['max_cfg']:g}) are ignored")
    elif d["steps"] == 1 and (d["min_cfg"], d["max_cfg"]) != (1.0, 1.0):
        print(f"note: one step samples without guidance; --min-cfg/--max-cfg ({d['min_cfg']:g}/{d['max_cfg']:g}) "
              f"are ignored (pass --steps 25 for guided SVD sampling)")

# -----------------------------------------------------------------------------
# what the flags resolve to


def sampling_defaults(svd):
    """The checkpoint's sampling defaults (its config): {key: value} for SAMPLING_KEYS."""
    return {k: getattr(svd.cfg, k) for k in SAMPLING_KEYS}


def pick_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def sync(device):
    """Wait for the device's queued work, so that a time measured after it is the work's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def warm_up(svd, d, H, W):
    """One UNet evaluation on zeros at the sampling shapes (batch 2 with CFG): torch.compile compiles here, so its
    time is not counted as denoising. -> seconds."""
    device, dtype = next(svd.unet.parameters()).device, next(svd.unet.parameters()).dtype
    T, z, h, w = svd.latent_shape(d["num_frames"], H, W)
    guided = svd.cfg.sampler == "euler" and d["steps"] > 1 and (d["min_cfg"], d["max_cfg"]) != (1.0, 1.0)
    fn = make_denoiser(svd.unet, torch.zeros(1, z, h, w, device=device, dtype=dtype),
                       torch.zeros(1, svd.cfg.clip.embed_dim, device=device, dtype=dtype),
                       added_time_ids(0, 0, 0, 1, device), cfg_scales(1.0, 2.0, T).to(device) if guided else None)
    t0 = time.perf_counter()
    fn(torch.zeros(1, T, z, h, w, device=device), svd.cfg.sigma_max)
    sync(device)
    return time.perf_counter() - t0
