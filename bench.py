"""
Benchmarks. Default: UNet forward, ours vs diffusers' UNetSpatioTemporalConditionModel at the same config, dtype and
input. Each measurement runs in a fresh child process (so peak memory is not polluted by the other model),
alternating ours/diffusers; the ratios are of the medians. Real-width rows also get a torch.profiler summary of one
forward per implementation (tensor copies, time inside the conv modules), so a layout regression shows.

  python bench.py                      # CPU fp32: tiny preset, and the real SVD widths at 14x16x16 and 14x32x32 latents
  python bench.py --cases svd:14x16x16 --rounds 3
  python bench.py --device cuda        # GPU: the real 14 x 72 x 128 latent (576 x 1024 video) in bf16
  python bench.py --sample             # end to end (sample.sample_video): SF-V's 1 step vs SVD's 25 steps with CFG
  python bench.py --train-memory --device cuda   # peak GPU memory of one SF-V training step at 14x448x768
The UNet benchmark needs diffusers (pip install -r requirements-dev.txt); it is only the reference here, never a
runtime dependency. Set OMP_NUM_THREADS to fix the CPU thread count (children inherit it).
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
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# -----------------------------------------------------------------------------
# UNet forward: one child process measures one implementation


def build(impl, preset, T, device, dtype):
    """Our UNet or diffusers' at the same config, random weights, in eval mode."""
    from model import CONFIGS, UNet
    cfg = CONFIGS[preset].unet
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
    return net.to(dtype).eval(), cfg


def child(impl, preset, T, H, W, device, dtype, iters, prof=False):
    dt = getattr(torch, dtype)
    net, cfg = build(impl, preset, T, device, dt)
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
        if prof:
            return print(json.dumps(profile_forward(net, run, sync)))
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


def profile_forward(net, run, sync):
    """One forward under torch.profiler: self-CPU total, aten::copy_ calls and self time, and wall time spent inside
    the conv modules (nn.Conv2d / nn.Conv3d and subclasses, whatever kernel they use)."""
    from torch.profiler import profile, ProfilerActivity
    conv = {"n": 0, "s": 0.0}
    t0 = {}

    def pre(m, args):
        t0[id(m)] = time.perf_counter()

    def post(m, args, out):
        conv["n"] += 1
        conv["s"] += time.perf_counter() - t0.pop(id(m))

    hooks = [h for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))
             for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    with profile(activities=[ProfilerActivity.CPU]) as p:
        run()
        sync()
    for h in hooks:
        h.remove()
    ev = p.key_averages()
    copy = [e for e in ev if e.key == "aten::copy_"]
    return {"total": sum(e.self_cpu_time_total for e in ev) / 1e6, "copy_n": sum(e.count for e in copy),
            "copy_s": sum(e.self_cpu_time_total for e in copy) / 1e6, "conv_n": conv["n"], "conv_s": conv["s"]}


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
            if isinstance(o, torch.Tensor) and (p := o.untyped_storage().data_ptr()) not in self.seen and p not in ins:
                key, n = p, o.untyped_storage().nbytes()
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
    """Run one child: what='time' (normal allocator), 'mem' (allocator set so peak RSS = live peak) or 'profile'."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--child-preset", preset, "--child-shape",
           f"{T}x{H}x{W}", "--device", args.device, "--child-dtype", dtype,
           "--iters", str(args.iters if what == "time" else 1)] + (["--child-profile"] if what == "profile" else [])
    env = dict(os.environ)
    if what == "mem" and args.device == "cpu":
        # a fixed mmap threshold makes glibc return every freed tensor to the OS at once (slow, so not for timing)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        sys.exit(f"child failed: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r if what == "profile" else r["time"] if what == "time" else (r["peak"], r["live"])


def unet_main(args):
    cases = args.cases or ("tiny:14x32x32,svd:14x16x16,svd:14x32x32" if args.device == "cpu"
                           else "svd:14x72x128:bfloat16,svd:14x16x16:bfloat16")
    cases = [(c.split(":") + ["float32"])[:3] for c in cases.split(",")]
    print(f"UNet forward, batch 1, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} alternating rounds x {args.iters} forwards")
    mem = "RSS" if args.device == "cpu" else "CUDA"
    print(f"{'config':<8}{'T x h x w':<12}{'dtype':<10}{'ours s':>8}{'diff s':>8}{'ratio':>7}"
          f"{mem + ' ours MB':>14}{'diff MB':>9}{'ratio':>7}{'tensors ours MB':>17}{'diff MB':>9}{'ratio':>7}")
    for preset, shape, dtype in cases:
        T, H, W = map(int, shape.split("x"))
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
        print(f"{preset:<8}{shape:<12}{dtype:<10}{t['ours']:>8.3f}{t['diffusers']:>8.3f}{t['ours'] / t['diffusers']:>7.2f}"
              f"{peak['ours']:>14.0f}{peak['diffusers']:>9.0f}{peak['ours'] / peak['diffusers']:>7.2f}"
              f"{live['ours']:>17.0f}{live['diffusers']:>9.0f}{lr}", flush=True)
        if preset != "tiny" and args.device == "cpu" and not args.no_profile:
            for impl in t:
                p = measure(impl, args, preset, T, H, W, dtype, "profile")
                print(f"  profile {impl:<10} self CPU {p['total']:6.2f} s   aten::copy_ {p['copy_n']:4d} calls "
                      f"{p['copy_s']:5.2f} s   conv modules {p['conv_n']:4d} calls {p['conv_s']:5.2f} s", flush=True)

# -----------------------------------------------------------------------------
# end to end: SF-V's 1 step vs SVD's N steps with CFG (2 UNet evaluations per step), split by stage


def sample_configs():
    from model import CONFIGS, SVDConfig, UNetConfig, VAEConfig, CLIPConfig
    return {
        "tiny": CONFIGS["tiny"],
        # the SVD structure at 1/5 width (UNet 64 ch, 4 levels, 2 res blocks; VAE 64 ch), 14 frames of 128x128
        "medium": SVDConfig(
            unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2, head_dim=32,
                            context_dim=256, addition_time_embed_dim=64),
            vae=VAEConfig(ch=64, ch_mult=(1, 2, 4, 4)),
            clip=CLIPConfig(image_size=112, patch_size=14, width=256, layers=4, heads=4, embed_dim=256),
            num_frames=14, height=128, width=128),
    }


def bench_sample(cfg, steps, device, dtype, repeats=2):
    """-> [(1, stats), (steps, stats)]; every stage time is the minimum over `repeats` runs."""
    from model import SVD
    from sample import sample_video
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


def sample_main(args):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.sample_dtype]
    configs = sample_configs()
    print(f"torch {torch.__version__}, {args.device} {args.sample_dtype}, {torch.get_num_threads()} threads")
    print(f"{'config':8} {'frames':>6} {'size':>8} {'steps':>5} {'UNet evals':>10} {'encode s':>8} {'denoise s':>9} "
          f"{'decode s':>8} {'total s':>8} {'vs 1-step':>9}")
    for name in args.configs.split(","):
        if name not in configs:
            sys.exit(f"unknown --configs entry {name!r}; choose from {', '.join(configs)}")
        cfg = configs[name]
        rows = bench_sample(cfg, args.steps, torch.device(args.device), dtype, args.repeats)
        t1 = rows[0][1]["total"]
        for n, st in rows:
            print(f"{name:8} {cfg.num_frames:>6} {cfg.height}x{cfg.width:<4} {n:>5} {st['unet_evals']:>10} "
                  f"{st['encode']:>8.2f} {st['denoise']:>9.2f} {st['decode']:>8.2f} {st['total']:>8.2f} "
                  f"{st['total'] / t1:>8.1f}x")
        (_, a1), (_, an) = rows
        print(f"{name}: 1 step is {an['total'] / a1['total']:.1f}x faster end to end, {an['denoise'] / a1['denoise']:.1f}x "
              f"in the denoise stage; encode + decode are {100 * (a1['encode'] + a1['decode']) / a1['total']:.0f}% of "
              f"the 1-step time")


# -----------------------------------------------------------------------------
# training memory: peak GPU memory of one SF-V step (train.Trainer), as SF-V trains it (Zhang et al. 2024, sec. 4)


def train_memory(config="svd", shape="14x448x768", device="cuda", train_flags=()):
    """Two SF-V steps of a randomly initialised UNet (`config`) at `shape` (TxHxW pixels) from random cached latents
    (VAE/CLIP never touch the GPU), with train.py's memory flags as given in train_flags (default: bf16 autocast,
    gradient checkpointing, SM3). The second step has optimiser state and logs the per-term gradient norms (the
    costliest step). -> {"peak_gib": torch.cuda.max_memory_allocated in GiB, losses...}; on CPU peak_gib is None
    (there is no per-step peak to read, only the process's lifetime RSS): a CPU run only checks that the step runs."""
    import load_svd
    import train
    from model import CONFIGS, SVD, UNet
    T, H, W = (int(v) for v in shape.split("x"))
    args = train.parse_args([*train_flags, "--mode", "sfv"])
    dev = load_svd.pick_device(device)
    cfg = CONFIGS[config]
    with torch.device("meta"):
        svd = SVD(cfg)                                                     # VAE/CLIP stay on meta: never used
    torch.manual_seed(args.seed)
    with torch.device(dev):
        svd.unet = UNet(cfg.unet)
    tr = train.Trainer(args, svd, dev)
    B, h, w = args.batch_size, H // 8, W // 8
    batch = {"latents": torch.randn(B, T, 4, h, w), "cond": torch.randn(B, 4, h, w),
             "image_embeds": torch.randn(B, cfg.unet.context_dim), "keys": list(range(B))}
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(2):                                                     # step 2: optimiser state exists
        t = time.time()
        m = tr.step([batch] * args.grad_accum, log_terms=i == 1)
        if cuda:
            torch.cuda.synchronize()
        print(f"step {i}: {time.time() - t:.2f} s, " + (f"peak {train.peak_memory_gb(dev):.2f} GiB, " if cuda else "")
              + f"loss_g {m['loss_g']:.4g}, loss_d {m['loss_d']:.4g}, r1_share {m['r1_share']:.3g}", flush=True)
    peak = train.peak_memory_gb(dev) if cuda else None
    print(f"peak GPU memory (torch.cuda.max_memory_allocated) of one SF-V step, {config} UNet, {T}x{H}x{W}, "
          f"batch {B}: " + (f"{peak:.2f} GiB (target on one GPU: < 40 GB)" if cuda else "not measured (CPU run)"))
    return {"peak_gib": peak, **m}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--cases", default=None, help="UNet rows, comma-separated preset:TxHxW[:dtype] "
                   "(default cpu: tiny:14x32x32,svd:14x16x16,svd:14x32x32)")
    p.add_argument("--iters", type=int, default=3, help="timed forwards per child process (median taken)")
    p.add_argument("--rounds", type=int, default=2, help="child processes per implementation, alternating")
    p.add_argument("--no-profile", action="store_true", help="skip the profile lines under the real-width rows")
    p.add_argument("--sample", action="store_true", help="end-to-end sampling benchmark instead (ours only)")
    p.add_argument("--configs", default="tiny,medium", help="--sample: configs to run (tiny, medium)")
    p.add_argument("--steps", type=int, default=25, help="--sample: steps of the multi-step run")
    p.add_argument("--sample-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="--sample: dtype")
    p.add_argument("--repeats", type=int, default=2, help="--sample: per-stage minimum over this many runs")
    p.add_argument("--train-memory", action="store_true", help="peak GPU memory of one SF-V training step instead "
                   "(train.Trainer, random UNet, random cached latents); use with --device cuda")
    p.add_argument("--memory-config", default="svd", help="--train-memory: model.CONFIGS preset (tiny runs on CPU)")
    p.add_argument("--memory-shape", default="14x448x768", help="--train-memory: TxHxW in pixels (SF-V: 14x448x768)")
    p.add_argument("--train-flags", default="", help="--train-memory: train.py flags, e.g. '--batch-size 2 "
                   "--no-grad-ckpt --optimizer adamw' (default: train.py's memory defaults)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-preset", default="svd", help=argparse.SUPPRESS)
    p.add_argument("--child-shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        T, H, W = map(int, args.child_shape.split("x"))
        return child(args.child, args.child_preset, T, H, W, args.device, args.child_dtype, args.iters,
                     args.child_profile)
    if args.sample:
        return sample_main(args)
    if args.train_memory:
        return train_memory(args.memory_config, args.memory_shape, args.device, args.train_flags.split())
    unet_main(args)


if __name__ == "__main__":
    main()
