"""
Image-to-video with SVD (many steps + CFG) or SF-V (one step): `python sample.py img.png` -> img.mp4.

    python sample.py img.png                          # weights from --ckpt / $SFV_CKPT / checkpoints/ / the toy model
    python sample.py img.png --ckpt checkpoints/svd_xt.safetensors --steps 30 --frames 25
    python sample.py img.png --ckpt sfv.safetensors --steps 1 --gif --frames-dir frames/
    python sample.py --download svd_xt               # explicit; nothing is ever downloaded implicitly

Conditioning is SVD's (sgm, notes sec. 5): CLIP embedding of the clean image, conditioning latent of the image plus
cond_aug * noise, vector conditioning (fps_id, motion_bucket_id, cond_aug). steps=1 is SF-V: pure noise at sigma_max,
one denoiser evaluation, no CFG. steps>1 is sgm's Euler EDM sampler on the Karras schedule with per-frame linear CFG.
Runtime deps: torch, numpy, safetensors, tqdm, av.
"""
import argparse
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from fractions import Fraction

import av
import av.filter
import numpy as np
import torch
import torch.nn.functional as F

import load_svd
from load_svd import LoadError
from model import CONFIGS

HERE = os.path.dirname(os.path.abspath(__file__))
CKPT_ENV = "SFV_CKPT"                                   # env var naming a checkpoint
CKPT_DIRS = ["checkpoints", os.path.join(HERE, "checkpoints")]   # searched in order (cwd first)
TOY_CKPT = os.path.join(HERE, "assets", "toy_sfv.safetensors")   # the bundled toy model (fallback)
OFFICIAL = {  # --download name -> (Hugging Face repo, file)
    "svd": ("stabilityai/stable-video-diffusion-img2vid", "svd.safetensors"),
    "svd_xt": ("stabilityai/stable-video-diffusion-img2vid-xt", "svd_xt.safetensors"),
    "svd_xt_1_1": ("stabilityai/stable-video-diffusion-img2vid-xt-1-1", "svd_xt_1_1.safetensors"),
}
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
MIN_SIDE = 64          # smallest accepted input image side (pixels)
MAX_FRAMES = 128
SAMPLING_KEYS = ("num_frames", "steps", "min_cfg", "max_cfg", "fps_id", "motion_bucket_id", "cond_aug", "height", "width")


class SampleError(Exception):
    """A user-facing failure; the message is one line naming the problem and the fix."""

# -----------------------------------------------------------------------------
# image in


def read_image(path):
    """Decode one image with av -> (3, H, W) float32 in [0, 1]. Any pixel format (RGB, gray, palette, 8/16 bit) is
    converted to RGB at its own bit depth; alpha (incl. transparent palette entries) is composited over white (transparent areas do not turn black).
    For animations / videos the first frame is used. EXIF orientation is not applied."""
    if not os.path.exists(path):
        raise SampleError(f"image not found: {path}; check the path")
    if os.path.isdir(path):
        raise SampleError(f"{path} is a folder, not an image; pass an image file (PNG, JPEG, WebP)")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise SampleError(f"cannot read image {path}: {e.strerror}; check the file permissions") from None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise av.error.InvalidDataError(0, "no image stream")
            frame = next(container.decode(video=0))
    except (av.FFmpegError, StopIteration, ValueError):
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

# -----------------------------------------------------------------------------
# sampling (sgm EDMDiscretization, EulerEDMSampler with s_churn=0, LinearPredictionGuider)


def karras_sigmas(n, sigma_min=0.002, sigma_max=700.0, rho=7.0):
    """Karras schedule of n noise levels from sigma_max down to sigma_min, then 0 appended -> (n+1,) float32.
    n=1 gives [sigma_max, 0]: the SF-V single step."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def cfg_scales(min_cfg, max_cfg, num_frames):
    """Per-frame guidance scale, linear from frame 0 to the last frame -> (T,)."""
    return torch.linspace(min_cfg, max_cfg, num_frames)


def cfg_combine(x_u, x_c, scales):
    """x_u + s_t (x_c - x_u) per frame t. x_u, x_c (B, T, C, h, w); scales (T,)."""
    return x_u + scales.to(x_u).view(1, -1, 1, 1, 1) * (x_c - x_u)


def euler_sample(denoise_fn, x, sigmas):
    """EDM Euler: d = (x - D(x, s)) / s; x += d (s_next - s). x (B, T, C, h, w) already scaled to sigmas[0];
    denoise_fn(x, sigma) -> x0_hat. The last step (to sigma 0) is exactly D(x, s_last), returned as is."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x0 = denoise_fn(x, s)
        if s_next == 0:       # x + (x - x0) / s * (0 - s) = x0, without float cancellation at s = 700
            return x0
        x = x + (x - x0) / s * (s_next - s)
    return x


def make_denoiser(unet, cond_latent, image_embeds, added_time_ids, scales=None, counter=None):
    """D(x, sigma) -> x0_hat (float32) for x (1, T, 4, h, w) float32. With `scales` (T,), classifier-free guidance:
    uncond (zero CLIP embedding and zero cond latent, same vector conditioning) and cond run as one batch of 2,
    combined per frame on x0 (sgm LinearPredictionGuider). counter (a list) accumulates UNet evaluations."""
    from model import denoise
    dtype = next(unet.parameters()).dtype
    if scales is not None:
        cond_latent = torch.cat([torch.zeros_like(cond_latent), cond_latent])
        image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
        added_time_ids = added_time_ids.repeat(2, 1)

    def fn(x, sigma):
        xb = x.to(dtype) if scales is None else x.to(dtype).repeat(2, 1, 1, 1, 1)
        sig = torch.full((xb.shape[0],), float(sigma), device=x.device)
        out = denoise(unet, xb, sig, cond_latent, image_embeds, added_time_ids).float()
        if counter is not None:
            counter.append(xb.shape[0])
        if scales is None:
            return out
        x_u, x_c = out.chunk(2)
        return cfg_combine(x_u, x_c, scales)
    return fn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def sample_video(svd, image, num_frames=None, steps=None, min_cfg=None, max_cfg=None, fps_id=None,
                 motion_bucket_id=None, cond_aug=None, seed=23, decode_chunk=14, offload=False):
    """image (3, H, W) in [0, 1], H and W multiples of 64 -> (video (T, 3, H, W) float32 in [0, 1] on CPU, stats).
    Missing sampling arguments come from svd.cfg. stats: seconds per stage ("encode", "denoise", "decode") and
    "unet_evals" (network evaluations; a CFG step counts 2). All noise is drawn on CPU from one seeded generator,
    so a seed gives the same video on every device."""
    c = svd.cfg
    T = c.num_frames if num_frames is None else num_frames
    steps = c.steps if steps is None else steps
    min_cfg = c.min_cfg if min_cfg is None else min_cfg
    max_cfg = c.max_cfg if max_cfg is None else max_cfg
    fps_id = c.fps_id if fps_id is None else fps_id
    motion_bucket_id = c.motion_bucket_id if motion_bucket_id is None else motion_bucket_id
    cond_aug = c.cond_aug if cond_aug is None else cond_aug
    p = next(svd.unet.parameters())
    device, dtype = p.device, p.dtype
    gen = torch.Generator().manual_seed(seed)
    stats = {}

    # 1. conditioning: CLIP of the clean image, cond latent of the noise-augmented image, vector conditioning
    t0 = time.perf_counter()
    img = image[None].float() * 2 - 1                                              # (1, 3, H, W) in [-1, 1]
    H, W = img.shape[-2:]
    aug = torch.randn(img.shape, generator=gen)
    image_embeds = svd.encode_image(img).to(device, dtype)                         # (1, D)
    cond_latent = svd.encode_cond(img + cond_aug * aug).to(device, dtype)           # (1, 4, H/8, W/8)
    added_time_ids = torch.tensor([[fps_id, motion_bucket_id, cond_aug]], dtype=torch.float32, device=device)
    if offload and device.type != "cpu":   # the encoders are done: free their memory for the UNet and the decoder
        for m in (svd.clip, svd.cond_encoder, getattr(svd.vae, "encoder", svd.clip)):   # (toy: no VAE weights)
            m.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _sync(device)
    stats["encode"] = time.perf_counter() - t0

    # 2. denoise: x_T = randn * sqrt(1 + sigma_max^2); Euler over the Karras schedule (steps=1: one D evaluation)
    t0 = time.perf_counter()
    sigmas = karras_sigmas(steps)
    noise = torch.randn((1, *svd.latent_shape(T, H, W)), generator=gen)           # (1, T, 4, H/8, W/8)
    x = (noise * (1.0 + sigmas[0] ** 2).sqrt()).to(device)
    scales = None
    if steps > 1 and not (min_cfg == 1.0 and max_cfg == 1.0):   # scale 1 everywhere is the cond branch alone
        scales = cfg_scales(min_cfg, max_cfg, T).to(device)
    counter = []
    x = euler_sample(make_denoiser(svd.unet, cond_latent, image_embeds, added_time_ids, scales, counter), x, sigmas)
    _sync(device)
    stats["denoise"], stats["unet_evals"] = time.perf_counter() - t0, sum(counter)

    # 3. decode in chunks of frames
    t0 = time.perf_counter()
    video = svd.vae.decode(x.to(dtype), chunk=decode_chunk)[0]                    # (T, 3, H, W) in [-1, 1]
    video = ((video.float() + 1) / 2).clamp(0, 1).cpu()
    stats["decode"] = time.perf_counter() - t0
    return video, stats

# -----------------------------------------------------------------------------
# video out (atomic: a temp file in the same folder, then os.replace)


def to_uint8(frames):
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8 numpy."""
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).contiguous().numpy()


def _atomic(path, write):
    """write(tmp_path) then move into place; the temp file is removed on any failure (never a half-written file)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
    return _atomic(path, write)


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
    return _atomic(path, write)


def write_png(rgb, path):
    """rgb (H, W, 3) uint8 numpy -> PNG via av's png encoder, atomically. Returns path."""
    cc = av.CodecContext.create("png", "w")
    cc.width, cc.height, cc.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    data = b"".join(bytes(p) for p in cc.encode(frame) + cc.encode())

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return _atomic(path, write)


def write_frames_dir(frames, folder):
    """(T, 3, H, W) in [0, 1] -> folder/frame_0000.png ... (created if needed). Returns the file paths."""
    os.makedirs(folder, exist_ok=True)
    return [write_png(a, os.path.join(folder, f"frame_{i:04d}.png")) for i, a in enumerate(to_uint8(frames))]

# -----------------------------------------------------------------------------
# weights: resolution and explicit download


def _is_bundle(path):
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == load_svd.BUNDLE_FORMAT
    except Exception:
        return False


def _candidates(folder):
    """Usable checkpoints in a folder, best first: SF-V bundles, then svd_xt_1_1, svd_xt, svd, then others."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if os.path.isdir(p) and os.path.isdir(os.path.join(p, "unet")):
            out.append((3, p))
        elif os.path.isfile(p) and name.endswith((".safetensors", ".ckpt", ".pt", ".pth")) and ".tmp-" not in name:
            stem = name.rsplit(".", 1)[0]
            rank = 0 if name.endswith(".safetensors") and _is_bundle(p) else {"svd_xt_1_1": 1, "svd_xt": 2, "svd": 2.5}.get(stem, 3)
            out.append((rank, p))
    return [p for _, p in sorted(out, key=lambda r: r[0])]


def find_checkpoint(ckpt=None, env=None, dirs=None, toy=None):
    """--ckpt > $SFV_CKPT > first usable entry of checkpoints/ > the bundled toy model. -> (path, is_toy)."""
    env = os.environ if env is None else env
    if ckpt:
        return ckpt, False
    if env.get(CKPT_ENV):
        if not os.path.exists(env[CKPT_ENV]):
            raise SampleError(f"${CKPT_ENV} points to a missing checkpoint: {env[CKPT_ENV]}; fix or unset it")
        return env[CKPT_ENV], False
    for d in CKPT_DIRS if dirs is None else dirs:
        found = _candidates(d)
        if found:
            return found[0], False
    toy = TOY_CKPT if toy is None else toy
    if os.path.isfile(toy):
        return toy, True
    raise SampleError(f"no weights found (--ckpt, ${CKPT_ENV}, checkpoints/) and the toy model {toy} is missing; "
                      f"pass --ckpt PATH or run: python sample.py --download svd_xt")


def _sha256_etag(headers):
    for k in ("X-Linked-Etag", "ETag"):
        m = re.fullmatch(r'(?:W/)?"?([0-9a-fA-F]{64})"?', (headers.get(k) or "").strip())
        if m:
            return m.group(1).lower()
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _http_error(e, url):
    if e.code in (401, 403):
        return SampleError(f"access denied (HTTP {e.code}) for {url}: the SVD weights are gated: accept the licence on "
                           f"the model page and set HF_TOKEN=<your token>")
    return SampleError(f"download failed (HTTP {e.code} {e.reason}) for {url}; check the name or try again later")


def download(url, dest, token=None, chunk_size=1 << 20, progress=True):
    """Fetch url to dest: resumes dest + '.part' with an HTTP Range request, tqdm bar, checks the size against
    Content-Length / X-Linked-Size and the sha256 against an ETag / X-Linked-Etag that is one. Returns dest.
    The token (Bearer) goes to the first host only, never to the redirect target."""
    from tqdm import tqdm

    def request(method, extra=None):
        r = urllib.request.Request(url, method=method, headers={"User-Agent": "sfv-sample", **(extra or {})})
        if token:
            r.add_unredirected_header("Authorization", f"Bearer {token}")
        return r

    try:   # metadata from the first hop (the Hub answers a HEAD with a redirect carrying X-Linked-Size/-Etag)
        head = urllib.request.build_opener(_NoRedirect).open(request("HEAD"), timeout=60).headers
    except urllib.error.HTTPError as e:
        if not 300 <= e.code < 400:
            raise _http_error(e, url) from None
        head = e.headers
    except (urllib.error.URLError, OSError) as e:
        raise SampleError(f"network error for {url}: {getattr(e, 'reason', e)}; check the connection or download the "
                          f"file yourself into checkpoints/") from None
    total = head.get("X-Linked-Size") or (head.get("Content-Length") if head.get("Location") is None else None)
    total = int(total) if total else None
    sha = _sha256_etag(head)

    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    start = os.path.getsize(part) if os.path.exists(part) else 0
    if total is not None and start > total:
        os.remove(part)
        start = 0
    if total is None or start < total:
        extra = {"Range": f"bytes={start}-"} if start else {}
        try:
            resp = urllib.request.urlopen(request("GET", extra), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code != 416:
                raise _http_error(e, url) from None
            os.remove(part)                         # our partial file does not fit the remote one: start over
            return download(url, dest, token, chunk_size, progress)
        except (urllib.error.URLError, OSError) as e:
            raise SampleError(f"network error for {url}: {getattr(e, 'reason', e)}; run the same command to resume") from None
        if resp.status != 206:                      # the server ignored the range: start from zero
            start = 0
        if total is None and resp.headers.get("Content-Length"):
            total = start + int(resp.headers["Content-Length"])
        with resp, open(part, "ab" if start else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=os.path.basename(dest), disable=not progress) as bar:
            try:
                while True:
                    buf = resp.read(chunk_size)
                    if not buf:
                        break
                    f.write(buf)
                    bar.update(len(buf))
            except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                raise SampleError(f"download interrupted ({type(e).__name__}: {e}); run the same command again to resume") from None
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise SampleError(f"download incomplete: {size} of {total} bytes in {part}; run the same command again to resume")
    if sha is not None:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for buf in iter(lambda: f.read(1 << 24), b""):
                h.update(buf)
        if h.hexdigest() != sha:
            os.remove(part)
            raise SampleError(f"sha256 mismatch for {dest} (expected {sha}, got {h.hexdigest()}); the corrupt file was "
                              f"removed: run the same command again")
    os.replace(part, dest)
    return dest


def download_official(name, folder=None, progress=True):
    """--download NAME: the official single file into checkpoints/ (no-op if it is already there)."""
    repo, fname = OFFICIAL[name]
    dest = os.path.join(CKPT_DIRS[0] if folder is None else folder, fname)
    if os.path.isfile(dest):
        print(f"{dest} already downloaded")
        return dest
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    print(f"downloading {repo}/{fname} -> {dest}")
    return download(HF_URL.format(repo=repo, file=fname), dest, token=token, progress=progress)

# -----------------------------------------------------------------------------
# command line


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {name}: CUDA is not available on this machine; use --device cpu (or auto)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise SampleError(f"--device {name}: MPS is not available on this machine; use --device cpu (or auto)")
    return dev


def pick_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def sampling_defaults(svd):
    """The checkpoint's sampling defaults: its config, overridden by bundle metadata keys of the same names."""
    d = {k: getattr(svd.cfg, k) for k in SAMPLING_KEYS}
    meta = getattr(svd, "load_info", {}).get("metadata", {}) or {}
    for k in SAMPLING_KEYS:
        if k in meta:
            try:
                d[k] = type(d[k])(float(meta[k])) if isinstance(d[k], int) else float(meta[k])
            except ValueError:
                pass
    return d


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Image-to-video with SVD / SF-V. Writes an H.264 mp4 next to the image.")
    p.add_argument("image", nargs="?", help="input image (PNG, JPEG, WebP, ...)")
    p.add_argument("--out", help="output .mp4 (default: next to the image, same name)")
    p.add_argument("--gif", action="store_true", help="also write a .gif next to the mp4")
    p.add_argument("--frames-dir", help="also write every frame as PNG into this folder")
    p.add_argument("--ckpt", help=f"official .safetensors, diffusers folder or SF-V bundle (default: ${CKPT_ENV}, "
                                  f"checkpoints/, then the toy model)")
    p.add_argument("--config", choices=sorted(CONFIGS), help="model config for a non-official single file / diffusers "
                                                              "folder (default: recognised from the shapes)")
    p.add_argument("--download", choices=sorted(OFFICIAL), help="download official weights into checkpoints/ "
                                                                 "(uses $HF_TOKEN; resumes)")
    p.add_argument("--steps", type=int, help="1 = SF-V single step; >1 = Euler EDM with CFG (default: checkpoint's)")
    p.add_argument("--frames", type=int, help="number of frames (default: checkpoint's, 14 or 25)")
    p.add_argument("--height", type=int, help="multiple of 64 (default: checkpoint's, 576)")
    p.add_argument("--width", type=int, help="multiple of 64 (default: checkpoint's, 1024)")
    p.add_argument("--min-cfg", type=float, help="guidance at the first frame (default: checkpoint's)")
    p.add_argument("--max-cfg", type=float, help="guidance at the last frame (default: checkpoint's)")
    p.add_argument("--fps-id", type=int, help="fps conditioning (default 6)")
    p.add_argument("--motion-bucket-id", type=int, help="motion conditioning, higher = more motion (default 127)")
    p.add_argument("--cond-aug", type=float, help="noise added to the conditioning image (default 0.02)")
    p.add_argument("--fps", type=float, help="output frame rate (default fps_id + 1)")
    p.add_argument("--seed", type=int, default=23, help="seed of all noise; same seed -> same video (default 23)")
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
    if not os.path.isdir(folder):
        raise SampleError(f"cannot write {path}: folder {folder} does not exist; create it or pass another --out")
    probe = os.path.join(folder, f".sfv-write-test-{os.getpid()}")
    try:
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise SampleError(f"cannot write {path}: {e.strerror}; pass --out to a writable folder") from None


def run(args):
    """The command: returns the output path."""
    if args.download:
        path = download_official(args.download, progress=not args.quiet)
        if args.image is None:
            print(path)
            return path
        args.ckpt = args.ckpt or path
    # cheap checks first: the image, the output path, the numbers
    image = read_image(args.image)
    if min(image.shape[1:]) < MIN_SIDE:
        raise SampleError(f"image too small: {image.shape[2]}x{image.shape[1]} px; use an image with at least "
                          f"{MIN_SIDE} px on each side (ideally >= the output size)")
    out = args.out or os.path.splitext(args.image)[0] + ".mp4"
    _check_out(out)
    for name in ("frames", "steps", "decode_chunk"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SampleError(f"bad --{name.replace('_', '-')} {v}: must be at least 1")
    if args.frames is not None and args.frames > MAX_FRAMES:
        raise SampleError(f"bad --frames {args.frames}: at most {MAX_FRAMES} (SVD is trained on 14/25)")
    if args.fps is not None and args.fps <= 0:
        raise SampleError(f"bad --fps {args.fps}: must be positive")
    if args.frames_dir and os.path.exists(args.frames_dir) and not os.path.isdir(args.frames_dir):
        raise SampleError(f"--frames-dir {args.frames_dir} is a file; pass a folder (it is created if missing)")

    path, is_toy = find_checkpoint(args.ckpt)
    if is_toy:
        print(f"no SF-V/SVD weights found (--ckpt, ${CKPT_ENV}, checkpoints/): using the bundled toy model {path} "
              f"(not realistic; get real weights with --download svd_xt)")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    svd = load_svd.load(path, config=CONFIGS[args.config] if args.config else None, dtype=dtype, device=device)
    if args.compile:
        svd.unet = torch.compile(svd.unet)
    d = sampling_defaults(svd)
    for k, a in (("steps", "steps"), ("num_frames", "frames"), ("min_cfg", "min_cfg"), ("max_cfg", "max_cfg"),
                 ("fps_id", "fps_id"), ("motion_bucket_id", "motion_bucket_id"), ("cond_aug", "cond_aug"),
                 ("height", "height"), ("width", "width")):
        if getattr(args, a) is not None:
            d[k] = getattr(args, a)
    H, W = snap_size(d["height"], d["width"])
    if (H, W) != (d["height"], d["width"]):
        print(f"note: {d['height']}x{d['width']} is not a multiple of 64; using {H}x{W} (height x width)")
    image = resize_center_crop(image, H, W).clamp(0, 1)
    offload = device.type != "cpu" if args.offload is None else args.offload

    video, st = sample_video(svd, image, d["num_frames"], d["steps"], d["min_cfg"], d["max_cfg"], d["fps_id"],
                             d["motion_bucket_id"], d["cond_aug"], args.seed, args.decode_chunk, offload)
    fps = args.fps if args.fps is not None else d["fps_id"] + 1
    extras = []
    try:
        write_video(video, out, fps)
        if args.gif:
            extras.append(write_gif(video, os.path.splitext(out)[0] + ".gif", fps))
        if args.frames_dir:
            write_frames_dir(video, args.frames_dir)
            extras.append(args.frames_dir + os.sep)
    except OSError as e:   # e.g. disk full, --frames-dir is a file
        raise SampleError(f"cannot write {e.filename or out}: {e.strerror or e}; free some space or pick another "
                          f"--out / --frames-dir") from None
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
    except (SampleError, LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:100]}); try --decode-chunk 2, a lower --height/--width, "
              f"fewer --frames or --dtype fp16", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
