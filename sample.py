"""
Image-to-video with SVD (many steps + CFG) or SF-V (one step): `python sample.py img.png` -> img.mp4.

    python sample.py img.png                          # weights from --ckpt / $SFV_CKPT / checkpoints/ / the toy model
    python sample.py img.png --ckpt checkpoints/svd_xt.safetensors --steps 30 --frames 25
    python sample.py img.png --ckpt sfv.safetensors --steps 1 --gif --frames-dir frames/
    python sample.py --download svd_xt               # explicit; nothing is ever downloaded implicitly

The maths is in model.py: SVD.condition (CLIP embedding of the clean image, conditioning latent of the image plus
cond_aug * noise, vector conditioning; SVD, Blattmann et al. 2023) and SVD.sample (steps=1: SF-V's single evaluation
at sigma_max, Zhang et al. 2024, sec. 3; steps>1: EDM Euler on the Karras grid with per-frame linear CFG). This file
is the command line; image and video files are read and written by data.py (pixels in [0, 1]).
Runtime deps: torch, numpy, safetensors, tqdm, av.
"""
import argparse
import math
import os
import sys
import time

import av
import av.filter
import torch

import cli
import load_svd
from cli import UserError, pick_device
from data import read_image, resize_center_crop, write_frames_dir, write_gif, write_video
from model import CONFIGS, size_multiple

MIN_SIDE = 64                                   # smallest accepted input image side (pixels)
MAX_FRAMES = 128
MAX_STEPS = 1000
FPS_RANGE = (0.001, 1000)                       # output frame rate (mp4); a GIF's frame delays are in 1/100 s
GIF_MAX_FPS = 100
OUT_EXTS = (".mp4", ".gif")                     # --out: H.264 mp4 or GIF
SAMPLING_KEYS = ("num_frames", "steps", "min_cfg", "max_cfg", "fps_id", "motion_bucket_id", "cond_aug", "height", "width")


# -----------------------------------------------------------------------------
# images and videos in


def snap_size(height, width, multiple=64):
    """Round (height, width) to the nearest multiple of `multiple` (at least one multiple)."""
    return tuple(max(multiple, int(round(v / multiple)) * multiple) for v in (height, width))


@torch.no_grad()
def sample_video(svd, image, num_frames=None, steps=None, min_cfg=None, max_cfg=None, fps_id=None,
                 motion_bucket_id=None, cond_aug=None, seed=23, decode_chunk=14, offload=False):
    """image (3, H, W) in [0, 1], H and W multiples of 64 -> (video (T, 3, H, W) float32 in [0, 1] on CPU, stats).
    Missing sampling arguments come from svd.cfg. stats: seconds per stage ("encode", "denoise", "decode") and
    "unet_evals" (network evaluations; a CFG step counts 2). All noise is drawn on CPU from one generator seeded
    `seed` (the cond-aug noise, then the initial latent), so a seed gives the same video on every device."""
    p = next(svd.unet.parameters())
    device, dtype = p.device, p.dtype
    gens = [torch.Generator().manual_seed(seed)]
    stats = {}
    t0 = time.perf_counter()
    cond = svd.condition(image[None].float() * 2 - 1, gens, fps_id, motion_bucket_id, cond_aug)
    if offload and device.type != "cpu":   # the encoders are done: free their memory for the UNet and the decoder
        for m in (svd.clip, svd.cond_encoder, getattr(svd.vae, "encoder", svd.clip)):
            m.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _sync(device)
    stats["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    counter = []
    x = svd.sample(cond, gens, num_frames, steps, min_cfg, max_cfg, counter=counter)      # (1, T, z, h, w)
    _sync(device)
    stats["denoise"], stats["unet_evals"] = time.perf_counter() - t0, sum(counter)

    t0 = time.perf_counter()
    video = svd.vae.decode(x.to(dtype), chunk=decode_chunk)[0]                    # (T, 3, H, W) in [-1, 1]
    video = ((video.float() + 1) / 2).clamp(0, 1).cpu()
    stats["decode"] = time.perf_counter() - t0
    return video, stats


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

# -----------------------------------------------------------------------------
# videos and images out, atomically (frames in [0, 1])


# -----------------------------------------------------------------------------
# command line


def pick_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def sampling_defaults(svd):
    """The checkpoint's sampling defaults (its config): {key: value} for SAMPLING_KEYS."""
    return {k: getattr(svd.cfg, k) for k in SAMPLING_KEYS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Image-to-video with SVD / SF-V. Writes an H.264 mp4 next to the image.")
    p.add_argument("image", nargs="?", help="input image (PNG, JPEG, WebP, ...)")
    p.add_argument("--out", help="output .mp4 or .gif (default: next to the image, same name, .mp4)")
    p.add_argument("--gif", action="store_true", help="also write a .gif next to the mp4")
    p.add_argument("--frames-dir", help="also write every frame as PNG into this folder")
    p.add_argument("--ckpt", help=f"official .safetensors, diffusers folder or SF-V bundle (default: "
                                  f"${load_svd.CKPT_ENV}, checkpoints/, then the toy model)")
    p.add_argument("--config", choices=sorted(CONFIGS), help="model config for a non-official single file / diffusers "
                                                              "folder (default: recognised from the shapes)")
    p.add_argument("--download", choices=sorted(load_svd.OFFICIAL), help="download official weights into "
                                                                          "checkpoints/ (uses $HF_TOKEN; resumes)")
    p.add_argument("--steps", type=int, help="1 = SF-V single step (no guidance); >1 = Euler EDM with CFG "
                                             "(default: checkpoint's)")
    p.add_argument("--frames", type=int, help="number of frames (default: checkpoint's, 14 or 25)")
    p.add_argument("--height", type=int, help="multiple of 64 (default: checkpoint's, 576)")
    p.add_argument("--width", type=int, help="multiple of 64 (default: checkpoint's, 1024)")
    p.add_argument("--min-cfg", type=float, help="guidance at the first frame (default: checkpoint's)")
    p.add_argument("--max-cfg", type=float, help="guidance at the last frame (default: checkpoint's)")
    p.add_argument("--fps-id", type=int, help="fps conditioning (default 6)")
    p.add_argument("--motion-bucket-id", type=int, help="motion conditioning, higher = more motion (default 127)")
    p.add_argument("--cond-aug", type=float, help="noise added to the conditioning image (default 0.02)")
    p.add_argument("--fps", type=float, help="output frame rate (default fps_id + 1)")
    p.add_argument("--seed", type=int, default=23, help="seed of all noise, 0 .. 2^64-1; same seed -> same video "
                                                        "(default 23)")
    p.add_argument("--decode-chunk", type=int, default=14, help="frames per VAE decode chunk (lower = less memory)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 (fp16 without bf16 support) on GPU, fp32 on CPU")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="move the CLIP/VAE encoders to CPU after use (default: on for GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    if args.image is None and args.download is None:
        p.error("the image is required (or --download NAME)")
    return args


def _check_out(path):
    """Fail before any work if the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"output path {path} is a folder; pass a file name such as --out {os.path.join(path, 'video.mp4')}")
    ext = os.path.splitext(path)[1].lower()
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


def _check_paths(args):
    """Path flags given as '' (e.g. an unset shell variable) would silently mean their defaults."""
    for name in ("out", "ckpt", "frames_dir"):
        if getattr(args, name) == "":
            raise UserError(f"bad --{name.replace('_', '-')} '': an empty path; pass a path or leave the flag out")


def _check_gif_fps(fps, out, gif):
    if fps > GIF_MAX_FPS and (out.lower().endswith(".gif") or gif):
        raise UserError(f"a GIF plays at most {GIF_MAX_FPS} fps (its frame delays are in 1/100 s), not {fps:g}; pass "
                          f"--fps {GIF_MAX_FPS} or lower, or write only an .mp4")


def _check_numbers(args):
    """Every numeric flag, before anything expensive."""
    for name in ("frames", "steps", "decode_chunk"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"bad --{name.replace('_', '-')} {v}: must be at least 1")
    if args.frames is not None and args.frames > MAX_FRAMES:
        raise UserError(f"bad --frames {args.frames}: at most {MAX_FRAMES} (SVD is trained on 14/25)")
    if args.steps is not None and args.steps > MAX_STEPS:
        raise UserError(f"bad --steps {args.steps}: at most {MAX_STEPS} (Euler sampling uses 25-50)")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v < MIN_SIDE:
            raise UserError(f"bad --{name} {v}: must be at least {MIN_SIDE} (a multiple of 64)")
    for name in ("fps_id", "motion_bucket_id"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise UserError(f"bad --{name.replace('_', '-')} {v}: must be at least 0")
    if args.fps_id is not None and args.fps is None and args.fps_id + 1 > FPS_RANGE[1]:
        raise UserError(f"bad --fps-id {args.fps_id}: the video would play at fps-id + 1 = {args.fps_id + 1} fps, "
                          f"over {FPS_RANGE[1]:g}; pass --fps too")
    for name in ("fps", "min_cfg", "max_cfg", "cond_aug"):
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise UserError(f"bad --{name.replace('_', '-')} {v}: must be a finite number")
    if args.fps is not None and args.fps <= 0:
        raise UserError(f"bad --fps {args.fps:g}: must be positive")
    if args.fps is not None and not FPS_RANGE[0] <= args.fps <= FPS_RANGE[1]:
        raise UserError(f"bad --fps {args.fps:g}: must be from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}")
    if args.cond_aug is not None and args.cond_aug < 0:
        raise UserError(f"bad --cond-aug {args.cond_aug:g}: must be at least 0 (it is a noise level)")
    if not 0 <= args.seed < 2 ** 64:
        raise UserError(f"bad --seed {args.seed}: must be an integer from 0 to 2^64-1")


def run(args):
    """The command: returns the output path."""
    if args.download:
        path = load_svd.download_official(args.download, progress=not args.quiet)
        if args.image is None:
            print(path)
            return path
        args.ckpt = args.ckpt or path
    # cheap checks first: the numbers, the device, the image, the output paths
    _check_paths(args)
    _check_numbers(args)
    device = pick_device(args.device)
    image = read_image(args.image)
    if min(image.shape[1:]) < MIN_SIDE:
        raise UserError(f"image too small: {image.shape[2]}x{image.shape[1]} px; use an image with at least "
                          f"{MIN_SIDE} px on each side (ideally >= the output size)")
    out = args.out or os.path.splitext(args.image)[0] + ".mp4"
    _check_out(out)
    for o in [out] + ([os.path.splitext(out)[0] + ".gif"] if args.gif else []):
        if os.path.exists(o) and os.path.samefile(o, args.image):
            raise UserError(f"the output {o} is the input image {args.image} (it would be overwritten); pass "
                              f"another --out, e.g. --out {os.path.splitext(args.image)[0]}_sfv.mp4")
    if args.frames_dir:
        cli.check_folder("--frames-dir", args.frames_dir)
    if args.fps is not None:
        _check_gif_fps(args.fps, out, args.gif)

    path, is_toy = load_svd.find_checkpoint(args.ckpt)
    if is_toy:
        print(f"no SF-V/SVD weights found (--ckpt, ${load_svd.CKPT_ENV}, checkpoints/): using the bundled toy model "
              f"{path} (not realistic; get real weights with --download svd_xt)")
    dtype = pick_dtype(args.dtype, device)
    svd = load_svd.load(path, config=CONFIGS[args.config] if args.config else None, dtype=dtype, device=device)
    if args.config and svd.load_info["layout"] == "bundle":
        print(f"note: --config {args.config} is ignored: {path} is an SF-V bundle and carries its own config")
    if args.compile:
        svd.unet = torch.compile(svd.unet)
    d = sampling_defaults(svd)
    for k, a in (("steps", "steps"), ("num_frames", "frames"), ("min_cfg", "min_cfg"), ("max_cfg", "max_cfg"),
                 ("fps_id", "fps_id"), ("motion_bucket_id", "motion_bucket_id"), ("cond_aug", "cond_aug"),
                 ("height", "height"), ("width", "width")):
        if getattr(args, a) is not None:
            d[k] = getattr(args, a)
    if d["steps"] == 1 and (d["min_cfg"], d["max_cfg"]) != (1.0, 1.0):
        print(f"note: one step samples without guidance; --min-cfg/--max-cfg ({d['min_cfg']:g}/{d['max_cfg']:g}) "
              f"are ignored (pass --steps 25 for guided SVD sampling)")
    fps = args.fps if args.fps is not None else d["fps_id"] + 1
    _check_gif_fps(fps, out, args.gif)
    m = size_multiple(svd.cfg)
    H, W = snap_size(d["height"], d["width"], m)
    if (H, W) != (d["height"], d["width"]):
        print(f"note: {d['height']}x{d['width']} is not a multiple of {m}; using {H}x{W} (height x width)")
    image = resize_center_crop(image, H, W).clamp(0, 1)
    offload = device.type != "cpu" if args.offload is None else args.offload

    video, st = sample_video(svd, image, d["num_frames"], d["steps"], d["min_cfg"], d["max_cfg"], d["fps_id"],
                             d["motion_bucket_id"], d["cond_aug"], args.seed, args.decode_chunk, offload)
    if not torch.isfinite(video).all():
        raise UserError(f"the sampled video is not finite (NaN/inf): the checkpoint {path} holds NaN/inf weights, "
                          f"or --dtype {args.dtype} overflowed; check the weights, or pass --dtype fp32")
    extras = []
    try:
        if out.lower().endswith(".gif"):
            write_gif(video, out, fps)
        else:
            write_video(video, out, fps)
            if args.gif:
                extras.append(write_gif(video, os.path.splitext(out)[0] + ".gif", fps))
        if args.frames_dir:
            write_frames_dir(video, args.frames_dir)
            extras.append(args.frames_dir + os.sep)
    except OSError as e:   # e.g. disk full, --frames-dir is a file
        raise UserError(f"cannot write {e.filename or out}: {e.strerror or e}; free some space or pick another "
                          f"--out / --frames-dir") from None
    except av.FFmpegError as e:
        raise UserError(f"cannot encode {out} at {W}x{H}, {fps:g} fps ({type(e).__name__}); use the default "
                          f"--height/--width and --fps") from None
    print(f"wrote {out} ({video.shape[0]} frames, {W}x{H}, {fps:g} fps, {d['steps']} step{'s' * (d['steps'] > 1)})"
          + "".join(f" + {e}" for e in extras))
    print(f"image encode {st['encode']:.2f} s, denoise {st['denoise']:.2f} s ({st['unet_evals']} UNet evals), "
          f"decode {st['decode']:.2f} s")
    return out


def main(argv=None):
    """CLI entry: one-line 'error: ...' on stderr and exit code 2 (1 for out-of-memory) instead of a traceback."""
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:                           # torch.OutOfMemoryError is a RuntimeError
        text = cli.oom_text(e)
        if text is None:
            raise
        print(f"error: out of memory ({text}); try --decode-chunk 2, a lower --height/--width, "
              f"fewer --frames or --dtype fp16", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
