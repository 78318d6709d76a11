"""
The memory side of train.py, none of it part of SF-V. The memory plan of one training step: the predicted peak device
memory, printed before the first step, and the refusal of a configuration predicted not to fit (--max-memory).
Weights, EMA, optimiser state, gradients and the frozen D backbone are exact byte counts from the parameter shapes
(built on the meta device); activations are an estimate fitted to bench.py --simulate. Then the measured peak, the
tensor-by-tensor module copy behind --ema-device cpu, and the memory options of the generator step (MemoryOptions:
--fused-step and the per-term gradient norms), which train.Trainer inherits.
"""
import copy
import resource

import torch
import torch.nn as nn

from cli import UserError
from discriminator import Discriminator
from distributed import all_reduce_mean
from model import UNet, latent_factor

STATE_BYTES = {"fp32": 4, "bf16": 2}                         # --optim-state-dtype -> bytes per momentum element

# Activations of one G step per unit B*T*h*w*model_channels*bytes-per-element (2 under bf16 autocast, else 4), by
# --grad-ckpt: (live at the peak with every gradient present; the most live at any point, gradients freed as they are
# produced (--fused-step); on a step that logs the per-term gradient norms, whose first backward pass retains the
# graph). An estimate: fitted so that the plan reproduces the peaks bench.py --simulate finds for SVD at 14x448x768,
# batch 1, bf16 (checkpointing: 27.4 GiB, 17.4 fused with the EMA on the host, 23.9 logged with the EMA on the host;
# without: 72.4, and 73.0 logged with the EMA on the host; the fused case without checkpointing is not simulated).
ACTIVATION_UNITS = {True: (92.0, 117.2, 139.6), False: (1032.3, 1032.3, 1172.1)}


def _grad_params(unet_cfg, T, h, w):
    """Which generator parameters a backward reaches at this latent size (one-key attention has no q/k gradient):
    names, from a forward and backward on the meta device (shapes only, no memory, no arithmetic)."""
    with torch.device("meta"):
        G = UNet(unet_cfg)
        x = torch.zeros(1, T, unet_cfg.in_channels, h, w)
        out = G(x, torch.zeros(1), torch.zeros(1, unet_cfg.context_dim), torch.zeros(1, 3))
    out.sum().backward()
    return {n for n, p in G.named_parameters() if p.grad is not None}


def memory_plan(args, cfg, T, H, W, device):
    """Predicted device memory of one training step of `cfg` (an SVDConfig) at T x H x W pixels on `device`:
    {"items": [(label, bytes)], "peak", "term_grads" (bytes a step that logs the per-term gradient norms adds),
    "limit" (bytes; None on CPU), "options"}. Weights, EMA, optimiser state, gradients and the frozen D backbone are
    exact byte counts from the parameter shapes (built on the meta device); activations are an estimate
    (ACTIVATION_UNITS). The D step and the sample videos (after the step, gradients freed) peak lower."""
    cuda = device.type == "cuda"
    amp = args.bf16 and cuda
    sfv = args.mode == "sfv"
    with torch.device("meta"):
        G = UNet(cfg.unet)
        D = Discriminator(G, args.disc_heads, args.head_channels, args.cmap_dim, args.cond_embed_dim,
                          args.disc_tap) if sfv else None
    f = latent_factor(cfg.vae)
    h, w = H // f, W // f
    with_grad = _grad_params(cfg.unet, T, h, w)
    named = list(G.named_parameters())
    fp32 = 4
    n_g = sum(p.numel() for _, p in named)
    state_bytes = STATE_BYTES[args.optim_state_dtype]

    def opt_bytes(params):
        out = 0
        for p in params:
            if args.optimizer == "adamw":
                out += 2 * p.numel() * fp32 + 4                        # exp_avg, exp_avg_sq, step
            else:
                acc = p.numel() if p.ndim <= 1 else sum(p.shape)        # SM3: one accumulator per dimension
                out += acc * fp32 + 4 + (p.numel() * state_bytes if args.beta1 > 0 else 0)
        return out
    g_train = [p for n, p in named if n in with_grad]
    ema_host = cuda and args.ema_device == "cpu"
    items = [("G weights (fp32)", n_g * fp32),
             ("EMA (fp32" + (", on the host)" if ema_host else ")"), 0 if ema_host else n_g * fp32),
             (f"G optimiser state ({args.optimizer}" + (f", {args.optim_state_dtype} momentum)" if args.optimizer == "sm3"
                                                         else ")"), opt_bytes(g_train)),
             ("G gradients" + (" (freed as produced: --fused-step)" if args.fused_step else ""),
              0 if args.fused_step else sum(p.numel() for p in g_train) * fp32)]
    if sfv:
        heads = D.head_parameters()
        items += [("D backbone (frozen" + (", bf16)" if amp else ")"),
                   sum(p.numel() for p in D.backbone.parameters()) * (2 if amp else fp32)),
                  ("D heads + optimiser", sum(p.numel() for p in heads) * fp32 + opt_bytes(heads))]
    if amp and not args.grad_ckpt:
        items.append(("bf16 weight copies saved for the backward", n_g * 2))
    unit = args.batch_size * T * h * w * cfg.unet.model_channels * (2 if amp else 4)
    end, most, logged = ACTIVATION_UNITS[args.grad_ckpt]
    state = sum(b for _, b in items)
    grads = dict(items)[items[3][0]]
    peak = max(state + end * unit, state - grads + most * unit)
    items.append((f"activations (estimate: {end if grads else most:g} x B*T*h*w*C*bytes)",
                  peak - state))
    limit = None
    if cuda:
        limit = (args.max_memory * 2 ** 30 if args.max_memory > 0
                 else torch.cuda.get_device_properties(device).total_memory - 2 ** 30)
    opts = (f"EMA on {'the host' if ema_host else 'the device'}, autocast cache {'on' if args.autocast_cache else 'off'}, "
            f"fused step {'on' if args.fused_step else 'off'}, optimiser state {args.optim_state_dtype}, "
            f"checkpointing {'on' if args.grad_ckpt else 'off'}, bf16 autocast {'on' if amp else 'off'}, "
            f"sample decode chunk {args.sample_decode_chunk}")
    term = 0                                   # what a step that logs the per-term gradient norms adds
    if sfv and args.log_term_grads:            # one micro-batch: Trainer._split_backward (every gradient present)
        term = max(0, state - grads + sum(p.numel() for p in g_train) * fp32 + logged * unit - peak)
        if args.grad_accum > 1:                # more: the G-sized buffer of the recon term's gradient
            term += n_g * fp32
    return {"items": items, "peak": peak, "term_grads": term, "limit": limit, "options": opts}


def format_plan(plan, what):
    """The plan as printed before the first step."""
    gib = lambda b: f"{b / 2**30:6.2f} GiB"
    lines = [f"memory plan ({what}): {plan['options']}"]
    lines += [f"  {label:<58}{gib(b)}" for label, b in plan["items"]]
    tail = f" of {plan['limit'] / 2**30:.1f} GiB (--max-memory)" if plan["limit"] else " (checked on CUDA only)"
    lines.append(f"  {'predicted peak of a training step':<58}{gib(plan['peak'])}{tail}")
    if plan["term_grads"]:
        lines.append(f"  {'  steps that log the term gradients (--log-term-grads)':<58}"
                     f"{gib(plan['peak'] + plan['term_grads'])}")
    return "\n".join(lines)


def check_plan(plan, args):
    """Refuse a plan predicted not to fit (UserError naming the biggest items and the flags that would help); turn
    --log-term-grads off (a note) when only its buffer does not fit. -> the note or None."""
    limit = plan["limit"]
    if limit is None:
        return None
    if plan["peak"] > limit:
        big = sorted(plan["items"], key=lambda it: -it[1])[:3]
        fix = [f for f, on in (("--ema-device cpu", args.ema_device != "cpu"),
                               ("--fused-step --grad-clip 0", not args.fused_step),
                               ("--optim-state-dtype bf16", args.optimizer == "sm3" and args.optim_state_dtype == "fp32"),
                               ("--grad-ckpt", not args.grad_ckpt)) if on]
        raise UserError(f"predicted peak {plan['peak'] / 2**30:.1f} GiB does not fit in {limit / 2**30:.1f} GiB "
                        f"(--max-memory); largest: " + ", ".join(f"{l.split(' (')[0]} {b / 2**30:.1f}" for l, b in big)
                        + " GiB; try " + ", ".join(fix + ["fewer --frames or a smaller --height/--width"]))
    if plan["term_grads"] and plan["peak"] + plan["term_grads"] > limit:
        args.log_term_grads = False
        return (f"note: --log-term-grads off: the steps that log them need {plan['term_grads'] / 2**30:.1f} GiB more, "
                f"over --max-memory ({(plan['peak'] + plan['term_grads']) / 2**30:.1f} > {limit / 2**30:.1f} GiB)")
    return None

# -----------------------------------------------------------------------------
# the measured peak, and module copies on another device


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20          # Linux: KiB -> GiB (process RSS)


def copy_module(m, device, dtype=None):
    """A deep copy of module m with every parameter and buffer copied to `device` (floating ones in `dtype`), tensor
    by tensor through the deepcopy memo: no second full copy on m's own device."""
    memo = {}
    for t in [*m.parameters(), *m.buffers()]:
        c = t.detach().to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype,
                          copy=True)
        memo[id(t)] = nn.Parameter(c, t.requires_grad) if isinstance(t, nn.Parameter) else c
    return copy.deepcopy(m, memo)

# -----------------------------------------------------------------------------
# the memory options of train.py's generator step (not part of SF-V): the same step with less memory, or with the
# per-term gradient norms of the logged steps


class MemoryOptions:
    """Methods of train.Trainer (it inherits them) that run its G step under the memory options. --fused-step: each G
    weight steps inside the backward as soon as its gradient is complete (_fused_hook), and that gradient is freed: no
    G-sized gradient memory. Per-term gradient norms (--log-term-grads, on logged steps): with one micro-batch the
    backward is split in two passes (_split_backward); with more, the weighted recon term's gradient is summed in a
    G-sized buffer. Uses the Trainer's args, G, D, opt_g, world, device, lr(), _finish() and _fused."""

    def _memory_begin(self, log_terms, n_micro):
        """The state of one G step under the memory options; None if none applies (the plain step)."""
        a = self.args
        terms = log_terms and a.log_term_grads and self.D is not None
        if not (terms or a.fused_step):
            return None
        if a.fused_step:                       # the optimiser steps inside backward() (_fused_hook)
            self.opt_g.param_groups[0]["lr"] = self.lr(a.lr_g)
            self._fused = {"sq": torch.zeros((), device=self.device), "reduced": False}
        return {"split": terms and n_micro == 1, "buffer": terms and n_micro > 1, "term": None, "norms": {}}

    def _memory_backward(self, o, loss, logs, n_micro):
        """backward() of one micro-batch's loss / n_micro; per-term norms: the split passes, or the term buffer."""
        params = list(self.G.parameters())
        if o["split"]:
            o["norms"] = self._split_backward(logs["adv_g"], self.args.recon_weight * logs["recon"], params)
            return
        if o["buffer"]:
            grads = torch.autograd.grad(self.args.recon_weight * logs["recon"] / n_micro, params, retain_graph=True,
                                        allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            o["term"] = grads if o["term"] is None else [t.add_(g) for t, g in zip(o["term"], grads)]
            del grads
        (loss / n_micro).backward()

    def _memory_end(self, o):
        """Step G (unless the fused hooks did) -> gradient norms {"": global; "_rec", "_adv" per term (logged steps)}:
        the term buffer's norm and that of the rest of the (all-reduced) gradient."""
        norms, params = o["norms"], list(self.G.parameters())
        if self.args.fused_step:
            norms[""] = self._fused["sq"].sqrt().item()
            self._fused = None
            return norms
        if o["buffer"]:
            live = [(p, t) for p, t in zip(params, o["term"]) if p.grad is not None]
            all_reduce_mean([p.grad for p, _ in live], self.world)
            all_reduce_mean([t for _, t in live], self.world)
            norms["_rec"] = torch.stack([t.square().sum() for _, t in live]).sum().sqrt().item()
            norms["_adv"] = torch.stack([(p.grad - t).square().sum() for p, t in live]).sum().sqrt().item()
            o["term"] = live = None                                  # the buffer is freed before the step
        return {**norms, **self._finish(self.opt_g, params, self.lr(self.args.lr_g), reduced=o["split"] or o["buffer"])}

    def _fused_hook(self, p):
        """--fused-step (post-accumulate-grad hook of every G weight): p's gradient is complete. All-reduce it (data
        parallel; unless _split_backward did), add its squares to the running norm, step p alone (the optimiser's
        group narrowed to [p]) and free the gradient."""
        f = self._fused
        if f is None:                                                   # a backward outside g_step
            return
        if not f["reduced"]:
            all_reduce_mean([p.grad], self.world)
        f["sq"] += p.grad.float().square().sum()
        group = self.opt_g.param_groups[0]
        params, group["params"] = group["params"], [p]
        try:
            self.opt_g.step()
        finally:
            group["params"] = params
        p.grad = None

    def _split_backward(self, adv, rec, params):
        """backward() of adv + rec as two passes, for the gradient norm of each term of one micro-batch without a
        G-sized buffer: pass 1 leaves the adversarial term's gradient in .grad (data parallel: all-reduced), pass 2
        adds the reconstruction term's, whose norm a tensor hook on each weight takes before it is accumulated (data
        parallel: all-reduced there, per weight). -> {"_adv", "_rec"} norms; .grad is then all-reduced."""
        fused, self._fused = self._fused, None                          # no fused step on a partial gradient
        adv.backward(retain_graph=True)
        live = [p for p in params if p.grad is not None]
        all_reduce_mean([p.grad for p in live], self.world)
        sq = {"_adv": torch.stack([p.grad.float().square().sum() for p in live]).sum(),
              "_rec": torch.zeros((), device=self.device)}

        def hook(g):
            if self.world > 1:
                g = g.clone()
                all_reduce_mean([g], self.world)
            sq["_rec"] += g.float().square().sum()
            return g
        handles = [p.register_hook(hook) for p in params]
        if fused is not None:
            fused["reduced"] = True
        self._fused = fused
        try:
            rec.backward()
        finally:
            for h in handles:
                h.remove()
        return {k: v.sqrt().item() for k, v in sq.items()}

