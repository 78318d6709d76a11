"""
The SF-V discriminator (Zhang et al., NeurIPS 2024, sec. 3.2 and Fig. 2): a FROZEN copy of the pretrained SVD
UNet encoder (conv_in + the four down levels with their temporal layers) as the feature backbone, and "after each
downsampling block" one trainable spatial head (judges frames) and one trainable temporal head (judges motion).

Inputs (sec. 3.3): real and fake latents are noised with the SAME sigma' and eps', x' = x0 + sigma' eps', and fed to
the backbone exactly like a UNet input: cat[c_in(sigma') x', cond latent] with c_noise(sigma') and the generator's
image embedding / vector conditioning. Gradients flow through the frozen backbone (its weights have
requires_grad=False) to the generator's output.

Feature tap (tap="after", the paper's wording): a level's features are taken after the downsampling conv that ends
it (the last level has none: its own output). tap="before" takes them before that conv (UNet.encode_levels).

Precision: the backbone may run in bf16 under autocast; the heads, the condition embedder, the logits and the
scores always run in fp32 with autocast disabled, so D(x + delta) - D(x) and R1 are not bf16 rounding noise.

Head design (the paper only draws the heads; this is a StyleGAN-T / ADD-style choice):
  feat --1x1 conv--> GroupNorm --LeakyReLU(0.2)--> + residual [conv k=3, GroupNorm, LeakyReLU(0.2)]
       --1x1 conv--> [1 unconditional logit | cmap_dim vector] per location
  logit = uncond + <cmap, proj(cond)> / sqrt(cmap_dim)               (projection discriminator, Miyato & Koyama 2018)
  cond  = cat[Linear(CLIP image embedding), MLP(sinusoid(c_noise(sigma'))), MLP(sinusoid(frame index))]
- GroupNorm (not the BatchNorm of StyleGAN-T/ADD): no coupling between samples, so the loss of a batch is the mean
  of per-sample losses, which keeps data-parallel training identical to one process with the same global batch.
- Spatial head: conv2d on (B*T, C, H, W); its condition is per frame (the frame index of that frame).
- Temporal head: conv1d over time on (B*H*W, C, T); the frame index enters per time position.
- The condition embedder is shared by all heads; each head has its own final projection to its cmap space.
"""
import copy
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Downsample, UNet, edm_input, edm_precondition, timestep_embedding

# -----------------------------------------------------------------------------
# frozen backbone


def frozen_encoder(unet: UNet) -> UNet:
    """A frozen deep copy of `unet` without its middle/output blocks (only encode_levels is used on it).
    The dropped modules are never copied (deepcopy memo), so the copy costs only the encoder's memory."""
    memo = {id(m): None for m in (unet.middle_block, unet.output_blocks, unet.out)}
    enc = copy.deepcopy(unet, memo)
    del enc.middle_block, enc.output_blocks, enc.out
    enc.requires_grad_(False)
    return enc.eval()

# -----------------------------------------------------------------------------
# heads (fp32, autocast off: see Discriminator.heads)


def _norm(ch):
    return nn.GroupNorm(max(1, ch // 16), ch)       # 16 channels per group: well defined even at 1x1 resolution


class DiscHead(nn.Module):
    """Projection head on (N, C, *S) features, dims=2 (spatial: S = H, W) or dims=1 (temporal: S = T).
    forward(h, c): c is the head's condition broadcastable to (N, cond_dim, *S); returns logits (N, *S)."""

    def __init__(self, channels, cond_dim, dims, hidden=256, cmap_dim=64):
        super().__init__()
        Conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.cmap_dim = cmap_dim
        self.proj_in = nn.Sequential(Conv(channels, hidden, 1), _norm(hidden), nn.LeakyReLU(0.2))
        self.res = nn.Sequential(Conv(hidden, hidden, 3, padding=1), _norm(hidden), nn.LeakyReLU(0.2))
        self.out = Conv(hidden, 1 + cmap_dim, 1)
        self.cond_proj = nn.Linear(cond_dim, cmap_dim)

    def forward(self, h, c):
        # h (N, C, *S); c (N, cond_dim) or (N, cond_dim, *S)
        h = self.proj_in(h)
        h = h + self.res(h)
        o = self.out(h)                                              # (N, 1 + cmap, *S)
        uncond, cmap = o[:, 0], o[:, 1:]
        p = self.cond_proj(c.movedim(1, -1)).movedim(-1, 1)         # (N, cmap) or (N, cmap, *S)
        p = p.reshape(*p.shape, *([1] * (cmap.ndim - p.ndim)))
        return uncond + (cmap * p).sum(1) / math.sqrt(self.cmap_dim)


class CondEmbed(nn.Module):
    """cat[Linear(image_embeds), MLP(sin(c_noise)), MLP(sin(frame))] -> (B, T, 3*dim), fp32."""

    def __init__(self, image_dim, dim=128):
        super().__init__()
        self.dim = dim
        self.image = nn.Linear(image_dim, dim)
        self.noise = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.frame = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, image_embeds, c_noise, T):
        B = image_embeds.shape[0]
        e_img = self.image(image_embeds.float())                                                # (B, dim)
        e_noise = self.noise(timestep_embedding(c_noise.float().reshape(B), self.dim))         # (B, dim)
        e_frame = self.frame(timestep_embedding(torch.arange(T, device=c_noise.device), self.dim))  # (T, dim)
        return torch.cat([e_img[:, None].expand(-1, T, -1), e_noise[:, None].expand(-1, T, -1),
                          e_frame[None].expand(B, -1, -1)], dim=-1)                    # (B, T, 3*dim)

# -----------------------------------------------------------------------------
# discriminator


class Discriminator(nn.Module):
    """Frozen UNet encoder + per-level spatial/temporal heads. heads: "both" | "spatial" | "temporal" (Table 2
    ablation); tap: "after" | "before" the downsampling conv ending each level.
    forward(x, sigma, cond_latent, image_embeds, added_time_ids) -> list of per-location fp32 logits, each (B, L_i);
    it is heads(features(...), condition(...)), split so the D step can run the backbone without a graph and R1 can
    differentiate the heads alone."""

    def __init__(self, unet: UNet, heads="both", hidden=256, cmap_dim=64, embed_dim=128, tap="after"):
        super().__init__()
        assert heads in ("both", "spatial", "temporal"), heads
        assert tap in ("after", "before"), tap
        self.tap = tap
        self.backbone = frozen_encoder(unet)
        cfg = unet.cfg
        chans = [m * cfg.model_channels for m in cfg.channel_mult]   # a Downsample keeps the channel count
        self.cond = CondEmbed(cfg.context_dim, embed_dim)
        cd = 3 * embed_dim
        use_s, use_t = heads in ("both", "spatial"), heads in ("both", "temporal")
        self.spatial = nn.ModuleList([DiscHead(c, cd, 2, hidden, cmap_dim) for c in chans]) if use_s else None
        self.temporal = nn.ModuleList([DiscHead(c, cd, 1, hidden, cmap_dim) for c in chans]) if use_t else None

    def train(self, mode=True):
        """The backbone has no dropout/normalisation statistics; its `training` flag only switches gradient
        checkpointing, so it follows backbone.gradient_checkpointing rather than `mode`."""
        super().train(mode)
        self.backbone.train(mode and self.backbone.gradient_checkpointing)
        return self

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def head_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_head_state_dict(self, state):
        """Load head_state_dict()'s output (the backbone is the generator's init, never saved)."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("backbone.") for k in missing), (missing, unexpected)

    def features(self, x, sigma, cond_latent, image_embeds, added_time_ids):
        """Backbone features per level, each (B, T, C_l, H_l, W_l), in the backbone's (autocast) dtype.
        x (B, T, 4, h, w) noisy latents x0 + sigma' eps'; sigma (B,); cond_latent (B, 4, h, w)."""
        B, T = x.shape[:2]
        _, _, c_in, c_noise = edm_precondition(sigma.float())
        inp = edm_input(x, c_in, cond_latent, torch.float32)                     # (B, T, 8, h, w), as the generator's
        bb = self.backbone
        feats = bb.encode_levels(inp, c_noise.to(x.device), image_embeds, added_time_ids)  # before the downsample
        if self.tap == "after":
            for lvl, end in enumerate(bb.level_ends[:-1]):         # input_blocks[end + 1]: the level's Downsample
                down = bb.input_blocks[end + 1][0]
                assert isinstance(down, Downsample), type(down)
                h = down(feats[lvl].flatten(0, 1))                                     # (B*T, C, H/2, W/2)
                feats[lvl] = h.reshape(B, T, *h.shape[1:])
        return feats

    def condition(self, image_embeds, sigma, T):
        """The heads' shared condition (B, T, 3*embed_dim), fp32."""
        with torch.autocast(image_embeds.device.type, enabled=False):
            c_noise = edm_precondition(sigma.float())[3].to(image_embeds.device)
            return self.cond(image_embeds, c_noise, T)

    def heads(self, feats, c):
        """feats: per level (B, T, C, H, W) (any dtype); c (B, T, cd) -> list of fp32 logits (B, L_i)."""
        logits = []
        with torch.autocast(c.device.type, enabled=False):
            c = c.float()
            B, T = c.shape[:2]
            for lvl, f in enumerate(feats):                                            # f (B, T, C, H, W)
                _, _, C, H, W = f.shape
                f = f.float().contiguous()                                    # channels-last in, NCHW here
                if self.spatial is not None:
                    out = self.spatial[lvl](f.reshape(B * T, C, H, W), c.reshape(B * T, -1))  # (B*T, H, W)
                    logits.append(out.reshape(B, -1))
                if self.temporal is not None:
                    ft = f.permute(0, 3, 4, 2, 1).reshape(B * H * W, C, T)             # (B*H*W, C, T)
                    ct = c.transpose(1, 2).repeat_interleave(H * W, dim=0)             # (B*H*W, cd, T)
                    out = self.temporal[lvl](ft, ct)                                   # (B*H*W, T)
                    logits.append(out.reshape(B, -1))
        return logits

    def forward(self, x, sigma, cond_latent, image_embeds, added_time_ids):
        feats = self.features(x, sigma, cond_latent, image_embeds, added_time_ids)
        return self.heads(feats, self.condition(image_embeds, sigma, x.shape[1]))

# -----------------------------------------------------------------------------
# losses on the list of per-location logits


def score(logits):
    """Per-sample scalar D(x): mean over locations, then over heads. -> (B,)"""
    return torch.stack([l.float().mean(1) for l in logits]).mean(0)


def hinge_d_loss(logits_real, logits_fake):
    """Standard hinge (D wants real high, fake low), per location, averaged over locations and heads."""
    real = torch.stack([F.relu(1 - l.float()).mean() for l in logits_real]).mean()
    fake = torch.stack([F.relu(1 + l.float()).mean() for l in logits_fake]).mean()
    return real + fake


def hinge_g_loss(logits_fake):
    """-mean D(fake), averaged over locations and heads."""
    return -torch.stack([l.float().mean() for l in logits_fake]).mean()


def r1_penalty(disc, feats, c, noise, mode="exact", fd_eps=1e-2):
    """R1 on real samples, per position, w.r.t. the heads' input features f (the frozen backbone's outputs, detached:
    the backbone is fixed, so this penalises the trainable part of D without double backward through it):

        R1 = mean over heads h, positions l and samples of (J_{h,l} n)^2,   n ~ N(0, I) over f,

    J_{h,l} = d logit_{h,l} / d f, so E_n[R1] = mean_h (1/L_h) ||J_h||_F^2 per sample: the mean over positions of
    ||grad_f logit_l||^2, not the squared gradient of the mean logit (which is L times smaller and made R1 inert).
    exact: J n by forward-mode AD (torch.func.jvp), fp32, differentiable w.r.t. the heads.
    fd:    (logit(f + e n) - logit(f)) / e with e = fd_eps * RMS(f) per sample and level, fp32; the same n, so it
           differs from exact only by O(e) Taylor terms (the heads are scale-invariant in f through their GroupNorm,
           hence a step relative to |f|).
    feats: per level (B, T, C, H, W) detached; c (B, T, cd); noise: per level like feats (unit normal).
    Returns (r1 (), logits of the real sample (list of (B, L_i), fp32))."""
    feats = [f.detach().float().contiguous() for f in feats]
    if mode == "off":
        return torch.zeros((), device=c.device), disc.heads(feats, c)
    noise = [n.float().contiguous() for n in noise]
    if mode == "exact":
        with warnings.catch_warnings():       # jvp's first call builds torch's decompositions with torch.jit.script
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
            logits, tangents = torch.func.jvp(lambda *fs: disc.heads(list(fs), c), tuple(feats), tuple(noise))
    elif mode == "fd":
        logits = disc.heads(feats, c)
        e = [fd_eps * f.square().mean(dim=(1, 2, 3, 4), keepdim=True).sqrt().clamp_min(1e-12) for f in feats]
        shifted = disc.heads([f + s * n for f, s, n in zip(feats, e, noise)], c)
        scale = _per_head([s.flatten() for s in e], disc)                              # per head (B,)
        tangents = [(b - a) / s[:, None] for a, b, s in zip(logits, shifted, scale)]
    else:
        raise ValueError(f"unknown R1 mode {mode!r} (exact | fd | off)")
    return torch.stack([t.square().mean() for t in tangents]).mean(), logits


def _per_head(per_level, disc):
    """Repeat a per-level list in the order heads() emits logits (spatial then temporal within a level)."""
    n = (disc.spatial is not None) + (disc.temporal is not None)
    return [v for v in per_level for _ in range(n)]


def r1_approx_penalty(disc, feats, feats_perturbed, c):
    """Approximated R1 on D's INPUT (Seaweed-APT, Lin et al. 2025): with x' the real input and n ~ N(0, I) over it,

        R1 = mean over heads h, positions l and samples of (D_{h,l}(x') - D_{h,l}(x' + s n))^2,

    a finite difference of the whole D (backbone included) without any second-order derivative. feats and
    feats_perturbed: the backbone's features of x' and of x' + s n (the caller's two no-grad forwards); the heads and
    the difference run in fp32. Returns (r1 (), logits of the real sample)."""
    logits = disc.heads([f.detach() for f in feats], c)
    shifted = disc.heads([f.detach() for f in feats_perturbed], c)
    return torch.stack([(a - b).square().mean() for a, b in zip(logits, shifted)]).mean(), logits
