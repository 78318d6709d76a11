"""
Stable Video Diffusion in plain PyTorch: the spatiotemporal UNet, the temporal VAE, the OpenCLIP image
encoder and the EDM v-prediction preconditioning (SVD: Blattmann et al. 2023; used as the generator
and discriminator backbone of SF-V: Zhang et al., NeurIPS 2024, section 3).

Module names mirror Stability AI's official (sgm) checkpoint tree, so loading the official single file
is a prefix strip plus shape checks (see load_svd.py). Tensor layout at the API: videos are (B, T, C, H, W);
inside the networks frames are folded into the batch, (B*T, C, H, W), as sgm does.
"""
import math
from dataclasses import dataclass, field, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# configs


@dataclass
class UNetConfig:
    in_channels: int = 8                     # 4 noisy latent + 4 conditioning-image latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)      # levels that carry a SpatialVideoTransformer
    head_dim: int = 64                       # heads per level = channels // head_dim
    transformer_depth: int = 1
    context_dim: int = 1024                  # CLIP image embedding size (one token)
    addition_time_embed_dim: int = 256       # sinusoid size of each of fps_id, motion_bucket_id, cond_aug
    num_groups: int = 32
    res_norm_eps: float = 1e-5               # sgm: GroupNorm32 default eps in every res block
    attn_norm_eps: float = 1e-6              # sgm: SpatialTransformer GroupNorm eps


@dataclass
class VAEConfig:
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    scale_factor: float = 0.18215
    num_groups: int = 32
    norm_eps: float = 1e-6                   # spatial blocks (SD KL autoencoder)
    time_norm_eps: float = 1e-5              # the decoder's temporal res blocks (sgm UNet ResBlock)
    use_quant_conv: bool = False             # first_stage_model has none; the diffusers vae/ does
    linear_patch_size: int = 0               # 0: the KL VAE above; p > 0: the toy LinearPatchLatent on p x p patches


@dataclass
class CLIPConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_ratio: float = 4.0
    embed_dim: int = 1024
    norm_eps: float = 1e-5


@dataclass
class SVDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    # sampling defaults of the checkpoint (paper / sgm scripts)
    num_frames: int = 14
    steps: int = 25
    min_cfg: float = 1.0
    max_cfg: float = 2.5
    fps_id: int = 6
    motion_bucket_id: int = 127
    cond_aug: float = 0.02
    height: int = 576
    width: int = 1024
    # the sampler: "euler" (the teacher: Euler steps on the Karras grid below, with CFG) or "student" (SF-V: one
    # evaluation at sigma_max, refined at the generator's trained noise levels, student_levels, descending)
    sampler: str = "euler"
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    rho: float = 7.0
    student_levels: tuple = ()

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        sub = {"unet": UNetConfig, "vae": VAEConfig, "clip": CLIPConfig}
        kw = {}
        for name in [f.name for f in fields(cls) if f.name in d]:
            v = d[name]
            if name == "vae" and "space_to_depth" in v:      # the older name, kept by existing bundles
                v = {("linear_patch_size" if k == "space_to_depth" else k): x for k, x in v.items()}
            if name in sub:
                unknown = set(v) - {g.name for g in fields(sub[name])}
                if unknown:
                    raise ValueError(f"unknown {name} config fields: {sorted(unknown)}")
                v = sub[name](**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
            kw[name] = tuple(v) if isinstance(v, list) else v
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown SVD config fields: {sorted(unknown)}")
        return cls(**kw)

# -----------------------------------------------------------------------------
# shared pieces


def timestep_embedding(t, dim, max_period=10000):
    """sgm/diffusers sinusoid: [cos | sin] with freqs exp(-ln(max_period) * i / half). t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (sgm's GroupNorm32), safe under fp16/bf16."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def mix(alpha_param, x_a, x_b):
    """AlphaBlender ('learned'): sigmoid(mix_factor) x_a + (1 - sigmoid) x_b as one lerp, in x_b's memory layout."""
    return torch.lerp(x_b, x_a, torch.sigmoid(alpha_param.float()).to(x_a.dtype))

# -----------------------------------------------------------------------------
# UNet blocks: res blocks (sgm openaimodel.py, video_model.py) and attention (sgm attention.py, video_attention.py)


class ResBlock(nn.Module):
    """GN, SiLU, conv, + Linear(SiLU(emb)), GN, SiLU, conv, + skip. dims=2 (frames) or 3 (kernel (3,1,1) over time)."""

    def __init__(self, channels, out_channels, emb_channels, dims=2, groups=32, eps=1e-5):
        super().__init__()
        Conv = nn.Conv2d if dims == 2 else nn.Conv3d
        k, p = (3, 1) if dims == 2 else ((3, 1, 1), (1, 0, 0))
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels, eps=eps), nn.SiLU(), Conv(channels, out_channels, k, padding=p))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels)) if emb_channels else None
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels, eps=eps), nn.SiLU(), nn.Dropout(0.0),
                                        Conv(out_channels, out_channels, k, padding=p))
        self.skip_connection = nn.Identity() if channels == out_channels else Conv(channels, out_channels, 1)

    def forward(self, x, emb=None):
        # x (N, C, H, W) with emb (N, E), or x (B, C, T, H, W) with emb (B, T, E)
        h = self.in_layers(x)
        if self.emb_layers is not None:
            e = self.emb_layers(emb).to(h.dtype)
            if h.ndim == 5:
                e = e.transpose(1, 2)                               # (B, C, T)
            h = h + e.reshape(*e.shape, *([1] * (h.ndim - e.ndim)))
        h = self.out_layers(h)
        return self.skip_connection(x) + h        # skip after out_layers: one fewer live activation at the peak


class VideoResBlock(ResBlock):
    """Spatial ResBlock, then a temporal ResBlock (time_stack) mixed back in: a*x_spatial + (1-a)*x_temporal."""

    def __init__(self, channels, out_channels, emb_channels, groups=32, eps=1e-5):
        super().__init__(channels, out_channels, emb_channels, 2, groups, eps)
        self.time_stack = ResBlock(out_channels, out_channels, emb_channels, 3, groups, eps)
        self.time_mixer = nn.Module()
        self.time_mixer.mix_factor = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x, emb, T):
        x = super().forward(x, emb)                                 # (B*T, C, H, W)
        BT, C, H, W = x.shape
        xs = x.view(BT // T, T, C, H, W).transpose(1, 2)            # (B, C, T, H, W)
        xt = self.time_stack(xs, emb.view(BT // T, T, -1))
        x = mix(self.time_mixer.mix_factor, xs, xt)
        return x.transpose(1, 2).reshape(BT, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention through SDPA; self-attention when context is None. q/k/v have no bias."""

    def __init__(self, query_dim, heads, dim_head, context_dim=None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        # x (N, L, C), context (N, S, Cc) -> (N, L, C), or (N, 1, C) to broadcast over L when S == 1
        ctx = x if context is None else context
        if ctx.shape[1] == 1:   # one key (the CLIP token): softmax is exactly 1, every query gets the same v
            return self.to_out(self.to_v(ctx))
        N, L, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (t.view(N, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)              # (N, heads, L, d)
        return self.to_out(out.transpose(1, 2).reshape(N, L, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP: (..., dim) -> Linear to 2 x inner, x * gelu(gate), Linear to dim_out -> (..., dim_out)."""

    def __init__(self, dim, dim_out=None, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim_out or dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Spatial block: self-attn over H*W tokens, cross-attn to the CLIP token, GEGLU FF (pre-LN, residual)."""

    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class VideoTransformerBlock(nn.Module):
    """Temporal block on (B*H*W, T, C): ff_in, self-attn over frames, cross-attn to frame 0's CLIP token, FF."""

    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.norm_in = LayerNorm(dim)
        self.ff_in = FeedForward(dim, dim)
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim, dim)
        self.norm2 = LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm3 = LayerNorm(dim), LayerNorm(dim)

    def forward(self, x, context, T):
        BT, S, C = x.shape
        x = x.view(BT // T, T, S, C).transpose(1, 2).reshape(-1, T, C)      # (B*S, T, C)
        x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        x = self.ff(self.norm3(x)) + x
        return x.view(BT // T, S, T, C).transpose(1, 2).reshape(BT, S, C)


class SpatialVideoTransformer(nn.Module):
    """GN, proj_in, [spatial block; + time_pos_embed, temporal block; mix], proj_out, + residual."""

    def __init__(self, channels, heads, dim_head, depth, context_dim, groups=32, eps=1e-6):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm32(groups, channels, eps=eps)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.time_stack = nn.ModuleList([VideoTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.time_pos_embed = nn.Sequential(nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, channels))
        self.time_mixer = nn.Module()
        self.time_mixer.mix_factor = nn.Parameter(torch.tensor([0.5]))
        self.proj_out = nn.Linear(inner, channels)
        self.channels = channels

    def forward(self, x, context, T):
        # x (B*T, C, H, W), context (B*T, 1, D)
        BT, C, H, W = x.shape
        x_in = x
        x = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))   # (B*T, H*W, inner)
        # temporal context: frame 0's token of each video, one per spatial location
        t_ctx = context[::T].repeat_interleave(H * W, dim=0)        # (B*H*W, 1, D)
        frames = torch.arange(T, device=x.device).repeat(BT // T)
        pos = self.time_pos_embed(timestep_embedding(frames, self.channels).to(x.dtype))[:, None, :]  # (B*T, 1, C)
        for block, time_block in zip(self.transformer_blocks, self.time_stack):
            x = block(x, context)
            x_t = time_block(x + pos, t_ctx, T)
            x = mix(self.time_mixer.mix_factor, x, x_t)
        # x_in first: the sum takes x_in's contiguous layout, not proj_out's channels-last view
        return x_in + self.proj_out(x).transpose(1, 2).view(BT, C, H, W)

# -----------------------------------------------------------------------------
# UNet


class UNet(nn.Module):
    """The SVD spatiotemporal UNet (sgm VideoUNet). forward: (B, T, 8, H, W) -> (B, T, 4, H, W). Each entry of
    input_blocks, middle_block and output_blocks (sgm TimestepEmbedSequential) is a list of layers run by _layer."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mc, E, g = cfg.model_channels, 4 * cfg.model_channels, cfg.num_groups

        def res(cin, cout):
            return VideoResBlock(cin, cout, E, g, cfg.res_norm_eps)

        def attn(c):
            return SpatialVideoTransformer(c, c // cfg.head_dim, cfg.head_dim, cfg.transformer_depth, cfg.context_dim, g, cfg.attn_norm_eps)

        self.time_embed = nn.Sequential(nn.Linear(mc, E), nn.SiLU(), nn.Linear(E, E))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(3 * cfg.addition_time_embed_dim, E), nn.SiLU(), nn.Linear(E, E)))

        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        chans, ch = [mc], mc
        self.level_ends = []                                        # input_blocks index ending each level
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                self.input_blocks.append(nn.ModuleList(layers))
                chans.append(ch)
            self.level_ends.append(len(self.input_blocks) - 1)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                chans.append(ch)

        self.middle_block = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + chans.pop(), mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(layers))

        self.out = nn.Sequential(GroupNorm32(g, ch, eps=cfg.res_norm_eps), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @torch.no_grad()
    def zero_init_(self):
        """sgm's init for training from scratch (zero_module), returning self: the last conv of every (spatial and
        temporal) residual branch, each transformer's proj_out and the output conv are 0: blocks start as identities."""
        last = [m.out_layers[-1] if isinstance(m, ResBlock) else m.proj_out for m in self.modules()
                if isinstance(m, (ResBlock, SpatialVideoTransformer))]
        for layer in last + [self.out[-1]]:
            layer.weight.zero_()
            layer.bias.zero_()
        return self

    def _embed(self, x, c_noise, image_embeds, added_time_ids):
        """-> h (B*T, Cin, H, W): x with frames folded into the batch; emb (B*T, E); context (B*T, 1, D)."""
        B, T = x.shape[:2]
        cfg = self.cfg
        dt = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(c_noise.reshape(B), cfg.model_channels).to(dt)
        ids = added_time_ids.reshape(B, 3)
        v_emb = torch.cat([timestep_embedding(ids[:, i], cfg.addition_time_embed_dim) for i in range(3)], dim=1).to(dt)
        emb = self.time_embed(t_emb) + self.label_emb(v_emb)                     # (B, E)
        emb = emb.repeat_interleave(T, dim=0)                                    # (B*T, E), shared by frames
        context = image_embeds.reshape(B, 1, -1).to(dt).repeat_interleave(T, dim=0)  # (B*T, 1, D)
        return x.flatten(0, 1).to(emb.dtype), emb, context

    def _layer(self, layer, h, emb, context, T):
        """Run one layer; layer by layer (not block by block) so each input is freed as soon as it is consumed."""
        if isinstance(layer, VideoResBlock):
            args = (h, emb, T)
        elif isinstance(layer, SpatialVideoTransformer):
            args = (h, context, T)
        else:
            return layer(h)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def _block(self, block, h, emb, context, T):
        for layer in block:
            h = self._layer(layer, h, emb, context, T)
        return h

    def forward(self, x, c_noise, image_embeds, added_time_ids):
        """x (B, T, Cin, H, W), c_noise (B,), image_embeds (B, D), added_time_ids (B, 3) -> (B, T, Cout, H, W)."""
        B, T = x.shape[:2]
        h, emb, context = self._embed(x, c_noise, image_embeds, added_time_ids)
        hs = []
        for block in self.input_blocks:
            h = self._block(block, h, emb, context, T)
            hs.append(h)
        h = self._block(self.middle_block, h, emb, context, T)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)                     # (B*T, C + C_skip, H, W)
            h = self._block(block, h, emb, context, T)
        h = self.out(h)
        return h.reshape(B, T, *h.shape[1:])

    def encode_levels(self, x, c_noise, image_embeds, added_time_ids):
        """The encoder half (conv_in + input_blocks). Returns per level the features at the end of that level
        (before its downsample), each (B, T, C_l, H_l, W_l): the SF-V discriminator backbone (paper sec. 3.2)."""
        B, T = x.shape[:2]
        h, emb, context = self._embed(x, c_noise, image_embeds, added_time_ids)
        feats = []
        for i, block in enumerate(self.input_blocks[:self.level_ends[-1] + 1]):
            h = self._block(block, h, emb, context, T)
            if i in self.level_ends:
                feats.append(h.reshape(B, T, *h.shape[1:]))
        return feats

# -----------------------------------------------------------------------------
# temporal VAE (sgm diffusionmodules/model.py Encoder, autoencoding/temporal_ae.py VideoDecoder); the toy latent


class ResnetBlock(nn.Module):
    """SD-VAE res block: GN, SiLU, conv, GN, SiLU, conv, + (1x1 nin_shortcut) x."""

    def __init__(self, cin, cout, groups=32, eps=1e-6):
        super().__init__()
        self.norm1 = GroupNorm32(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm32(groups, cout, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class VAEVideoResBlock(ResnetBlock):
    """Spatial ResnetBlock then a temporal ResBlock; mixed s*x_temporal + (1-s)*x_spatial (note: opposite of the UNet)."""

    def __init__(self, cin, cout, groups=32, eps=1e-6, time_eps=1e-5):
        super().__init__(cin, cout, groups, eps)
        self.time_stack = ResBlock(cout, cout, 0, 3, groups, time_eps)
        self.mix_factor = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x, T):
        x = super().forward(x)                                       # (B*T, C, H, W)
        BT, C, H, W = x.shape
        xs = x.view(BT // T, T, C, H, W).transpose(1, 2)             # (B, C, T, H, W)
        x = mix(self.mix_factor, self.time_stack(xs), xs)
        return x.transpose(1, 2).reshape(BT, C, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over H*W with 1x1 conv projections (sgm 'vanilla')."""

    def __init__(self, c, groups=32, eps=1e-6):
        super().__init__()
        self.norm = GroupNorm32(groups, c, eps=eps)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # (N, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(N, C, H, W)
        return x + self.proj_out(h)


class VAEDownsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    """SD KL-f8 encoder: (N, 3, H, W) in [-1, 1] -> (N, 2*z, H/8, W/8) (mean | logvar)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, eps = cfg.num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, cfg.ch * mult, g, eps))
                cin = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = VAEDownsample(cin)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, g, eps)
        self.mid.attn_1 = AttnBlock(cin, g, eps)
        self.mid.block_2 = ResnetBlock(cin, cin, g, eps)
        self.norm_out = GroupNorm32(g, cin, eps=eps)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class TimeMixConv(nn.Conv2d):
    """conv_out of the video decoder: a 2D conv then time_mix_conv, a Conv3d (3,1,1) over frames."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=1)
        self.time_mix_conv = nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x, T):
        x = super().forward(x)
        BT, C, H, W = x.shape
        x = self.time_mix_conv(x.view(BT // T, T, C, H, W).transpose(1, 2))
        return x.transpose(1, 2).reshape(BT, C, H, W)


class VideoDecoder(nn.Module):
    """SVD's temporal decoder ('conv-only' time mode): (B*T, z, h, w) latents -> (B*T, 3, 8h, 8w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, eps, teps = cfg.num_groups, cfg.norm_eps, cfg.time_norm_eps
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = VAEVideoResBlock(cin, cin, g, eps, teps)
        self.mid.attn_1 = AttnBlock(cin, g, eps)
        self.mid.block_2 = VAEVideoResBlock(cin, cin, g, eps, teps)
        up = []
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(VAEVideoResBlock(cin, cfg.ch * mult, g, eps, teps))
                cin = cfg.ch * mult
            if i != 0:
                level.upsample = Upsample(cin)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = GroupNorm32(g, cin, eps=eps)
        self.conv_out = TimeMixConv(cin, cfg.in_channels)

    def forward(self, z, T):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z), T)), T)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, T)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)), T)


class VAEEncoder(nn.Module):
    """Encoder (+ optional quant_conv): image -> posterior (mean, logvar). sgm embedders.3.encoder has the quant_conv."""

    def __init__(self, cfg: VAEConfig, quant_conv=True):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1) if quant_conv else None

    def encode(self, x):
        """x (N, 3, H, W) in [-1, 1] -> mean, logvar each (N, z, H/8, W/8) (logvar clamped to [-30, 20])."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class TemporalVAE(VAEEncoder):
    """sgm first_stage_model: image encoder + video decoder. Latents in the diffusion space are z * scale_factor."""

    def __init__(self, cfg: VAEConfig):
        super().__init__(cfg, quant_conv=cfg.use_quant_conv)
        self.cfg = cfg
        self.decoder = VideoDecoder(cfg)

    def decode(self, z, chunk=14):
        """z (B, T, z, h, w) diffusion latents -> (B, T, 3, 8h, 8w) in [-1, 1] (unclamped).
        Each chunk of `chunk` frames is decoded as its own video (sgm decoding_t), so chunking changes the result."""
        B, T = z.shape[:2]
        z = z / self.cfg.scale_factor
        out = []
        for b in range(B):
            for s in range(0, T, chunk):
                zc = z[b, s:s + chunk]
                out.append(self.decoder(zc, zc.shape[0]))
        return torch.cat(out).reshape(B, T, *out[0].shape[1:])


class LinearPatchLatent(nn.Module):
    """The toy's stand-in for the KL VAE: z = proj (patch - patch_mean) per p x p pixel patch, decoded by its
    pseudo-inverse; fit() sets proj by PCA to the patches' top z_channels components, whitened to std 1 / scale_factor
    (as in SVD, z * scale_factor has unit variance, the conditioning latent z is 1 / scale_factor times larger).
    Unfitted: pixel_unshuffle by p. TemporalVAE's interface (encode, decode); decoder=False: the encoder only."""

    def __init__(self, cfg: VAEConfig, decoder=True):
        super().__init__()
        self.cfg, self.p = cfg, cfg.linear_patch_size
        n = 3 * self.p ** 2
        if cfg.z_channels > n:
            raise ValueError(f"linear_patch_size {self.p} gives {n} values per patch: z_channels {cfg.z_channels} "
                             f"must be at most {n}")
        self.register_buffer("patch_mean", torch.zeros(n))                      # (3 p^2,)
        self.register_buffer("proj", torch.eye(n)[:cfg.z_channels].clone())     # (z, 3 p^2)
        if decoder:
            self.register_buffer("unproj", self.proj.T.clone())                 # (3 p^2, z)

    def encode(self, x):
        """x (N, 3, H, W) in [-1, 1] -> mean (N, z, H/p, W/p), logvar (the clamp floor -30: deterministic)."""
        patches = F.pixel_unshuffle(x, self.p) - self.patch_mean.to(x.dtype).view(1, -1, 1, 1)   # (N, 3 p^2, h, w)
        mean = torch.einsum("kc,nchw->nkhw", self.proj.to(x.dtype), patches)                     # (N, z, h, w)
        return mean, torch.full_like(mean, -30.0)

    def decode(self, z, chunk=14):
        """z (B, T, z, h, w) -> (B, T, 3, p h, p w). Frame by frame, so `chunk` has no effect."""
        B, T, _, h, w = z.shape
        z = z / self.cfg.scale_factor
        patches = torch.einsum("ck,nkhw->nchw", self.unproj.to(z.dtype), z.flatten(0, 1))
        patches = patches + self.patch_mean.to(z.dtype).view(1, -1, 1, 1)                        # (B*T, 3 p^2, h, w)
        return F.pixel_shuffle(patches, self.p).reshape(B, T, 3, h * self.p, w * self.p)

    @torch.no_grad()
    def fit(self, frames):
        """The PCA of the class docstring, from the p x p patches of frames (N, 3, H, W) in [-1, 1]."""
        k, n = self.proj.shape
        s = self.cfg.scale_factor
        patches = F.pixel_unshuffle(frames.double(), self.p).movedim(1, -1).reshape(-1, n)     # (N h w, 3 p^2)
        mean = patches.mean(0)
        lam, U = torch.linalg.eigh(torch.cov((patches - mean).T))            # ascending eigenvalues
        lam, U = lam.flip(0)[:k].clamp_min(1e-12), U.flip(1)[:, :k]
        self.patch_mean.copy_(mean)
        self.proj.copy_((U / (s * lam.sqrt())).T)                            # (z, 3 p^2): whiten to std 1/s
        if hasattr(self, "unproj"):
            self.unproj.copy_(U * (s * lam.sqrt()))                          # (3 p^2, z): its pseudo-inverse

# -----------------------------------------------------------------------------
# OpenCLIP ViT image encoder (open_clip VisionTransformer; SVD's FrozenOpenCLIPImageEmbedder preprocessing)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def gaussian_blur(x, sigma, ksize):
    """Separable Gaussian blur with reflect padding (kornia gaussian_blur2d). x (N, C, H, W); sigma, ksize per axis."""
    C = x.shape[1]
    for dim, (s, k) in enumerate(zip(sigma, ksize)):
        t = torch.arange(k, dtype=torch.float32, device=x.device) - (k - 1) / 2          # tap offsets from the centre
        kern = torch.exp(-t.pow(2) / (2.0 * s ** 2))
        kern = (kern / kern.sum()).to(x.dtype)
        lo, hi = k // 2, (k - 1) // 2
        pad, shape = ((0, 0, lo, hi), (1, 1, k, 1)) if dim == 0 else ((lo, hi, 0, 0), (1, 1, 1, k))   # along H, W
        x = F.conv2d(F.pad(x, pad, mode="reflect"), kern.view(shape).repeat(C, 1, 1, 1), groups=C)
    return x


def clip_preprocess(img, size):
    """SVD's CLIP preprocessing: img (N, 3, H, W) in [-1, 1] -> (N, 3, size, size), resized ignoring aspect (Gaussian
    antialias, then bicubic with align_corners=True), mapped to [0, 1] and normalised with the CLIP mean/std."""
    H, W = img.shape[-2:]
    sig = [max((H / size - 1.0) / 2.0, 0.001), max((W / size - 1.0) / 2.0, 0.001)]
    ks = [int(max(2.0 * 2 * s, 3)) for s in sig]
    ks = [k + 1 if k % 2 == 0 else k for k in ks]
    x = gaussian_blur(img.float(), sig, ks)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ResidualAttentionBlock(nn.Module):
    """open_clip block: x + attn(ln_1(x)); x + mlp(ln_2(x)); attn is nn.MultiheadAttention-shaped (in_proj q,k,v)."""

    def __init__(self, width, heads, mlp_ratio, eps):
        super().__init__()
        self.heads = heads
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.attn.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        self.ln_2 = LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())                   # exact GELU (ViT-H-14 is not quick_gelu)
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x):
        N, L, C = x.shape
        h = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = (t.view(N, L, self.heads, -1).transpose(1, 2) for t in h.chunk(3, dim=-1))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, C)
        x = x + self.attn.out_proj(h)
        return x + self.mlp(self.ln_2(x))


class CLIPImageEncoder(nn.Module):
    """OpenCLIP ViT visual tower. forward(img in [-1, 1], any size) -> ln_post(CLS) @ proj, (N, embed_dim)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        w, n = cfg.width, (cfg.image_size // cfg.patch_size) ** 2
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(n + 1, w) * w ** -0.5)
        self.ln_pre = LayerNorm(w, eps=cfg.norm_eps)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([ResidualAttentionBlock(w, cfg.heads, cfg.mlp_ratio, cfg.norm_eps) for _ in range(cfg.layers)])
        self.ln_post = LayerNorm(w, eps=cfg.norm_eps)
        self.proj = nn.Parameter(torch.randn(w, cfg.embed_dim) * w ** -0.5)

    def forward(self, img):
        x = clip_preprocess(img, self.cfg.image_size).to(self.conv1.weight.dtype)
        x = self.conv1(x).flatten(2).transpose(1, 2)               # (N, L, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj

# -----------------------------------------------------------------------------
# EDM v-prediction preconditioning (sgm VScalingWithEDMcNoise) and the denoiser D(x, sigma)


def edm_precondition(sigma):
    """c_skip, c_out, c_in, c_noise for sigma (any shape): D(x, s) = c_skip x + c_out F(c_in x, c_noise)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    c_skip = 1.0 / (sigma ** 2 + 1.0)
    c_out = -sigma / (sigma ** 2 + 1.0).sqrt()
    c_in = 1.0 / (sigma ** 2 + 1.0).sqrt()
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def edm_input(x, c_in, cond_latent, dtype=None):
    """The UNet input of the SVD denoiser: cat[c_in x, cond latent] on channels. x (B, T, 4, h, w); c_in (B,);
    cond_latent (B, 4, h, w) (the same for every frame) or (B, T, 4, h, w) -> (B, T, 8, h, w) in dtype (x's)."""
    B, T = x.shape[:2]
    dtype = x.dtype if dtype is None else dtype
    if cond_latent.ndim == 4:
        cond_latent = cond_latent[:, None].expand(-1, T, -1, -1, -1)
    scaled = c_in.to(x.device).view(B, 1, 1, 1, 1) * x.float()
    return torch.cat([scaled.to(dtype), cond_latent.to(dtype)], dim=2)


def denoise(unet, x, sigma, cond_latent, image_embeds, added_time_ids):
    """The SVD denoiser D(x, sigma) -> x0_hat. x (B, T, 4, h, w); sigma (B,); cond_latent (B, 4, h, w) or
    (B, T, 4, h, w), concatenated after the c_in scaling; image_embeds (B, D); added_time_ids (B, 3)."""
    B, T = x.shape[:2]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
    c_skip, c_out, c_in, c_noise = edm_precondition(sigma)
    out = unet(edm_input(x, c_in, cond_latent), c_noise.reshape(B), image_embeds, added_time_ids)
    c_skip, c_out = c_skip.view(B, 1, 1, 1, 1), c_out.view(B, 1, 1, 1, 1)
    return (c_skip * x.float() + c_out * out.float()).to(x.dtype)


@torch.no_grad()
def sample_one_step(unet, cond, eps, sigma_max=700.0):
    """SF-V's generator at inference (Zhang et al. 2024, sec. 3): pure noise at sigma_max, one denoiser evaluation, no
    guidance. eps (B, T, z, h, w) standard normal; cond: SVD.condition's dict -> x0_hat (B, T, z, h, w) float32."""
    p = next(unet.parameters())
    x_T = (eps * math.sqrt(1.0 + sigma_max ** 2)).to(p.device, p.dtype)    # x_T ~ N(0, (1 + sigma_max^2) I)
    return denoise(unet, x_T, sigma_max, cond["cond_latent"], cond["image_embeds"], cond["added_time_ids"]).float()


@torch.no_grad()
def sample_student(unet, cond, eps, levels, generators):
    """SF-V student with len(levels) evaluations (multi-step refinement of a one-step model, as in OSV and LCM):
    sample_one_step at levels[0] = sigma_max, then at each next trained level s the prediction is re-noised with FRESH
    noise, x = x0_hat + s eps', eps' per sample from its generator, and predicted again. -> x0_hat (B, T, z, h, w)."""
    x0 = sample_one_step(unet, cond, eps, levels[0])
    dtype = next(unet.parameters()).dtype
    for s in levels[1:]:
        x = x0 + s * seeded_randn(eps.shape[1:], generators).to(x0.device)                 # (B, T, z, h, w)
        x0 = denoise(unet, x.to(dtype), s, cond["cond_latent"], cond["image_embeds"], cond["added_time_ids"]).float()
    return x0


def added_time_ids(fps_id, motion_bucket_id, cond_aug, batch=1, device=None):
    """SVD's vector conditioning (fps_id, motion_bucket_id, cond_aug) -> (batch, 3) float32."""
    ids = torch.tensor([[float(fps_id), float(motion_bucket_id), float(cond_aug)]], dtype=torch.float32, device=device)
    return ids.expand(batch, -1)

# -----------------------------------------------------------------------------
# sampling: the Karras grid and Euler steps of EDM (Karras et al. 2022, eq. 5 and Algorithm 1 without the 2nd-order
# correction), per-frame linear classifier-free guidance (SVD; sgm EulerEDMSampler, s_churn=0, LinearPredictionGuider)


def karras_sigmas(n, sigma_min=0.002, sigma_max=700.0, rho=7.0):
    """Karras schedule of n noise levels from sigma_max down to sigma_min, then 0 appended -> (n+1,) float32."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def cfg_scales(min_cfg, max_cfg, num_frames):
    """Per-frame guidance scale, linear from frame 0 to the last frame -> (T,)."""
    return torch.linspace(min_cfg, max_cfg, num_frames)


def cfg_combine(x_u, x_c, scales):
    """x_u + s_t (x_c - x_u) per frame t. x_u, x_c (B, T, C, h, w); scales (T,)."""
    return x_u + scales.to(x_u).view(1, -1, 1, 1, 1) * (x_c - x_u)


def euler_sample(denoise_fn, x, sigmas):
    """EDM Euler: d = (x - D(x, s)) / s; x += d (s_next - s). x (B, T, C, h, w) already scaled to sigmas[0];
    denoise_fn(x, sigma) -> x0_hat. The last step (to sigma 0) is exactly D(x, s_last), returned as is."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x0 = denoise_fn(x, s)
        if s_next == 0:       # x + (x - x0) / s * (0 - s) = x0, without float cancellation at s = 700
            return x0
        x = x + (x - x0) / s * (s_next - s)
    return x


def make_denoiser(unet, cond_latent, image_embeds, added_time_ids, scales=None, counter=None):
    """D(x, sigma) -> x0_hat (float32) for x (B, T, 4, h, w) float32. With `scales` (T,), classifier-free guidance:
    uncond (zero CLIP embedding and zero cond latent, same vector conditioning) and cond run as one batch of 2B,
    combined per frame on x0 (sgm LinearPredictionGuider). counter (a list) accumulates UNet evaluations."""
    dtype = next(unet.parameters()).dtype
    if scales is not None:
        cond_latent = torch.cat([torch.zeros_like(cond_latent), cond_latent])
        image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
        added_time_ids = added_time_ids.repeat(2, 1)

    def fn(x, sigma):
        xb = x.to(dtype) if scales is None else x.to(dtype).repeat(2, 1, 1, 1, 1)
        sig = torch.full((xb.shape[0],), float(sigma), device=x.device)
        out = denoise(unet, xb, sig, cond_latent, image_embeds, added_time_ids).float()
        if counter is not None:
            counter.append(xb.shape[0])
        if scales is None:
            return out
        x_u, x_c = out.chunk(2)
        return cfg_combine(x_u, x_c, scales)
    return fn


def seeded_randn(shape, generators):
    """One normal sample of `shape` per generator, stacked -> (len(generators), *shape) float32 on CPU. Each sample's
    noise depends only on its own generator: a seed gives the same result in any batch and on any device."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


@torch.no_grad()
def sample_latents(unet, cond, num_frames, generators, steps, min_cfg=1.0, max_cfg=1.0, sigma_min=0.002, sigma_max=700.0,
           rho=7.0, counter=None, levels=None):
    """Latent videos (B, num_frames, z, h, w) float32 from `cond` (SVD.condition's dict), eps per sample from its
    generator. steps=1: sample_one_step (SF-V); else x_T = sqrt(1 + sigma_max^2) eps, Euler over `steps` Karras levels
    with per-frame guidance min_cfg -> max_cfg (none if 1 everywhere: the cond branch alone)."""
    cond_latent = cond["cond_latent"]
    noise = seeded_randn((num_frames, *cond_latent.shape[1:]), generators)          # (B, T, z, h, w)
    if steps == 1 or levels:                                 # SF-V: one step, or the student's refinement
        if counter is not None:
            counter.extend([len(noise)] * steps)
        return sample_student(unet, cond, noise, (levels or [sigma_max])[:steps], generators)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    x = (noise * (1.0 + sigmas[0] ** 2).sqrt()).to(cond_latent.device)
    scales = None if min_cfg == max_cfg == 1.0 else cfg_scales(min_cfg, max_cfg, num_frames).to(cond_latent.device)
    fn = make_denoiser(unet, cond_latent, cond["image_embeds"], cond["added_time_ids"], scales, counter)
    return euler_sample(fn, x, sigmas)

# -----------------------------------------------------------------------------
# the bundle of the three networks


def _device_dtype(module):
    t = next(module.parameters(), None)
    t = next(module.buffers()) if t is None else t
    return t.device, t.dtype


def latent_factor(vae_cfg):
    """Pixels per latent position along each side: 8 for the KL VAE (2 per extra level), p for the toy latent."""
    return vae_cfg.linear_patch_size or 2 ** (len(vae_cfg.ch_mult) - 1)


def size_multiple(cfg):
    """Pixel sizes must be multiples of this: the latent factor times the UNet's downsampling (64 for SVD)."""
    return latent_factor(cfg.vae) * 2 ** (len(cfg.unet.channel_mult) - 1)


class SVD(nn.Module):
    """All of SVD: unet (model.diffusion_model), vae (first_stage_model), cond_encoder
    (conditioner.embedders.3.encoder, makes the conditioning latent), clip (embedders.0 ... visual).
    With cfg.vae.linear_patch_size the vae and cond_encoder are the toy LinearPatchLatent instead of the KL VAE."""

    def __init__(self, cfg: SVDConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg.unet)
        if cfg.vae.linear_patch_size:
            self.vae = LinearPatchLatent(cfg.vae)
            self.cond_encoder = LinearPatchLatent(cfg.vae, decoder=False)
        else:
            self.vae = TemporalVAE(cfg.vae)
            self.cond_encoder = VAEEncoder(cfg.vae, quant_conv=True)
        self.clip = CLIPImageEncoder(cfg.clip)

    def latent_shape(self, T, H, W):
        """Latent video shape (T, z, H/f, W/f) of a T x H x W pixel video (f = 8, or the toy patch size)."""
        f = latent_factor(self.cfg.vae)
        return (T, self.cfg.vae.z_channels, H // f, W // f)

    @torch.no_grad()
    def encode_image(self, img):
        """img (B, 3, H, W) in [-1, 1] (clean), on any device -> CLIP image embedding (B, D) on the encoder's device."""
        return self.clip(img.to(*_device_dtype(self.clip)))

    @torch.no_grad()
    def encode_cond(self, img):
        """img (B, 3, H, W) in [-1, 1], already noise-augmented -> conditioning latent (B, 4, H/8, W/8), the
        posterior mode, NOT scaled by scale_factor (sgm VideoPredictionEmbedderWithEncoder)."""
        return self.cond_encoder.encode(img.to(*_device_dtype(self.cond_encoder)))[0]

    @torch.no_grad()
    def condition(self, image, generators, fps_id=None, motion_bucket_id=None, cond_aug=None):
        """SVD's image-to-video conditioning (Blattmann et al. 2023) of image (B, 3, H, W) in [-1, 1] -> dict on the
        UNet's device and dtype: image_embeds (B, D), CLIP of the clean image; cond_latent (B, z, h, w), the cond
        encoder's mode of image + cond_aug eps (eps per sample, from its generator); added_time_ids (B, 3). The
        vector conditioning (fps_id, motion_bucket_id, cond_aug) defaults to cfg's."""
        c = self.cfg
        cond_aug = c.cond_aug if cond_aug is None else cond_aug
        device, dtype = _device_dtype(self.unet)
        aug = seeded_randn(image.shape[1:], generators).to(image.device)               # (B, 3, H, W)
        return {"image_embeds": self.encode_image(image).to(device, dtype),
                "cond_latent": self.encode_cond(image + cond_aug * aug).to(device, dtype),
                "added_time_ids": added_time_ids(c.fps_id if fps_id is None else fps_id,
                                                 c.motion_bucket_id if motion_bucket_id is None else motion_bucket_id,
                                                 cond_aug, len(image), device)}

    def sample(self, cond, generators, num_frames=None, steps=None, min_cfg=None, max_cfg=None, counter=None):
        """Latent videos (B, T, z, h, w) from SVD.condition's dict (sample_latents; decode with vae.decode) by
        cfg.sampler: "euler" (Euler on cfg's Karras grid, guidance min_cfg -> max_cfg) or "student" (sample_student at
        the `steps` largest trained levels, no guidance; more steps than levels: ValueError). Defaults from cfg."""
        c = self.cfg
        steps = c.steps if steps is None else steps
        if c.sampler == "student" and not 1 <= steps <= len(c.student_levels):
            raise ValueError(f"steps {steps}: the student was trained at {len(c.student_levels)} noise levels "
                             f"({', '.join(f'{s:.4g}' for s in c.student_levels)}); sample with 1 to "
                             f"{len(c.student_levels)} steps")
        return sample_latents(self.unet, cond, c.num_frames if num_frames is None else num_frames, generators, steps,
                              c.min_cfg if min_cfg is None else min_cfg, c.max_cfg if max_cfg is None else max_cfg,
                              c.sigma_min, c.sigma_max, c.rho, counter, c.student_levels if c.sampler == "student" else None)

    def fit_linear_latent(self, frames):
        """Toy latent: fit the vae and the cond_encoder (the same encoder, as in SVD) on frames (N, 3, H, W)."""
        for m in (self.vae, self.cond_encoder):
            m.fit(frames)

# -----------------------------------------------------------------------------
# config table

CONFIGS = {
    # same networks; sampling defaults from the sgm scripts (svd: 14 frames/25 steps, svd_xt: 25 frames/30 steps)
    "svd": SVDConfig(),
    "svd_xt": SVDConfig(num_frames=25, steps=30, min_cfg=1.5, max_cfg=3.0),
    # a tiny net with the full structure (4 levels, video blocks everywhere): a CPU forward in milliseconds
    "tiny": SVDConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention_levels=(0, 1, 2),
                        head_dim=16, context_dim=32, addition_time_embed_dim=32),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2)),
        clip=CLIPConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=32),
        num_frames=4, steps=4, height=64, width=64),
    # the toy reproduction (toy.py): a small UNet on 8-frame 16x16 synthetic videos in pixel space (LinearPatchLatent,
    # 1x1 patches); 8 norm groups, as 32 would make each 32-channel GroupNorm an InstanceNorm, erasing the frame colour
    "toy": SVDConfig(
        unet=UNetConfig(in_channels=6, out_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_levels=(2,), head_dim=16, context_dim=32, addition_time_embed_dim=32, num_groups=8),
        vae=VAEConfig(z_channels=3, linear_patch_size=1, scale_factor=0.2),
        clip=CLIPConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=32),
        num_frames=8, steps=25, min_cfg=1.0, max_cfg=1.5, fps_id=6, height=16, width=16),
}
