"""
UNet forward benchmark: our UNet vs diffusers' UNetSpatioTemporalConditionModel at the same config, dtype and
input, in one run. Each measurement runs in a fresh child process (so peak memory is not polluted by the other
model), alternating ours/diffusers; the ratio is of the medians.

  python bench.py                      # CPU: tiny preset + the real SVD widths at a 14 x 16 x 16 latent
  python bench.py --device cuda        # GPU: the real 14 x 72 x 128 latent (576 x 1024 video) in bf16
Needs diffusers (pip install -r requirements-dev.txt); it is only the reference here, never a runtime dependency.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def child(impl, preset, T, H, W, device, dtype, iters):
    from model import CONFIGS, UNet
    cfg = CONFIGS[preset].unet
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        if impl == "ours":
            net = UNet(cfg)
        else:
            from diffusers import UNetSpatioTemporalConditionModel
            ch = tuple(cfg.model_channels * m for m in cfg.channel_mult)
            n = len(ch)
            net = UNetSpatioTemporalConditionModel(
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=ch,
                down_block_types=tuple("CrossAttnDownBlockSpatioTemporal" if i in cfg.attention_levels else "DownBlockSpatioTemporal" for i in range(n)),
                up_block_types=tuple("CrossAttnUpBlockSpatioTemporal" if n - 1 - i in cfg.attention_levels else "UpBlockSpatioTemporal" for i in range(n)),
                addition_time_embed_dim=cfg.addition_time_embed_dim, projection_class_embeddings_input_dim=3 * cfg.addition_time_embed_dim,
                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                num_attention_heads=tuple(c // cfg.head_dim for c in ch), num_frames=T)
    net = net.to(dt).eval()
    x = torch.randn(1, T, cfg.in_channels, H, W, device=device, dtype=dt)
    c_noise = torch.tensor([0.25 * 6.55], device=device)
    emb = torch.randn(1, cfg.context_dim, device=device, dtype=dt)
    ids = torch.tensor([[6.0, 127.0, 0.02]], device=device, dtype=dt)

    def run():
        if impl == "ours":
            return net(x, c_noise, emb, ids)
        return net(x, c_noise, encoder_hidden_states=emb[:, None], added_time_ids=ids).sample

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        run()                                   # warm-up
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:   # reset the peak-RSS counter (Linux)
                f.write("5")
            base = _rss("VmRSS")
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss("VmHWM")) - base
        live = 0
        if device == "cpu":
            with LiveTensorPeak() as tracker:
                run()
            live = tracker.peak
    # peak: bytes above the weights+inputs (CUDA allocator, or process RSS on CPU); live: tensor bytes only
    print(json.dumps({"time": statistics.median(times), "peak": peak, "live": live}))


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensors created by the forward (exact, allocator-independent; CPU only)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an argument's storage (a view, an in-place or out= op) allocated nothing: skipping it
        # keeps views of the weights (w.t() in every linear) from counting as new memory
        ins = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in self.seen | ins:
                key, n = o.untyped_storage().data_ptr(), o.untyped_storage().nbytes()
                self.seen.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(o, self._free, key, n)
        return out

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)


def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(impl, args, preset, T, H, W, dtype, what):
    """Run one child: what='time' (normal allocator) or 'mem' (allocator set so peak RSS = live peak)."""
    cmd = [sys.executable, __file__, "--child", impl, "--preset", preset, "--shape", f"{T}x{H}x{W}",
           "--device", args.device, "--dtype", dtype, "--iters", str(args.iters if what == "time" else 1)]
    env = dict(os.environ)
    if what == "mem" and args.device == "cpu":
        # a fixed mmap threshold makes glibc return every freed tensor to the OS at once (slow, so not for timing)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        sys.exit(f"child failed: {out.stderr.strip().splitlines()[-1]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["time"] if what == "time" else (r["peak"], r["live"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--iters", type=int, default=3, help="timed forwards per child process (median taken)")
    p.add_argument("--rounds", type=int, default=2, help="child processes per implementation, alternating")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--preset", default="svd", help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        T, H, W = map(int, args.shape.split("x"))
        return child(args.child, args.preset, T, H, W, args.device, args.dtype, args.iters)
    cases = ([("tiny", 14, 32, 32, "float32"), ("svd", 14, 16, 16, "float32")] if args.device == "cpu"
             else [("svd", 14, 72, 128, "bfloat16"), ("svd", 14, 16, 16, "bfloat16")])
    print(f"UNet forward, batch 1, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    mem = "RSS" if args.device == "cpu" else "CUDA"
    print(f"{'config':<8}{'T x h x w':<12}{'dtype':<10}{'ours s':>8}{'diff s':>8}{'ratio':>7}"
          f"{mem + ' ours MB':>14}{'diff MB':>9}{'ratio':>7}{'tensors ours MB':>17}{'diff MB':>9}{'ratio':>7}")
    for preset, T, H, W, dtype in cases:
        t = {"ours": [], "diffusers": []}
        m = {"ours": [], "diffusers": []}
        for _ in range(args.rounds):
            for impl in t:
                t[impl].append(measure(impl, args, preset, T, H, W, dtype, "time"))
                m[impl].append(measure(impl, args, preset, T, H, W, dtype, "mem"))
        t = {k: statistics.median(v) for k, v in t.items()}
        peak = {k: statistics.median(x[0] for x in v) / 2 ** 20 for k, v in m.items()}
        live = {k: statistics.median(x[1] for x in v) / 2 ** 20 for k, v in m.items()}
        lr = f"{live['ours'] / live['diffusers']:>7.2f}" if live["diffusers"] else f"{'-':>7}"
        print(f"{preset:<8}{f'{T}x{H}x{W}':<12}{dtype:<10}{t['ours']:>8.3f}{t['diffusers']:>8.3f}{t['ours'] / t['diffusers']:>7.2f}"
              f"{peak['ours']:>14.0f}{peak['diffusers']:>9.0f}{peak['ours'] / peak['diffusers']:>7.2f}"
              f"{live['ours']:>17.0f}{live['diffusers']:>9.0f}{lr}", flush=True)


if __name__ == "__main__":
    main()
