"""
The memory plan of one train.py step: the predicted peak device memory, printed before the first step, and the refusal
of a configuration predicted not to fit (--max-memory). Weights, EMA, optimiser state, gradients and the frozen D
backbone are exact byte counts from the parameter shapes (built on the meta device); activations are an estimate
fitted to bench.py --simulate.
"""
import torch

from cli import UserError
from discriminator import Discriminator
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
