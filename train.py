"""
SF-V training (Zhang et al., NeurIPS 2024): fine-tune the SVD UNet into a single-step image-to-video generator by
adversarial training against a discriminator made of the frozen SVD UNet encoder plus trainable spatial and temporal
heads (discriminator.py). Also plain SVD-style diffusion training (--mode diffusion: stage 1 of the toy run).

    python train.py --init tiny --data synthetic --max-steps 200                     # toy run on CPU
    python train.py --init svd_xt.safetensors --data /videos --cache /cache/latents   # one GPU
    torchrun --nproc_per_node=8 train.py --init svd_xt.safetensors --data /videos ... # data parallel
    python train.py ... --resume                                  # continue from <out>/train_state.pt

The objective (SF-V sec. 3.3), x0 a clean video latent, eps and eps' ~ N(0, I), D_G the SVD-preconditioned UNet:
  generator:     sigma ~ uniform over the 3 largest levels of a 4-level Karras grid; x0_hat = D_G(x0 + sigma eps, sigma)
                 (one evaluation, with the image/CLIP/vector conditioning, no CFG)
  discriminator: sigma' ~ lognormal (P_mean -1, P_std 1) snapped to a 1000-level Karras grid; real and fake get the
                 SAME noise:  x' = x0 + sigma' eps',  x0_hat' = x0_hat + sigma' eps'
  L_D = E max(0, 1 - D(x')) + E max(0, 1 + D(x0_hat')) + gamma R1(x')                  (hinge; x0_hat detached)
  L_G = -E D(x0_hat') + 0.1 pseudo-Huber(x0_hat, x0),     pseudo-Huber(a, b) = sqrt(||a - b||^2 + c^2) - c
The paper leaves gamma, R1's variable and c open: R1 here is the squared gradient w.r.t. the heads' input features
(the backbone is frozen; discriminator.r1_penalty), or with --r1 approx Seaweed-APT's approximation on D's input,
(D(x') - D(x' + s n))^2 (discriminator.r1_approx_penalty); gamma 0.05, c 0.001 (OSV's). SF-V trains at 448x768
(sec. 4), the default for SVD-sized models here. Every number is a flag (the table at the end of this file). One
iteration (Trainer.step) draws each micro-batch's noise once; one G forward makes the fakes that the D step reuses,
detached (as in ADD, Sauer et al. 2023).

Every random number of a training sample comes from a generator seeded by (seed, step, global slot in the batch) and
the data order is a per-epoch permutation of (seed, epoch): resume is exact, and N processes with batch b give the same
result as one with batch N*b (gradients all-reduced once per optimiser step; not nn.parallel.DDP, since G and D
alternate and R1 differentiates a forward-mode derivative).
"""
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

import cli
import cpu_kernels
import load_svd
from cli import UserError, atomic_write, write_json
from discriminator import Discriminator, hinge_d_loss, hinge_g_loss, r1_approx_penalty, r1_penalty, score
from data import (VIDEO_EXTS, ItemDataset, LatentCache, StepBatches, SyntheticVideos, VideoFolder, build_cache,
                  check_cache, collate, encode_videos, move_frozen, sample_seed, write_video)
from distributed import all_reduce_mean, barrier, broadcast_from_rank0, dist_setup
from memory_plan import MemoryOptions, check_plan, copy_module, format_plan, memory_plan, peak_memory_gb
from model import (CONFIGS, SVD, SVDConfig, added_time_ids, denoise, karras_sigmas, latent_factor, sample_latents,
                   size_multiple)
from run_folder import load_resume, prepare_out, probe_data, read_state, record_unreadable, unlock

# -----------------------------------------------------------------------------
# noise levels (SF-V sec. 3.3)


def generator_levels(levels=4, sigma_min=0.002, sigma_max=700.0, rho=7.0):
    """The generator's noise levels: the `levels`-level Karras grid without its smallest level, descending.
    With the SVD defaults: (700.0, 70.54, 2.269). -> (levels - 1,)"""
    return karras_sigmas(levels, sigma_min, sigma_max, rho)[:-2]     # without the trailing 0 and sigma_min


def sample_generator_sigma(n, generator=None, levels=4, sigma_min=0.002, sigma_max=700.0, rho=7.0):
    """Generator noise level: uniform over generator_levels. -> (n,)"""
    grid = generator_levels(levels, sigma_min, sigma_max, rho)
    return grid[torch.randint(0, len(grid), (n,), generator=generator)]


def sample_disc_sigma(n, generator=None, p_mean=-1.0, p_std=1.0, levels=1000, sigma_min=0.002, sigma_max=700.0, rho=7.0):
    """Discriminator noise level sigma': log sigma' ~ N(p_mean, p_std^2), snapped to the nearest level (in log
    space) of a `levels`-level Karras grid: a discretised lognormal. -> (n,)"""
    grid = karras_sigmas(levels, sigma_min, sigma_max, rho)[:-1]
    log_s = p_mean + p_std * torch.randn(n, generator=generator)
    return grid[(log_s[:, None] - grid.log()[None]).abs().argmin(1)]

# -----------------------------------------------------------------------------
# losses (SF-V sec. 3.3): x0 (B, T, 4, h, w) clean latents, cond (B, 4, h, w) cond latent, emb (B, D) CLIP image
# embedding, ids (B, 3) added_time_ids, nz the micro-batch's noise (Trainer.noise). Each returns (loss, {metric: scalar
# tensor}, ...)


def pseudo_huber(x, y, c, form="norm"):
    """Pseudo-Huber reconstruction distance per sample, averaged over the batch.
    norm: sqrt(||x - y||^2 + c^2) - c, the paper's form (as in iCT).
    mean: sqrt(mean (x - y)^2 + c^2) - c, i.e. the norm form with c' = c sqrt(dim) divided by sqrt(dim)."""
    d = (x.float() - y.float()).flatten(1).square()
    d = d.sum(1) if form == "norm" else d.mean(1)
    return ((d + c * c).sqrt() - c).mean()


def sfv_generator_loss(G, D, x0, cond, emb, ids, nz, args):
    """SF-V generator loss (Zhang et al. 2024, sec. 3.3): x0_hat = D_G(x0 + s eps, s) in one evaluation, then
    L_G = -mean D(x0_hat + s' eps') + recon_weight * pseudo-Huber(x0_hat, x0). -> (L_G, terms, x0_hat (B,T,4,h,w))"""
    B = x0.shape[0]
    s, sd = nz["s_g"], nz["s_d"]
    x0_hat = denoise(G, x0 + s.view(B, 1, 1, 1, 1) * nz["eps"], s, cond, emb, ids).float()
    adv = hinge_g_loss(D(x0_hat + sd.view(B, 1, 1, 1, 1) * nz["eps_d"], sd, cond, emb, ids))
    rec = pseudo_huber(x0_hat, x0, args.huber_c, args.huber_form)
    loss = adv + args.recon_weight * rec
    return loss, {"loss_g": loss, "adv_g": adv, "recon": rec}, x0_hat


def discriminator_loss(D, x0, fake, cond, emb, ids, nz, r1_dirs, args, amp=False):
    """SF-V discriminator loss (Zhang et al. 2024, sec. 3.3): real x0 and the generator's detached `fake` noised
    with the SAME s' and eps'; L_D = hinge(real, fake) + r1_gamma * R1(real). The frozen backbone runs without a graph
    (under bf16 autocast if amp); the heads run in fp32. r1_dirs(tensors) -> unit normal directions shaped like each
    (per sample): over the heads' input features (exact, fd) or over D's input x' (approx: one more backbone forward,
    of x' + r1_approx_std n). -> (L_D + gamma R1, metrics)"""
    T = x0.shape[1]
    s = nz["s_d"]
    sd = s.view(-1, 1, 1, 1, 1)
    x_real = x0 + sd * nz["eps_d"]                                              # (B, T, 4, h, w) fp32
    with torch.no_grad(), torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=amp):
        f_real = D.features(x_real, s, cond, emb, ids)
        f_fake = D.features(fake + sd * nz["eps_d"], s, cond, emb, ids)
        if args.r1 == "approx":
            f_pert = D.features(x_real + args.r1_approx_std * r1_dirs([x_real])[0], s, cond, emb, ids)
    c = D.condition(emb, s, T)
    if args.r1 == "approx":
        r1, logits_r = r1_approx_penalty(D, f_real, f_pert, c)
    else:
        r1, logits_r = r1_penalty(D, f_real, c, r1_dirs(f_real) if args.r1 != "off" else None, args.r1,
                                  args.r1_fd_eps)
    logits_f = D.heads(f_fake, c)
    ld = hinge_d_loss(logits_r, logits_f)
    return ld + args.r1_gamma * r1, {"loss_d": ld, "r1": r1, "d_real": score(logits_r).mean(),
                                     "d_fake": score(logits_f).mean()}


def diffusion_loss(G, x0, cond, emb, ids, nz, args):
    """Plain diffusion training as SVD does it (Blattmann et al. 2023) in the EDM framework (Karras et al. 2022, sec. 5,
    Table 1): log s ~ N(train_p_mean, train_p_std^2), the image conditioning dropped with probability cond_drop (for
    CFG), loss weight (s^2 + 1) / s^2 (EDM's lambda with sigma_data = 1). -> (loss, {"loss"}, x0_hat)"""
    B = x0.shape[0]
    s = nz["s_g"]
    keep = 1 - nz["drop"]                                                   # (B,)
    emb, cond = emb * keep.view(B, 1), cond * keep.view(B, 1, 1, 1)
    x0_hat = denoise(G, x0 + s.view(B, 1, 1, 1, 1) * nz["eps"], s, cond, emb, ids).float()
    w = (s ** 2 + 1) / s ** 2
    loss = (w * (x0_hat - x0).square().flatten(1).mean(1)).mean()
    return loss, {"loss": loss}, x0_hat

# -----------------------------------------------------------------------------
# SM3 optimiser (Anil et al. 2019, SM3-II)


class SM3(torch.optim.Optimizer):
    """SM3-II (Anil et al. 2019): per tensor of shape (n_1..n_k) one accumulator per dimension, mu_r (n_r,) (O(sum n_i)
    memory; 0/1-D tensors: one per element). With nu_min = min_r mu_r[i_r] (the cover's minimum):
      plain (the reference update): nu = nu_min + g^2 (beta2 = 0, SM3-II: mu_r = max of nu over the other dims), or
            nu = beta2 nu_min + (1 - beta2) g^2 (beta2 > 0, the EMA of the reference ports: mu_r = max(mu_r, that max));
            u = g / sqrt(nu + eps).
      debiased: nu as above, mu_r = max of nu over the other dims (may shrink), u = g / sqrt(nu / (1 - beta2^t) + eps)
            (Adam's bias correction).
    Then momentum m = beta1 m + (1 - beta1) u (a full-size buffer, stored in state_dtype: bf16 halves it; the update
    is computed in fp32 and uses the unrounded m), p -= lr (m + weight_decay p).
    eps = 1e-16 under the square root (the reference uses 1e-30) keeps gradients that are pure rounding noise (e.g. a
    bias whose hinge terms cancel) from taking full-size sign steps."""

    def __init__(self, params, lr=1e-3, betas=(0.5, 0.999), eps=1e-16, weight_decay=0.0, variant="plain",
                 state_dtype=torch.float32):
        if variant not in ("plain", "debiased"):
            raise ValueError(f"unknown SM3 variant {variant!r} (plain | debiased)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, variant=variant))
        self.state_dtype = state_dtype

    def load_state_dict(self, state_dict):
        """torch.optim casts loaded state to each parameter's dtype; the momentum goes back to state_dtype."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            if "momentum" in st:
                st["momentum"] = st["momentum"].to(self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            plain = group["variant"] == "plain"
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    shapes = [g.shape] if g.ndim <= 1 else \
                        [tuple(n if d == r else 1 for d, n in enumerate(g.shape)) for r in range(g.ndim)]
                    for r, s in enumerate(shapes):
                        st[f"acc{r}"] = torch.zeros(s, dtype=torch.float32, device=p.device)
                if beta1 > 0 and "momentum" not in st:                  # also after a resume that turned beta1 on
                    st["momentum"] = torch.zeros_like(g, dtype=self.state_dtype)
                st["step"] += 1
                accs = [st[f"acc{r}"] for r in range(max(1, g.ndim))]
                nu = accs[0]
                for a in accs[1:]:
                    nu = torch.minimum(nu, a)                               # broadcast: min over the cover
                nu = beta2 * nu + (1 - beta2) * g.square() if beta2 > 0 else nu + g.square()
                for r, a in enumerate(accs):
                    new = nu if g.ndim <= 1 else nu.amax(dim=[d for d in range(g.ndim) if d != r], keepdim=True)
                    a.copy_(torch.maximum(a, new) if plain and beta2 > 0 else new)
                denom = nu if plain or beta2 == 0 else nu / (1 - beta2 ** st["step"].item())
                u = g / (denom + group["eps"]).sqrt()
                if beta1 > 0:
                    m = st["momentum"]
                    if m.dtype == torch.float32:
                        u = m.mul_(beta1).add_(u, alpha=1 - beta1)
                    else:                                                   # fp32 math, rounded storage
                        u = m.float().mul_(beta1).add_(u, alpha=1 - beta1)
                        m.copy_(u)
                if group["weight_decay"]:
                    u = u + group["weight_decay"] * p.float()
                p.add_(u.to(p.dtype), alpha=-group["lr"])


STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_optimizer(args, params, lr):
    if args.optimizer == "sm3":
        return SM3(params, lr=lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay,
                   variant=args.sm3_variant, state_dtype=STATE_DTYPES[args.optim_state_dtype])
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    raise ValueError(f"unknown --optimizer {args.optimizer!r} (sm3 | adamw)")

# -----------------------------------------------------------------------------
# the trainer: one iteration = the G step, then the D step (SF-V sec. 3.3)


class Trainer(MemoryOptions):
    """Holds G (svd.unet), its EMA, D (sfv mode) and the optimisers; step() runs one optimiser step on a list of
    micro-batches (dicts with latents (B,T,4,h,w), cond (B,4,h,w), image_embeds (B,D), keys). The memory options of
    the G step (--fused-step, per-term gradient norms) are inherited: memory_plan.MemoryOptions."""

    def __init__(self, args, svd, device, rank=0, world=1):
        self.args, self.svd, self.device, self.rank, self.world = args, svd, device, rank, world
        self.amp = args.bf16 and device.type == "cuda"
        self.G = svd.unet.to(device).train()
        self.G.gradient_checkpointing = args.grad_ckpt
        self.D = None
        if args.mode == "sfv":
            self.D = Discriminator(self.G, args.disc_heads, args.head_channels, args.cmap_dim, args.cond_embed_dim,
                                   args.disc_tap).to(device)
            if self.amp:
                self.D.backbone.to(torch.bfloat16)
            self.D.backbone.gradient_checkpointing = args.grad_ckpt
            self.D.train()
            self.opt_d = make_optimizer(args, self.D.head_parameters(), args.lr_d)
        host = device.type == "cuda" and args.ema_device == "cpu"        # --ema-device: the EMA in host memory
        self.ema = copy_module(self.G, "cpu") if host else copy.deepcopy(self.G)
        self.ema.requires_grad_(False).eval()
        self.opt_g = make_optimizer(args, self.G.parameters(), args.lr_g)
        self._fused = None                         # --fused-step: the running squared gradient norms during a backward
        if args.fused_step:                        # each G weight steps inside the backward (MemoryOptions)
            for p in self.G.parameters():
                p.register_post_accumulate_grad_hook(self._fused_hook)
        self.step_num, self.skipped_run = 0, 0
        self.ids = added_time_ids(args.fps - 1, args.motion_bucket_id, args.cond_aug, device=device)

    def step(self, micros, log_terms=False):
        """One iteration: the noise of every micro-batch (drawn once, shared by both steps), the G step, then (sfv)
        the D step on the G step's fakes. Returns rank-averaged metrics."""
        noises = [self.noise(self.step_num, mb["keys"], mb["latents"].shape[1:]) for mb in micros]
        m, fakes = self.g_step(micros, noises, log_terms)
        if self.D is not None:
            m.update(self.d_step(micros, noises, fakes))
        self.step_num += 1
        # global metrics: average over ranks (gradient norms are global already)
        keys = sorted(k for k in m if not k.startswith(("lr_", "grad_norm")))
        t = torch.tensor([m[k] for k in keys], dtype=torch.float64, device=self.device)
        all_reduce_mean([t], self.world)
        m.update(zip(keys, t.tolist()))
        if "r1" in m:
            r = self.args.r1_gamma * m["r1"]
            m["r1_share"] = r / (m["loss_d"] + r) if m["loss_d"] + r > 0 else 0.0   # gamma R1 / L_D
        return m

    def noise(self, step, keys, shape):
        """The noise of one micro-batch, drawn once per step and shared by its G and D step: sfv: s_g, s_d (B,), eps,
        eps_d (B, *shape); diffusion: s_g, drop (B,), eps. Sample k's values depend only on (seed, step, k)."""
        a = self.args
        out = {n: [] for n in ("s_g", "s_d", "eps", "eps_d", "drop")}
        for k in keys:
            g = torch.Generator().manual_seed(sample_seed(a.seed, step, k, 3))
            if a.mode == "sfv":
                out["s_g"].append(sample_generator_sigma(1, g, a.gen_levels, a.sigma_min, a.sigma_max, a.rho))
                out["s_d"].append(sample_disc_sigma(1, g, a.p_mean, abs(a.p_std), a.disc_levels, a.sigma_min,
                                                    a.sigma_max, a.rho))        # the paper writes P_std = -1
            else:
                log_s = a.train_p_mean + a.train_p_std * torch.randn(1, generator=g)
                high = math.log(2.0) + (math.log(a.sigma_max) - math.log(2.0)) * torch.rand(1, generator=g)
                out["s_g"].append(torch.where(torch.rand(1, generator=g) < a.high_sigma_frac, high, log_s).exp())
                out["drop"].append((torch.rand(1, generator=g) < a.cond_drop).float())
            out["eps"].append(torch.randn(shape, generator=g))
            if a.mode == "sfv":
                out["eps_d"].append(torch.randn(shape, generator=g))
        return {n: torch.stack(v).to(self.device).squeeze(-1) if n in ("s_g", "s_d", "drop")
                else torch.stack(v).to(self.device) for n, v in out.items() if v}

    def g_step(self, micros, noises, log_terms=False):
        """Generator step on the mode's objective (sfv_generator_loss: D frozen, its gradient reaches x0_hat only;
        diffusion_loss), the gradient averaged over the micro-batches; then the EMA. noises: one Trainer.noise per
        micro-batch. log_terms (sfv): also the gradient norms of the adversarial and the weighted recon term (both,
        and --fused-step, run by MemoryOptions). -> (metrics, detached x0_hat per micro-batch)"""
        a, n = self.args, len(micros)
        if self.D is not None:
            self.D.requires_grad_(False)
        opts = self._memory_begin(log_terms, n)                        # None: the plain step
        m, fakes = {}, []
        for mb, nz in zip(micros, noises):
            x0, cond, emb, ids = self.inputs(mb)
            with self.autocast():
                if self.D is not None:
                    loss, logs, x0_hat = sfv_generator_loss(self.G, self.D, x0, cond, emb, ids, nz, a)
                else:
                    loss, logs, x0_hat = diffusion_loss(self.G, x0, cond, emb, ids, nz, a)
            for k, v in logs.items():
                m[k] = m.get(k, 0.0) + v.item() / n
            if self.D is not None:
                fakes.append(x0_hat.detach())                          # the D step's fakes: no second G forward
            if opts is None:
                (loss / n).backward()
            else:
                self._memory_backward(opts, loss, logs, n)
        params = list(self.G.parameters())
        norms = self._finish(self.opt_g, params, self.lr(a.lr_g)) if opts is None else self._memory_end(opts)
        m.update({"grad_norm_g" + k: v for k, v in norms.items()})
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), params):
                e.lerp_(p.detach().to(e.device, e.dtype), 1 - a.ema)     # --ema-device cpu: a copy to the host
        m["lr_g"] = self.lr(a.lr_g)
        return m, fakes

    def d_step(self, micros, noises, fakes):
        """Discriminator step on the heads (discriminator_loss) with the G step's noises and fakes; the generator is
        not touched. Returns metrics."""
        a, n_micro = self.args, len(micros)
        m = {}
        for p in self.D.head_parameters():
            p.requires_grad_(True)
        for mb, nz, fake in zip(micros, noises, fakes):
            x0, cond, emb, ids = self.inputs(mb)
            r1_dirs = lambda feats: self.r1_noise(self.step_num, mb["keys"], feats)
            loss, logs = discriminator_loss(self.D, x0, fake, cond, emb, ids, nz, r1_dirs, a, self.amp)
            (loss / n_micro).backward()
            for k, v in logs.items():
                m[k] = m.get(k, 0.0) + v.item() / n_micro
        m["grad_norm_d"] = self._finish(self.opt_d, self.D.head_parameters(), self.lr(a.lr_d))[""]
        m["lr_d"] = self.lr(a.lr_d)
        return m

    def _finish(self, opt, params, lr, reduced=False):
        """All-reduce the gradients (data parallel; unless `reduced` already), clip, step. -> {"": the global gradient
        norm before clipping}"""
        params = [p for p in params if p.grad is not None]
        if not reduced:
            all_reduce_mean([p.grad for p in params], self.world)
        norm = torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip if self.args.grad_clip > 0 else float("inf"))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"": norm.item()}

    def lr(self, base):
        """Linear warm-up over --warmup steps, then a cosine decay to lr_final * base at --lr-decay-steps."""
        a, t = self.args, self.step_num + 1
        if t <= a.warmup:
            return base * t / a.warmup
        u = min(1.0, (t - a.warmup) / max(1, (a.lr_decay_steps or a.max_steps) - a.warmup))
        return base * (a.lr_final + (1 - a.lr_final) * 0.5 * (1 + math.cos(math.pi * u)))

    def inputs(self, mb):
        """A micro-batch's latents (B,T,4,h,w) fp32, cond (B,4,h,w), image_embeds (B,D), added_time_ids (B,3)."""
        x0 = mb["latents"].to(self.device).float()
        return x0, mb["cond"].to(self.device), mb["image_embeds"].to(self.device), self.ids.expand(x0.shape[0], -1)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                              cache_enabled=self.args.autocast_cache)

    def r1_noise(self, step, keys, feats):
        """The R1 direction n ~ N(0, I) over the heads' input features, per sample. feats: per level (B, ...)."""
        gens = [torch.Generator().manual_seed(sample_seed(self.args.seed, step, k, 7)) for k in keys]
        return [torch.stack([torch.randn(f.shape[1:], generator=g) for g in gens]).to(self.device) for f in feats]

    # ---- the data-parallel start, checkpoints
    def broadcast_from_rank0(self):
        """Copy rank 0's G, EMA and D heads to every rank (fresh heads need not rely on identical RNG streams)."""
        ts = [*self.G.state_dict().values(), *self.ema.state_dict().values()]
        if self.D is not None:
            ts += list(self.D.head_state_dict().values())
        broadcast_from_rank0(ts, self.world, device=self.device)

    def state_dict(self):
        st = {"step": self.step_num, "unet": self.G.state_dict(), "ema": self.ema.state_dict(),
              "opt_g": self.opt_g.state_dict(), "rng_torch": torch.get_rng_state(), "skipped_run": self.skipped_run,
              "args": json.dumps(vars(self.args))}
        if self.D is not None:
            st["disc"], st["opt_d"] = self.D.head_state_dict(), self.opt_d.state_dict()
        return st

    def load_state_dict(self, st, optimizer_state=True):
        """The state of state_dict(). The optimisers keep this run's hyperparameters (lr, betas, weight decay, SM3
        variant: the flags), not the saved ones; optimizer_state=False starts them fresh (another --optimizer)."""
        self.step_num, self.skipped_run = int(st["step"]), int(st["skipped_run"])
        self.G.load_state_dict(st["unet"])
        self.ema.load_state_dict(st["ema"])
        opts = [(self.opt_g, st["opt_g"])]
        if self.D is not None:
            self.D.load_head_state_dict(st["disc"])
            opts.append((self.opt_d, st["opt_d"]))
        for opt, saved in opts if optimizer_state else ():
            opt.load_state_dict(saved)
            for group in opt.param_groups:
                group.update(opt.defaults)                             # this run's flags
        torch.set_rng_state(st["rng_torch"])

    def save(self, out, frames):
        """Atomic: train_state.pt (everything to resume) and model.safetensors (EMA generator in our bundle format).
        The bundle's config keeps the model's own sampling size (SVD: 576x1024, whatever the training size) and
        records the sampler and its noise grid: sfv: the student (steps=1, no CFG, refined at the trained generator
        levels), diffusion: Euler. torch.save's and safetensors' write failures (a full disk) raise OSError."""
        a, st = self.args, self.state_dict()
        svd, unet, cfg = self.svd, self.svd.unet, self.svd.cfg
        sampler = dict(sampler="student", steps=1, min_cfg=1.0, max_cfg=1.0, student_levels=tuple(
            generator_levels(a.gen_levels, a.sigma_min, a.sigma_max, a.rho).tolist())) if a.mode == "sfv" else \
            dict(sampler="euler", student_levels=())
        svd.unet = self.ema
        svd.cfg = replace(cfg, num_frames=frames, fps_id=a.fps - 1, motion_bucket_id=a.motion_bucket_id,
                          cond_aug=a.cond_aug, sigma_min=a.sigma_min, sigma_max=a.sigma_max, rho=a.rho, **sampler)
        try:
            atomic_write(os.path.join(out, "train_state.pt"), lambda tmp: torch.save(st, tmp))
            load_svd.save(svd, os.path.join(out, "model.safetensors"), {"train_step": self.step_num, "mode": a.mode})
        except (RuntimeError, SafetensorError) as e:                   # not OSErrors; the old files stay (atomic)
            if cli.oom_text(e) is not None:
                raise
            text = str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__
            raise OSError(f"the write failed: {text}") from None
        finally:
            svd.unet, svd.cfg = unet, cfg

# -----------------------------------------------------------------------------
# the training loop: batches, logging, checkpoints, sample videos


def train_loop(args, tr, svd, source, skipped_scan, frames, dtype_frozen, progress):
    """Optimiser steps from tr.step_num to --max-steps: batches from StepBatches, logging, checkpoints, samples.
    progress["step"] and progress["saved"] follow the run (for the line printed on Ctrl-C)."""
    master, world, device = tr.rank == 0, tr.world, tr.device
    sample_cond = sample_conditioning(args, svd, source, device) if args.sample_every > 0 and master else None
    sampler = StepBatches(len(source), args.seed, args.batch_size, args.grad_accum, world, tr.rank, tr.step_num,
                          args.max_steps)
    loader = torch.utils.data.DataLoader(ItemDataset(source), batch_sampler=sampler, num_workers=args.workers,
                                         collate_fn=collate)
    it = iter(loader)
    pbar = tqdm(total=args.max_steps, initial=tr.step_num, disable=not master, dynamic_ncols=True)
    log = None                                                            # opened at the first line
    skipped_run, t_last, steps_since, unreadable = tr.skipped_run, time.time(), 0, []
    try:
        while tr.step_num < args.max_steps:
            micros = []
            for _ in range(args.grad_accum):
                mb = next_batch(it)
                skipped_run += len(mb["skipped"])
                unreadable += [v for v in mb["skipped"] if v not in unreadable]
                if "video" in mb:
                    mb.update(encode_videos(svd, mb["video"], args, mb["keys"], (args.seed, tr.step_num), device))
                micros.append(mb)
            tr.skipped_run = skipped_run
            m = tr.step(micros, log_terms=(tr.step_num + 1) % args.log_every == 0 or tr.step_num + 1 == args.max_steps)
            step, steps_since = tr.step_num, steps_since + 1
            progress["step"] = step
            bad = [k for k in sorted(m) if k.startswith("loss") and not math.isfinite(m[k])]
            if bad:                                         # before any save: the last checkpoint stays a finite one
                raise UserError(f"training diverged at step {step} ({bad[0]} {m[bad[0]]}, not saved); lower "
                                f"--lr-g/--lr-d or check --init, --sigma-max and --cond-aug, then --resume or start a "
                                f"new --out")
            logged = step % args.log_every == 0 or step == args.max_steps
            if logged:
                n_skip = torch.tensor([float(skipped_run)], device=device)
                all_reduce_mean([n_skip], world)
                unreadable = record_unreadable(args, source, unreadable, tr.rank, world)
            try:
                if master and logged:
                    rec = {"step": step, **m, "it_s": steps_since / (time.time() - t_last),
                           "peak_mem_gb": peak_memory_gb(device),
                           "skipped_videos": len(skipped_scan) + int(round(n_skip.item() * world))}
                    log = log or open(os.path.join(args.out, "log.jsonl"), "a")
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    pbar.set_postfix({k: f"{m[k]:.4g}" for k in ("loss_g", "loss_d", "recon", "loss") if k in m})
                if master and (step % args.save_every == 0 or step == args.max_steps):
                    tr.save(args.out, frames)
                    progress["saved"] = step
                if master and sample_cond is not None and step % args.sample_every == 0:
                    save_samples(tr, svd, sample_cond, args, step, dtype_frozen)
            except OSError as e:                                          # e.g. disk full: the old files stay intact
                free = shutil.disk_usage(args.out).free / 2 ** 20
                raise UserError(f"cannot write to --out {args.out} at step {step} ({e.strerror or e}; {free:.0f} MiB "
                                f"free there); free some space, then continue with --resume") from None
            if logged:
                t_last, steps_since = time.time(), 0
            pbar.update(1)
            barrier(world)                                                    # others wait here (--dist-timeout)
    finally:                                                              # also on an error: end the bar's line
        pbar.close()
        if log:
            log.close()


def next_batch(it):
    """next(it). A UserError raised in a DataLoader worker comes back with the worker's traceback in its message:
    its own last line is kept, so it stays one line."""
    try:
        return next(it)
    except UserError as e:
        raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None


def sample_conditioning(args, svd, source, device):
    """The fixed conditioning of the sample videos: the first num_samples items, fixed seeds."""
    items = [source.get(i % len(source), sample_seed(args.seed, i, 6)) for i in range(args.num_samples)]
    if "video" in items[0]:
        enc = encode_videos(svd, torch.stack([it["video"] for it in items]), args, list(range(len(items))),
                            (args.seed, -2), svd.clip.conv1.weight.device)
    else:
        enc = {k: torch.stack([it[k] for it in items]) for k in ("latents", "cond", "image_embeds")}
    return {k: v.to(device) for k, v in enc.items()}


def save_samples(tr, svd, c, args, step, dtype_frozen):
    """Sample videos of the EMA generator: sfv: one evaluation at sigma_max; diffusion: sample_steps Euler steps
    (no CFG). -> <out>/samples/step<step>_<i>.mp4"""
    ema = tr.ema                                               # --ema-device cpu: a copy visits the GPU
    if next(ema.parameters()).device != tr.device:
        ema = copy_module(tr.ema, tr.device, dtype_frozen)
    ema.eval()
    B = c["cond"].shape[0]
    cond = {"cond_latent": c["cond"], "image_embeds": c["image_embeds"], "added_time_ids": tr.ids.expand(B, -1)}
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(B)]
    with tr.autocast():
        z = sample_latents(ema, cond, c["latents"].shape[1], gens, 1 if args.mode == "sfv" else args.sample_steps,
                           sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho)
    vdev = svd.clip.conv1.weight.device                           # cached run: the VAE visits the GPU briefly
    svd.vae.to(tr.device, dtype_frozen)
    del ema
    video = svd.vae.decode(z.to(dtype_frozen), chunk=args.sample_decode_chunk)
    svd.vae.to(vdev, torch.float32 if vdev.type == "cpu" else dtype_frozen)
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    for i, v in enumerate(video):
        write_video((v.detach().float().cpu() + 1) / 2, os.path.join(args.out, "samples", f"step{step:07d}_{i}.mp4"),
                    args.fps)

# -----------------------------------------------------------------------------
# setup: every check first (one-line UserError before a model is built), then data, model, resume


def run(args, progress=None):
    """The training command: every check first (UserError, one line), then data, model, resume and the loop.
    progress (a dict) follows the run for main's Ctrl-C line. -> the Trainer (None: nothing left to train)."""
    progress = {} if progress is None else progress
    check_args(args)
    rank, world, device = dist_setup(args.device, args.dist_timeout)
    progress["master"] = rank == 0
    created, lock = prepare_out(args, rank, world)
    try:
        tr = _run(args, rank, world, device, progress)
    except BaseException:
        unlock(lock)
        cli.remove_folders(created)                                    # the folders made now, if still empty
        raise
    unlock(lock)
    return tr


def _run(args, rank, world, device, progress):
    master = rank == 0
    st = read_state(args, master)                                      # refuse a changed model before building it
    progress["saved"] = None if st is None else int(st["step"])
    if st is not None and st["step"] >= args.max_steps:
        if master:
            print(f"nothing to train: {os.path.join(args.out, 'train_state.pt')} is at step {st['step']}, --max-steps "
                  f"{args.max_steps}; pass a larger --max-steps to continue")
        return None
    index = probe_data(args, rank, world)
    svd, source, size = build_model_and_data(args, index, rank, world)
    plan = memory_plan(args, svd.cfg, *size, device)
    note = check_plan(plan, args)
    if master:
        print(format_plan(plan, f"{device.type}, {'x'.join(map(str, size))}, batch {args.batch_size}"))
        if note:
            print(note)
    dtype_frozen = torch.bfloat16 if args.bf16 and device.type == "cuda" else torch.float32
    source, skipped_scan = prepare_data(args, svd, source, size, device, dtype_frozen, rank, world)
    if device.type == "cpu":
        cpu_kernels.apply(svd)                                        # opt-in CPU speed-ups, same outputs
    tr = Trainer(args, svd, device, rank, world)
    load_resume(tr, st, args, master)
    del st
    progress["step"] = tr.step_num
    tr.broadcast_from_rank0()                                         # every rank starts from rank 0's weights
    train_loop(args, tr, svd, source, skipped_scan, size[0], dtype_frozen, progress)
    if master:
        path = os.path.join(args.out, "model.safetensors")
        print(f"wrote {path} (step {tr.step_num}) and train_state.pt; sample it with python sample.py IMAGE "
              f"--ckpt {path}")
    if world > 1:
        dist.destroy_process_group()
    return tr


SVD_TRAIN_SIZE = (448, 768)            # SF-V sec. 4: trained at 448x768 (and sampled at SVD's 576x1024)


def init_config(init):
    """The SVDConfig of --init without reading its weights: a preset's, a bundle's (its metadata), else SVD's (an
    official file or diffusers folder has SVD's networks); None if a bundle's config is unreadable (load says so)."""
    if init in CONFIGS:
        return CONFIGS[init]
    meta = load_svd.bundle_metadata(init) if os.path.isfile(init) else {}
    try:
        return SVDConfig.from_dict(json.loads(meta["config"])) if "config" in meta else CONFIGS["svd"]
    except (TypeError, ValueError, AttributeError):
        return None


def train_size(args, cfg):
    """(T, H, W) of the training clips: the flags; 0 is the config's frames and, for a model with SVD's UNet, SF-V's
    448x768 (SVD_TRAIN_SIZE), else the config's size."""
    h, w = SVD_TRAIN_SIZE if cfg.unet == CONFIGS["svd"].unet else (cfg.height, cfg.width)
    return args.frames or cfg.num_frames, args.height or h, args.width or w


def check_size(args, cfg):
    """--height/--width are multiples of the model's size multiple (model.size_multiple: 64 for SVD, 4 for the toy)."""
    m, f, k = size_multiple(cfg), latent_factor(cfg.vae), len(cfg.unet.channel_mult) - 1
    latent = "has the image size" if f == 1 else f"is 1/{f} of the image size"
    for name in ("height", "width"):
        v = getattr(args, name)
        if v % m:
            raise UserError(f"bad --{name} {v}: must be a multiple of {m} (the latent {latent} and the UNet halves it "
                            f"{k} times); try --{name} {max(m, round(v / m) * m)}")


def build_model_and_data(args, index, rank, world):
    """The generator init (a CONFIGS preset: random weights, seeded; or load_svd.load: LoadError, one line) and the
    data source at the training size (train_size; VideoFolder: UserError if every video is too short). For a preset
    the data is checked before the model is built. -> (svd, source, (T, H, W))"""
    cfg = CONFIGS.get(args.init)
    torch.manual_seed(args.seed)                       # same seed on every rank: identical init
    svd = None if cfg is not None else load_svd.load(args.init)
    cfg = cfg or svd.cfg
    T, H, W = train_size(args, cfg)
    if index is None:
        if H != W:
            raise UserError(f"--data synthetic makes square videos, but the training size is {H}x{W}; pass equal "
                            f"--height and --width")
        source = SyntheticVideos(args.synthetic_size, T, H, args.seed, style=args.synthetic_style)
    else:
        source = VideoFolder(args.data, T, args.fps, H, W, index)
        barrier(world)                                            # every rank has read the old index file
        if rank == 0:
            write_json(os.path.join(args.out, "video_index.json"), source.index)
    if svd is None:
        svd = SVD(cfg)
        if args.mode == "diffusion":
            svd.unet.zero_init_()                          # training from scratch: sgm's zero-initialised branches
    return svd, source, (T, H, W)


def cache_settings(args, T, H, W):
    """What the latent cache's entries depend on ({flag: value}; data.check_cache compares them): the encoders
    (--init), the clips (data, frames, size, fps of a folder, the seed that picks them) and the cond-aug draw."""
    path = lambda p: p if p in CONFIGS or p == "synthetic" else os.path.abspath(p)
    s = {"init": path(args.init), "data": path(args.data), "frames": T, "height": H, "width": W,
         "cond_aug": args.cond_aug, "seed": args.seed}
    s.update(dict(synthetic_style=args.synthetic_style, synthetic_size=args.synthetic_size) if args.data == "synthetic"
             else dict(fps=args.fps))
    return s


def prepare_data(args, svd, source, size, device, dtype_frozen, rank, world):
    """Fit a fresh toy latent on the data; with --cache train from pre-encoded latents (refused if built for other
    settings; built, or completed, on first use; VAE/CLIP then stay on the CPU), else place VAE/CLIP on the device.
    -> (source, videos skipped at scan time)"""
    if args.init in CONFIGS and svd.cfg.vae.linear_patch_size:            # a fresh toy latent: fit it on the data
        svd.fit_linear_latent(torch.cat([source.get(i, args.seed)["video"] for i in range(min(64, len(source)))]))
    skipped_scan = getattr(source, "skipped", [])
    if args.cache:
        want = cache_settings(args, *size)
        check_cache(args.cache, want)
        index = os.path.join(args.cache, "index.json")
        if not os.path.exists(index) or LatentCache(args.cache).missing():
            move_frozen(svd, device, dtype_frozen)
            try:
                failed = build_cache(source, svd, args, args.cache, rank, world, device, want)
            except OSError as e:
                raise UserError(f"cannot write to --cache {args.cache} ({e.strerror or e}); free some space or pass "
                                f"a writable folder") from None
            record_unreadable(args, source, failed, rank, 1)               # build_cache gathered every rank's
        source = LatentCache(args.cache)
        if source.built_for is None:                          # an older cache: only the latent shape can be checked
            have, need = tuple(source.get(0, 0)["latents"].shape), svd.latent_shape(*size)
            if have != need:
                raise UserError(f"--cache {args.cache} holds latents of shape {list(have)}, this run needs "
                                f"{list(need)} ({'x'.join(map(str, size))}); pass another --cache folder (it is built "
                                f"on first use)")
            if rank == 0:
                print(f"note: --cache {args.cache} does not record what it was built for (an older train.py); only "
                      f"its latent shape is checked")
        skipped_scan = source.skipped or skipped_scan
        move_frozen(svd, "cpu", torch.float32)                             # VAE/CLIP off the GPU during training
    else:
        move_frozen(svd, device, dtype_frozen)
    return source, skipped_scan


# -----------------------------------------------------------------------------
# the flags: (name, default, bounds, help), each --name-with-dashes; `--help` lists them all. bounds: a text flag's
# choices, or a number's limits, each "op integer (note)" with op >=, >, <=, < (the error message quotes the note)

FLAGS = [
    # run
    ("mode", "sfv", ("sfv", "diffusion"), "sfv: SF-V's adversarial one-step fine-tuning | diffusion: plain SVD-style "
                                          "EDM training (stage 1)"),
    ("init", "tiny", None, "generator init: a model.CONFIGS preset (random weights) or a checkpoint (official single "
                           "file, diffusers folder, our bundle)"),
    ("data", "synthetic", None, "'synthetic' or a folder searched for videos (" + ", ".join(e[1:] for e in VIDEO_EXTS)
                                + "); unusable ones are skipped and counted"),
    ("out", "out/<mode>", None, "output dir (out/sfv or out/diffusion): model.safetensors (EMA bundle), "
                                "train_state.pt, log.jsonl, samples/; train.lock while a run uses it"),
    ("resume", False, None, "continue from <out>/train_state.pt (optimisers, EMA, step, RNG, data position); if there "
                            "is none, a note and a fresh start"),
    ("resume_any_args", False, None, "--resume even if model-defining flags (init, mode, D, bf16, optimizer) differ"),
    ("seed", 0, ">= 0", "seed of the init and of every sample's randomness"),
    ("device", "auto", None, "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps; torchrun: cuda is cuda:LOCAL_RANK"),
    ("max_steps", 50000, ">= 1", "optimiser steps (the paper: 50K)"),
    # data
    ("frames", 0, ">= 0 (0: the config's)", "frames per clip T (0: the config's num_frames, 14 for svd)"),
    ("height", 0, ">= 0 (0: the default)", "training height in pixels, a multiple of the model's size multiple (64 "
                                           "for SVD, 4 for the toy); 0: 448 for SVD's UNet (SF-V's), else the "
                                           "config's. Sampling keeps the config's size (SVD: 576x1024)"),
    ("width", 0, ">= 0 (0: the default)", "training width in pixels; 0: 768 for SVD's UNet (SF-V's), else the "
                                          "config's"),
    ("fps", 7, ">= 1, <= 1000 (frames per second)", "clip frame rate (stride: source fps / fps); fps_id = fps - 1"),
    ("motion_bucket_id", 127, ">= 0", "vector conditioning (constant; SVD's default)"),
    ("cond_aug", 0.02, ">= 0 (a noise level)", "noise std added to the conditioning frame (and its vector value)"),
    ("synthetic_size", 100000, ">= 1, <= 10000000 (its epoch permutation is held in memory)",
     "number of distinct synthetic videos"),
    ("synthetic_style", "textured", ("textured", "simple", "static"),
     "textured: 1-3 moving shapes on a texture | simple: one on a flat background (the toy) | static: simple, still"),
    ("cache", "", None, "dir of pre-encoded latents and CLIP embeddings, built on first use (VAE/CLIP then stay off "
                        "the GPU); it fixes one clip and one cond-aug draw per video"),
    ("workers", 2, ">= 0", "DataLoader worker processes (0: load in the main process)"),
    # batch and optimisation
    ("batch_size", 1, ">= 1, <= 65536 (per process)", "micro-batch per process"),
    ("grad_accum", 1, ">= 1", "micro-batches per optimiser step (global batch = batch_size * grad_accum * world)"),
    ("optimizer", "sm3", ("sm3", "adamw"), "sm3 (the paper's choice, memory-light) | adamw"),
    ("lr_g", 1e-5, ">= 0", "generator learning rate"),
    ("lr_d", 1e-4, ">= 0", "discriminator-head learning rate"),
    ("beta1", 0.5, ">= 0, < 1", "momentum (SM3) / Adam beta1"),
    ("beta2", 0.999, ">= 0, < 1", "second-moment EMA (SM3: of the accumulators; 0: SM3-II sums of squares)"),
    ("sm3_variant", "plain", ("plain", "debiased"), "plain: the reference SM3 (Anil et al. 2019) | debiased: "
                                                    "Adam-style bias-corrected EMA (see SM3)"),
    ("weight_decay", 0.0, ">= 0", "decoupled weight decay"),
    ("warmup", 0, ">= 0", "linear learning-rate warm-up steps"),
    ("lr_final", 1.0, ">= 0 (a fraction of the base rate), <= 1 (a fraction of the base rate)",
     "learning rate at the end of a cosine decay after the warm-up, as a fraction of the base one (1: constant)"),
    ("lr_decay_steps", 0, ">= 0 (0: --max-steps)", "step at which the cosine decay ends (0: --max-steps; "
                                                   "set it to split one schedule over --resume'd runs)"),
    ("grad_clip", 0.0, ">= 0 (0: off)", "clip the global gradient norm of G and of D's heads (0: off; the paper does "
                                        "not mention clipping; the toy SF-V distils about as well without)"),
    ("ema", 0.95, ">= 0, <= 1", "EMA decay of the generator; the EMA is saved and used for sampling"),
    # SF-V objective
    ("gen_levels", 4, ">= 2, <= 1000000 (the grid is held in memory)", "Karras grid of the generator sigma (all but "
                                                                       "the smallest level are drawn)"),
    ("sigma_min", 0.002, "> 0", "Karras grid sigma_min"),
    ("sigma_max", 700.0, None, "Karras grid sigma_max"),
    ("rho", 7.0, "> 0", "Karras grid rho"),
    ("p_mean", -1.0, None, "discriminator sigma': mean of log sigma'"),
    ("p_std", 1.0, None, "discriminator sigma': std of log sigma' (the paper writes -1: the same distribution as 1; "
                         "|p_std| is used)"),
    ("disc_levels", 1000, ">= 2, <= 1000000 (the grid is held in memory)", "Karras grid of the discriminator sigma'"),
    ("r1", "exact", ("exact", "fd", "approx", "off"), "R1 on real samples: exact (forward-mode AD) | fd (finite "
                                                     "difference): w.r.t. the D heads' input features | approx: "
                                                     "Seaweed-APT's (D(x') - D(x' + s n))^2 on D's input x' (one more "
                                                     "backbone forward) | off"),
    ("r1_gamma", 0.05, ">= 0", "R1 weight gamma (unstated in the paper; logged: r1_share = gamma*R1 / L_D)"),
    ("r1_fd_eps", 1e-2, "> 0", "fd: step relative to the RMS of each sample's level features"),
    ("r1_approx_std", 0.1, "> 0", "approx: std s of the perturbation of D's input (Seaweed-APT's value for video)"),
    ("recon_weight", 0.1, ">= 0", "weight of the pseudo-Huber reconstruction term in L_G"),
    ("huber_c", 0.001, ">= 0", "pseudo-Huber c (OSV's value; unstated in SF-V)"),
    ("huber_form", "norm", ("norm", "mean"), "norm: sqrt(||d||^2 + c^2) - c per sample (the paper's form) | mean: "
                                             "sqrt(mean d^2 + c^2) - c"),
    ("disc_heads", "both", ("both", "spatial", "temporal"), "the discriminator's heads (paper Table 2 ablation)"),
    ("head_channels", 256, ">= 1", "hidden channels of each discriminator head"),
    ("cmap_dim", 64, ">= 1", "projection-conditioning dim of the heads"),
    ("cond_embed_dim", 128, ">= 1", "dim of each of the heads' image/noise/frame condition embeddings"),
    ("disc_tap", "after", ("after", "before"), "D features per level: after (the paper: 'after each downsampling "
                                               "block') | before the downsampling conv that ends the level"),
    # diffusion mode
    ("train_p_mean", 0.7, None, "diffusion mode: mean of log sigma (SVD's video fine-tuning shift, inferred)"),
    ("train_p_std", 1.6, ">= 0", "diffusion mode: std of log sigma"),
    ("high_sigma_frac", 0.0, ">= 0 (a probability), <= 1 (a probability)",
     "diffusion mode: fraction of sigmas drawn log-uniform in [2, --sigma-max] (where the sampler starts)"),
    ("cond_drop", 0.1, ">= 0 (a probability), <= 1 (a probability)",
     "diffusion mode: probability of dropping the image conditioning (for CFG)"),
    # multi-process
    ("dist_timeout", 120, ">= 1 (minutes), <= 525600 (minutes: one year)",
     "process-group timeout: how long ranks wait while rank 0 alone saves or writes samples"),
    # memory
    ("bf16", True, None, "bf16 autocast on CUDA; the frozen D backbone and VAE/CLIP stored in bf16 (ignored on CPU)"),
    ("grad_ckpt", True, None, "gradient checkpointing of every UNet block (generator and D backbone)"),
    ("ema_device", "cpu", ("cpu", "same"), "where a CUDA run keeps the generator EMA: cpu (host memory; G's weights "
                                           "are copied there each step) | same (the training device)"),
    ("autocast_cache", True, None, "keep autocast's bf16 copy of each weight until the forward ends (PyTorch's "
                                   "default); --no-autocast-cache recasts at each use"),
    ("fused_step", False, None, "step each G weight inside the backward and free its gradient (no G-sized gradients; "
                                "needs --grad-accum 1, --grad-clip 0; data parallel: one all-reduce per weight)"),
    ("optim_state_dtype", "fp32", ("fp32", "bf16"), "dtype of the SM3 momentum (bf16: half the memory; the update is "
                                                    "computed in fp32, the stored momentum rounded). sm3 only"),
    ("sample_decode_chunk", 2, ">= 1", "frames the VAE decodes at a time for the sample videos "
                                       "(each chunk as its own video; training is unaffected)"),
    ("max_memory", 0.0, ">= 0 (GiB; 0: the CUDA device's total memory less 1 GiB)",
     "GiB a training step may use on CUDA (0: all but 1 GiB): a predicted peak above it is refused (if only the "
     "term-gradient logging does not fit, it is turned off with a note)"),
    # visibility
    ("log_every", 10, ">= 1", "log to log.jsonl and tqdm every N steps"),
    ("log_term_grads", True, None, "sfv: on logged steps also log the G gradient norms of the adversarial and the "
                                   "recon term (grad_norm_g_adv, grad_norm_g_rec; one more G backward)"),
    ("save_every", 1000, ">= 1", "checkpoint every N steps (and at the end)"),
    ("sample_every", 1000, ">= 0 (0: never)", "write sample videos every N steps (0: never)"),
    ("num_samples", 2, ">= 1", "sample videos per round (fixed seeds and conditioning images)"),
    ("sample_steps", 25, ">= 1", "diffusion mode: Euler steps for the sample videos (sfv: always 1)"),
]
def parse_args(argv=None):
    args = cli.flag_parser(FLAGS, __doc__.split("\n\n")[0]).parse_args(argv)
    args.out = args.out.replace("<mode>", args.mode)
    return args


def check_args(args):
    """Every flag value, before anything expensive: UserError "bad --flag v: must be ...; <fix>". The rows' bounds
    first, then the rules a bound cannot say."""
    cli.check_bounds(FLAGS, args)
    # what a bound cannot say: the form of one flag's value, then the rules between flags
    if not args.out.strip():
        raise UserError("bad --out '': pass the folder for checkpoints, logs and samples, e.g. --out out/sfv")
    if args.init not in CONFIGS and not os.path.exists(args.init):
        raise UserError(f"--init {args.init}: no such file or folder, and not a model.CONFIGS preset "
                        f"({', '.join(CONFIGS)}); pass a checkpoint path or a preset name")
    if args.seed >= 2 ** 63:
        raise UserError(f"bad --seed {args.seed}: must be an integer from 0 to 2^63-1")
    if args.sigma_max <= args.sigma_min:
        raise UserError(f"bad --sigma-max {args.sigma_max:g}: must be greater than --sigma-min {args.sigma_min:g}")
    try:                                              # the noise grids, in fp32 as training uses them
        grid = karras_sigmas(max(args.gen_levels, args.disc_levels), args.sigma_min, args.sigma_max, args.rho)
    except (OverflowError, ZeroDivisionError):
        grid = torch.tensor([math.inf])
    if not torch.isfinite(grid.square()).all() or not (grid[:-1] > 0).all():
        raise UserError(f"bad --sigma-min {args.sigma_min:g} / --sigma-max {args.sigma_max:g} / --rho {args.rho:g}: "
                        f"the Karras noise grid does not fit fp32 (every sigma > 0, sigma^2 finite); use values near "
                        f"the defaults (0.002 / 700 / 7)")
    cfg = init_config(args.init)
    if cfg is not None:                                    # else load_svd reports the damaged bundle
        check_size(args, cfg)
    if args.fused_step and args.grad_accum > 1:
        raise UserError(f"--fused-step steps each weight inside the backward, so it cannot accumulate gradients over "
                        f"--grad-accum {args.grad_accum}; pass --grad-accum 1 (a larger --batch-size), or drop "
                        f"--fused-step")
    if args.fused_step and args.grad_clip > 0:
        raise UserError(f"--fused-step steps each weight inside the backward, so it cannot clip the global gradient "
                        f"norm (--grad-clip {args.grad_clip:g}); pass --grad-clip 0, or drop --fused-step")
    if args.optim_state_dtype != "fp32" and args.optimizer != "sm3":
        raise UserError(f"--optim-state-dtype {args.optim_state_dtype} is implemented for --optimizer sm3 only; pass "
                        f"--optim-state-dtype fp32 with --optimizer {args.optimizer}")
    if args.data == "synthetic" and args.height != args.width:
        raise UserError(f"--data synthetic makes square videos, but --height {args.height} != --width {args.width}; "
                        f"pass equal sizes (or 0 for the config's)")


def main(argv=None):
    """CLI entry: an expected failure (UserError) is one line `error: <what>; <how to fix>` on stderr and exit
    status 2 (out of memory: 1; Ctrl-C: 130, with where the last checkpoint is); tracebacks are for bugs only.
    -> the Trainer."""
    args = parse_args(argv)
    progress = {}                                                      # run() fills in step, saved, master
    try:
        return run(args, progress)
    except KeyboardInterrupt:
        step, saved = progress.get("step"), progress.get("saved")
        if progress.get("master", True):
            print(f"interrupted {'before the first step' if step is None else f'at step {step}'}; " +
                  (f"the last checkpoint is {os.path.join(args.out, 'train_state.pt')} (step {saved})"
                   if saved is not None else "no checkpoint was written"), file=sys.stderr)
        raise SystemExit(130) from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (MemoryError, RuntimeError) as e:                           # torch.OutOfMemoryError is a RuntimeError
        text = cli.oom_text(e)
        if text is None:
            raise
        print(f"error: out of memory ({text}); try a smaller --batch-size (with a larger "
              f"--grad-accum), --grad-ckpt, --bf16, --cache, or fewer --frames / a smaller --height/--width",
              file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main(sys.argv[1:])
