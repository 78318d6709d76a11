"""
Evaluation: the Frechet distance (once, float64), FVD with a user-supplied I3D, and the toy metrics that toy.py
reports for the synthetic videos (data.SyntheticVideos).

    python evaluate.py fvd --i3d i3d_torchscript.pt REAL_DIR FAKE_DIR [--frames 16 --size 224]
    python evaluate.py toy-fd REAL_DIR FAKE_DIR          # the toy feature extractor below, on any two video folders

Frechet distance between Gaussians N(mu1, S1), N(mu2, S2) (FID: Heusel et al. 2017; FVD: Unterthiner et al. 2018):
    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)),
with tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i) over the eigenvalues of sqrt(S1) S2 sqrt(S1), a symmetric PSD matrix
with the same spectrum as S1 S2 (no sqrtm of a non-symmetric matrix, no complex round-off).

FVD (the SF-V paper's metric) is that distance between the I3D (Kinetics-400) features of real and generated clips.
We use StyleGAN-V's TorchScript I3D (i3d_torchscript.pt; not on PyPI, pass its path) with its FVD convention:
clips of the first --frames frames, each frame resized (bilinear) so its short side is --size, centre-cropped to
--size x --size, scaled to [-1, 1], fed as (N, 3, T, 224, 224) and called as
i3d(x, rescale=False, resize=False, return_features=True) -> (N, 400) features before the softmax.

Toy features (video_features): 64 hand-made, deterministic spatiotemporal statistics of a 64x64 clip, half on
appearance, half on motion, so the distance sees both blur/colour errors and frozen or jittery motion. No weights,
no training: a fixed, documented extractor that behaves the same on every machine. Runtime deps: torch, numpy, av.

Toy measures (toy_measures): what the toy's pictures show, per clip, in pixels and colour units: the shape is found by
its colour (background and shape colour from the conditioning frame), tracked by its centroid (speed, displacement at
frame 1), and checked for staying one solid blob (solidity), for colours that are neither the background nor the
shape (off-colour) and for noise on the flat background; means over clips with bootstrap standard errors.
"""
import argparse
import os
import sys
import warnings

import av
import numpy as np
import torch
import torch.nn.functional as F

from cli import UserError, oom_text, pick_device
from data import VIDEO_EXTS, read_video

# -----------------------------------------------------------------------------
# Frechet distance


def stats(features):
    """features (N, d) -> (mu (d,), S (d, d)) in float64; S is the unbiased sample covariance (np.cov, as FID/FVD)."""
    f = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, d) features, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"features not finite (NaN or inf) in {(~np.isfinite(f)).any(1).sum()} of {len(f)} rows")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, S1, mu2, S2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) in float64 (the squared Frechet / 2-Wasserstein distance of
    the two Gaussians). tr sqrt(S1 S2) from the eigenvalues of sqrt(S1) S2 sqrt(S1), tiny negatives clipped to 0."""
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    S1, S2 = (np.asarray(s, dtype=np.float64) for s in (S1, S2))
    w, V = np.linalg.eigh((S1 + S1.T) / 2)
    r1 = (V * np.sqrt(w.clip(0))) @ V.T                              # sqrt(S1), symmetric PSD
    M = r1 @ S2 @ r1
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((M + M.T) / 2).clip(0)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt)


def fd_from_features(f1, f2):
    """Frechet distance between the Gaussian fits of two feature sets (N1, d), (N2, d)."""
    return frechet_distance(*stats(f1), *stats(f2))

# -----------------------------------------------------------------------------
# toy feature extractor and metrics (videos (N, T, 3, H, W) in [-1, 1]; every clip resized to 64x64)


def _prep(videos):
    """(N, T, 3, H, W) -> float32 (N, T, 3, 64, 64) clamped to [-1, 1] (area resize if another size)."""
    v = videos.float().clamp(-1, 1)
    if v.shape[-2:] != (64, 64):
        N, T = v.shape[:2]
        v = F.interpolate(v.flatten(0, 1), size=(64, 64), mode="area").reshape(N, T, 3, 64, 64)
    return v


def _grad_energy(x):
    """RMS finite-difference gradient per channel: (M, C, H, W) -> (M, C). Sharpness / texture: unlike the mean
    |gradient| (total variation, unchanged when a monotone edge is blurred) it drops under blur."""
    gx, gy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    return (gx.square().mean((-2, -1)) + gy.square().mean((-2, -1))).sqrt()


def soft_histogram(x, bins=4):
    """Joint RGB histogram with linear (triangular) binning, a differentiable-smooth count: (M, 3, H, W) in [-1, 1]
    -> (M, bins^3), each row sums to 1."""
    u = (x.clamp(-1, 1) + 1) / 2 * (bins - 1)                       # (M, 3, H, W) in [0, bins-1]
    w = (1 - (u.flatten(2)[:, :, None] - torch.arange(bins, dtype=x.dtype)[:, None]).abs()).clamp(min=0)  # (M, 3, bins, P)
    return torch.einsum("mip,mjp,mkp->mijk", w[:, 0], w[:, 1], w[:, 2]).flatten(1) / w.shape[-1]


def block_flow(a, b, radius=2, block=8, zero_bias=1e-3):
    """Block matching from frame a to frame b, both (M, C, H, W): for each block x block tile of b the integer shift
    d in [-radius, radius]^2 minimising mean_p |b(p) - a(p - d)| (+ zero_bias |d|^2 so flat, static tiles pick d=0).
    -> flow (M, 2, H/block, W/block) as (dx, dy) pixels, residual (M, H/block, W/block) (the matched error)."""
    H, W = a.shape[-2:]
    ap = F.pad(a, (radius,) * 4, mode="replicate")
    errs, shifts = [], []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            a_shift = ap[..., radius - dy:radius - dy + H, radius - dx:radius - dx + W]  # a(p - d)
            errs.append(F.avg_pool2d((b - a_shift).abs().mean(1, keepdim=True), block))
            shifts.append((dx, dy))
    err = torch.cat(errs, 1)                                          # (M, K, h, w)
    d = torch.tensor(shifts, dtype=a.dtype)                           # (K, 2)
    idx = (err + zero_bias * d.square().sum(1).view(1, -1, 1, 1)).argmin(1)   # (M, h, w)
    return d[idx].permute(0, 3, 1, 2), err.gather(1, idx[:, None])[:, 0]


def _flows(v):
    """Block flow between consecutive frames at 32x32 (radius 2 = +-4 px at 64x64, 4x4 tiles of 16 px).
    v (N, T, 3, 64, 64) -> flow (N, T-1, 2, 4, 4), residual (N, T-1, 4, 4)."""
    N, T = v.shape[:2]
    x = F.avg_pool2d(v.flatten(0, 1), 2).reshape(N, T, 3, 32, 32)
    flow, res = block_flow(x[:, :-1].flatten(0, 1), x[:, 1:].flatten(0, 1))
    return flow.reshape(N, T - 1, 2, 4, 4), res.reshape(N, T - 1, 4, 4)


def _resample(x, n):
    """(N, L) -> (N, n) by linear interpolation over the normalised time axis (so clips of any length compare)."""
    if x.shape[1] == 1:
        return x.expand(-1, n)
    return F.interpolate(x[:, None], size=n, mode="linear", align_corners=True)[:, 0]


APPEARANCE_DIMS, MOTION_DIMS = 32, 32
STD_FLOOR = 0.01                             # toy_fd: smallest standardising std of a feature


@torch.no_grad()
def video_features(videos, batch=64):
    """Toy video features: (N, T >= 3, 3, H, W) in [-1, 1] -> (N, 64) float64. Deterministic, no weights.
    appearance (32, per frame then averaged over frames):
        2x2-grid mean colour (12), per-channel std (3), RMS gradient per channel at 64, 32 and 16 px (9),
        soft RGB octant histogram (8)
    motion (32):
        |frame difference| on a 4x4 grid, averaged over time (16); |frame difference| per step, resampled to
        4 time points (4); drift |x_t - x_0| at 4 time points (4); block flow: mean |dx|, mean |dy|, mean speed,
        jitter mean |flow_t+1 - flow_t|, matched residual, fraction of moving tiles (6); |second difference| (1);
        flicker = std over time of the frame-mean colour (1)"""
    out = []
    for v in _prep(videos).split(batch):
        N, T = v.shape[:2]
        assert T >= 3, "toy features need at least 3 frames"
        x = v.flatten(0, 1)                                           # (N*T, 3, 64, 64)
        app = [F.adaptive_avg_pool2d(x, 2).flatten(1), x.flatten(2).std(2)]
        for s in (1, 2, 4):
            app.append(_grad_energy(F.avg_pool2d(x, s) if s > 1 else x))
        app.append(soft_histogram(x, bins=2))
        app = torch.cat(app, 1).reshape(N, T, -1).mean(1)             # (N, 32)

        d = (v[:, 1:] - v[:, :-1]).abs().mean(2)                      # (N, T-1, 64, 64)
        flow, res = _flows(v)
        speed = flow.square().sum(2).sqrt()                           # (N, T-1, 4, 4)
        mot = [F.adaptive_avg_pool2d(d.mean(1, keepdim=True), 4).flatten(1),
               _resample(d.mean((2, 3)), 4),
               _resample((v[:, 1:] - v[:, :1]).abs().mean((2, 3, 4)), 4),
               flow[:, :, 0].abs().mean((1, 2, 3))[:, None], flow[:, :, 1].abs().mean((1, 2, 3))[:, None],
               speed.mean((1, 2, 3))[:, None],
               (flow[:, 1:] - flow[:, :-1]).abs().sum(2).mean((1, 2, 3))[:, None],
               res.mean((1, 2, 3))[:, None], (speed > 0).float().mean((1, 2, 3))[:, None],
               (v[:, 2:] - 2 * v[:, 1:-1] + v[:, :-2]).abs().mean((1, 2, 3, 4))[:, None],
               v.mean((3, 4)).std(1).mean(1)[:, None]]
        out.append(torch.cat([app] + mot, 1).double())
    f = torch.cat(out)
    assert f.shape[1] == APPEARANCE_DIMS + MOTION_DIMS
    return f


def toy_fd(real_features, fake_features, dims=slice(None)):
    """Frechet distance of toy features, each feature standardised by the REAL set's mean and std (so all 64
    features weigh the same, in units of the real spread). The std is floored at STD_FLOOR (features are in pixel
    units of [-1, 1] or pixels): a feature that is (nearly) constant on the real clips, e.g. the flicker of a flat
    background, would otherwise turn an invisible deviation into thousands. dims: a slice of features (e.g.
    slice(0, 32) appearance only, slice(32, 64) motion only)."""
    r, f = real_features[:, dims], fake_features[:, dims]
    mu, sd = r.mean(0), r.std(0).clamp(min=STD_FLOOR)
    return fd_from_features((r - mu) / sd, (f - mu) / sd)

# ---- interpretable per-clip metrics: videos (N, T, 3, H, W) in [-1, 1] -> (N,)


@torch.no_grad()
def first_frame_psnr(videos, images):
    """First-frame fidelity: PSNR (dB, pixel range [0, 1]) of generated frame 0 vs the conditioning image (N, 3, H, W)."""
    mse = ((videos[:, 0].float().clamp(-1, 1) - images.float().clamp(-1, 1)) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


@torch.no_grad()
def motion_amount(videos):
    """Mean |x_t+1 - x_t| over pixels, channels and steps (in [-1, 1] units): 0 for a frozen clip."""
    v = _prep(videos)
    return (v[:, 1:] - v[:, :-1]).abs().mean((1, 2, 3, 4))


@torch.no_grad()
def warp_error(videos):
    """Temporal consistency: the block-matched residual mean_p |x_t+1(p) - x_t(p - d)| (d the best local shift of
    each 16 px tile), averaged over tiles and steps. Small when each frame is the previous one moved; large for
    flicker, noise, or content that appears/disappears. Compare with the real clips' value."""
    return _flows(_prep(videos))[1].mean((1, 2, 3))


@torch.no_grad()
def histogram_drift(videos, bins=4):
    """Object persistence: mean over t >= 1 of the L1 distance (0..2) between the soft RGB histograms (bins^3) of
    frame t and frame 0. Objects that move keep the histogram; objects that dissolve, blur, merge into the
    background or change colour do not. Compare with the real clips' value."""
    v = _prep(videos)
    N, T = v.shape[:2]
    h = soft_histogram(v.flatten(0, 1), bins).reshape(N, T, -1)
    return (h[:, 1:] - h[:, :1]).abs().sum(2).mean(1)


@torch.no_grad()
def evaluate_videos(fake, real, images=None, real_features=None):
    """All toy metrics of a generated set vs the real clips (same conditioning, same order) -> dict of floats:
    fd (all 64 features), fd_app / fd_motion (each half), psnr0 (needs images), motion (fake/real mean ratio),
    warp (consistency residual), drift (histogram drift)."""
    rf = video_features(real) if real_features is None else real_features
    ff = video_features(fake)
    out = {"fd": toy_fd(rf, ff), "fd_app": toy_fd(rf, ff, slice(0, APPEARANCE_DIMS)),
           "fd_motion": toy_fd(rf, ff, slice(APPEARANCE_DIMS, None))}
    if images is not None:
        out["psnr0"] = first_frame_psnr(fake, images).mean().item()
    out["motion"] = (motion_amount(fake).mean() / motion_amount(real).mean().clamp(min=1e-12)).item()
    out["warp"] = warp_error(fake).mean().item()
    out["drift"] = histogram_drift(fake).mean().item()
    return out

# ---- the toy's shape tracked by colour (style "simple": one shape of one colour over a flat background)
# videos (N, T, 3, H, W) in [-1, 1] at their own size (distances in pixels of that size); reference (N, 3, H, W):
# the frame the two colours and the shape's size come from (the conditioning image; default the clip's frame 0)


def toy_colours(frames):
    """(N, 3, H, W) -> background (N, 3), shape colour (N, 3). Background: per-channel median of the border pixels
    (the shape covers less than half of them). Shape: per-channel median of the pixels whose RGB distance from the
    background is at least 9/10 of the largest (the shape's full pixels: exact on clean clips)."""
    x = frames.float()
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], -1)   # (N, 3, 2H+2W-4)
    bg = border.median(-1).values
    d = (x - bg[..., None, None]).norm(dim=1).flatten(1)                                    # (N, H*W)
    far = d >= 0.9 * d.max(1, keepdim=True).values
    return bg, x.flatten(2).masked_fill(~far[:, None], float("nan")).nanmedian(-1).values


def largest_component(mask):
    """(M, H, W) bool -> (M, H, W) bool: each mask's largest 8-connected component (each pixel's raster index spreads
    by 3x3 max-pooling until the labels settle; of equal components the one that ends first wins; empty stays empty)."""
    M, H, W = mask.shape
    lab = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W) * mask       # (M, H, W), 0 = not in mask
    while True:
        new = F.max_pool2d(lab[:, None], 3, 1, 1)[:, 0] * mask
        if torch.equal(new, lab):
            break
        lab = new
    count = torch.zeros(M, H * W + 1).scatter_add_(1, lab.long().flatten(1), torch.ones(M, H * W))
    count[:, 0] = 0
    return (lab == count.argmax(1).view(M, 1, 1)) & mask


def _toy_shape(videos, reference=None):
    """-> dict: x (N, T, 3, H, W) float; bg, col (N, 3) the background and shape colours; alpha (N, T, H, W) each
    pixel's position along the segment bg -> col (0 background, 1 shape, clamped); near (N, T, H, W) the pixels
    within half the contrast |col - bg| of col (on the segment: alpha > 1/2); cover (N, T, H, W) alpha on the largest
    connected component of near and its 1 px rim (the shape with its anti-aliased edge), 0 elsewhere; area_ref (N,)
    cover summed over the reference frame."""
    x = videos.float()
    ref = x[:, 0] if reference is None else reference.float()
    bg, col = toy_colours(ref)
    y = torch.cat([ref[:, None], x], 1) - bg[:, None, :, None, None]                        # (N, 1+T, 3, H, W)
    u = (col - bg)[:, None, :, None, None]
    alpha = ((y * u).sum(2) / u.square().sum(2).clamp(min=1e-12)).clamp(0, 1)              # (N, 1+T, H, W)
    near = (y - u).norm(dim=2) < 0.5 * u.norm(dim=2)
    blob = largest_component(near.flatten(0, 1))[:, None].float()                           # (N*(1+T), 1, H, W)
    cover = alpha * (F.max_pool2d(blob, 3, 1, 1) > 0).view(alpha.shape)
    return dict(x=x, bg=bg, col=col, alpha=alpha[:, 1:], near=near[:, 1:], cover=cover[:, 1:],
                area_ref=cover[:, 0].sum((1, 2)))


@torch.no_grad()
def centroids(videos, reference=None):
    """Per-frame centroid (x, y) in pixels of the shape's coverage (alpha on the blob and its 1 px rim, so sub-pixel
    motion of an anti-aliased edge counts) -> (N, T, 2). A frame without a blob keeps the previous frame's
    centroid (frame 0: the frame's centre), so a vanished shape counts as standing still."""
    w = _toy_shape(videos, reference)["cover"]
    N, T, H, W = w.shape
    n = w.sum((2, 3))                                                                        # (N, T)
    c = torch.stack([(w * torch.arange(W)).sum((2, 3)), (w * torch.arange(H)[:, None]).sum((2, 3))], -1)
    c = c / n.clamp(min=1e-12)[..., None]
    c[:, 0][n[:, 0] == 0] = torch.tensor([(W - 1) / 2, (H - 1) / 2])
    for t in range(1, T):
        c[:, t] = torch.where(n[:, t, None] > 0, c[:, t], c[:, t - 1])
    return c


@torch.no_grad()
def centroid_speed(videos, reference=None):
    """Mean |c_t+1 - c_t| of the shape's centroid, pixels per frame -> (N,)."""
    c = centroids(videos, reference)
    return (c[:, 1:] - c[:, :-1]).norm(dim=-1).mean(1)


@torch.no_grad()
def displacement(videos, reference=None):
    """|c_t - c_0| of the shape's centroid in pixels -> (N, T) (column 1: the displacement at frame 1)."""
    c = centroids(videos, reference)
    return (c - c[:, :1]).norm(dim=-1)


@torch.no_grad()
def solidity(videos, reference=None):
    """The shape's area at frame t (its coverage: alpha summed over the largest connected blob of pixels near the
    shape colour and that blob's 1 px rim) over its area in the reference frame, capped at 1 -> (N, T). A shape
    that moves keeps it (~1); one that blurs, fades, changes colour or breaks up falls towards 0."""
    s = _toy_shape(videos, reference)
    return (s["cover"].sum((2, 3)) / s["area_ref"].clamp(min=1e-12)[:, None]).clamp(max=1)


@torch.no_grad()
def off_colour(videos, reference=None):
    """Mean RGB distance of the pixels from the segment between the background and the shape colour -> (N, T), in
    [-1, 1] units. Every pixel of a real clip lies on it (edges blend the two colours): 0; blurring keeps pixels on
    it too; colours that are neither (tints, blotches, drift) move them off."""
    s = _toy_shape(videos, reference)
    bg, col = s["bg"][:, None, :, None, None], s["col"][:, None, :, None, None]
    return (s["x"] - bg - s["alpha"][:, :, None] * (col - bg)).norm(dim=2).mean((2, 3))


@torch.no_grad()
def background_noise(videos, reference=None):
    """Mean |x - background| over channels and over the pixels more than 2 px from any pixel near the shape colour
    (outside the near mask dilated by a 5x5 window) -> (N, T), in [-1, 1] units. 0 for a flat background; additive
    Gaussian noise of std s gives s sqrt(2/pi)."""
    s = _toy_shape(videos, reference)
    near = s["near"]
    away = F.max_pool2d(near.flatten(0, 1)[:, None].float(), 5, 1, 2).view(near.shape) == 0     # (N, T, H, W)
    dev = (s["x"] - s["bg"][:, None, :, None, None]).abs().mean(2)
    return (dev * away).sum((2, 3)) / away.sum((2, 3)).clamp(min=1)


def bootstrap_mean(values, n_boot=200, seed=0, divide_by=None):
    """Mean of per-clip values (N,) and its bootstrap standard error (clips resampled with replacement, generator
    seeded `seed`, so every measure and row sees the same resamples) -> (mean, se). divide_by (M,): the ratio of the
    means mean(values) / mean(divide_by), resampled with the same clip indices when M == N (paired clips), else
    independently."""
    v = values.double().flatten()
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, len(v), (n_boot, len(v)), generator=g)
    est, boot = v.mean(), v[i].mean(1)
    if divide_by is not None:
        r = divide_by.double().flatten()
        j = i if len(r) == len(v) else torch.randint(0, len(r), (n_boot, len(r)), generator=g)
        est, boot = est / r.mean(), boot / r[j].mean(1)
    return est.item(), boot.std().item()


TOY_MEASURES = {  # name in toy_measures -> what it is
    "psnr0": "frame-0 PSNR vs the conditioning image, dB",
    "speed": "centroid speed, px / frame", "speed_x_real": "centroid speed / the real clips' speed",
    "disp1": "centroid displacement at frame 1, px", "solid_last": "solidity at the last frame (1 = intact)",
    "off_colour_last": "off-colour at the last frame, RGB distance", "background": "background noise, mean |dev|",
}


@torch.no_grad()
def toy_measures(fake, images=None, real=None, n_boot=200, seed=0):
    """The toy's interpretable measures of a generated set -> {name: (mean over clips, bootstrap se)} (TOY_MEASURES;
    psnr0 needs images (N, 3, H, W), the conditioning frames, which are also the reference frames of the colours;
    speed_x_real needs real (M, T, 3, H, W), the real clips)."""
    m = {"speed": centroid_speed(fake, images), "disp1": displacement(fake, images)[:, 1],
         "solid_last": solidity(fake, images)[:, -1], "off_colour_last": off_colour(fake, images)[:, -1],
         "background": background_noise(fake, images).mean(1)}
    if images is not None:
        m["psnr0"] = first_frame_psnr(fake, images)
    out = {k: bootstrap_mean(v, n_boot, seed) for k, v in m.items()}
    if real is not None:
        out["speed_x_real"] = bootstrap_mean(m["speed"], n_boot, seed, divide_by=centroid_speed(real))
    return {k: out[k] for k in TOY_MEASURES if k in out}

# -----------------------------------------------------------------------------
# video folders and FVD


def list_videos(folder):
    """Video files under `folder` (recursive, sorted). Raises UserError if the folder is missing or has none."""
    if os.path.isfile(folder):
        raise UserError(f"{folder} is a file, not a folder; pass the folder that holds the videos")
    if not os.path.isdir(folder):
        raise UserError(f"video folder not found: {folder}; pass a folder of {'/'.join(e[1:] for e in VIDEO_EXTS)} files")
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(VIDEO_EXTS))
    if not paths:
        raise UserError(f"no videos in {folder} (looked for {', '.join(VIDEO_EXTS)}); point it at a folder of clips")
    return paths


def count_frames(path):
    """Decode every frame of a video -> (frames decoded, None), or (frames decoded before the failure, its name)."""
    n = 0
    try:
        with av.open(path) as c:
            for _ in c.decode(video=0):
                n += 1
    except (av.FFmpegError, IndexError, ValueError, OSError) as e:
        return n, "no video stream" if isinstance(e, IndexError) else type(e).__name__
    return n, None


def load_folder(folder, frames, transform=None, min_frames=1):
    """transform(clip) of every video of `folder`, clip (frames, 3, H, W) in [-1, 1] its first `frames` frames.
    Shorter videos are skipped (one warning). UserError for a video that does not decode (which one; remove or
    re-encode it) and for fewer than 2 usable videos (with the largest --frames >= min_frames that gives 2)."""
    paths, clips, short = list_videos(folder), [], []
    for p in paths:
        try:
            v = read_video(p, frames) * 2 - 1
        except (UserError, RuntimeError) as e:
            n, err = count_frames(p)
            if err is not None or n >= frames:
                why = err or (str(e).splitlines()[0][:100] if isinstance(e, RuntimeError) else
                              "its timestamps do not match its frame rate")
                raise UserError(f"cannot decode video {p} ({why}); remove it from {folder} or re-encode it") from None
            short.append((p, n))
            continue
        clips.append(v if transform is None else transform(v))
    if len(clips) < 2:
        lengths = sorted([frames] * len(clips) + [n for _, n in short], reverse=True)
        k = lengths[1] if len(lengths) > 1 else 0                      # the most frames 2 videos have
        raise UserError(f"{folder}: {len(clips)} usable video(s) with >= {frames} frames"
                        + (f" ({len(short)} shorter, the longest has {max(n for _, n in short)})" if short else "")
                        + "; the Frechet distance needs at least 2 (hundreds for a stable number): "
                        + (f"pass --frames {k} or fewer" if short and k >= min_frames else "add videos"))
    if short:
        print(f"warning: skipped {len(short)} of {len(paths)} videos in {folder} (< {frames} frames), "
              f"e.g. {short[0][0]}", file=sys.stderr)
    return clips


def i3d_preprocess(clip, size=224):
    """StyleGAN-V FVD preprocessing: (T, 3, H, W) in [-1, 1] -> (3, T, size, size): bilinear resize of the short
    side to `size` (aspect kept), centre crop."""
    T, _, H, W = clip.shape
    s = size / min(H, W)
    nh, nw = max(size, round(H * s)), max(size, round(W * s))
    x = F.interpolate(clip, size=(nh, nw), mode="bilinear", align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size].transpose(0, 1).contiguous()


def load_i3d(path, device="cpu"):
    """StyleGAN-V's TorchScript I3D (a TorchScript archive, loaded with torch.jit.load, never unpickled)."""
    if not os.path.isfile(path):
        raise UserError(f"I3D file not found: {path}; pass StyleGAN-V's i3d_torchscript.pt with --i3d PATH")
    try:
        with warnings.catch_warnings():                 # newer torch deprecates TorchScript; the I3D file is one
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
            return torch.jit.load(path, map_location=device).eval()
    except Exception as e:
        raise UserError(f"{path} is not a TorchScript file ({type(e).__name__}); pass StyleGAN-V's "
                        f"i3d_torchscript.pt") from None


@torch.no_grad()
def i3d_features(i3d, clips, batch=8, device="cpu"):
    """clips: list of (3, T, 224, 224) in [-1, 1] -> (N, F) float64 features of i3d(x, rescale=False, resize=False,
    return_features=True). UserError if the I3D rejects the input (its error's last line)."""
    feats = []
    for i in range(0, len(clips), batch):
        x = torch.stack(clips[i:i + batch]).to(device)
        try:
            f = i3d(x, rescale=False, resize=False, return_features=True)
        except (RuntimeError, torch.jit.Error) as e:                  # a TorchScript raise is a jit.Error
            if oom_text(e):
                raise                                                 # main: out of memory, exit 1
            last = [line.strip() for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise UserError(f"the I3D failed on input {tuple(x.shape)} ({last[0][:200]}); check --size (StyleGAN-V's "
                            f"I3D takes 224) and --frames") from None
        feats.append(f.double().cpu().flatten(1))
    return torch.cat(feats)


def fvd(i3d_path, real_dir, fake_dir, frames=16, size=224, batch=8, device="cpu"):
    """FVD between two folders of videos -> (fvd, n_real, n_fake). UserError if a set's features are not finite."""
    i3d = load_i3d(i3d_path, device)
    for folder in (real_dir, fake_dir):
        list_videos(folder)                                        # both folders hold videos, before any work
    prep = lambda v: i3d_preprocess(v, size)
    feats = []
    for folder in (real_dir, fake_dir):
        f = i3d_features(i3d, load_folder(folder, frames, prep), batch, device)
        bad = int((~torch.isfinite(f)).any(1).sum())
        if bad:
            raise UserError(f"the I3D features of {bad} of {len(f)} videos in {folder} are not finite (NaN or inf); "
                            f"check the I3D file (StyleGAN-V's i3d_torchscript.pt) and try --device cpu")
        feats.append(f)
    return fd_from_features(*feats), len(feats[0]), len(feats[1])

# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="FVD (user-supplied StyleGAN-V I3D) and the toy Frechet distance.",
                                epilog="python evaluate.py COMMAND --help shows a command's arguments",
                                formatter_class=fmt)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="the evaluation to run:")
    f = sub.add_parser("fvd", formatter_class=fmt,
                       help="FVD with StyleGAN-V's i3d_torchscript.pt between two folders of videos",
                       description="FVD: the Frechet distance of I3D features of two folders of videos (StyleGAN-V's "
                                   "convention: the first --frames frames, short side resized to --size, centre crop)")
    f.add_argument("--i3d", required=True, default=argparse.SUPPRESS,      # required: no default to show
                   help="path to StyleGAN-V's i3d_torchscript.pt (TorchScript; not on PyPI, download it yourself)")
    f.add_argument("--frames", type=int, default=16, help="first N frames of each video (shorter ones are skipped)")
    f.add_argument("--size", type=int, default=224, help="I3D input size (short side resize + centre crop)")
    f.add_argument("--batch", type=int, default=8, help="videos per I3D forward pass")
    f.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    t = sub.add_parser("toy-fd", formatter_class=fmt,
                       help="the toy feature Frechet distance (64x64 clips, standardised by REAL_DIR)",
                       description="The Frechet distance of the toy's 64 hand-made video features (no weights), each "
                                   "standardised by its mean and std over REAL_DIR; clips are resized to 64x64")
    t.add_argument("--frames", type=int, default=8,
                   help="first N frames of each video (>= 3; shorter ones are skipped)")
    for s in (f, t):
        s.add_argument("real_dir", metavar="REAL_DIR", help=f"folder of real videos (searched recursively for "
                                                            f"{', '.join(VIDEO_EXTS)})")
        s.add_argument("fake_dir", metavar="FAKE_DIR", help="folder of generated videos (same extensions)")
    return p.parse_args(argv)


def main(argv=None):
    """CLI entry: prints the distance; a one-line 'error: ...' on stderr and exit code 2 on bad input, 1 when out of
    memory."""
    a = parse_args(argv)
    try:
        if a.frames < (3 if a.cmd == "toy-fd" else 1):
            raise UserError(f"bad --frames {a.frames}: must be at least {3 if a.cmd == 'toy-fd' else 1}")
        if a.cmd == "fvd":
            for flag, v in (("--size", a.size), ("--batch", a.batch)):
                if v < 1:
                    raise UserError(f"bad {flag} {v}: must be at least 1")
            device = pick_device(a.device)
            d, nr, nf = fvd(a.i3d, a.real_dir, a.fake_dir, a.frames, a.size, a.batch, device)
            print(f"FVD {d:.2f} ({nr} real, {nf} generated videos, {a.frames} frames at {a.size}x{a.size})")
        else:
            to64 = lambda v: _prep(v[None])[0]
            for folder in (a.real_dir, a.fake_dir):
                list_videos(folder)                                    # both folders hold videos, before any work
            r = torch.stack(load_folder(a.real_dir, a.frames, to64, min_frames=3))
            g = torch.stack(load_folder(a.fake_dir, a.frames, to64, min_frames=3))
            d = toy_fd(video_features(r), video_features(g))
            print(f"toy FD {d:.3f} ({len(r)} real, {len(g)} generated videos, {a.frames} frames at 64x64)")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:
        if oom_text(e) is None:
            raise
        fix = "a lower --batch or --size, or fewer videos" if a.cmd == "fvd" else "fewer videos"
        print(f"error: out of memory ({oom_text(e)}); try {fix}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
