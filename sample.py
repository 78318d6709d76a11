"""
Image-to-video with SVD (many steps + CFG) or SF-V (one step): `python sample.py img.png` -> out/img.mp4.

    python sample.py img.png                          # weights from --ckpt / $SFV_CKPT / checkpoints/ / the toy model
    python sample.py img.png --ckpt checkpoints/svd_xt.safetensors --steps 30 --frames 25
    python sample.py img.png --ckpt sfv.safetensors --steps 1 --gif --frames-dir out/frames/
    python sample.py --download svd_xt               # explicit; nothing is ever downloaded implicitly

The maths is in model.py: SVD.condition (SVD, Blattmann et al. 2023) and SVD.sample (a teacher: EDM Euler on the
Karras grid with per-frame linear CFG; an SF-V student: one evaluation at sigma_max, Zhang et al. 2024, sec. 3,
refined at its trained noise levels for --steps 2, 3). This file is the command line (sample_flags.py checks its
flags); data.py reads the image and writes the video. Runtime deps: torch, numpy, safetensors, tqdm, av.
"""
import argparse
import errno
import os
import sys
import time

import av
import torch

import cli
import cpu_kernels
import load_svd
from cli import UserError, pick_device
from data import check_frames_dir, check_stale_frames, read_image, resize_center_crop, video_writes
from model import CONFIGS, size_multiple
from sample_flags import (SAMPLING_KEYS, check_gif_fps, check_numbers, check_out, check_sampler, pick_dtype,
                          sampling_defaults, sync, warm_up)

OUT_DIR = "out"                                 # the default output folder (in the current folder; git ignores it)

# -----------------------------------------------------------------------------
# sampling: image -> video


def snap_size(height, width, multiple):
    """Round (height, width) to the nearest multiple of `multiple` (model.size_multiple; at least one multiple)."""
    return tuple(max(multiple, int(round(v / multiple)) * multiple) for v in (height, width))


@torch.no_grad()
def sample_video(svd, image, num_frames=None, steps=None, min_cfg=None, max_cfg=None, fps_id=None,
                 motion_bucket_id=None, cond_aug=None, seed=23, decode_chunk=14, offload=False):
    """image (3, H, W) in [0, 1], H and W multiples of model.size_multiple -> (video (T, 3, H, W) float32 in [0, 1] on
    CPU, stats). Missing sampling arguments come from svd.cfg. stats: seconds per stage ("encode", "denoise",
    "decode") and "unet_evals" (network evaluations; a CFG step counts 2). All noise is drawn on CPU from one generator
    seeded `seed` (the cond-aug noise, then the initial latent), so a seed gives the same video on every device."""
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
    sync(device)
    stats["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    counter = []
    x = svd.sample(cond, gens, num_frames, steps, min_cfg, max_cfg, counter=counter)      # (1, T, z, h, w)
    sync(device)
    stats["denoise"], stats["unet_evals"] = time.perf_counter() - t0, sum(counter)

    t0 = time.perf_counter()
    video = svd.vae.decode(x.to(dtype), chunk=decode_chunk)[0]                    # (T, 3, H, W) in [-1, 1]
    video = ((video.float() + 1) / 2).clamp(0, 1).cpu()
    stats["decode"] = time.perf_counter() - t0
    return video, stats

# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=f"Image-to-video with SVD / SF-V. Writes an H.264 mp4 into {OUT_DIR}/.")
    p.add_argument("image", nargs="?", help="input image (PNG, JPEG, WebP, ...)")
    p.add_argument("--out", help=f"output .mp4 or .gif (default: {OUT_DIR}/<image name>.mp4, {OUT_DIR}/ made if "
                                 f"missing)")
    p.add_argument("--gif", action="store_true", help="also write a .gif next to the mp4")
    p.add_argument("--frames-dir", help="also write every frame as PNG into this folder")
    p.add_argument("--ckpt", help=f"official .safetensors, diffusers folder or SF-V bundle "
                                  f"(default: ${load_svd.CKPT_ENV}, checkpoints/, then the toy model)")
    p.add_argument("--config", choices=sorted(CONFIGS), help="config of non-official weights (default: from the "
                                                             "shapes)")
    p.add_argument("--download", choices=sorted(load_svd.OFFICIAL), help="download official weights into "
                                                                          "checkpoints/ (uses $HF_TOKEN; resumes)")
    p.add_argument("--steps", type=int, help="1: one evaluation, no CFG; >1: EDM Euler + CFG, or an SF-V student's "
                                             "refinement at its trained levels (default: checkpoint's)")
    p.add_argument("--frames", type=int, help="number of frames (default: checkpoint's, 14 or 25)")
    p.add_argument("--height", type=int, help="a multiple of the model's size step, 64 for SVD, 4 for the toy (others "
                                              "are rounded; default: checkpoint's, 576)")
    p.add_argument("--width", type=int, help="a multiple of the model's size step (default: checkpoint's, 1024)")
    p.add_argument("--min-cfg", type=float, help="guidance at the first frame (default: checkpoint's)")
    p.add_argument("--max-cfg", type=float, help="guidance at the last frame (default: checkpoint's)")
    p.add_argument("--fps-id", type=int, help="fps conditioning (default: checkpoint's, 6)")
    p.add_argument("--motion-bucket-id", type=int, help="higher = more motion (default: checkpoint's, 127)")
    p.add_argument("--cond-aug", type=float, help="noise on the conditioning image (default: checkpoint's, 0.02)")
    p.add_argument("--fps", type=float, help="output frame rate (default: fps-id + 1)")
    p.add_argument("--seed", type=int, default=23, help="seed of all noise, 0 .. 2^64-1 (default: 23)")
    p.add_argument("--decode-chunk", type=int, default=14, help="frames per VAE decode, lower saves memory (default: "
                                                                "14)")
    p.add_argument("--device", default="auto", help="auto (default: cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 (fp16 without bf16 support) on GPU, fp32 on CPU")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="move the CLIP/VAE encoders to CPU after use (default: on for GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compiled in a warm-up call, timed "
                                                          "apart)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    if args.image is None and args.download is None:
        p.error("the image is required (or --download NAME)")
    return args


def run(args):
    """The command: returns the output path."""
    if args.download:
        part = os.path.join(load_svd.CKPT_DIRS[0], load_svd.OFFICIAL[args.download][1]) + ".part"
        args.on_interrupt = f"the partial download {part} is kept: run the same command to resume"
        path = load_svd.download_official(args.download, progress=not args.quiet)
        args.on_interrupt = None
        if args.image is None:
            print(path)
            return path
        args.ckpt = args.ckpt or path
    # cheap checks first: the paths, the numbers, the device, the image, the outputs
    for name in ("out", "ckpt", "frames_dir"):   # '' (e.g. an unset shell variable) would silently mean the default
        if getattr(args, name) == "":
            raise UserError(f"bad --{name.replace('_', '-')} '': an empty path; pass a path or leave the flag out")
    check_numbers(args)
    device = pick_device(args.device)
    image = read_image(args.image)
    out = args.out or os.path.join(OUT_DIR, os.path.splitext(os.path.basename(args.image))[0] + ".mp4")
    if args.out is None:
        try:
            os.makedirs(OUT_DIR, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the output folder {OUT_DIR} ({e.strerror}); pass --out") from None
    check_out(out, args.image, args.gif)
    if args.frames_dir:
        check_frames_dir(args.frames_dir, args.image)
    if args.fps is not None:
        check_gif_fps(args.fps, out, args.gif)

    path, source = load_svd.find_checkpoint(args.ckpt)
    if source == "toy":
        print(f"no SF-V/SVD weights found (--ckpt, ${load_svd.CKPT_ENV}, checkpoints/): using the bundled toy model "
              f"{path} (not realistic; get real weights with --download svd_xt)")
    elif source != "--ckpt":
        print(f"using {path} ({'found in checkpoints/' if source == 'checkpoints' else 'from ' + source}; pass "
              f"--ckpt to choose another)")
    dtype = pick_dtype(args.dtype, device)
    svd = load_svd.load(path, config=CONFIGS[args.config] if args.config else None, dtype=dtype, device=device)
    if device.type == "cpu":
        cpu_kernels.apply(svd)                                       # opt-in CPU speed-ups, same outputs
    if args.config and svd.load_info["layout"] == "bundle":
        print(f"note: --config {args.config} is ignored: {path} is an SF-V bundle and carries its own config")
    d = sampling_defaults(svd)
    for k in SAMPLING_KEYS:                        # the flags given override the checkpoint's defaults
        v = getattr(args, "frames" if k == "num_frames" else k)
        d[k] = d[k] if v is None else v
    check_sampler(svd, d, path)
    fps = args.fps if args.fps is not None else d["fps_id"] + 1
    check_gif_fps(fps, out, args.gif)
    m = size_multiple(svd.cfg)
    H, W = snap_size(d["height"], d["width"], m)
    if (H, W) != (d["height"], d["width"]):
        print(f"note: {d['height']}x{d['width']} is not a multiple of {m}; using {H}x{W} (height x width)")
    if min(image.shape[1:]) < m:
        raise UserError(f"image too small: {image.shape[2]}x{image.shape[1]} px; use an image with at least {m} px on "
                        f"each side (ideally >= the output size, {W}x{H})")
    if args.frames_dir:
        check_stale_frames(args.frames_dir, d["num_frames"])
    image = resize_center_crop(image, H, W).clamp(0, 1)
    offload = device.type != "cpu" if args.offload is None else args.offload
    if args.compile:
        svd.unet = torch.compile(svd.unet)
        print(f"compiled the UNet (torch.compile, one warm-up evaluation) in {warm_up(svd, d, H, W):.2f} s; not "
              f"counted as denoise time below")

    video, st = sample_video(svd, image, d["num_frames"], d["steps"], d["min_cfg"], d["max_cfg"], d["fps_id"],
                             d["motion_bucket_id"], d["cond_aug"], args.seed, args.decode_chunk, offload)
    if not torch.isfinite(video).all():
        raise UserError(f"the sampled video is not finite (NaN/inf): the checkpoint {path} holds NaN/inf weights, "
                        f"or --dtype {args.dtype} overflowed; check the weights, or pass --dtype fp32")
    writes = video_writes(video, out, fps, args.gif, args.frames_dir)          # all written, or none
    missing = cli.check_folder("--frames-dir", args.frames_dir) if args.frames_dir else []
    try:
        if args.frames_dir:
            os.makedirs(args.frames_dir, exist_ok=True)
        cli.atomic_write_all(writes)
    except OSError as e:   # e.g. disk full
        cli.remove_folders(missing)
        frames = bool(args.frames_dir) and e.filename not in [p for p, _ in writes if not p.endswith(".png")]
        raise UserError(f"cannot write {f'--frames-dir {args.frames_dir}' if frames else e.filename or out} "
                        f"({e.strerror or e}); nothing was written: {'free some space or ' * (e.errno == errno.ENOSPC)}"
                        f"pass another {'--frames-dir' if frames else '--out'}") from None
    except av.FFmpegError as e:
        cli.remove_folders(missing)
        raise UserError(f"cannot encode {out} at {W}x{H}, {fps:g} fps ({type(e).__name__}); use the default "
                        f"--height/--width and --fps") from None
    extras = [p for p, _ in writes[1:] if p.endswith(".gif")]
    extras += [os.path.join(args.frames_dir, "")] if args.frames_dir else []          # one trailing separator
    print(f"wrote {out} ({video.shape[0]} frames, {W}x{H}, {fps:g} fps, {d['steps']} step{'s' * (d['steps'] > 1)})"
          + "".join(f" + {e}" for e in extras))
    print(f"image encode {st['encode']:.2f} s, denoise {st['denoise']:.2f} s ({st['unet_evals']} UNet evals), "
          f"decode {st['decode']:.2f} s")
    return out


def main(argv=None):
    """CLI entry: one-line 'error: ...' on stderr and exit code 2 (1 for out-of-memory) instead of a traceback."""
    args = parse_args(argv)
    args.on_interrupt = None
    try:
        run(args)
    except KeyboardInterrupt:
        return cli.interrupted(args.on_interrupt or "nothing was written")
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
