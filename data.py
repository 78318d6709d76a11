"""
Data for sampling, training and evaluation: images and videos in and out (PyAV; resizing with torch), the datasets
(the toy's synthetic videos, folders of real videos, the latent cache), the per-sample seeded batch order of
train.py, and the encoding of videos with the frozen VAE and CLIP. Pixels are float in [0, 1] at the file boundary,
in [-1, 1] inside the datasets.
"""
import json
import os
import re
import warnings
from fractions import Fraction

import av
import av.filter
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cli import UserError, atomic_write, atomic_write_all, check_folder, write_json
from distributed import barrier

# -----------------------------------------------------------------------------
# images and videos in and out (frames in [0, 1])

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")     # videos read from folders (train.py, evaluate.py)
IMAGE_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP"}     # first bytes -> format


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
        raise UserError(f"image not found: {path}; check the path")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not an image; pass an image file (PNG, JPEG, WebP)")
    try:
        kind = _image_kind(path)
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror}; check the file permissions") from None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise av.error.InvalidDataError(0, "no image stream")
            frame = next(container.decode(video=0))
    except (av.FFmpegError, StopIteration, ValueError):
        if kind is not None:
            raise UserError(f"{path} is a damaged or truncated {kind} file (it cannot be decoded); export or "
                              f"download it again") from None
        raise UserError(f"{path} is not an image av can decode; use a PNG, JPEG or WebP file") from None
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
    the keyframe before `start` is exact. Raises UserError if the file is unreadable or too short."""
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
        raise UserError(f"cannot decode video {path} ({type(e).__name__}); check or replace the file") from None
    if len(out) < len(want):
        raise UserError(f"video {path} is too short: {len(out)} of {len(want)} frames decoded; use a longer clip")
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0


def resize_center_crop(x, height, width, mode="bicubic"):
    """(..., C, h, w) -> (..., C, height, width): scale to cover (antialiased `mode` interpolation), centre-crop.
    Used for sample.py's input image (bicubic) and for training clips (bilinear, VideoFolder)."""
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):
        flat = x.reshape(-1, *x.shape[-3:]).float()                   # (N, C, h, w)
        x = F.interpolate(flat, size=(nh, nw), mode=mode, antialias=True, align_corners=False).reshape(*x.shape[:-2], nh, nw)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[..., top:top + height, left:left + width]


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


FRAME_NAME = re.compile(r"^frame_(\d{4,})\.png$")                 # write_frames_dir's files: frame_0000.png ...


def frame_path(folder, i):
    return os.path.join(folder, f"frame_{i:04d}.png")


def frame_files(folder):
    """The frame files of write_frames_dir in `folder` (frame_NNNN.png; every other file is ignored) -> {index: path}."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return {int(m.group(1)): os.path.join(folder, n) for n, m in zip(names, map(FRAME_NAME.match, names)) if m}


def frame_writes(frames, folder):
    """(T, 3, H, W) in [0, 1] -> [(folder/frame_0000.png, write_fn(tmp)), ...] for cli.atomic_write_all."""
    return [(frame_path(folder, i), lambda tmp, a=a: write_png(a, tmp)) for i, a in enumerate(to_uint8(frames))]


def write_frames_dir(frames, folder):
    """(T, 3, H, W) in [0, 1] -> folder/frame_0000.png ... (created if needed), all of them or none (atomic).
    Returns the file paths."""
    os.makedirs(folder, exist_ok=True)
    return atomic_write_all(frame_writes(frames, folder))

def video_writes(video, out, fps, gif=False, frames_dir=None):
    """[(path, write_fn(tmp))] of sample.py's outputs for cli.atomic_write_all (all written, or none): the mp4 (or
    the GIF when `out` ends in .gif), with `gif` a GIF beside it, with `frames_dir` its frames as PNG."""
    if out.lower().endswith(".gif"):
        writes = [(out, lambda tmp: write_gif(video, tmp, fps))]
    else:
        writes = [(out, lambda tmp: write_video(video, tmp, fps))]
        if gif:
            writes.append((os.path.splitext(out)[0] + ".gif", lambda tmp: write_gif(video, tmp, fps)))
    return writes + (frame_writes(video, frames_dir) if frames_dir else [])


def check_frames_dir(folder, image):
    """--frames-dir: writable (tried now), and not the folder of the input image's own frame_NNNN.png."""
    check_folder("--frames-dir", folder, writable=True)
    if any(os.path.samefile(p, image) for p in frame_files(folder).values()):
        raise UserError(f"the input image {image} is a frame file (frame_NNNN.png) in --frames-dir {folder}, where "
                        f"the video's frames are written; pass another --frames-dir")


def check_stale_frames(folder, num_frames):
    """Frames of an earlier, longer video that a num_frames video would not replace: refused (never deleted)."""
    stale = sorted(i for i in frame_files(folder) if i >= num_frames)
    if stale:
        raise UserError(f"--frames-dir {folder} holds {len(stale)} frames of an earlier, longer video "
                        f"(frame_{stale[0]:04d}.png .. frame_{stale[-1]:04d}.png) that this {num_frames}-frame video "
                        f"would not replace; empty the folder or pass another --frames-dir")

# -----------------------------------------------------------------------------
# datasets: every item is get(index, seed) -> dict; randomness only from `seed`


def sample_seed(*keys):
    """A 63-bit seed from a tuple of ints (stable across processes and runs)."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class SyntheticVideos:
    """Toy videos, video i a pure function of (seed, i); video(i) -> (T, 3, size, size) float in [-1, 1]. The first
    frame does not determine the motion (random velocities), so image-to-video is ambiguous, like real data.
    style textured: 1-3 coloured discs/squares with random velocities over a smooth random textured background;
    simple: one disc or square of a colour that stands out, moving in a uniformly random direction at a random speed
    (uniform in speed x size pixels per frame) over a flat background; static: simple without motion (every frame equals the
    first: the sanity test of a conditioning path). Shapes bounce off the borders."""

    def __init__(self, n=100000, frames=8, size=64, seed=0, max_shapes=3, style="textured", speed=(0.04, 0.08)):
        self.n, self.frames, self.size, self.seed, self.max_shapes = n, frames, size, seed, max_shapes
        self.style, self.speed = style, speed

    def __len__(self):
        return self.n

    def scene(self, rng):
        """-> background (3, S, S), shapes [(kind 0 disc | 1 square, radius, position (2,), velocity (2,), colour)]."""
        S = self.size
        if self.style == "textured":
            tex = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 5, 5))).float()
            bg = torch.from_numpy(rng.uniform(-0.6, 0.6, (3, 1, 1))).float() + 0.35 * F.interpolate(tex, (S, S), mode="bicubic", align_corners=True)[0]
            shapes = []
            for _ in range(rng.integers(1, self.max_shapes + 1)):
                r = rng.uniform(0.08, 0.18) * S
                pos = rng.uniform(r, S - r, 2)
                vel = rng.uniform(-0.06, 0.06, 2) * S                     # pixels per frame
                col = torch.from_numpy(rng.uniform(-1, 1, (3, 1, 1))).float()
                shapes.append((rng.integers(2), r, pos, vel, col))
            return bg, shapes
        bg_col = rng.uniform(-0.7, 0.7, 3)
        col = rng.uniform(-1, 1, 3)
        while np.abs(col - bg_col).max() < 0.8:                           # visible against the background
            col = rng.uniform(-1, 1, 3)
        r = rng.uniform(0.16, 0.24) * S
        pos = rng.uniform(r, S - r, 2)
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(*self.speed) * S * (self.style != "static")        # static: the same scene, unmoving
        vel = speed * np.array([np.cos(angle), np.sin(angle)])
        bg = torch.from_numpy(bg_col).float().view(3, 1, 1).expand(3, S, S)
        return bg, [(rng.integers(2), r, pos, vel, torch.from_numpy(col).float().view(3, 1, 1))]

    def video(self, i):
        S, T = self.size, self.frames
        bg, shapes = self.scene(np.random.default_rng([self.seed, i]))
        yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
        frames = []
        for _ in range(T):
            img = bg.clone()
            for kind, r, pos, vel, col in shapes:
                dx, dy = xx - pos[0], yy - pos[1]
                d = (dx.square() + dy.square()).sqrt() if kind == 0 else torch.maximum(dx.abs(), dy.abs())
                a = (r - d + 0.5).clamp(0, 1)                               # 1-pixel anti-aliased edge
                img = img * (1 - a) + col * a
            frames.append(img)
            for kind, r, pos, vel, col in shapes:                          # move, bounce off the borders
                pos += vel
                for ax in range(2):
                    if pos[ax] < r or pos[ax] > S - r:
                        vel[ax] = -vel[ax]
                        pos[ax] = np.clip(2 * np.clip(pos[ax], r, S - r) - pos[ax], r, S - r)
        return torch.stack(frames).clamp(-1, 1)

    def __getitem__(self, i):
        return self.video(i)

    def get(self, i, seed):
        return {"video": self.video(i), "skipped": []}


def video_paths(root):
    """Every video file (VIDEO_EXTS) under root, sorted; UserError if root is not a folder or holds none."""
    if not os.path.exists(root):
        raise UserError(f"--data {root} does not exist; pass a folder of videos or --data synthetic")
    if not os.path.isdir(root):
        raise UserError(f"--data {root} is a file, not a folder; pass the folder that holds the videos")
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(VIDEO_EXTS))
    if not paths:
        raise UserError(f"no videos in {root} (searched recursively for {', '.join(VIDEO_EXTS)}); add videos or "
                        f"pass another --data")
    return paths


def unusable_videos(root, skipped, frames, fps):
    """The UserError for a folder whose every video was skipped: [(path, reason)] counted as corrupt / too short."""
    short = sum(r.startswith("too short") for _, r in skipped)
    parts = [f"{len(skipped) - short} corrupt"] * (short < len(skipped)) + \
            [f"{short} too short for {frames} frames at {fps} fps"] * (short > 0)
    return UserError(f"no usable videos in {root}: {', '.join(parts)}; add readable videos" +
                     (", or lower --frames (or raise --fps: a smaller frame stride)" if short else ""))


def file_stamp(path):
    """[size, mtime in ns] of a file: a probe index entry holds for the version of the file it was made from."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def probe_videos(root, index, rank=0, world=1):
    """The probe index {path: {n, fps, stamp} | {error, stamp}} of every video under root: entries missing from
    `index` or made from another version of the file (file_stamp) are probed, sharded over ranks and gathered, so no
    rank waits on a single prober. -> the merged index (same on all ranks)."""
    todo = [p for p in video_paths(root) if (index.get(p) or {}).get("stamp") != file_stamp(p)][rank::world]
    parts = [{p: VideoFolder.probe(p) for p in todo}]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, {p: VideoFolder.probe(p) for p in todo})
    return {k: v for part in [index, *parts] for k, v in part.items()}


class VideoFolder:
    """Videos under `root` read with PyAV: random clips of `frames` frames at `fps` (stride = round(src_fps / fps)),
    resized/centre-cropped. Corrupt or too-short files are skipped with a warning and recorded in self.skipped, at
    scan time (cannot open / too few frames) and at read time (decoding fails: the next video is used instead and
    the failure is reported in the item's "skipped" list as (path, reason), for the caller to record in the index).
    self.index holds what the probe found ("too short" depends on --frames and --fps, so it is not stored)."""

    def __init__(self, root, frames, fps, height, width, index=None):
        self.root, self.frames, self.fps, self.height, self.width = root, frames, fps, height, width
        self.items, self.skipped, self.index = [], [], dict(index or {})
        for path in video_paths(root):
            info = self.index[path] = self.index.get(path) or self.probe(path)
            reason = info.get("error") or (None if info["n"] >= self.span(info["fps"]) else
                                           f"too short ({info['n']} frames < {self.span(info['fps'])})")
            if reason:
                warnings.warn(f"skipping video {path}: {reason}")
                self.skipped.append((path, reason))
            else:
                self.items.append((path, info["n"], info["fps"]))
        if not self.items:
            raise unusable_videos(root, self.skipped, frames, fps)

    def __len__(self):
        return len(self.items)

    def stride(self, src_fps):
        return max(1, round(src_fps / self.fps))

    def span(self, src_fps):
        return (self.frames - 1) * self.stride(src_fps) + 1

    @staticmethod
    def probe(path):
        """-> {n, fps, stamp} or {error, stamp} (file_stamp: the version of the file probed)."""
        stamp = {"stamp": file_stamp(path)} if os.path.exists(path) else {}
        try:
            with av.open(path) as c:
                s = c.streams.video[0]
                fps = float(s.average_rate or s.guessed_rate or 0)
                n = s.frames or int(float(c.duration or 0) / 1e6 * fps)
                if fps <= 0:
                    return {"error": "unknown frame rate", **stamp}
                return {"n": n, "fps": fps, **stamp}
        except Exception as e:                                             # any open/parse failure = corrupt
            return {"error": f"cannot open ({type(e).__name__}: {str(e)[:80]})", **stamp}

    def read(self, path, start, stride, src_fps):
        """Decode frames start, start+stride, ... (frame index from the pts) -> (T, 3, H, W) in [-1, 1]."""
        x = read_video(path, self.frames, start, stride, src_fps) * 2 - 1
        return resize_center_crop(x, self.height, self.width, mode="bilinear")

    def get(self, i, seed):
        skipped = []
        g = np.random.default_rng(seed)
        for j in range(len(self.items)):
            path, n, src_fps = self.items[(i + j) % len(self.items)]
            stride = self.stride(src_fps)
            start = int(g.integers(0, max(1, n - self.span(src_fps) + 1)))
            for s0 in dict.fromkeys([start, 0]):                           # frame counts can be estimates
                try:
                    return {"video": self.read(path, s0, stride, src_fps), "skipped": skipped}
                except Exception as e:
                    err = e
            warnings.warn(f"skipping video {path}: {type(err).__name__}: {err}")
            skipped.append((path, str(err).split(";")[0][:160]))
        raise UserError(f"no readable video left in {self.root}: all {len(self.items)} failed to decode, e.g. "
                        f"{skipped[0][0]}; check or replace the videos in --data")


class LatentCache:
    """Pre-encoded items in `root`: <i>.safetensors with latents (T,4,h,w), cond (4,h,w), image_embeds (D,), each
    with the settings it was built for in its metadata; index.json, written last: {n, skipped, built_for}."""

    def __init__(self, root):
        self.root = root
        try:
            with open(os.path.join(root, "index.json")) as f:
                meta = json.load(f)
            self.n, self.skipped = int(meta["n"]), [tuple(s) for s in meta["skipped"]]
            self.built_for = meta.get("built_for")                # None: built by an older train.py
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"cannot read the latent cache {os.path.join(root, 'index.json')} ({type(e).__name__}); "
                            f"delete the --cache folder to rebuild it") from None

    def __len__(self):
        return self.n

    def path(self, i):
        return os.path.join(self.root, f"{i:08d}.safetensors")

    def missing(self):
        """Indices whose entry file is absent (deleted after a damage report: encoded again by build_cache)."""
        names = set(os.listdir(self.root))
        return [i for i in range(self.n) if os.path.basename(self.path(i)) not in names]

    def get(self, i, seed):
        try:
            return {**load_file(self.path(i)), "skipped": []}
        except (SafetensorError, OSError) as e:
            raise UserError(f"damaged latent cache entry {self.path(i)} ({type(e).__name__}); delete that file and run "
                            f"again (a missing entry is encoded again)") from None


def cache_built_for(root):
    """The settings a latent cache, complete or partly built, was built for ({flag: value}): index.json's, else the
    metadata of its first readable entry; None if nothing records them (an empty folder, an older cache)."""
    try:
        with open(os.path.join(root, "index.json")) as f:
            return json.load(f).get("built_for")
    except (OSError, ValueError, AttributeError):
        pass
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.endswith(".safetensors") and not name.startswith("."):
            try:
                with safe_open(os.path.join(root, name), framework="pt") as f:
                    return json.loads((f.metadata() or {})["built_for"])
            except Exception:                                               # damaged or older: try the next one
                continue
    return None


def check_cache(root, want):
    """UserError if the latent cache in `root` was built for other settings than `want` ({flag: value})."""
    have = cache_built_for(root) or {}
    diff = [k for k in want if k in have and have[k] != want[k]]
    if diff:
        flags = lambda d: " ".join(f"--{k.replace('_', '-')} {d[k]}" for k in diff)
        raise UserError(f"--cache {root} was built for {flags(have)}, not {flags(want)}; pass another --cache folder "
                        f"(it is built on first use), or the settings it was built for")

# -----------------------------------------------------------------------------
# batches: train.py's seeded order of (index, clip seed, slot) items over steps, ranks and micro-batches


class ItemDataset(torch.utils.data.Dataset):
    """Map-style wrapper: item = (index, clip seed, global slot k) -> source.get(index, seed) plus k."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        i, seed, k = item
        return {**self.source.get(i, seed), "key": k}


def collate(items):
    out = {k: torch.stack([it[k] for it in items]) for k in items[0] if k not in ("skipped", "key")}
    out["keys"] = [it["key"] for it in items]
    out["skipped"] = [p for it in items for p in it["skipped"]]
    return out


class StepBatches:
    """Batch sampler: for steps start..max_steps-1, the micro-batches of this rank. Global slot k of step s maps
    to dataset position g = s * global_batch + k of a per-epoch permutation seeded by (seed, epoch). Rank r's
    micro-batch m holds slots (m * world + r) * b ... + b - 1. The clip seed is a function of (seed, s, k)."""

    def __init__(self, n, seed, batch, accum, world, rank, start, max_steps):
        self.n, self.seed, self.b, self.accum, self.world, self.rank = n, seed, batch, accum, world, rank
        self.start, self.max_steps, self._perm = start, max_steps, {}

    def index(self, g):
        e = g // self.n
        if e not in self._perm:
            self._perm = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(sample_seed(self.seed, e, 1)))}
        return int(self._perm[e][g % self.n])

    def __len__(self):
        return (self.max_steps - self.start) * self.accum

    def __iter__(self):
        G = self.b * self.accum * self.world
        for s in range(self.start, self.max_steps):
            for m in range(self.accum):
                ks = [(m * self.world + self.rank) * self.b + j for j in range(self.b)]
                yield [(self.index(s * G + k), sample_seed(self.seed, s, k, 2), k) for k in ks]

# -----------------------------------------------------------------------------
# encoding with the frozen networks: VAE latents and SVD's conditioning (per batch, or once into the latent cache)


def move_frozen(svd, device, dtype):
    """The frozen networks (VAE, conditioning encoder, CLIP) to device/dtype, without gradients, in eval mode."""
    for m in (svd.vae, svd.cond_encoder, svd.clip):
        m.to(device=device, dtype=dtype).requires_grad_(False).eval()


@torch.no_grad()
def encode_videos(svd, video, args, keys, seed_keys, device):
    """video (B, T, 3, H, W) in [-1, 1] -> latents (B,T,4,h,w) (posterior mean * scale), and SVD.condition of the
    first frame: cond (B,4,h,w) of the noise-augmented frame, image_embeds (B, D) of the clean frame."""
    B, T = video.shape[:2]
    dt = svd.clip.conv1.weight.dtype
    video = video.to(device)
    gens = [torch.Generator().manual_seed(sample_seed(*seed_keys, k, 4)) for k in keys]
    cond = svd.condition(video[:, 0], gens, cond_aug=args.cond_aug)
    lat = torch.cat([svd.vae.encode(c.to(dt))[0] for c in video.flatten(0, 1).split(16)])
    return {"latents": (lat.float() * svd.cfg.vae.scale_factor).reshape(B, T, *lat.shape[1:]),
            "cond": cond["cond_latent"].float(), "image_embeds": cond["image_embeds"].float()}


def build_cache(source, svd, args, root, rank, world, device, built_for):
    """Encode every item of `source` once (clip seed and cond-aug noise fixed per item) into root/<i>.safetensors,
    each entry recording `built_for` (the settings it depends on; check_cache compares them). Resumable: existing
    files are kept. Items are sharded over ranks; rank 0 writes index.json last. -> the videos that failed to decode
    while encoding [(path, reason)] (all ranks')."""
    os.makedirs(root, exist_ok=True)
    todo = [i for i in range(rank, len(source), world) if not os.path.exists(os.path.join(root, f"{i:08d}.safetensors"))]
    meta, failed = {"built_for": json.dumps(built_for)}, []
    for i in tqdm(todo, desc="caching latents", disable=rank != 0):
        item = source.get(i, sample_seed(args.seed, i, 5))
        failed += [s for s in item["skipped"] if s not in failed]
        enc = encode_videos(svd, item["video"][None], args, [i], (args.seed, -1), device)
        tensors = {k: v[0].cpu().contiguous() for k, v in enc.items()}
        atomic_write(os.path.join(root, f"{i:08d}.safetensors"), lambda tmp: save_file(tensors, tmp, metadata=meta))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, failed)
        failed = list(dict.fromkeys(tuple(s) for part in parts for s in part))
    if rank == 0:
        skipped = [tuple(s) for s in getattr(source, "skipped", [])] + failed
        write_json(os.path.join(root, "index.json"), {"n": len(source), "skipped": skipped, "built_for": built_for})
    barrier(world)
    return failed
