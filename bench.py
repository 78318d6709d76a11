"""
Benchmarks. Default: UNet forward, ours vs diffusers' UNetSpatioTemporalConditionModel at the same config, dtype and
input. Each measurement runs in a fresh child process (so peak memory is not polluted by the other model),
alternating ours/diffusers; a time ratio is the median of the per-round ratios, with their range. On CPU "ours" is
model.py with the opt-in cpu_kernels.apply (as is every CPU run in --sample). Real-width rows also get a
torch.profiler summary of one forward per implementation (tensor copies, time inside the conv modules), so a layout
regression shows.

  python bench.py                      # CPU fp32: tiny preset, and the real SVD widths at 14x16x16 and 14x32x32 latents
  python bench.py --cases svd:14x16x16 --rounds 3
  python bench.py --device cuda        # GPU: the real 14 x 72 x 128 latent (576 x 1024 video) in bf16
  python bench.py --sample             # end to end (condition, sample, decode): SF-V's 1 step vs SVD's 25 steps + CFG
  python bench.py --train-memory --device cuda   # peak GPU memory of one SF-V training step at 14x448x768
  python bench.py --simulate           # no GPU needed: FLOPs, GPU time bounds and peak memory at full SVD size
  python bench.py --fit                # will one SF-V training step fit on a 24/40/80 GB card (train.py's memory plan)
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
import warnings
import weakref

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cli
from cli import UserError
from model import CONFIGS, size_multiple

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
            if torch.device(device).type == "cpu":
                import cpu_kernels
                cpu_kernels.apply(net)
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
    """Peak bytes of live tensor storages created under this mode (exact, allocator-independent). Works on real tensors
    and on fake ones (FakeTensorMode: shapes and dtypes only), which is how the simulator measures full-size runs.
    A storage counts from the op that creates it until it is freed (a weakref on the storage, so a view keeps it
    alive); an output sharing an argument's storage (a view, an in-place or out= op) allocated nothing, which keeps
    views of the weights (w.t() in every linear) from counting as new memory. Options: device (count only storages
    of that device type), fake_scalars (answer .item() of a fake tensor with 1, so code that logs a loss runs),
    snapshot (keep the set of storages live at the peak, for breakdown()). Allocations inside an op's kernel that
    never become tensors (library workspaces) are not seen."""

    def __init__(self, device=None, fake_scalars=False, snapshot=False, flop_formulas=None):
        super().__init__()
        self.device, self.fake_scalars, self.snapshot = device, fake_scalars, snapshot
        self.flop_formulas, self.flops = flop_formulas, 0      # {op packet: f(*args, out_val=out, **kwargs)}
        self.live = self.peak = 0
        self.ids = {}               # storage address (live) -> allocation id
        self.info = {}              # allocation id -> [bytes, label]
        self.label = "activations and temporaries"
        self.weight_keys = set()    # storage addresses of parameters: their dtype casts are labelled autocast copies
        self.excluded = set()       # allocation ids not counted (memory kept elsewhere, e.g. on the host)
        self._n, self._snap, self._snap_at = 0, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake_scalars and func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return 1.0 if t.is_floating_point() else True if t.dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        if self.flop_formulas is not None and (f := self.flop_formulas.get(func._overloadpacket)) is not None:
            self.flops += f(*args, **(kwargs or {}), out_val=out)
        ins = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and (self.device is None or o.device.type == self.device):
                s = o.untyped_storage()
                if s._cdata not in ins and s._cdata not in self.ids:
                    label = self.label
                    if func is torch.ops.aten._to_copy.default and args[0].untyped_storage()._cdata in self.weight_keys:
                        label = "autocast weight copies"
                    self._add(s, label)
        return out

    def _add(self, s, label):
        aid, n, key = self._n, s.nbytes(), s._cdata
        self._n += 1
        self.ids[key] = aid
        self.info[aid] = [n, label]
        self.live += n
        if self.live > self.peak:
            self.peak = self.live
            if self.snapshot and self.live > self._snap_at * 1.0005:     # within 0.05% of the peak
                self._snap, self._snap_at = list(self.ids.values()), self.live
        weakref.finalize(s, self._free, key, aid).atexit = False

    def _free(self, key, aid):
        if self.ids.get(key) == aid:
            del self.ids[key]
        if aid not in self.excluded:
            self.live -= self.info[aid][0]

    def relabel(self, tensors, label):
        """Label the (live) storages of these tensors, e.g. the weights, for breakdown()."""
        for t in tensors:
            aid = self.ids.get(t.untyped_storage()._cdata)
            if aid is not None:
                self.info[aid][1] = label

    def exclude(self, tensors, label):
        """Stop counting these tensors' storages (an option that keeps them on the host), labelled for the report."""
        for t in tensors:
            aid = self.ids.get(t.untyped_storage()._cdata)
            if aid is not None and aid not in self.excluded:
                self.excluded.add(aid)
                self.info[aid][1] = label
                self.live -= self.info[aid][0]

    def reset_peak(self):
        self.peak, self._snap, self._snap_at = self.live, list(self.ids.values()), self.live

    def breakdown(self):
        """{label: bytes} of the storages live at the (last snapshot of the) peak."""
        out = {}
        for aid in self._snap:
            if aid not in self.excluded:
                n, label = self.info[aid]
                out[label] = out.get(label, 0) + n
        return out


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
    print(f"UNet forward, batch 1, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; time: "
          f"median of {args.rounds} alternating rounds x {args.iters} forwards, ratio = median of the per-round ratios "
          f"(range = min-max over rounds); memory: one child each"
          + ("; ours = model.UNet with cpu_kernels.apply" if args.device == "cpu" else ""))
    mem = "RSS" if args.device == "cpu" else "CUDA"
    print(f"{'config':<8}{'T x h x w':<12}{'dtype':<10}{'ours s':>8}{'diff s':>8}{'ratio':>7}{'range':>11}"
          f"{mem + ' ours MB':>14}{'diff MB':>9}{'ratio':>7}{'tensors ours MB':>17}{'diff MB':>9}{'ratio':>7}")
    for preset, shape, dtype in cases:
        T, H, W = map(int, shape.split("x"))
        t = {"ours": [], "diffusers": []}
        for _ in range(args.rounds):
            for impl in t:
                t[impl].append(measure(impl, args, preset, T, H, W, dtype, "time"))
        # paired: ours and diffusers of one round ran back to back, so a slow spell of the machine cancels out
        ratios = sorted(o / d for o, d in zip(t["ours"], t["diffusers"]))
        t = {k: statistics.median(v) for k, v in t.items()}
        # peak memory repeats to within 0.1% across children: one child per implementation
        m = {impl: measure(impl, args, preset, T, H, W, dtype, "mem") for impl in t}
        peak = {k: v[0] / 2 ** 20 for k, v in m.items()}
        live = {k: v[1] / 2 ** 20 for k, v in m.items()}
        lr = f"{live['ours'] / live['diffusers']:>7.2f}" if live["diffusers"] else f"{'-':>7}"
        span = f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
        print(f"{preset:<8}{shape:<12}{dtype:<10}{t['ours']:>8.3f}{t['diffusers']:>8.3f}"
              f"{statistics.median(ratios):>7.2f}{span:>11}"
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


@torch.no_grad()
def sample_stages(svd, img, steps, min_cfg=1.0, max_cfg=2.5, seed=23):
    """One image-to-video run through model.py's API, timed per stage: encode (SVD.condition), denoise (SVD.sample:
    SF-V's one evaluation for steps=1, else Euler + CFG), decode (vae.decode, 14-frame chunks, to [0, 1] on the CPU).
    img (3, H, W) in [0, 1]. -> {encode, denoise, decode: seconds; unet_evals (a CFG step counts 2)}."""
    p = next(svd.unet.parameters())
    sync = (lambda: torch.cuda.synchronize(p.device)) if p.device.type == "cuda" else (lambda: None)
    gens, counter = [torch.Generator().manual_seed(seed)], []
    t0 = time.perf_counter()
    cond = svd.condition(img[None].float() * 2 - 1, gens)
    sync()
    t1 = time.perf_counter()
    z = svd.sample(cond, gens, steps=steps, min_cfg=min_cfg, max_cfg=max_cfg, counter=counter)
    sync()
    t2 = time.perf_counter()
    ((svd.vae.decode(z.to(p.dtype), chunk=14)[0].float() + 1) / 2).clamp(0, 1).cpu()    # the video, discarded
    sync()
    t3 = time.perf_counter()
    return {"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "unet_evals": sum(counter)}


def bench_sample(cfg, steps, device, dtype, repeats=2):
    """-> [(1, stats), (steps, stats)]; every stage time is the minimum over `repeats` runs. On CPU the model runs
    with cpu_kernels.apply."""
    from model import SVD
    torch.manual_seed(0)
    svd = SVD(cfg).to(device=device, dtype=dtype).eval()
    if device.type == "cpu":
        import cpu_kernels
        cpu_kernels.apply(svd)
    img = torch.rand(3, cfg.height, cfg.width)
    sample_stages(svd, img, 1)                                        # warm-up
    rows = []
    for n in (1, steps):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            st = sample_stages(svd, img, n)
            st["total"] = time.perf_counter() - t0
            runs.append(st)
        rows.append((n, {k: min(r[k] for r in runs) for k in runs[0]}))   # per-stage minimum: robust to noise
    return rows


def sample_main(args):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.sample_dtype]
    configs = sample_configs()
    print(f"torch {torch.__version__}, {args.device} {args.sample_dtype}, {torch.get_num_threads()} threads"
          + (", model.py with cpu_kernels.apply" if args.device == "cpu" else ""))
    print(f"{'config':8} {'frames':>6} {'size':>8} {'steps':>5} {'UNet evals':>10} {'encode s':>8} {'denoise s':>9} "
          f"{'decode s':>8} {'total s':>8} {'vs 1-step':>9}")
    for name in args.configs.split(","):
        if name not in configs:
            raise UserError(f"unknown --configs entry {name!r}; choose from {', '.join(configs)}")
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
    import cli
    import train
    from model import CONFIGS, SVD, UNet
    T, H, W = parse_shape("--memory-shape", shape, CONFIGS[config])
    args = train.parse_args([*train_flags, "--mode", "sfv"])
    dev = cli.pick_device(device)
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--cases", default=None, help="UNet rows, comma-separated preset:TxHxW[:dtype] "
                   "(none: tiny:14x32x32,svd:14x16x16,svd:14x32x32 on cpu; svd:14x72x128:bfloat16,"
                   "svd:14x16x16:bfloat16 on cuda)")
    p.add_argument("--iters", type=int, default=3, help="timed forwards per child process (median taken)")
    p.add_argument("--rounds", type=int, default=3,
                   help="timing child processes per implementation, alternating; ratio = median of per-round ratios")
    p.add_argument("--no-profile", action="store_true", help="skip the profile lines under the real-width rows")
    p.add_argument("--sample", action="store_true", help="end-to-end sampling benchmark instead (ours only)")
    p.add_argument("--configs", default="tiny,medium", help="--sample: configs to run, comma-separated, of: "
                   + ", ".join(sample_configs()) + " (medium: the SVD structure at 1/5 width, 14x128x128)")
    p.add_argument("--steps", type=int, default=25, help="--sample: steps of the multi-step run")
    p.add_argument("--sample-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="--sample: dtype")
    p.add_argument("--repeats", type=int, default=2, help="--sample: per-stage minimum over this many runs")
    p.add_argument("--train-memory", action="store_true", help="peak GPU memory of one SF-V training step instead "
                   "(train.Trainer, random UNet, random cached latents); use with --device cuda")
    p.add_argument("--memory-config", default="svd", help="--train-memory: model.CONFIGS preset, one of "
                   + ", ".join(CONFIGS) + " (tiny runs on CPU)")
    p.add_argument("--memory-shape", default="14x448x768", help="--train-memory: TxHxW in pixels (SF-V: 14x448x768)")
    p.add_argument("--train-flags", default="", help="--train-memory: train.py flags, e.g. '--batch-size 2 "
                   "--no-grad-ckpt --optimizer adamw' (none: train.py's memory defaults)")
    p.add_argument("--simulate", action="store_true", help="FLOPs, GPU time bounds and peak memory at full SVD size, "
                   "simulated on fake tensors (no GPU), and their validation against real CPU runs")
    p.add_argument("--fit", action="store_true", help="will it fit: train.py's memory plan for one SF-V step per card "
                   "(24/40/80 GB), resolution and frame count")
    p.add_argument("--sim-no-train", action="store_true", help="--simulate: skip the training rows")
    p.add_argument("--sim-no-validate", action="store_true", help="--simulate: skip the validation runs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-preset", default="svd", help=argparse.SUPPRESS)
    p.add_argument("--child-shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args):
    """Every flag checked before any work: UserError (one line) otherwise."""
    for flag, v in (("--iters", args.iters), ("--rounds", args.rounds), ("--steps", args.steps),
                    ("--repeats", args.repeats)):
        if v < 1:
            raise UserError(f"bad {flag} {v}: must be at least 1")
    if args.train_memory:
        if args.memory_config not in CONFIGS:
            raise UserError(f"unknown --memory-config {args.memory_config!r}; choose from {', '.join(CONFIGS)}")
        parse_shape("--memory-shape", args.memory_shape, CONFIGS[args.memory_config])
        cli.pick_device(args.device)
    if args.sample:
        for name in args.configs.split(","):
            if name not in sample_configs():
                raise UserError(f"unknown --configs entry {name!r}; choose from {', '.join(sample_configs())}")
        cli.pick_device(args.device)


def parse_shape(flag, text, cfg):
    """'TxHxW' (pixels) -> (T, H, W); UserError unless three positive integers with H, W multiples of the model's
    size multiple."""
    m = size_multiple(cfg)
    try:
        T, H, W = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"bad {flag} {text}: must be TxHxW in pixels, e.g. 14x448x768") from None
    if min(T, H, W) < 1 or H % m or W % m:
        raise UserError(f"bad {flag} {text}: frames >= 1 and height, width positive multiples of {m} (the model's "
                        f"size multiple); e.g. 14x448x768")
    return T, H, W


def main(argv=None):
    """CLI entry: a bad flag is one line `error: <what>; <fix>` (exit 2); Ctrl-C one line (exit 130)."""
    args = parse_args(argv)
    try:
        check_args(args)
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; bench.py writes no files, nothing was lost", file=sys.stderr)
        return 130
    return 0


def run(args):
    if args.child:
        T, H, W = map(int, args.child_shape.split("x"))
        return child(args.child, args.child_preset, T, H, W, args.device, args.child_dtype, args.iters,
                     args.child_profile)
    if args.sample:
        return sample_main(args)
    if args.train_memory:
        return train_memory(args.memory_config, args.memory_shape, args.device, args.train_flags.split())
    if args.simulate:
        return simulate_main(args)
    if args.fit:
        return fit_main()
    unet_main(args)


# -----------------------------------------------------------------------------
# ---- simulator: FLOPs, GPU time bounds and peak memory at full SVD size, without a GPU (python bench.py --simulate)
#
# The real code (model.py's modules, SVD.condition, model.sample_latents, TemporalVAE.decode, train.Trainer.step) runs
# on fake tensors (FakeTensorMode: shapes and dtypes, no data, no arithmetic), under LiveTensorPeak (live storage
# bytes, and FLOPs by torch.utils.flop_counter's formulas). A fake CUDA device is not usable in a CPU-only PyTorch build
# (tensor indexing needs the CUDA device guard), so the fake tensors are CPU tensors and:
#   - model.py's modules run as they do on CUDA (plain nn.Conv2d/nn.Conv3d/nn.Linear, FeedForward on all tokens at
#     once): cpu_kernels is not applied, except in the validation row named "CPU code paths";
#   - bf16 autocast is PyTorch's CPU autocast (the same lower-precision op list for conv, linear, matmul and
#     attention as CUDA's, the same cache of bf16 weight copies); the Trainer's CUDA-only setting (amp on, frozen D
#     backbone in bf16) is applied after construction, as Trainer.__init__ does on CUDA;
#   - attention is one fused kernel: F.scaled_dot_product_attention runs the flash kernel (output + log-sum-exp, no
#     L x L matrix), FLOPs 4 L S d per head forward and 2.5x that backward (FlopCounterMode's SDPA formulas).
# Memory is live tensor bytes (torch.cuda.max_memory_allocated's measure): the CUDA context (~0.5 GiB), allocator
# fragmentation and kernel workspaces (cuDNN, cuBLAS) come on top. FLOPs are matmul/conv/attention FLOPs (2 per
# multiply-add); the time bound is FLOPs / peak, a lower bound (no kernel reaches peak; elementwise ops not counted).

import torch.nn.functional as F  # noqa: E402  (the simulator patches F.scaled_dot_product_attention)

GPU_PEAKS = (("H100", 989e12), ("A100", 312e12), ("RTX 4090", 165e12))    # dense bf16 tensor-core FLOP/s
GiB = 2 ** 30


def flop_formulas():
    """torch.utils.flop_counter's per-op FLOP formulas (what FlopCounterMode counts), plus the CPU flash-attention
    kernel's (it has them for the CUDA kernels only). Counted inside LiveTensorPeak: FlopCounterMode's module
    tracker keeps the autograd graph of module outputs alive, which would distort the memory measured beside it."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    return {**fc.flop_registry,
            aten._scaled_dot_product_flash_attention_for_cpu: fc.shape_wrapper(
                lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: fc.shape_wrapper(
                lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))}


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as one fused kernel: (out, logsumexp) only, never an L x L matrix."""
    if torch.is_autocast_enabled("cpu"):
        dt = torch.get_autocast_dtype("cpu")
        q, k, v = (t.to(dt) for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                      attn_mask=attn_mask, scale=scale)[0]


class Sim:
    """with Sim(fake, gpu_paths) as s: ... -> s.mem (LiveTensorPeak on CPU storages, counting FLOPs too).
    fake: FakeTensorMode (False: real tensors, for validation). gpu_paths: the fused attention of a GPU (False: the
    attention a real CPU run takes; the callers then also apply cpu_kernels to the networks they build)."""

    def __init__(self, fake=True, gpu_paths=True, snapshot=False):
        self.fake, self.gpu_paths, self.snapshot = fake, gpu_paths, snapshot

    def __enter__(self):
        import contextlib
        import model
        self.stack = st = contextlib.ExitStack()
        saved = (F.scaled_dot_product_attention, model.karras_sigmas)

        def restore():
            F.scaled_dot_product_attention, model.karras_sigmas = saved
        st.callback(restore)
        if self.gpu_paths:
            F.scaled_dot_product_attention = _fused_sdpa
        if self.fake:
            from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
            st.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            st.enter_context(warnings.catch_warnings())   # copy.deepcopy of a fake module (D's frozen backbone)
            warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")   # reads 0: clones
            karras = saved[1]

            def real_karras(*a, **kw):             # the sampler reads the levels as Python floats (.tolist())
                with unset_fake_temporarily():
                    return karras(*a, **kw)
            model.karras_sigmas = real_karras
            apply = nn.Module._apply
            nn.Module._apply = _apply_replacing
            st.callback(setattr, nn.Module, "_apply", apply)
        self.mem = st.enter_context(LiveTensorPeak("cpu", self.fake, self.snapshot, flop_formulas()))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)

    def total_flops(self):
        return self.mem.flops


def _apply_replacing(self, fn, recurse=True):
    """nn.Module._apply for fake tensors (module.to(...)): a converted parameter or buffer replaces the old one, where
    PyTorch's _apply would swap the tensors' contents, which fake tensors do not allow."""
    if recurse:
        for m in self.children():
            m._apply(fn)
    for n, p in self._parameters.items():
        if p is not None:
            with torch.no_grad():
                q = fn(p)
            if q is not p:
                self._parameters[n] = nn.Parameter(q, p.requires_grad)
    for n, b in self._buffers.items():
        if b is not None:
            self._buffers[n] = fn(b)
    return self


def _build(make, fake, dtype=None):
    """make() with random weights (real), or on the meta device with every parameter and buffer then replaced by a
    new tensor of the same shape (fake: allocated under the simulator's modes, so counted like real weights)."""
    if not fake:
        torch.manual_seed(0)
        m = make()
        return m.to(dtype) if dtype is not None else m
    with torch.device("meta"):
        m = make()
    for mod in m.modules():
        for n, p in mod._parameters.items():
            if p is not None:
                mod._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype), p.requires_grad)
        for n, b in mod._buffers.items():
            if b is not None:
                mod._buffers[n] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() and dtype else b.dtype)
    return m


def sim_unet_forward(cfg, T, h, w, dtype=torch.bfloat16, fake=True, gpu_paths=True):
    """One UNet forward (no grad), weights in dtype (gpu_paths=False: with cpu_kernels.apply). -> {flops, peak (bytes,
    weights included), act (peak above the weights and inputs)}."""
    import cpu_kernels
    from model import UNet
    with Sim(fake, gpu_paths) as s:
        net = _build(lambda: UNet(cfg.unet), fake, dtype).eval()
        if not gpu_paths:
            cpu_kernels.apply(net)
        x = torch.randn(1, T, cfg.unet.in_channels, h, w, dtype=dtype)
        c_noise = torch.tensor([0.25 * 6.55])
        emb = torch.randn(1, cfg.unet.context_dim, dtype=dtype)
        ids = torch.tensor([[6.0, 127.0, 0.02]], dtype=dtype)
        s.mem.reset_peak()
        base = s.mem.live
        with torch.no_grad():
            net(x, c_noise, emb, ids)
    return {"flops": s.total_flops(), "peak": s.mem.peak, "act": s.mem.peak - base}


def sim_sample(cfg, steps, chunks, dtype=torch.bfloat16):
    """The sampling stages (sample_stages) at cfg's size, all of SVD resident in dtype: SVD.condition (CLIP + cond
    encoder), SVD.sample (steps; CFG for steps > 1), TemporalVAE.decode with each chunk. -> {chunk: {flops, peak}}."""
    from model import SVD
    out = {}
    with Sim() as s, torch.no_grad():                                 # sampling runs without autograd
        svd = _build(lambda: SVD(cfg), True, dtype).eval()
        img = torch.rand(1, 3, cfg.height, cfg.width) * 2 - 1
        gens = [torch.Generator().manual_seed(23)]
        cond = svd.condition(img, gens)
        z = svd.sample(cond, gens, steps=steps)
        f1, p1 = s.total_flops(), s.mem.peak
        for c in chunks:
            s.mem.reset_peak()
            f = s.total_flops()
            video = svd.vae.decode(z.to(dtype), chunk=c)[0]
            video = ((video.float() + 1) / 2).clamp(0, 1)
            del video
            out[c] = {"flops": f1 + s.total_flops() - f, "peak": max(p1, s.mem.peak), "peak_sampling": p1}
    return out


def _train_args(ckpt, bf16, fused, bf16_state=False):
    import train
    args = train.parse_args(["--device", "cpu", "--grad-ckpt" if ckpt else "--no-grad-ckpt",
                             "--bf16" if bf16 else "--no-bf16", "--r1", "fd"]
                            + (["--fused-step", "--grad-clip", "0"] if fused else [])
                            + (["--optim-state-dtype", "bf16"] if bf16_state else []))
    args.mode = "sfv"
    return args


def sim_train(cfg, T, H, W, ckpt=True, bf16=True, ema_cpu=False, fused=False, bf16_state=False, log_terms=False,
              sample_chunks=(), fake=True, gpu_paths=True):
    """One SF-V step of train.Trainer (batch 1, cached latents: VAE/CLIP not resident, as train.py --bench-memory) at
    T x H x W: two steps, the second measured (the optimiser state exists). Memory options, train.py's own flags:
      ema_cpu: --ema-device cpu (the fake run is on the CPU, so the EMA's storage is excluded from the count here;
             the per-step host transfer is not modelled);
      fused: --fused-step --grad-clip 0 (each weight stepped in its post-accumulate-grad hook, its gradient freed);
      bf16_state: --optim-state-dtype bf16 (the SM3 momentum held in bf16);
      sample_chunks: then also the training run's sample videos for each chunk (train.py save_samples: num_samples
             videos, one step of the EMA, the VAE moved to the GPU in bf16, decoded `chunk` frames at a time).
    -> {flops (of the step), peak, base (live before it), breakdown {label: bytes}, sample_peak {chunk: bytes}}."""
    import train
    from model import SVD, UNet, TemporalVAE, sample_latents
    args = _train_args(ckpt, bf16, fused, bf16_state)
    h, w = H // 8, W // 8
    res = {}
    with Sim(fake, gpu_paths, snapshot=True) as s:
        with torch.device("meta"):
            svd = SVD(cfg)                                            # VAE/CLIP never resident (cached latents)
        svd.unet = _build(lambda: UNet(cfg.unet), fake)
        if not gpu_paths:                                             # the CPU run's modules
            import cpu_kernels
            cpu_kernels.apply(svd.unet)
        tr = train.Trainer(args, svd, torch.device("cpu"))
        if bf16 and gpu_paths:                                        # Trainer.__init__ on CUDA
            tr.amp = True
            tr.D.backbone.to(torch.bfloat16)
        G = list(tr.G.parameters())
        s.mem.weight_keys = {p.untyped_storage()._cdata for p in G}
        if ema_cpu:
            s.mem.exclude([*tr.ema.parameters(), *tr.ema.buffers()], "EMA (on the host)")

        def hook(p):                                                  # runs after the Trainer's own (fused) hook
            if p.grad is not None:
                s.mem.relabel([p.grad], "G gradients")
        for p in G:
            p.register_post_accumulate_grad_hook(hook)
        batch = {"latents": torch.randn(1, T, 4, h, w), "cond": torch.randn(1, 4, h, w),
                 "image_embeds": torch.randn(1, cfg.unet.context_dim), "keys": [0]}
        tr.step([batch])                                              # the optimiser state of a running job
        states = [tr.opt_g.state]
        s.mem.reset_peak()
        base, f0 = s.mem.live, s.total_flops()
        tr.step([batch], log_terms=log_terms)
        res.update(flops=s.total_flops() - f0, peak=s.mem.peak, base=base)
        s.mem.relabel(G, "G weights")
        if not ema_cpu:
            s.mem.relabel([*tr.ema.parameters(), *tr.ema.buffers()], "EMA")
        s.mem.relabel([t for state in states for st in state.values() for t in st.values()
                       if isinstance(t, torch.Tensor)], "G optimiser state")
        s.mem.relabel(list(tr.D.backbone.parameters()), "D backbone (frozen)")
        s.mem.relabel(tr.D.head_parameters() + [t for st in tr.opt_d.state.values() for t in st.values()
                                                if isinstance(t, torch.Tensor)], "D heads + optimiser")
        res["breakdown"] = s.mem.breakdown()
        res["sample_peak"] = {}
        B = args.num_samples
        dt = torch.bfloat16 if bf16 and gpu_paths else torch.float32
        for c in sample_chunks:
            s.mem.reset_peak()
            cond = {"cond_latent": torch.randn(B, 4, h, w), "image_embeds": torch.randn(B, cfg.unet.context_dim),
                    "added_time_ids": tr.ids.expand(B, -1)}
            gens = [torch.Generator().manual_seed(1000 + i) for i in range(B)]
            ema = tr.ema if not ema_cpu else _build(lambda: UNet(cfg.unet), fake, dt)   # a bf16 copy visits the GPU
            ema.eval()
            with torch.no_grad(), tr.autocast():
                z = sample_latents(ema, cond, T, gens, 1, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                                   rho=args.rho)
            del ema
            vae = _build(lambda: TemporalVAE(cfg.vae), fake, dt)                         # svd.vae.to(device, bf16)
            with torch.no_grad():
                video = vae.decode(z.to(dt), chunk=c)
            del video, vae, z
            res["sample_peak"][c] = s.mem.peak
    return res


def validate():
    """The simulator against real runs at shapes a CPU can run: each case once on fake tensors and once on real ones
    (random weights), both in the simulator's configuration (model.py's GPU code paths, fused attention, bf16 autocast
    for training; CPU autocast computes for real here). Compared: the peak above what is resident before the measured
    forward/step (weights, inputs, optimiser state), the part a simulation could get wrong, and the total peak.
    -> [(case, simulated, measured, error)] for the above-resident peak."""
    from model import CONFIGS
    medium = sample_configs()["medium"]
    cases = [("UNet forward, tiny, 14x16x16 fp32", lambda f: sim_unet_forward(CONFIGS["tiny"], 14, 16, 16, torch.float32, f)),
             ("UNet forward, SVD widths, 14x16x16 fp32",
              lambda f: sim_unet_forward(CONFIGS["svd"], 14, 16, 16, torch.float32, f)),
             ("UNet forward, SVD widths, 14x16x16 fp32, CPU code paths",
              lambda f: sim_unet_forward(CONFIGS["svd"], 14, 16, 16, torch.float32, f, gpu_paths=False)),
             ("SF-V step, tiny, 14x128x128, bf16 autocast", lambda f: sim_train(CONFIGS["tiny"], 14, 128, 128, fake=f)),
             ("SF-V step, SVD structure at 1/5 width, 14x128x128, bf16 autocast",
              lambda f: sim_train(medium, 14, 128, 128, fake=f))]
    print("validation: simulated (fake tensors) vs measured (real CPU run, LiveTensorPeak); peak above the resident "
          "weights/state, and total\n(a training step at the SVD widths needs ~26 GB of weights and optimiser state, "
          "more than this machine: the 1/5-width SVD structure stands in)")
    out = []
    for name, run in cases:
        sim, real = run(True), run(False)
        key = "act" if "act" in sim else None
        s_a, r_a = (sim["act"], real["act"]) if key else (sim["peak"] - sim["base"], real["peak"] - real["base"])
        err = abs(s_a - r_a) / r_a
        err_t = abs(sim["peak"] - real["peak"]) / real["peak"]
        out.append((name, s_a, r_a, err))
        print(f"  {name:<68} above resident: sim {s_a / 2**20:8.1f} MB, real {r_a / 2**20:8.1f} MB, error "
              f"{100 * err:4.1f}%   total: sim {sim['peak'] / 2**20:8.1f} MB, real {real['peak'] / 2**20:8.1f} MB, "
              f"error {100 * err_t:4.1f}%", flush=True)
    print(f"validated: largest error {100 * max(e for *_, e in out):.0f}% (simulated vs measured live-tensor peak, "
          f"{len(out)} cases). Both sides count tensors: kernel workspaces that are not tensors (oneDNN's per-call "
          f"re-layout of a conv weight on CPU, up to 2x the weight; cuDNN/cuBLAS workspaces on GPU) are outside both.")
    return out


def _gib(n):
    return f"{n / GiB:.1f} GiB"


def _bounds(flops):
    return "".join(f"{flops / peak * 1e3:>11.0f} ms" for _, peak in GPU_PEAKS)



CARDS = [("24 GB", 23), ("40 GB", 39), ("80 GB", 79)]     # usable GiB: train.py's default leaves 1 GiB for CUDA itself
FIT_SHAPES = [(14, 448, 768), (25, 448, 768), (14, 576, 1024), (25, 576, 1024)]
FIT_OPTIONS = [("train.py defaults", []),
               ("+ --fused-step --grad-clip 0 --optim-state-dtype bf16", ["--fused-step", "--grad-clip", "0",
                                                                          "--optim-state-dtype", "bf16"])]


def fit_main():
    """Will it fit? train.py's memory plan (exact state bytes, simulator-fitted activations) for one SF-V step of the
    SVD UNet, batch 1, checkpointing on, bf16, per card and option set; `python bench.py --fit`."""
    import memory_plan
    import train
    from model import CONFIGS
    print("Will it fit? One SF-V training step, SVD UNet, batch 1, bf16 autocast, checkpointing on, EMA on the host "
          "(train.py's memory plan:\nexact weight/EMA/optimiser/gradient bytes + activations fitted to bench.py "
          "--simulate). Peak GiB; 'yes' if <= the card's usable memory (its size - 1 GiB).")
    print(f"{'options':<56}{'frames x H x W':>16}{'peak':>10}" + "".join(f"{n:>8}" for n, _ in CARDS))
    for name, flags in FIT_OPTIONS:
        args = train.parse_args(flags + ["--max-memory", "80"])        # any limit: only the peak is read
        for T, H, W in FIT_SHAPES:
            peak = memory_plan.memory_plan(args, CONFIGS["svd"], T, H, W, torch.device("cuda"))["peak"] / GiB
            print(f"{name:<56}{f'{T}x{H}x{W}':>16}{peak:>6.1f} GiB" + "".join(f"{'yes' if peak <= c else 'no':>8}"
                                                                              for _, c in CARDS))


def simulate_main(args):
    from model import CONFIGS
    import warnings
    # torch asks a FakeTensor for its data pointer in one of its own checks and warns about it; nothing here uses it
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
    cfg = CONFIGS["svd"]
    t_start = time.time()
    print(f"Simulated at full SVD size (model.CONFIGS['svd']), batch 1, torch {torch.__version__}: the real code on fake "
          "tensors (no GPU).\nAssumptions: bf16 weights for inference; bf16 autocast for training, emulated with "
          "PyTorch's CPU autocast\n(fake CUDA tensors need a CUDA build); model.py's CUDA code paths (native conv, "
          "unchunked FeedForward);\nattention as one fused kernel (no L x L matrix). Peak = live tensor bytes, "
          "CUDA context and allocator\nfragmentation not included. Time bound = matmul/conv/attention FLOPs / dense "
          "bf16 peak (a lower bound).")
    hdr = (f"{'row':<66}{'TFLOP':>8}" + "".join(f"{n + ' @' + format(p / 1e12, '.0f'):>14}" for n, p in GPU_PEAKS)
           + f"{'peak memory':>13}")
    print(hdr)
    rows = []

    def row(name, flops, peak):
        rows.append((name, flops, peak))
        f = f"{flops / 1e12:>8.1f}{_bounds(flops)}" if flops else f"{'-':>8}" + "".join(f"{'-':>14}" for _ in GPU_PEAKS)
        print(f"{name:<66}{f}{_gib(peak):>13}", flush=True)

    for T in (14, 25):
        r = sim_unet_forward(cfg, T, 72, 128)
        row(f"UNet forward {T}x72x128 (576x1024 video)", r["flops"], r["peak"])
    for steps in (1, 25):
        res = sim_sample(cfg, steps, (14, 4, 2))
        for c, r in res.items():
            what = "1 step (SF-V)" if steps == 1 else f"{steps} steps, CFG (SVD)"
            row(f"sample 14x576x1024, {what}, decode chunk {c}", r["flops"], r["peak"])
    if not args.sim_no_train:
        opts24 = dict(ema_cpu=True, fused=True, bf16_state=True)
        runs = {}
        for shape, name, kw in [
                ("14x448x768", "EMA on the GPU (--ema-device same)", {}),
                ("14x448x768", "EMA on the GPU, checkpointing off", dict(ckpt=False)),
                ("14x448x768", "EMA on the GPU, a step logging term grads", dict(log_terms=True)),
                ("14x448x768", "train.py defaults (EMA on the host)", dict(ema_cpu=True)),
                ("14x448x768", "defaults + --fused-step --grad-clip 0", dict(ema_cpu=True, fused=True)),
                ("14x448x768", "... + --optim-state-dtype bf16", dict(opts24, sample_chunks=(14, 2))),
                ("14x576x1024", "train.py defaults (EMA on the host)", dict(ema_cpu=True)),
                ("14x576x1024", "... + --fused-step --grad-clip 0 --optim-state-dtype bf16", dict(opts24, sample_chunks=(14, 2)))]:
            T, H, W = map(int, shape.split("x"))
            r = runs[shape, name] = sim_train(cfg, T, H, W, **kw)
            row(f"SF-V step {shape}, {name}", r["flops"], r["peak"])
            for c, pk in r["sample_peak"].items():
                row(f"  + sample videos (2, 1 step, decode chunk {c})", 0, pk)
        print("\nSF-V step 14x448x768, batch 1, bf16 autocast, checkpointing on: what is live at the peak (GiB; train.py's "
              "flags, the host EMA left out of the count)")
        labels = ["G weights", "EMA", "G optimiser state", "G gradients", "autocast weight copies",
                  "D backbone (frozen)", "D heads + optimiser", "activations and temporaries"]
        short = ["G weights", "EMA", "G opt state", "G grads", "autocast cp", "D backbone", "D heads+opt", "activations"]
        print(f"{'options':<50}" + "".join(f"{l:>12}" for l in short) + f"{'peak':>11}")
        for (shape, name), r in runs.items():
            if shape == "14x448x768" and "checkpointing off" not in name:
                b = r["breakdown"]
                print(f"{name:<50}" + "".join(f"{b.get(l, 0) / GiB:>12.2f}" for l in labels) + f"{_gib(r['peak']):>11}")
        print("EMA on the host: its update then copies each G weight to the host every step (not modelled). Fused step: "
              "each parameter's\noptimiser step runs in its post-accumulate-grad hook and frees the gradient, so "
              "gradients never coexist; it excludes\ngradient accumulation and global-norm clipping. "
              "bf16 optimiser state: the SM3 momentum in bf16.")
    if not args.sim_no_validate:
        validate()
    print(f"({time.time() - t_start:.0f} s)")
    return rows


if __name__ == "__main__":
    sys.exit(main())
