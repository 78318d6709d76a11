"""
End-to-end wall time of SF-V's 1 step vs SVD's N steps with CFG (2 UNet evaluations per step) through
sample.sample_video, split by stage, on random-weight configs small enough for a CPU.
    python bench_sample.py                       # tiny + medium, 25 steps
    python bench_sample.py --configs medium --steps 25 --device cuda
"""
import argparse
import time
import torch

from model import CONFIGS, SVD, SVDConfig, UNetConfig, VAEConfig, CLIPConfig
from sample import sample_video

BENCH_CONFIGS = {
    "tiny": CONFIGS["tiny"],
    # the SVD structure at 1/5 width (UNet 64 ch, 4 levels, 2 res blocks; VAE 64 ch), 14 frames of 128x128
    "medium": SVDConfig(
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2, head_dim=32, context_dim=256,
                        addition_time_embed_dim=64),
        vae=VAEConfig(ch=64, ch_mult=(1, 2, 4, 4)),
        clip=CLIPConfig(image_size=112, patch_size=14, width=256, layers=4, heads=4, embed_dim=256),
        num_frames=14, height=128, width=128),
}


def bench(cfg, steps, device, dtype, repeats=2):
    """-> [(1, stats), (steps, stats)]; every stage time is the minimum over `repeats` runs."""
    torch.manual_seed(0)
    svd = SVD(cfg).to(device=device, dtype=dtype).eval()
    img = torch.rand(3, cfg.height, cfg.width)
    sample_video(svd, img, steps=1)                                   # warm-up
    rows = []
    for n in (1, steps):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, st = sample_video(svd, img, steps=n, min_cfg=1.0, max_cfg=2.5)
            st["total"] = time.perf_counter() - t0
            runs.append(st)
        rows.append((n, {k: min(r[k] for r in runs) for k in runs[0]}))   # per-stage minimum: robust to noise
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="tiny,medium")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=2, help="per-stage minimum over this many runs")
    a = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    print(f"torch {torch.__version__}, {a.device} {a.dtype}, {torch.get_num_threads()} threads")
    print(f"{'config':8} {'frames':>6} {'size':>8} {'steps':>5} {'UNet evals':>10} {'encode s':>8} {'denoise s':>9} "
          f"{'decode s':>8} {'total s':>8} {'vs 1-step':>9}")
    for name in a.configs.split(","):
        cfg = BENCH_CONFIGS[name]
        rows = bench(cfg, a.steps, torch.device(a.device), dtype, a.repeats)
        t1 = rows[0][1]["total"]
        for n, st in rows:
            print(f"{name:8} {cfg.num_frames:>6} {cfg.height}x{cfg.width:<4} {n:>5} {st['unet_evals']:>10} "
                  f"{st['encode']:>8.2f} {st['denoise']:>9.2f} {st['decode']:>8.2f} {st['total']:>8.2f} "
                  f"{st['total'] / t1:>8.1f}x")
        (_, a1), (_, an) = rows
        print(f"{name}: 1 step is {an['total'] / a1['total']:.1f}x faster end to end, {an['denoise'] / a1['denoise']:.1f}x "
              f"in the denoise stage; encode + decode are {100 * (a1['encode'] + a1['decode']) / a1['total']:.0f}% of "
              f"the 1-step time")
