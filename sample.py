"""
Image-to-video with SVD (many steps + CFG) or SF-V (one step): `python sample.py img.png` -> img.mp4.

    python sample.py img.png                          # weights from --ckpt / $SFV_CKPT / checkpoints/ / the toy model
    python sample.py img.png --ckpt checkpoints/svd_xt.safetensors --steps 30 --frames 25
    python sample.py img.png --ckpt sfv.safetensors --steps 1 --gif --frames-dir frames/
    python sample.py --download svd_xt               # explicit; nothing is ever downloaded implicitly

The maths is in model.py: SVD.condition (CLIP embedding of the clean image, conditioning latent of the image plus
cond_aug * noise, vector conditioning; SVD, Blattmann et al. 2023) and SVD.sample (steps=1: SF-V's single evaluation
at sigma_max, Zhang et al. 2024, sec. 3; steps>1: EDM Euler on the Karras grid with per-frame linear CFG). This file
is the command line and the file I/O of the project: images and videos in, videos out (pixels in [0, 1]).
Runtime deps: torch, numpy, safetensors, tqdm, av.
"""
import argparse
import math
import os
import sys
import time
from fractions import Fraction

import av
import av.filter
import numpy as np
import torch
import torch.nn.functional as F

import load_svd
from load_svd import UserError, atomic_write, pick_device
from model import CONFIGS, size_multiple

MIN_SIDE = 64                                   # smallest accepted input image side (pixels)
MAX_FRAMES = 128
MAX_STEPS = 1000
FPS_RANGE = (0.001, 1000)                       # output frame rate (mp4); a GIF's frame delays are in 1/100 s
GIF_MAX_FPS = 100
OUT_EXTS = (".mp4", ".gif")                     # --out: H.264 mp4 or GIF
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")     # videos read from folders (train.py, evaluate.py)
IMAGE_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP"}
SAMPLING_KEYS = ("num_frames", "steps", "min_cfg", "max_cfg", "fps_id", "motion_bucket_id", "cond_aug", "height", "width")


class SampleError(UserError):
    """A bad input of the sampling command; one line naming the problem and the fix."""

# -----------------------------------------------------------------------------
# images and videos in


def _image_kind(path):
    """'PNG', 'JPEG', ... from the file's first bytes, or None."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in IMAGE_MAGIC.items() if head.startswith(magic)), None)


def read_image(path):
    """Decode one image with av -> (3, H, W) float32 in [0, 1]. Any pixel format (RGB, gray, palette, 8/16 bit) is
    converted to RGB at its own bit depth; alpha (incl. transparent palette entries) is composited over white.
    For animations / videos the first frame is used. EXIF orientation is not applied."""
    if not os.path.exists(path):
        raise SampleError(f"image not found: {path}; check the path")
    if os.path.isdir(path):
        raise SampleError(f"{path} is a folder, not an image; pass an image file (PNG, JPEG, WebP)")
    try:
        kind = _image_kind(path)
    except OSError as e:
        raise SampleError(f"cannot read image {path}: {e.strerror}; check the file permissions") from None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise av.error.InvalidDataError(0, "no image stream")
            frame = next(container.decode(video=0))
    except (av.FFmpegError, StopIteration, ValueError):
        if kind is not None:
            raise SampleError(f"{path} is a damaged or truncated {kind} file (it cannot be decoded); export or "
                              f"download it again") from None
        raise SampleError(f"{path} is not an image av can decode; use a PNG, JPEG or WebP file") from None
    comps = frame.format.components
    alpha = any(c.is_alpha for c in comps) or frame.format.has_palette   # palettes carry alpha (tRNS)
    deep = max(c.bits for c in comps) > 8 and not frame.format.has_palette
    fmt = {(False, False): "rgb24", (True, False): "rgba", (False, True): "rgb48le", (True, True): "rgba64le"}[(alpha, deep)]
    arr = frame.to_ndarray(format=fmt)                            # (H, W, 3|4) uint8 / uint16
    x = torch.from_numpy(arr.astype(np.float32) / (65535.0 if deep else 255.0)).permute(2, 0, 1)
    if alpha:
        x = x[:3] * x[3:] + (1.0 - x[3:])                          # over white
    return x.contiguous()


def read_video(path, frames, start=0, stride=1, fps=None):
    """Frames start, start + stride, ... (`frames` of them) of a video, decoded with av -> (frames, 3, H, W) float32
    in [0, 1]. A frame's index comes from its timestamp at `fps` (default: the stream's average rate), so seeking to
    the keyframe before `start` is exact. Raises SampleError if the file is unreadable or too short."""
    want, out = [start + j * stride for j in range(frames)], []
    try:
        with av.open(path) as c:
            s = c.streams.video[0]
            fps = fps or float(s.average_rate or s.guessed_rate or 0) or 1.0
            t0 = s.start_time or 0
            if start / fps > 1.0:                                       # seek to the keyframe before the clip
                c.seek(t0 + int((start / fps - 0.5) / s.time_base), stream=s, backward=True)
            count = None
            for frame in c.decode(s):
                if frame.pts is None:
                    count = 0 if count is None else count + 1
                    idx = count
                else:
                    idx = round(float((frame.pts - t0) * s.time_base) * fps)
                if idx >= want[len(out)]:
                    out.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                    if len(out) == len(want):
                        break
    except (av.FFmpegError, IndexError, ValueError, OSError) as e:
        raise SampleError(f"cannot decode video {path} ({type(e).__name__}); check or replace the file") from None
    if len(out) < len(want):
        raise SampleError(f"video {path} is too short: {len(out)} of {len(want)} frames decoded; use a longer clip")
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0


def resize_center_crop(x, height, width, mode="bicubic"):
    """(..., C, h, w) -> (..., C, height, width): scale to cover (antialiased `mode` interpolation), centre-crop.
    Used for the input image here (bicubic) and for training clips in train.py (bilinear)."""
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):
        flat = x.reshape(-1, *x.shape[-3:]).float()                   # (N, C, h, w)
        x = F.interpolate(flat, size=(nh, nw), mode=mode, antialias=True, align_corners=False).reshape(*x.shape[:-2], nh, nw)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[..., top:top + height, left:left + width]


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


def to_uint8(frames):
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8 numpy."""
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).contiguous().numpy()


def write_video(frames, path, fps=7, crf=18):
    """(T, 3, H, W) in [0, 1] -> H.264 yuv420p mp4 (faststart), playable in browsers. H and W must be even."""
    arr = to_uint8(frames)

    def write(tmp):
        with av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"}) as out:
            s = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options={"crf": str(crf)})
            s.width, s.height, s.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
            for a in arr:
                out.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
            out.mux(s.encode())
    return atomic_write(path, write)


def write_gif(frames, path, fps=7):
    """(T, 3, H, W) in [0, 1] -> looping GIF with one palette for the whole clip (ffmpeg palettegen/paletteuse)."""
    arr = to_uint8(frames)
    T, H, W, _ = arr.shape

    def write(tmp):
        g = av.filter.Graph()
        src = g.add_buffer(width=W, height=H, format="rgb24", time_base=Fraction(1, 100))
        split, pg = g.add("split"), g.add("palettegen", "stats_mode=full")
        pu, sink = g.add("paletteuse", "dither=sierra2_4a"), g.add("buffersink")
        src.link_to(split)
        split.link_to(pg, 0, 0)
        split.link_to(pu, 1, 0)
        pg.link_to(pu, 0, 1)
        pu.link_to(sink)
        g.configure()
        for i, a in enumerate(arr):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts, f.time_base = round(i * 100 / fps), Fraction(1, 100)
            g.push(f)
        g.push(None)
        with av.open(tmp, "w", format="gif", options={"loop": "0"}) as out:
            s = out.add_stream("gif", rate=Fraction(fps).limit_denominator(100))
            s.width, s.height, s.pix_fmt = W, H, "pal8"
            s.codec_context.time_base = Fraction(1, 100)
            while True:
                try:
                    f = g.pull()
                except (av.error.BlockingIOError, av.error.EOFError):
                    break
                out.mux(s.encode(f))
            out.mux(s.encode())
    return atomic_write(path, write)


def write_png(rgb, path):
    """rgb (H, W, 3) uint8 numpy -> PNG via av's png encoder, atomically. Returns path."""
    cc = av.CodecContext.create("png", "w")
    cc.width, cc.height, cc.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    data = b"".join(bytes(p) for p in cc.encode(frame) + cc.encode())

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write)


def write_frames_dir(frames, folder):
    """(T, 3, H, W) in [0, 1] -> folder/frame_0000.png ... (created if needed). Returns the file paths."""
    os.makedirs(folder, exist_ok=True)
    return [write_png(a, os.path.join(folder, f"frame_{i:04d}.png")) for i, a in enumerate(to_uint8(frames))]


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
        raise SampleError(f"output path {path} is a folder; pass a file name such as --out {os.path.join(path, 'video.mp4')}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in OUT_EXTS:
        raise SampleError(f"cannot write {path}: unsupported output type '{ext or '(no extension)'}'; name it "
                          f"{' or '.join(OUT_EXTS)}")
    if not os.path.isdir(folder):
        raise SampleError(f"cannot write {path}: folder {folder} does not exist; create it or pass another --out")
    probe = os.path.join(folder, f".sfv-write-test-{os.getpid()}")
    try:
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise SampleError(f"cannot write {path}: {e.strerror}; pass --out to a writable folder") from None


def _check_paths(args):
    """Path flags given as '' (e.g. an unset shell variable) would silently mean their defaults."""
    for name in ("out", "ckpt", "frames_dir"):
        if getattr(args, name) == "":
            raise SampleError(f"bad --{name.replace('_', '-')} '': an empty path; pass a path or leave the flag out")


def _check_gif_fps(fps, out, gif):
    if fps > GIF_MAX_FPS and (out.lower().endswith(".gif") or gif):
        raise SampleError(f"a GIF plays at most {GIF_MAX_FPS} fps (its frame delays are in 1/100 s), not {fps:g}; pass "
                          f"--fps {GIF_MAX_FPS} or lower, or write only an .mp4")


def _check_numbers(args):
    """Every numeric flag, before anything expensive."""
    for name in ("frames", "steps", "decode_chunk"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SampleError(f"bad --{name.replace('_', '-')} {v}: must be at least 1")
    if args.frames is not None and args.frames > MAX_FRAMES:
        raise SampleError(f"bad --frames {args.frames}: at most {MAX_FRAMES} (SVD is trained on 14/25)")
    if args.steps is not None and args.steps > MAX_STEPS:
        raise SampleError(f"bad --steps {args.steps}: at most {MAX_STEPS} (Euler sampling uses 25-50)")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v < MIN_SIDE:
            raise SampleError(f"bad --{name} {v}: must be at least {MIN_SIDE} (a multiple of 64)")
    for name in ("fps_id", "motion_bucket_id"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise SampleError(f"bad --{name.replace('_', '-')} {v}: must be at least 0")
    if args.fps_id is not None and args.fps is None and args.fps_id + 1 > FPS_RANGE[1]:
        raise SampleError(f"bad --fps-id {args.fps_id}: the video would play at fps-id + 1 = {args.fps_id + 1} fps, "
                          f"over {FPS_RANGE[1]:g}; pass --fps too")
    for name in ("fps", "min_cfg", "max_cfg", "cond_aug"):
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise SampleError(f"bad --{name.replace('_', '-')} {v}: must be a finite number")
    if args.fps is not None and args.fps <= 0:
        raise SampleError(f"bad --fps {args.fps:g}: must be positive")
    if args.fps is not None and not FPS_RANGE[0] <= args.fps <= FPS_RANGE[1]:
        raise SampleError(f"bad --fps {args.fps:g}: must be from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}")
    if args.cond_aug is not None and args.cond_aug < 0:
        raise SampleError(f"bad --cond-aug {args.cond_aug:g}: must be at least 0 (it is a noise level)")
    if not 0 <= args.seed < 2 ** 64:
        raise SampleError(f"bad --seed {args.seed}: must be an integer from 0 to 2^64-1")


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
        raise SampleError(f"image too small: {image.shape[2]}x{image.shape[1]} px; use an image with at least "
                          f"{MIN_SIDE} px on each side (ideally >= the output size)")
    out = args.out or os.path.splitext(args.image)[0] + ".mp4"
    _check_out(out)
    for o in [out] + ([os.path.splitext(out)[0] + ".gif"] if args.gif else []):
        if os.path.exists(o) and os.path.samefile(o, args.image):
            raise SampleError(f"the output {o} is the input image {args.image} (it would be overwritten); pass "
                              f"another --out, e.g. --out {os.path.splitext(args.image)[0]}_sfv.mp4")
    if args.frames_dir:
        load_svd.check_folder("--frames-dir", args.frames_dir)
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
        raise SampleError(f"the sampled video is not finite (NaN/inf): the checkpoint {path} holds NaN/inf weights, "
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
        raise SampleError(f"cannot write {e.filename or out}: {e.strerror or e}; free some space or pick another "
                          f"--out / --frames-dir") from None
    except av.FFmpegError as e:
        raise SampleError(f"cannot encode {out} at {W}x{H}, {fps:g} fps ({type(e).__name__}); use the default "
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
        text = load_svd.oom_text(e)
        if text is None:
            raise
        print(f"error: out of memory ({text}); try --decode-chunk 2, a lower --height/--width, "
              f"fewer --frames or --dtype fp16", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
