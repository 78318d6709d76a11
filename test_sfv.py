"""
Tests for the SVD/SF-V reimplementation; no test downloads anything.
- model.py / load_svd.py: tiny random configs are built with the reference implementations (diffusers,
  transformers), saved in BOTH official layouts (an sgm-keyed single file and a diffusers folder) and loaded through
  load_svd.py; our outputs must match the references numerically. Loader errors.
- sample.py: end to end on tiny checkpoints in every layout, the sampler maths, image formats, outputs, errors.
- discriminator.py / train.py: frozen backbone, samplers, losses, resume after a kill, 2-process DDP == 1 process.
- evaluate.py / toy.py: Frechet distance vs closed forms, metrics, the FVD command, the toy pipeline smoke run.
Run: python -m pytest -q test_sfv.py
"""
import argparse
import hashlib
import http.server
import json
import math
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import replace

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import cli
import data
import load_svd
import memory_plan
import sample
import train
from discriminator import Discriminator, hinge_d_loss, hinge_g_loss, r1_penalty, score
from load_svd import LoadError
import evaluate as E
import model
from model import CONFIGS, SVD, edm_precondition

# 2 shared cores: every test runs single-threaded (OpenMP spinning on 2 threads is ~20x slower for these tiny ops);
# subprocesses get OMP_NUM_THREADS=1 through ENV
torch.set_num_threads(1)
HERE = ROOT = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
TINY = CONFIGS["tiny"]
SMALL_D = ["--head-channels", "32", "--cmap-dim", "16", "--cond-embed-dim", "32"]     # small D heads for speed
DEFAULT_D = ["--head-channels", "256", "--cmap-dim", "64", "--cond-embed-dim", "128"]   # train.py's defaults
COMMON = ["--init", "tiny", "--data", "synthetic", "--workers", "0", "--log-every", "1", "--sample-every", "0"] + SMALL_D
LOSS_KEYS = ["loss_g", "adv_g", "recon", "loss_d", "r1", "d_real", "d_fake", "grad_norm_g", "grad_norm_d"]


def write_mp4(path, frames, fps=8):
    """The tests' one video writer: frames (T, H, W, 3) uint8 -> an MPEG-4 Part 2 mp4 (deterministic, unlike x264)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode())
    return str(path)

# -----------------------------------------------------------------------------
# reference models (diffusers / transformers) with tiny configs and random non-zero weights


def _randomize(module, seed):
    """Every parameter random and non-zero, including zero-initialised convs and the mix factors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if re.search(r"norm|layer_norm|layrnorm", name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith("mix_factor"):
                p.copy_(r)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(r / max(fan_in, 1) ** 0.5 * (0.5 if p.ndim > 1 else 0.1))
    return module


def ref_unet(cfg=TINY.unet):
    pytest.importorskip("diffusers")
    from diffusers import UNetSpatioTemporalConditionModel
    chans = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    n = len(chans)
    down = tuple("CrossAttnDownBlockSpatioTemporal" if i in cfg.attention_levels else "DownBlockSpatioTemporal" for i in range(n))
    up = tuple("CrossAttnUpBlockSpatioTemporal" if (n - 1 - i) in cfg.attention_levels else "UpBlockSpatioTemporal" for i in range(n))
    m = UNetSpatioTemporalConditionModel(
        sample_size=None, in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=down,
        up_block_types=up, block_out_channels=chans, addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=3 * cfg.addition_time_embed_dim, layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim, transformer_layers_per_block=cfg.transformer_depth,
        num_attention_heads=tuple(c // cfg.head_dim for c in chans), num_frames=4)
    # diffusers uses GroupNorm eps 1e-6 in some res blocks where sgm (the ground truth) uses 1e-5: align to sgm
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.GroupNorm) and ".resnets." in name:
            mod.eps = cfg.res_norm_eps
    return _randomize(m, 1).eval()


def ref_vae(cfg=TINY.vae):
    from diffusers import AutoencoderKLTemporalDecoder
    m = AutoencoderKLTemporalDecoder(block_out_channels=tuple(cfg.ch * x for x in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                                     down_block_types=("DownEncoderBlock2D",) * len(cfg.ch_mult),
                                     latent_channels=cfg.z_channels, scaling_factor=cfg.scale_factor)
    return _randomize(m, 2).eval()


def ref_clip(cfg=TINY.clip):
    pytest.importorskip("transformers")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    c = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio), num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                         projection_dim=cfg.embed_dim, hidden_act="gelu", layer_norm_eps=cfg.norm_eps)
    return _randomize(CLIPVisionModelWithProjection(c), 3).eval()

# -----------------------------------------------------------------------------
# an independent diffusers -> sgm renaming (written from the two libraries' module trees, not from load_svd.py) used to
# write the official single-file layout from the reference weights


def d2s_unet(k, nrb, attention_levels, n_levels):
    for a, b in [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                 ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
                 ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]:
        if k.startswith(a):
            return b + k[len(a):]
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

    def inner(typ, rest):
        if typ == "resnets":
            m = re.match(r"(spatial_res_block|temporal_res_block)\.(\w+)\.(\w+)$", rest)
            if m is None:
                return rest  # time_mixer.mix_factor
            return ("" if m.group(1) == "spatial_res_block" else "time_stack.") + res[m.group(2)] + "." + m.group(3)
        rest = rest.replace("temporal_transformer_blocks.", "time_stack.")
        return rest.replace("time_pos_embed.linear_1.", "time_pos_embed.0.").replace("time_pos_embed.linear_2.", "time_pos_embed.2.")

    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m.group(1), m.group(2))]
        return f"middle_block.{idx}." + inner(m.group(1), m.group(3))
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
    side, b, typ, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if typ == "downsamplers":
        return f"input_blocks.{1 + b * (nrb + 1) + nrb}.0.op." + rest[len("conv."):]
    if typ == "upsamplers":
        level = n_levels - 1 - b
        return f"output_blocks.{b * (nrb + 1) + nrb}.{2 if level in attention_levels else 1}." + rest
    i = 1 + b * (nrb + 1) + j if side == "down" else b * (nrb + 1) + j
    return f"{'input' if side == 'down' else 'output'}_blocks.{i}.{0 if typ == 'resnets' else 1}." + inner(typ, rest)


def d2s_vae(k, v, n_levels):
    """diffusers vae key -> (sgm key, tensor)."""
    if re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", k):
        v = v[:, :, None, None]
    k = re.sub(r"mid_block\.attentions\.0\.", "mid.attn_1.", k)
    k = k.replace("attn_1.group_norm", "attn_1.norm").replace("attn_1.to_q", "attn_1.q").replace("attn_1.to_k", "attn_1.k")
    k = k.replace("attn_1.to_v", "attn_1.v").replace("attn_1.to_out.0", "attn_1.proj_out")
    k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.upsample.", k)
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out").replace("time_conv_out", "conv_out.time_mix_conv")
    k = k.replace("spatial_res_block.", "").replace("time_mixer.mix_factor", "mix_factor")
    for a, b in [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3")]:
        k = k.replace(f"temporal_res_block.{a}.", f"time_stack.{b}.")
    return k, v


def d2s_clip(sd):
    out = {}
    for k, v in sd.items():
        if k == "visual_projection.weight":
            out["proj"] = v.t().contiguous()
            continue
        if "position_ids" in k:
            continue
        k = k.replace("vision_model.", "").replace("embeddings.patch_embedding", "conv1").replace("embeddings.class_embedding", "class_embedding")
        k = k.replace("embeddings.position_embedding.weight", "positional_embedding").replace("pre_layrnorm", "ln_pre").replace("post_layernorm", "ln_post")
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", k)
        if m:
            i, rest = m.groups()
            if re.match(r"self_attn\.[qkv]_proj", rest):
                if rest.startswith("self_attn.q_proj"):
                    wb = rest.rsplit(".", 1)[1]
                    qkv = [sd[f"vision_model.encoder.layers.{i}.self_attn.{x}_proj.{wb}"] for x in "qkv"]
                    out[f"transformer.resblocks.{i}.attn.in_proj_{wb}"] = torch.cat(qkv)
                continue
            rest = rest.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("self_attn.out_proj", "attn.out_proj")
            rest = rest.replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
            k = f"transformer.resblocks.{i}.{rest}"
        out[k] = v
    return out


def single_file_state(unet, vae, clip, cfg=TINY, extras=True):
    """The official single-file layout (sgm names) of the reference weights, with SVD's known-unused extras."""
    u = cfg.unet
    sd = {"model.diffusion_model." + d2s_unet(k, u.num_res_blocks, u.attention_levels, len(u.channel_mult)): v
          for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        sk, sv = d2s_vae(k, v, len(cfg.vae.ch_mult))
        if sk.startswith("quant_conv."):
            sd["conditioner.embedders.3.encoder." + sk] = sv
            continue
        if sk.startswith("encoder."):   # first stage encoder (no quant_conv) and the conditioning encoder
            sd["conditioner.embedders.3.encoder." + sk] = sv.clone()
        sd["first_stage_model." + sk] = sv
    sd.update({"conditioner.embedders.0.open_clip.model.visual." + k: v for k, v in d2s_clip(clip.state_dict()).items()})
    if extras:
        w = cfg.clip.width
        sd.update({"conditioner.embedders.0.open_clip.model.token_embedding.weight": torch.zeros(10, w),
                   "conditioner.embedders.0.open_clip.model.positional_embedding": torch.zeros(7, w),
                   "conditioner.embedders.0.open_clip.model.ln_final.weight": torch.ones(w),
                   "conditioner.embedders.0.open_clip.model.text_projection": torch.zeros(w, w),
                   "conditioner.embedders.0.open_clip.model.logit_scale": torch.ones(()),
                   "conditioner.embedders.3.encoder.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
                   "conditioner.embedders.3.encoder.post_quant_conv.weight": torch.zeros(4, 4, 1, 1)})
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Reference models + the same weights saved as a single file and as a diffusers folder."""
    d = tmp_path_factory.mktemp("svd")
    unet, vae, clip = ref_unet(), ref_vae(), ref_clip()
    single = d / "svd_tiny.safetensors"
    save_file(single_file_state(unet, vae, clip), str(single))
    folder = d / "diffusers"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    clip.save_pretrained(folder / "image_encoder")
    return dict(unet=unet, vae=vae, clip=clip, single=single, folder=folder, dir=d)


@pytest.fixture(scope="module", params=["single", "diffusers"])
def loaded(request, refs):
    path = refs["single"] if request.param == "single" else refs["folder"]
    return request.param, load_svd.load(path, config=TINY)


def _close(a, b, atol=2e-5, rtol=2e-5):
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= atol + rtol * scale, f"max abs err {err:.3g} (ref max {scale:.3g})"
    return err


def _inputs(B=2, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = TINY.unet
    # 16x16 latents: at 8x8 the deepest level is 1x1 and a random net's GroupNorm amplifies fp32 rounding ~1000x
    return (torch.randn(B, T, c.in_channels, 16, 16, generator=g), torch.randn(B, generator=g),
            torch.randn(B, c.context_dim, generator=g), torch.tensor([[6.0, 127.0, 0.02], [3.0, 40.0, 0.5]])[:B])

# -----------------------------------------------------------------------------
# parity


def test_unet_parity(refs, loaded):
    layout, svd = loaded
    x, c_noise, emb, ids = _inputs()
    with torch.no_grad():
        ref = refs["unet"](x, c_noise, encoder_hidden_states=emb[:, None], added_time_ids=ids).sample
        ours = svd.unet(x, c_noise, emb, ids)
    assert ref.abs().mean() > 1e-2           # the reference does real work (nothing is zero-initialised)
    _close(ours, ref)


def test_unet_any_frames_and_size(refs, loaded):
    _, svd = loaded
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 8, 16, 24, generator=g)
    c_noise, emb, ids = torch.tensor([0.3]), torch.randn(1, 32, generator=g), torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        ref = refs["unet"](x, c_noise, encoder_hidden_states=emb[:, None], added_time_ids=ids).sample
        _close(svd.unet(x, c_noise, emb, ids), ref)


class _FunctionCalls(torch.overrides.TorchFunctionMode):
    """Records the names of the torch functions called under it (which path a module took)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _grads_close(fast, plain, x, params, plain_params=None):
    """fast(x) and plain(x): equal outputs, and equal gradients for x and the parameters (params, plain's own
    plain_params if it has its own) under a random upstream gradient."""
    out, ref = fast(x), plain(x)
    _close(out, ref)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(out, [x] + params, grad)
    for a, b in zip(got, torch.autograd.grad(ref, [x] + (params if plain_params is None else plain_params), grad)):
        _close(a, b)


def test_cpu_kernels_match_plain_modules():
    # cpu_kernels.apply switches plain modules to its fast CPU paths: each path runs at shapes that take it (checked by
    # the torch functions called), the plain forward below its threshold; outputs and gradients equal the plain ones
    import cpu_kernels
    g = torch.Generator().manual_seed(7)
    F = torch.nn.functional

    def calls(module, x):
        with torch.no_grad(), _FunctionCalls() as c:
            module(x)
        return c.names
    cases = [  # (conv, input, GEMM path expected)
        (lambda: torch.nn.Conv2d(256, 128, 3, padding=1, stride=2), (2, 256, 4, 4), True),  # 295k weights >= 16x 8k
        (lambda: torch.nn.Conv2d(512, 256, 1), (2, 512, 2, 2), True),                          # 1x1: 131k >= 16x 4k
        (lambda: torch.nn.Conv2d(16, 32, 3, padding=1), (2, 16, 8, 8), False)]                 # 4.6k < 16x 2k input
    for make, shape, gemm in cases:
        conv = cpu_kernels.apply(make())
        assert type(conv) is cpu_kernels.Conv2d
        x = torch.randn(shape, generator=g, requires_grad=True)
        assert ("unfold" in calls(conv, x)) == gemm, shape
        _grads_close(conv, lambda x: F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding), x,
                     [conv.weight, conv.bias])
    conv3 = cpu_kernels.apply(torch.nn.Conv3d(16, 24, (3, 1, 1), padding=(1, 0, 0)))
    x = torch.randn(2, 16, 5, 6, 7, generator=g, requires_grad=True)
    names = calls(conv3, x)
    assert "conv2d" in names and "conv3d" not in names, names
    _grads_close(conv3, lambda x: F.conv3d(x, conv3.weight, conv3.bias, 1, (1, 0, 0)), x, [conv3.weight, conv3.bias])
    cases = [  # Linear: a 1x1 conv from 192 rows and 2^26 multiply-adds on, F.linear below either
        ((320, 256), (3, 300, 320), True),        # 900 rows, 74M multiply-adds
        ((1280, 640), (1, 191, 1280), False),     # 191 rows (157M multiply-adds)
        ((64, 48), (4, 1000, 64), False)]         # 12M multiply-adds (4000 rows)
    for (cin, cout), shape, conv in cases:
        for bias in (True, False):
            lin = cpu_kernels.apply(torch.nn.Linear(cin, cout, bias=bias))
            x = torch.randn(shape, generator=g, requires_grad=True)
            names = calls(lin, x)
            assert ("conv2d" in names) == conv and ("linear" in names) != conv, (shape, names)
            _grads_close(lin, lambda x: F.linear(x, lin.weight, lin.bias), x, [lin.weight] + ([lin.bias] if bias else []))
    plain, ff = model.FeedForward(64), model.FeedForward(64)
    ff.load_state_dict(plain.state_dict())
    assert cpu_kernels.apply(ff) is ff and type(ff) is cpu_kernels.FeedForward and type(ff.net[2]) is cpu_kernels.Linear
    chunks = []
    ff.net.register_forward_pre_hook(lambda m, args: chunks.append(args[0].shape[0]))
    x = torch.randn(3, 700, 64, generator=g, requires_grad=True)
    old = cpu_kernels.FeedForward.chunk_values
    cpu_kernels.FeedForward.chunk_values = 512 * 2 * 256          # chunks of 512 tokens: 2100 rows -> 5 chunks
    try:
        _grads_close(ff, plain, x, list(ff.parameters()), list(plain.parameters()))
        chunks.clear()
        ff(x)
        assert chunks == [512, 512, 512, 512, 52], chunks
    finally:
        cpu_kernels.FeedForward.chunk_values = old
    chunks.clear()
    ff(x)
    assert chunks == [1024, 1024, 52], chunks                     # default: 2^19 values / 512 GEGLU outputs


def test_cpu_kernels_apply_to_a_model():
    # one call on a whole SVD: the same parameters under the same keys, every matching module switched, subclasses
    # (TimeMixConv) left alone, and the UNet's output and gradients equal the plain model's
    import cpu_kernels
    torch.manual_seed(0)
    plain = SVD(TINY)
    svd = SVD(TINY)
    svd.load_state_dict(plain.state_dict())
    before = {k: v.data_ptr() for k, v in svd.state_dict().items()}
    assert cpu_kernels.apply(svd) is svd
    assert {k: v.data_ptr() for k, v in svd.state_dict().items()} == before        # same keys, same tensors
    kinds = {type(m) for m in svd.modules()}
    assert {cpu_kernels.Conv2d, cpu_kernels.Conv3d, cpu_kernels.Linear, cpu_kernels.FeedForward} <= kinds
    assert not kinds & {torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear, model.FeedForward}
    assert type(svd.vae.decoder.conv_out) is model.TimeMixConv
    x, c_noise, emb, ids = _inputs()
    x.requires_grad_(True)
    out, ref = svd.unet(x, c_noise, emb, ids), plain.unet(x, c_noise, emb, ids)
    _close(out, ref)
    (out * ref.detach()).sum().backward()
    (ref * ref.detach()).sum().backward()
    grads = [(a.grad, b.grad) for a, b in zip(svd.unet.parameters(), plain.unet.parameters())]
    assert sum(a is not None for a, _ in grads) > 100 and all((a is None) == (b is None) for a, b in grads)
    for a, b in grads:
        if a is not None:                       # None: to_q/to_k of the cross-attentions to one token are unused
            _close(a, b)


def test_vae_encode_parity(refs, loaded):
    layout, svd = loaded
    img = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post = refs["vae"].encode(img).latent_dist
        mean, logvar = svd.cond_encoder.encode(img)          # the conditioning encoder: encoder + quant_conv
        _close(mean, post.mean)
        _close(logvar, post.logvar)
        _close(svd.encode_cond(img), post.mode())
        m2, _ = svd.vae.encode(img)
        if layout == "single":   # sgm first_stage_model: the encoder without quant_conv
            _close(m2, refs["vae"].encoder(img).chunk(2, dim=1)[0])
        else:
            _close(m2, post.mean)


@pytest.mark.parametrize("chunk", [4, 3])
def test_vae_decode_parity(refs, loaded, chunk):
    _, svd = loaded
    B, T = 2, 4
    z = torch.randn(B, T, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    vae = refs["vae"]
    with torch.no_grad():
        ref = []
        for b in range(B):
            for s in range(0, T, chunk):
                zc = z[b, s:s + chunk] / vae.config.scaling_factor
                ref.append(vae.decode(zc, num_frames=zc.shape[0]).sample)
        ref = torch.cat(ref).reshape(B, T, 3, 64, 64)
        ours = svd.vae.decode(z, chunk=chunk)
    _close(ours, ref)


def test_vae_chunking_changes_result(loaded):
    _, svd = loaded
    z = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = svd.vae.decode(z, chunk=4), svd.vae.decode(z, chunk=2)
    assert (a - b).abs().max() > 1e-3   # the temporal convs see different neighbours


def test_clip_parity_with_preprocessing(refs, loaded):
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
    _, svd = loaded
    img = torch.rand(2, 3, 45, 77, generator=torch.Generator().manual_seed(4)) * 2 - 1    # non-square, non-32
    size = TINY.clip.image_size
    x = (_resize_with_antialiasing(img, (size, size)) + 1.0) / 2.0
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = refs["clip"](pixel_values=(x - mean) / std).image_embeds
        _close(svd.encode_image(img), ref)


@pytest.mark.parametrize("sigma", [700.0, 1.5])
def test_denoiser_parity(refs, loaded, sigma):
    _, svd = loaded
    g = torch.Generator().manual_seed(6)
    B, T = 2, 4
    x = torch.randn(B, T, 4, 16, 16, generator=g) * (1 + sigma ** 2) ** 0.5
    cond = torch.randn(B, 4, 16, 16, generator=g)
    emb = torch.randn(B, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * B)
    s = torch.full((B,), sigma)
    # EDM v-prediction (Karras et al. 2022, Table 1; SVD's sgm VScalingWithEDMcNoise): c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1), c_in = 1/sqrt(s^2+1)
    c_in, c_out, c_skip = 1 / (sigma ** 2 + 1) ** 0.5, -sigma / (sigma ** 2 + 1) ** 0.5, 1 / (sigma ** 2 + 1)
    inp = torch.cat([c_in * x, cond[:, None].expand(-1, T, -1, -1, -1)], dim=2)
    with torch.no_grad():
        F_ = refs["unet"](inp, torch.full((B,), 0.25 * torch.log(torch.tensor(sigma)).item()), encoder_hidden_states=emb[:, None],
                          added_time_ids=ids).sample
        ref = c_skip * x + c_out * F_
        ours = model.denoise(svd.unet, x, s, cond, emb, ids)
    _close(ours, ref)


def test_edm_precondition_values():
    c_skip, c_out, c_in, c_noise = edm_precondition(torch.tensor([1.0, 700.0]))
    torch.testing.assert_close(c_skip, torch.tensor([0.5, 1 / 490001]))
    torch.testing.assert_close(c_out, torch.tensor([-0.5 ** 0.5, -700 / 490001 ** 0.5]))
    torch.testing.assert_close(c_in, torch.tensor([0.5 ** 0.5, 1 / 490001 ** 0.5]))
    torch.testing.assert_close(c_noise, torch.tensor([0.0, 0.25 * 6.551080335043404]))


def test_load_bf16_reports_skipped(refs):
    svd = load_svd.load(refs["single"], config=TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in svd.parameters())
    assert not any(p.is_meta for p in svd.parameters())
    assert svd.load_info["skipped"] == {"OpenCLIP text-tower leftovers": 5, "the conditioning autoencoder's unused decoder": 2}
    x, c_noise, emb, ids = _inputs()
    with torch.no_grad():
        ref = refs["unet"](x, c_noise, encoder_hidden_states=emb[:, None], added_time_ids=ids).sample
        out = svd.unet(x.bfloat16(), c_noise, emb.bfloat16(), ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_bundle_round_trip(refs, loaded, tmp_path):
    _, svd = loaded
    p = load_svd.save(svd, tmp_path / "bundle.safetensors", {"steps": 1})
    assert sorted(os.listdir(tmp_path)) == ["bundle.safetensors"]     # atomic: no temp file left behind
    back = load_svd.load(p)
    assert back.cfg == svd.cfg and back.load_info["layout"] == "bundle"
    assert back.load_info["metadata"]["steps"] == "1"
    for (k, a), (k2, b) in zip(svd.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)

# -----------------------------------------------------------------------------
# full-size key mapping (shapes only: reference models built on the meta device)


def test_full_size_checkpoint_maps_every_key():
    from diffusers import UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    cfg = CONFIGS["svd"]
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()       # diffusers' defaults are SVD's
        vae = AutoencoderKLTemporalDecoder(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                           down_block_types=("DownEncoderBlock2D",) * 4)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                              num_attention_heads=16, image_size=224, patch_size=14,
                                                              projection_dim=1024, hidden_act="gelu"))
    assert sum(p.numel() for p in unet.parameters()) == 1524623082
    shapes = {}
    for tag, m in (("unet", unet), ("vae", vae), ("image_encoder", clip)):
        shapes.update({f"{tag}/{k}": tuple(v.shape) for k, v in m.state_dict().items()})
    dcfg = replace(cfg, vae=replace(cfg.vae, use_quant_conv=True))
    plan, skipped = load_svd.match(dcfg, "diffusers", shapes)
    with torch.device("meta"):
        assert set(plan) == set(SVD(dcfg).state_dict()) and not skipped
    single = single_file_state(unet, vae, clip, cfg)   # meta tensors: names and shapes only
    assert sum(k.startswith("model.diffusion_model.") for k in single) == 1428
    plan, skipped = load_svd.match(cfg, "single", {k: tuple(v.shape) for k, v in single.items()})
    with torch.device("meta"):
        ours = SVD(cfg)
    assert set(plan) == set(ours.state_dict())
    assert sum(p.numel() for p in ours.unet.parameters()) == 1524623082
    assert sum(p.numel() for p in ours.clip.parameters()) == 632076800

# -----------------------------------------------------------------------------
# loader errors


@pytest.fixture(scope="module")
def single_sd(refs):
    return single_file_state(refs["unet"], refs["vae"], refs["clip"])


def _write(tmp_path, sd, name="ckpt.safetensors"):
    p = tmp_path / name
    save_file(sd, str(p))
    return p


def test_error_missing_key(tmp_path, single_sd):
    sd = dict(single_sd)
    del sd["model.diffusion_model.out.2.bias"]
    with pytest.raises(LoadError, match=r"^checkpoint is missing 1 keys: model\.diffusion_model\.out\.2\.bias "):
        load_svd.load(_write(tmp_path, sd), config=TINY)


def test_error_unexpected_key(tmp_path, single_sd):
    sd = dict(single_sd, **{"model.diffusion_model.extra.weight": torch.zeros(3)})
    with pytest.raises(LoadError, match=r"^checkpoint has 1 unexpected keys: model\.diffusion_model\.extra\.weight "):
        load_svd.load(_write(tmp_path, sd), config=TINY)


def test_error_wrong_shape(tmp_path, single_sd):
    sd = dict(single_sd, **{"model.diffusion_model.out.2.bias": torch.zeros(5)})
    with pytest.raises(LoadError, match=re.escape("shape mismatch for 'model.diffusion_model.out.2.bias': checkpoint has [5], model expects [4]")):
        load_svd.load(_write(tmp_path, sd), config=TINY)
    bundle = make_tiny_checkpoint(str(tmp_path), "bundle")     # our bundles too, also at the same size (transposed)
    meta, sd = load_svd.bundle_metadata(bundle), {k: v.contiguous() for k, v in SVD(TINY).state_dict().items()}
    for key, bad in (("unet.out.2.bias", [5]), ("unet.input_blocks.0.0.weight", [8, 32, 3, 3])):
        save_file({**sd, key: torch.zeros(bad)}, bundle, metadata=meta)
        with pytest.raises(LoadError, match=re.escape(f"shape mismatch for '{key}': checkpoint has {bad}, model expects "
                                                      f"{list(sd[key].shape)}")):
            load_svd.load(bundle)


def test_error_sd15_checkpoint(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.zeros(320, 320),
          "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
          "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 768)}
    with pytest.raises(LoadError, match=re.escape("is not an SVD checkpoint: it looks like a Stable Diffusion image model "
                                                  "(UNet without temporal layers, conv_in [320, 4, 3, 3])")):
        load_svd.load(_write(tmp_path, sd))
    with pytest.raises(LoadError, match="is not an SVD checkpoint: none of its 1 keys"):
        load_svd.load(_write(tmp_path, {"lm_head.weight": torch.zeros(2)}, "other.safetensors"))


def test_error_truncated_file(tmp_path, refs):
    data = refs["single"].read_bytes()
    p = tmp_path / "trunc.safetensors"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"is not a readable safetensors file .*truncated: download it again$"):
        load_svd.load(p, config=TINY)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_legacy_checkpoints_load_weights_only(tmp_path, single_sd, fmt):
    """.ckpt of plain tensors in both torch.save formats loads; the same file with code in it is refused, naming it."""
    plain = tmp_path / "svd_tiny.ckpt"
    torch.save({"state_dict": single_sd}, plain, _use_new_zipfile_serialization=fmt == "zip")
    svd = load_svd.load(plain, config=TINY)
    torch.testing.assert_close(svd.unet.out[2].bias, single_sd["model.diffusion_model.out.2.bias"])
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Evil()}}, evil, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(LoadError) as e:
        load_svd.load(evil, config=TINY)
    assert str(e.value) == (f"refusing to load {evil}: it imports Python objects ({os.system.__module__}.system) that "
                            f"would run when unpickled; only plain tensor checkpoints are loaded (torch.load "
                            f"weights_only=True): convert a checkpoint you trust to .safetensors")


def test_pickle_and_damaged_torch_files_refused(tmp_path, single_sd):
    evil = tmp_path / "evil.ckpt"                              # a raw pickle, not even a torch.save file
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(LoadError, match=rf"^refusing to load .*evil\.ckpt: it imports Python objects "
                                        rf"\({os.system.__module__}\.system\) that would run when unpickled; "):
        load_svd.load(evil, config=TINY)
    for fmt in ("zip", "legacy"):
        good = tmp_path / f"good_{fmt}.pt"
        torch.save({"state_dict": single_sd}, good, _use_new_zipfile_serialization=fmt == "zip")
        cut = tmp_path / f"cut_{fmt}.pt"
        cut.write_bytes(good.read_bytes()[:4000])
        with pytest.raises(LoadError, match=rf"^{re.escape(str(cut))} is not a readable PyTorch checkpoint \(.*\); it may "
                                            rf"be truncated or not a checkpoint: download it again or convert it to "
                                            rf"\.safetensors$"):
            load_svd.load(cut, config=TINY)


def test_user_error_hierarchy():
    assert issubclass(LoadError, cli.UserError) and issubclass(LoadError, ValueError)
    assert issubclass(cli.UserError, cli.UserError) and issubclass(cli.UserError, cli.UserError)


def test_error_not_found_and_bad_folder(tmp_path):
    with pytest.raises(LoadError, match="^checkpoint not found: "):
        load_svd.load(tmp_path / "nope.safetensors")
    with pytest.raises(LoadError, match="is a folder but not a diffusers SVD folder"):
        load_svd.load(tmp_path)


def test_official_shapes_recognised_without_config(refs):
    with pytest.raises(LoadError, match=re.escape("unrecognised SVD shapes (UNet conv_in [32, 8, 3, 3]); pass the model config explicitly")):
        load_svd.load(refs["single"])


# =============================================================================
# sample.py: image -> video

def test_error_renamed_missing_and_extra_bundle_keys(tmp_path):
    bundle = make_tiny_checkpoint(str(tmp_path), "bundle")
    meta, sd = load_svd.bundle_metadata(bundle), {k: v.contiguous() for k, v in SVD(TINY).state_dict().items()}
    key = "unet.out.2.bias"
    renamed = {("unet.out.2.b" if k == key else k): v for k, v in sd.items()}
    save_file(renamed, bundle, metadata=meta)
    with pytest.raises(LoadError) as e:
        load_svd.load(bundle)
    assert str(e.value) == (f"bundle {bundle} has a tensor 'unet.out.2.b' where its config expects '{key}' (the same "
                            f"shape [4]: renamed?); rename it back to '{key}', or use the file as train.py wrote it, or "
                            f"save or download it again")
    save_file({**sd, "unet.extra": torch.zeros(2)}, bundle, metadata=meta)
    with pytest.raises(LoadError) as e:
        load_svd.load(bundle)
    assert str(e.value) == (f"bundle {bundle} does not match its config: it has 1 tensors its config does not define "
                            f"(unet.extra); use the file as train.py wrote it, or save or download it again")
    save_file({k: v for k, v in sd.items() if k != key}, bundle, metadata=meta)
    with pytest.raises(LoadError) as e:
        load_svd.load(bundle)
    assert str(e.value) == (f"bundle {bundle} does not match its config: it lacks 1 tensors of its config ({key}); use "
                            f"the file as train.py wrote it, or save or download it again")


def test_error_not_a_checkpoint(tmp_path, single_sd):
    """A text file (e.g. --ckpt README.md), an empty file or unknown bytes: 'not a checkpoint', not 'pickled
    objects'; a safetensors file under another extension is recognised by its content."""
    for name, content, what in (("README.md", b"# SF-V\nA reimplementation.\n", "a text file"),
                                ("empty.ckpt", b"", "an empty file"), ("blob.bin", bytes(range(1, 256)) * 4, "an unknown binary format")):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(LoadError) as e:
            load_svd.load(p, config=TINY)
        assert str(e.value) == (f"{p} is not a checkpoint ({what}, neither safetensors nor a PyTorch file); pass "
                                f"svd.safetensors, a diffusers folder or an SF-V bundle")
    renamed = _write(tmp_path, single_sd, "svd_tiny.ckpt")
    torch.testing.assert_close(load_svd.load(renamed, config=TINY).unet.out[2].bias,
                               single_sd["model.diffusion_model.out.2.bias"])


def test_bundle_sampler_fields_round_trip_and_old_bundles(tmp_path):
    """The sampler kind, the noise grid and a student's trained levels travel in the bundle's config; a bundle saved
    before they were set loads as a student (train.py's default levels) when it was an SF-V run: its metadata says
    mode sfv, or (toy.py's copies, without a mode or the fields) it samples in one step."""
    cfg = replace(TINY, sampler="student", student_levels=(80.0, 8.0, 0.5), sigma_max=80.0, sigma_min=0.01, rho=5.0,
                  steps=2, min_cfg=1.0, max_cfg=1.0)
    path = load_svd.save(SVD(cfg), str(tmp_path / "s.safetensors"))
    assert load_svd.load(path).cfg == cfg
    sd = {k: v.contiguous() for k, v in SVD(TINY).state_dict().items()}
    old = {k: v for k, v in TINY.to_dict().items() if k not in ("sampler", "sigma_min", "sigma_max", "rho", "student_levels")}
    levels = (700.0, pytest.approx(70.5408, rel=1e-5), pytest.approx(2.26912, rel=1e-5))
    euler = {"sampler": "euler", "student_levels": []}           # the fields' defaults, before train.py set them
    for mode, fields, want in (("sfv", {}, "student"), ("sfv", euler, "student"), ("diffusion", {}, "euler"),
                               (None, {}, "student"), (None, {"steps": 4}, "euler"), (None, euler, "euler")):
        meta = {"format": load_svd.BUNDLE_FORMAT, "config": json.dumps({**old, "steps": 1, **fields}),
                **({"mode": mode} if mode else {})}
        save_file(sd, str(tmp_path / "old.safetensors"), metadata=meta)
        c = load_svd.load(str(tmp_path / "old.safetensors")).cfg
        assert (c.sampler, c.student_levels) == ((want, levels) if want == "student" else (want, ())), (mode, fields)
        assert (c.sigma_min, c.sigma_max, c.rho) == (0.002, 700.0, 7.0)
    for bad, why in ((dict(sampler="ddim"), "sampler 'ddim' is neither 'euler' nor 'student'"),
                     (dict(sampler="student", student_levels=(1.0, 5.0)), "student_levels [1.0, 5.0]: need positive "
                                                                           "noise levels, descending"),
                     (dict(sampler="student", student_levels=(700.0,), steps=2), "steps 2: a student takes 1 to 1 steps "
                                                                                 "(one per trained level)"),
                     (dict(num_frames=0), "num_frames 0: must be a number >= 1"),
                     (dict(height=None), "height None: must be a number >= 1")):
        path = load_svd.save(SVD(TINY), str(tmp_path / "bad.safetensors"))
        save_file(sd, path, metadata={"format": load_svd.BUNDLE_FORMAT, "config": json.dumps({**TINY.to_dict(), **bad})})
        with pytest.raises(LoadError) as e:
            load_svd.load(path)
        assert str(e.value) == f"bundle {path} has a bad value in its config ({why}); save or download it again"


# -----------------------------------------------------------------------------
# helpers: a tiny random checkpoint in each layout, test images


def make_tiny_checkpoint(folder, layout="bundle", seed=0, extra_metadata=None, cfg=TINY):
    """A tiny random SVD saved as our bundle, an sgm-keyed single file or a diffusers folder -> its path.
    The single file and the folder need --config tiny; the bundle carries its config (cfg)."""
    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    if layout == "bundle":
        return load_svd.save(SVD(cfg), os.path.join(folder, "tiny_bundle.safetensors"), extra_metadata)
    if layout == "single":
        sd = SVD(TINY).state_dict()
        state = {load_svd.SGM_PREFIX[k.split(".", 1)[0]] + k.split(".", 1)[1]: v.contiguous() for k, v in sd.items()}
        path = os.path.join(folder, "svd_tiny.safetensors")
        save_file(state, path)
        return path
    assert layout == "diffusers"
    cfg = replace(TINY, vae=replace(TINY.vae, use_quant_conv=True))    # diffusers' one encoder has the quant_conv
    svd = SVD(cfg)
    svd.cond_encoder.load_state_dict(svd.vae.state_dict(), strict=False)  # encoder + quant_conv shared
    sd = svd.state_dict()
    files = {}
    for name, (srcs, kind) in load_svd.key_map(cfg, "diffusers").items():
        t = sd[name]
        if kind == "cat":
            parts = t.chunk(3, dim=0)
        elif kind == "t":
            parts = [t.t()]
        elif kind == "view":
            parts = [t.reshape(t.shape[:2]) if t.ndim == 4 else t]
        else:
            parts = [t]
        for s, v in zip(srcs, parts):
            sub, key = s.split("/", 1)
            files.setdefault(sub, {})[key] = v.contiguous().clone()
    path = os.path.join(folder, "svd_tiny_diffusers")
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("image_encoder", "model")):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
        save_file(files[sub], os.path.join(path, sub, stem + ".safetensors"))
    return path


def write_image(path, arr, fmt, codec="png", pix_fmt=None):
    """Encode arr (H, W, C) of pixel format fmt with av into a one-frame image file."""
    frame = av.VideoFrame.from_ndarray(arr, format=fmt)
    cc = av.CodecContext.create(codec, "w")
    cc.width, cc.height, cc.pix_fmt = frame.width, frame.height, pix_fmt or fmt
    if pix_fmt and pix_fmt != fmt:
        frame = frame.reformat(format=pix_fmt)
    with open(path, "wb") as f:
        for p in cc.encode(frame) + cc.encode():
            f.write(bytes(p))
    return path


def smooth_rgb(H, W, seed=0):
    """A smooth colourful test image (H, W, 3) uint8 (compresses well, survives JPEG)."""
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    r = np.random.default_rng(seed).uniform(1, 3, size=3)
    img = np.stack([np.sin(r[0] * 3 * x) * 0.5 + 0.5, np.cos(r[1] * 3 * y) * 0.5 + 0.5, (x + y) / 2 * r[2] / 3], -1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def decode(path):
    """-> (frames (T, H, W, 3) uint8, fps, codec name, pixel format)."""
    with av.open(path) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return np.stack(frames), s.average_rate, s.codec_context.name, s.codec_context.pix_fmt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {layout: make_tiny_checkpoint(str(d), layout) for layout in ("bundle", "single", "diffusers")}


@pytest.fixture()
def img(tmp_path, monkeypatch):
    """A test image; the test runs in its folder (sample.py's default output out/ lands there, not in the repo)."""
    monkeypatch.chdir(tmp_path)
    return write_image(str(tmp_path / "in.png"), smooth_rgb(96, 160), "rgb24")


def run_main(argv, capsys):
    rc = sample.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err

# -----------------------------------------------------------------------------
# sampler maths (model.py)


def test_karras_sigmas():
    s = model.karras_sigmas(25)
    assert s.shape == (26,) and s[-1] == 0
    assert torch.allclose(s[[0, -2]], torch.tensor([700.0, 0.002]), rtol=1e-5)
    assert (s[1:] < s[:-1]).all()
    i = torch.arange(25, dtype=torch.float64) / 24   # (max^(1/7) + i/(n-1) (min^(1/7) - max^(1/7)))^7
    ref = (700 ** (1 / 7) + i * (0.002 ** (1 / 7) - 700 ** (1 / 7))) ** 7
    assert torch.allclose(s[:-1].double(), ref, rtol=1e-6)
    assert model.karras_sigmas(1).tolist() == [700.0, 0.0]   # SF-V: one step from sigma_max


def test_euler_with_true_x0_denoiser_recovers_x0():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(1, 3, 4, 5, 5, generator=g, dtype=torch.float64)
    sigmas = model.karras_sigmas(10).double()
    seen = []

    def oracle(x, s):
        seen.append((x.clone(), s))
        return x0
    out = model.euler_sample(oracle, x0 + sigmas[0] * eps, sigmas)
    assert torch.allclose(out, x0, atol=1e-9)
    assert len(seen) == 10
    for (x, s), ref in zip(seen, sigmas[:-1].tolist()):   # each iterate lies on the true path x0 + sigma_i eps
        assert s == pytest.approx(ref)
        assert torch.allclose(x, x0 + s * eps, rtol=1e-6, atol=1e-6)


def test_sample_one_step_is_one_euler_step():
    # SF-V's generator (model.sample_one_step) equals the general sampler's Euler path with one step, and
    # sample_latents(steps=1) runs it on per-generator noise, one evaluation per sample
    torch.manual_seed(0)
    svd = SVD(TINY).eval()
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    cond = svd.condition(torch.rand(2, 3, 64, 64, generator=gens[0]) * 2 - 1, gens)
    state = [g.get_state() for g in gens]
    eps = model.seeded_randn((4, 4, 8, 8), gens)
    x0 = model.sample_one_step(svd.unet, cond, eps)
    sigmas = model.karras_sigmas(1)
    with torch.no_grad():
        D = model.make_denoiser(svd.unet, cond["cond_latent"], cond["image_embeds"], cond["added_time_ids"])
        ref = model.euler_sample(D, eps * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    assert x0.shape == (2, 4, 4, 8, 8) and x0.dtype == torch.float32 and ref.abs().mean() > 1e-2
    assert (x0 - ref).abs().max().item() <= 1e-6
    for g, s in zip(gens, state):
        g.set_state(s)
    counter = []
    z = model.sample_latents(svd.unet, cond, 4, gens, 1, min_cfg=1.0, max_cfg=2.5, counter=counter)
    assert (z - x0).abs().max().item() <= 1e-6 and counter == [2]


def test_cfg_weights_per_frame_follow_linspace():
    sc = model.cfg_scales(1.5, 3.0, 25)
    assert torch.allclose(sc, torch.tensor(np.linspace(1.5, 3.0, 25), dtype=torch.float32))
    out = model.cfg_combine(torch.zeros(1, 25, 4, 2, 2), torch.ones(1, 25, 4, 2, 2), sc)
    assert torch.allclose(out[0, :, 0, 0, 0], sc)
    # through the batched denoiser: a UNet whose output depends on whether the branch is conditional
    T, calls = 5, []

    class FakeUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, c_noise, image_embeds, added_time_ids):
            calls.append(x.shape[0])
            cond = (image_embeds.abs().sum(1) > 0).float().view(-1, 1, 1, 1, 1)      # 0 = uncond, 1 = cond
            return torch.ones_like(x[:, :, :4]) * (1 + 2 * cond)                       # F_u = 1, F_c = 3
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    scales = model.cfg_scales(1.0, 2.5, T)
    D = model.make_denoiser(FakeUNet(), torch.randn(1, 4, 2, 2), torch.randn(1, 8), ids, scales)
    x, s = torch.randn(1, T, 4, 2, 2), 3.0
    c_skip, c_out, _, _ = edm_precondition(torch.tensor(s))
    ref = c_skip * x + c_out * (1 + 2 * scales.view(1, T, 1, 1, 1))   # D_u + s_t (D_c - D_u)
    assert torch.allclose(D(x, s), ref, atol=1e-5)
    assert calls == [2]                                                  # cond + uncond in one call

def test_student_refinement_levels_fresh_noise_and_seeds(monkeypatch):
    """An SF-V student's N steps: sample_one_step at sigma_max, then the N-1 next trained levels, each re-noising the
    prediction with fresh seeded noise (not the noise implied by the previous step); deterministic per seed and
    independent of the batch."""
    torch.manual_seed(0)
    svd = SVD(replace(TINY, sampler="student", student_levels=(700.0, 70.5, 2.27), steps=1)).eval()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    seen, real = [], model.denoise

    def spy(unet, x, sigma, *a):
        out = real(unet, x, sigma, *a)
        seen.append((float(torch.as_tensor(sigma).reshape(-1)[0]), x.float().clone(), out.float().clone()))
        return out
    monkeypatch.setattr(model, "denoise", spy)

    def run(images, seeds, steps):
        g = [torch.Generator().manual_seed(s) for s in seeds]
        return svd.sample(svd.condition(images, g), g, steps=steps)
    for steps, levels in ((1, [700.0]), (2, [700.0, 70.5]), (3, [700.0, 70.5, 2.27])):
        seen.clear()
        x = run(img, (1, 2), steps)
        assert [round(s, 4) for s, _, _ in seen] == levels
        eps0 = seen[0][1] / math.sqrt(1 + 700.0 ** 2)                       # the initial noise
        for (_, _, prev), (s, x_in, _) in zip(seen, seen[1:]):
            implied = (x_in - prev) / s                                      # the noise added at this level
            assert abs(implied.std().item() - 1) < 0.1                       # unit noise at the trained level
            cos = F.cosine_similarity(implied.flatten(), eps0.flatten(), dim=0).item()
            assert abs(cos) < 0.1, cos                                       # fresh, not the initial/implied noise
        assert torch.equal(x, run(img, (1, 2), steps))                       # same seeds, same video
        alone = run(img[1:], (2,), steps)                                    # batch independent (to float round-off)
        assert ((alone - x[1:]).norm() / x[1:].norm()).item() < 1e-2   # other noise would differ by O(1)


def test_condition_and_sample_per_sample_seeds_batch_independent():
    """SVD.condition + SVD.sample: each sample's noise comes from its own generator, so a batch of 3 equals the
    three samples run one by one (up to batched-kernel round-off), and sample 0 equals sample_video's recipe."""
    torch.manual_seed(0)
    svd = SVD(TINY).eval()
    imgs = torch.rand(3, 3, 64, 64) * 2 - 1
    seeds = [11, 12, 13]

    def run(i, j, steps, **kw):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:j]]
        cond = svd.condition(imgs[i:j], gens)
        return cond, svd.sample(cond, gens, num_frames=2, steps=steps, **kw)
    for steps, kw in ((1, {}), (3, dict(min_cfg=1.0, max_cfg=2.5))):
        cond, batch = run(0, 3, steps, **kw)
        assert batch.shape == (3, 2, 4, 8, 8)
        assert cond["added_time_ids"].tolist() == [[TINY.fps_id, TINY.motion_bucket_id, pytest.approx(TINY.cond_aug)]] * 3
        between = (batch[0] - batch[1]).abs().mean()                    # two seeds: O(1) apart
        for i in range(3):
            alone = run(i, i + 1, steps, **kw)[1][0]
            assert (alone - batch[i]).abs().mean() < 1e-2 * between      # the same sample, up to kernel round-off
            if steps == 1:
                torch.testing.assert_close(alone, batch[i], atol=1e-3, rtol=1e-3)
    # one generator per sample: first the cond-aug noise, then the initial latent (what sample_video draws)
    g = torch.Generator().manual_seed(11)
    aug, noise = torch.randn(3, 64, 64, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        cl = svd.encode_cond(imgs[:1] + TINY.cond_aug * aug[None])
        ref = model.denoise(svd.unet, noise[None] * (1 + 700.0 ** 2) ** 0.5, torch.tensor([700.0]), cl,
                            svd.encode_image(imgs[:1]),
                            model.added_time_ids(TINY.fps_id, TINY.motion_bucket_id, TINY.cond_aug))
    torch.testing.assert_close(run(0, 1, 1)[1], ref, atol=1e-5, rtol=1e-5)


def _student(levels=None, **kw):
    """A tiny SF-V student config: refinement at `levels` (default: train.py's 4-level grid without its smallest)."""
    levels = tuple(model.karras_sigmas(4)[:-2].tolist()) if levels is None else levels
    return replace(TINY, sampler="student", student_levels=levels, steps=1, min_cfg=1.0, max_cfg=1.0, **kw)


def test_student_refinement_exact_noise_batch_and_step_bound():
    """The refinement in closed form (a fake UNet F = x / 2): the noise added at each next level is exactly the
    sample's generator's next draw (not the implied noise of the previous step), sample 5 gets it in any batch, the
    counter counts one evaluation per step, guidance is not applied, and more steps than trained levels is an error."""
    levels = tuple(model.karras_sigmas(4)[:-2].tolist())
    seen = []

    class FakeUNet(torch.nn.Module):                                    # F = 0.5 * its input: D(x, s) known in closed form
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, c_noise, image_embeds, added_time_ids):
            seen.append((x[:, :, :4].clone(), c_noise[0].exp().pow(4).item()))  # c_noise = log(sigma) / 4
            return 0.5 * x[:, :, :4]
    with torch.device("meta"):
        svd = SVD(_student(levels))
    svd.unet = FakeUNet()
    cond = {"cond_latent": torch.zeros(1, 4, 8, 8), "image_embeds": torch.zeros(1, 32),
            "added_time_ids": model.added_time_ids(6, 127, 0.02)}
    for steps in (1, 2, 3):
        seen.clear()
        counter = []
        out = svd.sample(cond, [torch.Generator().manual_seed(5)], num_frames=2, steps=steps, max_cfg=3.0, counter=counter)
        assert [s for _, s in seen] == pytest.approx(levels[:steps], rel=1e-4) and sum(counter) == steps
    g = torch.Generator().manual_seed(5)
    eps = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]      # x_T's noise, then one fresh draw per step
    x0 = []
    for (inp, s) in seen:
        c_skip, c_out, c_in, _ = edm_precondition(torch.tensor(s))
        x0.append(c_skip * inp / c_in + c_out * 0.5 * inp)                 # D(x, s) of the fake UNet
    torch.testing.assert_close(seen[0][0][0], eps[0], rtol=1e-4, atol=1e-4)   # c_in x_T = eps
    for k in (1, 2):
        x = seen[k][0][0] / edm_precondition(torch.tensor(seen[k][1]))[2]
        fresh = (x - x0[k - 1][0]) / levels[k]
        torch.testing.assert_close(fresh, eps[k], rtol=1e-3, atol=1e-3)        # the generator's next draw
        implied = (seen[k - 1][0][0] / edm_precondition(torch.tensor(levels[k - 1]))[2] - x0[k - 1][0]) / levels[k - 1]
        assert abs(torch.nn.functional.cosine_similarity(fresh.flatten(), implied.flatten(), dim=0)) < 0.2     # not the implied noise
    torch.testing.assert_close(out[0], x0[2][0])
    pair = svd.sample(cond | {k: v.repeat(2, *[1] * (v.ndim - 1)) for k, v in cond.items()},
                      [torch.Generator().manual_seed(7), torch.Generator().manual_seed(5)], num_frames=2, steps=3)
    torch.testing.assert_close(pair[1], out[0], rtol=1e-6, atol=1e-6)    # sample 5's noise, whatever the batch
    with pytest.raises(ValueError, match=re.escape("steps 4: the student was trained at 3 noise levels (700, 70.54, "
                                                   "2.269); sample with 1 to 3 steps")):
        svd.sample(cond, [torch.Generator()], num_frames=2, steps=4)


def test_edm_input_and_added_time_ids():
    x, cl = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 4, 5, 5)
    c_in = torch.tensor([0.5, 2.0])
    inp = model.edm_input(x, c_in, cl)
    assert inp.shape == (2, 3, 8, 5, 5)
    torch.testing.assert_close(inp[1, 2, :4], 2.0 * x[1, 2])
    torch.testing.assert_close(inp[0, 1, 4:], cl[0])                  # the cond latent repeated over frames
    assert model.edm_input(x, c_in, cl, torch.bfloat16).dtype == torch.bfloat16
    ids = model.added_time_ids(6, 127, 0.02, batch=2)
    assert ids.shape == (2, 3) and ids.dtype == torch.float32 and ids[1].tolist() == pytest.approx([6, 127, 0.02])

# -----------------------------------------------------------------------------
# images in


@pytest.mark.parametrize("kind", ["rgb24", "rgba", "gray", "pal8", "gray16be", "rgb48be", "jpeg", "webp"])
def test_read_image_formats(tmp_path, kind):
    rgb = smooth_rgb(48, 80)
    p = str(tmp_path / f"x.{ {'jpeg': 'jpg', 'webp': 'webp'}.get(kind, 'png') }")
    if kind == "rgb24":
        write_image(p, rgb, "rgb24")
        ref, tol = rgb / 255.0, 1e-6
    elif kind == "rgba":
        a = np.zeros((48, 80, 1), np.uint8)
        a[:, 40:] = 255
        write_image(p, np.concatenate([rgb, a], -1), "rgba")
        ref, tol = np.where(a == 255, rgb / 255.0, 1.0), 1e-6                    # transparent half -> white
    elif kind == "gray":
        write_image(p, rgb[..., 0], "gray")
        ref, tol = np.repeat(rgb[..., :1] / 255.0, 3, -1), 1e-6
    elif kind == "pal8":
        idx = (np.arange(80)[None] // 20 + np.zeros((48, 1), int)).astype(np.uint8)   # 4 vertical stripes
        colours = np.array([[255, 0, 0, 255], [0, 200, 0, 255], [10, 20, 30, 255], [0, 0, 255, 0]], np.uint8)  # RGBA
        pal = np.zeros((256, 4), np.uint8)
        pal[:4] = colours[:, [3, 0, 1, 2]]                                       # av wants ARGB rows
        write_image(p, (idx, pal), "pal8")
        ref = np.where(colours[idx, 3:] == 255, colours[idx, :3] / 255.0, 1.0)   # transparent entry -> white
        tol = 1e-6
    elif kind == "gray16be":
        g16 = (np.linspace(0, 65535, 80)[None].repeat(48, 0)).astype(np.uint16)
        write_image(p, g16, "gray16le", pix_fmt="gray16be")
        ref, tol = np.repeat((g16.astype(np.float64) / 65535)[..., None], 3, -1), 1e-4
    elif kind == "rgb48be":
        v = rgb.astype(np.uint16) * 257 + 100
        write_image(p, v, "rgb48le", pix_fmt="rgb48be")
        ref, tol = v.astype(np.float64) / 65535, 1e-4
    elif kind == "jpeg":
        write_image(p, rgb, "rgb24", codec="mjpeg", pix_fmt="yuvj444p")
        ref, tol = rgb / 255.0, 0.06
    else:
        write_image(p, rgb, "rgb24", codec="libwebp", pix_fmt="yuv420p")
        ref, tol = rgb / 255.0, 0.12
    x = data.read_image(p)
    assert x.shape == (3, 48, 80) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert np.abs(x.permute(1, 2, 0).numpy() - ref).max() <= tol
    if kind == "rgb48be":   # 16-bit precision kept (not truncated to 8 bits)
        assert np.abs(x.permute(1, 2, 0).numpy() - ref).max() < 0.5 / 255


def test_resize_center_crop():
    img = torch.zeros(3, 100, 300)
    img[:, :, 100:200] = 1.0                                   # white centre third, black sides
    out = data.resize_center_crop(img, 64, 64)              # cover: 64x192, then crop the middle 64
    assert out.shape == (3, 64, 64)
    assert out[:, :, 4:-4].min() > 0.99                        # only the white centre survives
    out = data.resize_center_crop(torch.rand(3, 50, 60), 128, 256)
    assert out.shape == (3, 128, 256)
    clip = torch.rand(5, 3, 50, 60)                            # a clip (train.py's use) = the frames one by one
    out = data.resize_center_crop(clip, 32, 48, mode="bilinear")
    assert out.shape == (5, 3, 32, 48)
    assert torch.allclose(out, torch.stack([data.resize_center_crop(f, 32, 48, mode="bilinear") for f in clip]))
    assert sample.snap_size(100, 130, 64) == (128, 128) and sample.snap_size(576, 1024, 64) == (576, 1024)
    assert sample.snap_size(18, 1, 4) == (16, 4)                # the toy's step; at least one step

# -----------------------------------------------------------------------------
# end to end


@pytest.mark.parametrize("layout", ["bundle", "single", "diffusers"])
def test_e2e_each_layout(tmp_path, ckpts, img, layout, capsys):
    out = str(tmp_path / "v.mp4")
    argv = [img, "--ckpt", ckpts[layout], "--out", out, "--steps", "1", "--frames", "3", "--height", "64",
            "--width", "128", "--seed", "1"]
    if layout != "bundle":
        argv += ["--config", "tiny"]
    rc, so, err = run_main(argv, capsys)
    assert rc == 0, err
    frames, fps, codec, pix = decode(out)
    assert frames.shape == (3, 64, 128, 3)
    assert fps == 7 and codec == "h264" and pix == "yuv420p"
    assert f"wrote {out}" in so and "(1 UNet evals)" in so and "image encode" in so and "decode" in so
    assert [f for f in os.listdir(tmp_path) if ".tmp-" in f] == []


def test_layouts_give_the_same_video(tmp_path):
    """The same weights as a bundle and as an official single file give the same video for a seed."""
    bundle, single = (make_tiny_checkpoint(str(tmp_path), layout, seed=0) for layout in ("bundle", "single"))
    img = torch.rand(3, 64, 64)
    a, _ = sample.sample_video(load_svd.load(bundle), img, num_frames=2, steps=1, seed=3)
    b, _ = sample.sample_video(load_svd.load(single, config=TINY), img, num_frames=2, steps=1, seed=3)
    assert torch.allclose(a, b, atol=1e-3)     # not bitwise: kernels can differ with the weights' memory alignment


def test_one_step_and_multi_step(ckpts):
    svd = load_svd.load(ckpts["bundle"])
    img = torch.rand(3, 64, 64)
    calls = []
    h = svd.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    v1, st1 = sample.sample_video(svd, img, num_frames=2, steps=1, seed=0)
    assert calls == [1] and st1["unet_evals"] == 1                       # SF-V: one evaluation, no CFG
    calls.clear()
    v3, st3 = sample.sample_video(svd, img, num_frames=2, steps=3, min_cfg=1.0, max_cfg=2.5, seed=0)
    assert calls == [2, 2, 2] and st3["unet_evals"] == 6                 # CFG: cond + uncond per step, batched
    calls.clear()
    _, st = sample.sample_video(svd, img, num_frames=2, steps=3, min_cfg=1.0, max_cfg=1.0, seed=0)
    assert calls == [1, 1, 1] and st["unet_evals"] == 3                  # guidance 1 everywhere = cond branch only
    h.remove()
    for v in (v1, v3):
        assert v.shape == (2, 3, 64, 64) and v.min() >= 0 and v.max() <= 1
    assert not torch.equal(v1, v3)
    # 1 step is exactly D(x_T, sigma_max) decoded
    g = torch.Generator().manual_seed(0)
    aug, noise = torch.randn((1, 3, 64, 64), generator=g), torch.randn((1, 2, 4, 8, 8), generator=g)
    x = img[None] * 2 - 1
    ids = torch.tensor([[TINY.fps_id, TINY.motion_bucket_id, TINY.cond_aug]])
    with torch.no_grad():
        x0 = model.denoise(svd.unet, noise * torch.tensor(1 + 700.0 ** 2).sqrt(), torch.tensor([700.0]),
                           svd.encode_cond(x + TINY.cond_aug * aug), svd.encode_image(x), ids)
        ref = ((svd.vae.decode(x0, chunk=14)[0] + 1) / 2).clamp(0, 1)
    assert torch.allclose(v1, ref, atol=1e-6)


def test_same_seed_same_frames(tmp_path, ckpts, img, capsys):
    def go(name, seed):
        out = str(tmp_path / name)
        rc, _, err = run_main([img, "--ckpt", ckpts["bundle"], "--out", out, "--steps", "2", "--frames", "2",
                               "--seed", str(seed)], capsys)
        assert rc == 0, err
        return decode(out)[0]
    a, b, c = go("a.mp4", 5), go("b.mp4", 5), go("c.mp4", 6)
    assert a.shape == (2, 64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_defaults_from_bundle_config_gif_frames_dir(tmp_path, img, capsys):
    ck = make_tiny_checkpoint(str(tmp_path / "ck"), "bundle", extra_metadata={"steps": "5"},   # metadata: not a default
                              cfg=replace(TINY, steps=1, num_frames=3, fps_id=9))
    out = str(tmp_path / "o.mp4")
    rc, so, err = run_main([img, "--ckpt", ck, "--out", out, "--gif", "--frames-dir", str(tmp_path / "fr") + "/",
                            "--height", "70", "--width", "100"], capsys)
    assert rc == 0, err
    assert f"wrote {out} (3 frames, 128x64, 10 fps, 1 step) + {out[:-4]}.gif + {tmp_path / 'fr'}/\n" in so   # one "/"
    assert "note: 70x100 is not a multiple of 64; using 64x128" in so
    assert "(1 UNet evals)" in so                                   # steps=1 from the config
    frames, fps, _, _ = decode(out)
    assert frames.shape == (3, 64, 128, 3) and fps == 10         # num_frames 3, fps_id 9 -> 10 fps
    gif, _, codec, _ = decode(str(tmp_path / "o.gif"))
    assert codec == "gif" and gif.shape == (3, 64, 128, 3)
    assert np.abs(gif.astype(int) - frames.astype(int)).mean() < 12
    pngs = sorted(os.listdir(tmp_path / "fr"))
    assert pngs == [f"frame_{i:04d}.png" for i in range(3)]
    first = data.read_image(str(tmp_path / "fr" / pngs[0]))
    assert first.shape == (3, 64, 128)
    assert np.abs(first.permute(1, 2, 0).numpy() * 255 - frames[0]).mean() < 12    # PNG ~ the video frame 0 (codec loss)


def test_default_output_in_out_folder(tmp_path, ckpts, img, capsys, monkeypatch):
    """The default output is out/<image name>.mp4 in the current folder (made if missing; git ignores out/), never
    next to the image (e.g. the tracked assets/)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    rc, so, err = run_main([img, "--ckpt", ckpts["bundle"], "--steps", "1", "--frames", "2"], capsys)
    assert rc == 0, err
    assert so.splitlines()[-2] == "wrote out/in.mp4 (2 frames, 64x64, 7 fps, 1 step)"
    assert os.listdir(tmp_path / "cwd" / "out") == ["in.mp4"] and not os.path.exists(tmp_path / "in.mp4")
    (tmp_path / "cwd" / "out").rename(tmp_path / "cwd" / "elsewhere")
    (tmp_path / "cwd" / "out").write_text("a file")
    rc, so, err = run_main([img, "--ckpt", ckpts["bundle"]], capsys)
    assert rc == 2 and err.strip() == "error: cannot create the output folder out (File exists); pass --out"


def test_write_video_is_atomic(tmp_path, monkeypatch):
    out = str(tmp_path / "v.mp4")
    data.write_video(torch.rand(3, 3, 64, 64), out, fps=7)
    before = open(out, "rb").read()
    real, n = av.VideoFrame.from_ndarray, []

    def failing(*a, **k):                                                # the encoder dies at frame 2
        n.append(1)
        if len(n) == 2:
            raise OSError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(OSError):
        data.write_video(torch.rand(3, 3, 64, 64), out, fps=7)
    assert open(out, "rb").read() == before                               # the old file is intact
    n.clear()
    with pytest.raises(OSError):
        data.write_video(torch.rand(3, 3, 64, 64), str(tmp_path / "new.mp4"), fps=7)
    assert os.listdir(tmp_path) == ["v.mp4"]                              # no new file, no temp file left


def test_atomic_write_and_stale_temps(tmp_path):
    p = tmp_path / "a.bin"
    with pytest.raises(RuntimeError):
        cli.atomic_write(p, lambda tmp: (open(tmp, "wb").write(b"half"), (_ for _ in ()).throw(RuntimeError("x"))))
    assert os.listdir(tmp_path) == []                                  # nothing under the name, no temp file
    assert cli.atomic_write(p, lambda tmp: open(tmp, "wb").write(b"ok")) == str(p) and p.read_bytes() == b"ok"
    (tmp_path / "d").mkdir()                                           # several files: all or none
    for bad in (lambda tmp: (_ for _ in ()).throw(OSError(28, "No space left on device")), None):
        writes = [(tmp_path / "x", lambda tmp: open(tmp, "wb").write(b"x")), (tmp_path / "d", bad)]
        with pytest.raises(OSError) as e:
            cli.atomic_write_all(writes)
        assert e.value.filename == str(tmp_path / "d") and sorted(os.listdir(tmp_path)) == ["a.bin", "d"]
    assert cli.atomic_write_all([(tmp_path / "x", lambda tmp: open(tmp, "wb").write(b"x"))]) == [str(tmp_path / "x")]
    os.remove(tmp_path / "x")
    os.rmdir(tmp_path / "d")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = tmp_path / f".a.bin.tmp-{int(dead.stdout)}", tmp_path / f".b.bin.tmp-{os.getppid()}"
    other = tmp_path / "notes.tmp-1"                                   # not our pattern (no leading dot): kept
    for f in (stale, live, other):
        f.write_bytes(b"x")
    assert cli.remove_stale_temps(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted(["a.bin", live.name, other.name])


def test_read_video_frames_stride_and_errors(tmp_path):
    path = str(tmp_path / "v.mp4")
    frames = torch.stack([torch.full((3, 64, 64), 16.0 * i / 255) for i in range(12)])   # frame i is grey 16 i
    data.write_video(frames, path, fps=12)
    v = data.read_video(path, 4, start=3, stride=2)
    assert v.shape == (4, 3, 64, 64) and 0 <= v.min() and v.max() <= 1
    assert torch.allclose(v.mean((1, 2, 3)) * 255 / 16, torch.tensor([3.0, 5.0, 7.0, 9.0]), atol=0.2)
    with pytest.raises(cli.UserError, match=re.escape(f"video {path} is too short: 12 of 13 frames decoded; use a longer clip")):
        data.read_video(path, 13)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(500))
    with pytest.raises(cli.UserError, match=rf"^cannot decode video {re.escape(str(junk))} \(\w+\); check or replace the file$"):
        data.read_video(str(junk), 2)


# -----------------------------------------------------------------------------
# errors: one line with the fix, exit code 2 (1 for out of memory)


def test_errors(tmp_path, ckpts, img, capsys, monkeypatch):
    ck = ckpts["bundle"]

    def err(argv):
        rc, _, e = run_main(argv + ["--ckpt", ck] if "--ckpt" not in argv else argv, capsys)
        lines = e.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), e
        return lines[0]

    missing = str(tmp_path / "nope.png")
    assert err([missing]) == f"error: image not found: {missing}; check the path"
    assert err([str(tmp_path)]) == f"error: {tmp_path} is a folder, not an image; pass an image file (PNG, JPEG, WebP)"
    txt = tmp_path / "notes.png"
    txt.write_text("hello, not an image")
    assert err([str(txt)]) == f"error: {txt} is not an image av can decode; use a PNG, JPEG or WebP file"
    small = write_image(str(tmp_path / "small.png"), smooth_rgb(40, 50), "rgb24")
    assert err([small]) == ("error: image too small: 50x40 px; use an image with at least 64 px on each side "
                            "(ideally >= the output size, 64x64)")
    out = str(tmp_path / "no" / "dir" / "v.mp4")
    assert err([img, "--out", out]) == (f"error: cannot write {out}: folder {os.path.dirname(out)} does not exist; "
                                        f"create it or pass another --out")
    assert err([img, "--out", str(tmp_path)]).startswith(f"error: output path {tmp_path} is a folder; pass a file name")
    assert err([img, "--frames", "0"]) == "error: bad --frames 0: must be at least 1"
    assert err([img, "--frames", "1000"]) == "error: bad --frames 1000: at most 128 (SVD is trained on 14/25)"
    assert err([img, "--decode-chunk", "0"]) == "error: bad --decode-chunk 0: must be at least 1"
    assert err([img, "--frames-dir", img]) == f"error: --frames-dir {img} is a file; pass a folder (it is created if missing)"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    assert err([img, "--ckpt", str(junk)]).startswith(f"error: {junk} is not a readable safetensors file")
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    assert err([img, "--ckpt", str(other)]).startswith(f"error: {other} is not an SVD checkpoint")
    assert err([img, "--ckpt", str(tmp_path)]).startswith(f"error: {tmp_path} is a folder but not a diffusers SVD folder")
    assert err([img, "--ckpt", missing]).startswith(f"error: checkpoint not found: {missing}")
    meta = tmp_path / "meta.safetensors"                                 # a bundle whose config JSON is cut
    save_file(load_svd.load(ck).state_dict(), str(meta), metadata={"format": load_svd.BUNDLE_FORMAT, "config": "{not"})
    assert err([img, "--ckpt", str(meta)]) == (f"error: bundle {meta} has a damaged config in its metadata "
                                               f"(JSONDecodeError); save or download it again")
    svd = load_svd.load(ck)
    with torch.no_grad():
        next(svd.unet.parameters()).fill_(float("nan"))
    nan = load_svd.save(svd, str(tmp_path / "nan.safetensors"))
    assert err([img, "--ckpt", nan, "--out", str(tmp_path / "nan.mp4")]) == (
        f"error: the sampled video is not finite (NaN/inf): the checkpoint {nan} holds NaN/inf weights, or --dtype auto "
        f"overflowed; check the weights, or pass --dtype fp32")
    (tmp_path / "in").mkdir()
    clip = data.write_video(torch.rand(2, 3, 64, 64), str(tmp_path / "in" / "clip.mp4"))    # a video as the input
    before = open(clip, "rb").read()
    assert err([clip, "--out", clip]) == (f"error: the output {clip} is the input image {clip} (it would be overwritten); pass "
                           f"another --out, e.g. --out {tmp_path / 'in' / 'clip_sfv.mp4'}")
    assert open(clip, "rb").read() == before
    assert err([img, "--out", str(tmp_path / "v.gif"), "--fps-id", "200"]) == (
        "error: a GIF plays at most 100 fps (its frame delays are in 1/100 s), not 201; pass --fps 100 or lower, or "
        "write only an .mp4")
    rc, so, e = run_main([img, "--ckpt", ck, "--config", "svd", "--frames", "2", "--out", str(tmp_path / "in" / "c.mp4")], capsys)
    assert rc == 0 and so.splitlines()[0] == (f"note: --config svd is ignored: {ck} is an SF-V bundle and carries its "
                                              f"own config")
    # out of memory: exit code 1 and the memory levers
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(sample, "sample_video", oom)
    rc, _, e = run_main([img, "--ckpt", ck], capsys)
    assert rc == 1 and e.strip() == ("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); try "
                                     "--decode-chunk 2, a lower --height/--width, fewer --frames or --dtype fp16")
    def cpu_oom(*a, **k):                                                 # the CPU allocator's RuntimeError
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 89942409216 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(sample, "sample_video", cpu_oom)
    rc, _, e = run_main([img, "--ckpt", ck], capsys)
    assert rc == 1 and e.strip() == ("error: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to "
                                     "allocate 89942409216 bytes); try --decode-chunk 2, a lower --height/--width, "
                                     "fewer --frames or --dtype fp16")
    assert [f for f in os.listdir(tmp_path) if f.endswith(".mp4")] == []      # nothing half-written


def test_errors_checked_before_any_work(tmp_path, img, capsys):
    """Bad flags and outputs fail in one line before the checkpoint is even looked at (it does not exist here)."""
    missing = str(tmp_path / "nope.safetensors")

    def err(argv):
        rc, so, e = run_main([img, "--ckpt", missing] + argv, capsys)
        lines = e.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and so == "", (so, e)
        return lines[0]

    assert err(["--device", "nonsense"]) == ("error: bad --device 'nonsense': not a device; use auto, cpu, cuda, "
                                             "cuda:N or mps")
    if not torch.cuda.is_available():
        assert err(["--device", "cuda"]) == ("error: --device cuda: CUDA is not available on this machine; use "
                                             "--device cpu (or auto)")
    assert err(["--fps", "nan"]) == "error: bad --fps nan: must be a finite number"
    assert err(["--fps", "inf"]) == "error: bad --fps inf: must be a finite number"
    assert err(["--fps", "0"]) == "error: bad --fps 0: must be positive"
    assert err(["--min-cfg", "nan"]) == "error: bad --min-cfg nan: must be a finite number"
    assert err(["--cond-aug", "-1"]) == "error: bad --cond-aug -1: must be at least 0 (it is a noise level)"
    assert err(["--seed", str(2 ** 64)]) == f"error: bad --seed {2 ** 64}: must be an integer from 0 to 2^64-1"
    assert err(["--seed", "-1"]) == "error: bad --seed -1: must be an integer from 0 to 2^64-1"
    assert err(["--height", "0"]) == ("error: bad --height 0: must be positive (a multiple of the model's size step: "
                                      "64 for SVD, 4 for the toy)")
    assert err(["--width", "-64"]).startswith("error: bad --width -64: must be positive (")
    for flag in ("--max-cfg", "--min-cfg"):                              # absurd guidance: refused, not blamed on the weights
        assert err([flag, "1e20"]) == f"error: bad {flag} 1e+20: guidance from -100 to 100 (SVD samples with 1-3)"
    assert err(["--steps", "100000000"]) == "error: bad --steps 100000000: at most 1000 (Euler sampling uses 25-50)"
    assert err(["--fps", "1e-9"]) == "error: bad --fps 1e-09: must be from 0.001 to 1000"
    assert err(["--fps", "1e9"]) == "error: bad --fps 1e+09: must be from 0.001 to 1000"
    assert err(["--fps-id", "-10"]) == "error: bad --fps-id -10: must be at least 0"
    assert err(["--motion-bucket-id", "-5"]) == "error: bad --motion-bucket-id -5: must be at least 0"
    assert err(["--fps-id", str(10 ** 20)]) == (f"error: bad --fps-id {10 ** 20}: the video would play at fps-id + 1 = "
                                               f"{10 ** 20 + 1} fps, over 1000; pass --fps too")
    for flag in ("--out", "--ckpt", "--frames-dir"):                    # e.g. an unset shell variable
        assert err([flag, ""]) == f"error: bad {flag} '': an empty path; pass a path or leave the flag out"
    sub = os.path.join(img, "frames")
    assert err(["--frames-dir", sub]) == f"error: cannot create --frames-dir {sub}: {img} is a file; pass another --frames-dir"
    assert err(["--gif", "--fps", "200"]) == ("error: a GIF plays at most 100 fps (its frame delays are in 1/100 s), "
                                              "not 200; pass --fps 100 or lower, or write only an .mp4")
    for name in ("x.txt", "x"):
        out = str(tmp_path / name)
        ext = "'.txt'" if name == "x.txt" else "'(no extension)'"
        assert err(["--out", out]) == f"error: cannot write {out}: unsupported output type {ext}; name it .mp4 or .gif"
    assert not os.path.exists(tmp_path / "x.txt")
    # a damaged image of a known type: say so, not "use a PNG"
    good = open(img, "rb").read()
    for cut in (len(good) // 2, 20):
        bad = tmp_path / "cut.png"
        bad.write_bytes(good[:cut])
        rc, _, e = run_main([str(bad), "--ckpt", missing], capsys)
        assert rc == 2 and e.strip() == (f"error: {bad} is a damaged or truncated PNG file (it cannot be decoded); "
                                         f"export or download it again")


def test_frames_dir_keeps_the_input_and_refuses_stale_frames(tmp_path, ckpts, img, capsys):
    """--frames-dir never overwrites the input image (a frame file in that folder) and never mixes this video's frames
    with those of an earlier, longer one: both refused before sampling; nothing is ever deleted."""
    fr = tmp_path / "frames"
    fr.mkdir()
    first = write_image(str(fr / "frame_0000.png"), smooth_rgb(64, 64), "rgb24")
    before = open(first, "rb").read()
    rc, so, e = run_main([first, "--ckpt", ckpts["bundle"], "--frames-dir", str(fr), "--out", str(tmp_path / "v.mp4")],
                         capsys)
    assert rc == 2 and so == "" and e.strip() == (f"error: the input image {first} is a frame file (frame_NNNN.png) in "
                                                  f"--frames-dir {fr}, where the video's frames are written; pass "
                                                  f"another --frames-dir")
    assert open(first, "rb").read() == before and not os.path.exists(tmp_path / "v.mp4")
    out, other = tmp_path / "o", tmp_path / "o" / "notes.txt"
    base = [img, "--ckpt", ckpts["bundle"], "--steps", "1", "--frames-dir", str(out), "--out", str(tmp_path / "w.mp4")]
    assert run_main(base + ["--frames", "4"], capsys)[0] == 0
    other.write_text("mine")
    rc, so, e = run_main(base + ["--frames", "2"], capsys)
    assert rc == 2 and e.strip() == (f"error: --frames-dir {out} holds 2 frames of an earlier, longer video "
                                      f"(frame_0002.png .. frame_0003.png) that this 2-frame video would not replace; "
                                      f"empty the folder or pass another --frames-dir")
    assert sorted(os.listdir(out)) == ["frame_0000.png", "frame_0001.png", "frame_0002.png", "frame_0003.png", "notes.txt"]
    rc, so, e = run_main(base + ["--frames", "5"], capsys)                # a longer video replaces them all
    assert rc == 0 and len(data.frame_files(str(out))) == 5 and other.read_text() == "mine", e


def test_outputs_written_all_or_none_and_the_failing_one_named(tmp_path, ckpts, img, capsys, monkeypatch):
    """A full disk while writing the frames names --frames-dir (not the mp4) and leaves no mp4, gif or frame behind;
    an unwritable --frames-dir is found before sampling."""
    import errno
    out, fr = tmp_path / "v.mp4", tmp_path / "new" / "frames"
    argv = [img, "--ckpt", ckpts["bundle"], "--steps", "1", "--frames", "3", "--gif", "--frames-dir", str(fr),
            "--out", str(out)]
    real, n = data.write_png, []

    def full(rgb, path):                                                  # the disk fills up at the second frame
        n.append(path)
        if len(n) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(rgb, path)
    monkeypatch.setattr(data, "write_png", full)
    rc, so, e = run_main(argv, capsys)
    assert rc == 2 and e.strip() == (f"error: cannot write --frames-dir {fr} (No space left on device); nothing was "
                                      f"written: free some space or pass another --frames-dir")
    assert os.listdir(tmp_path) == ["in.png"]                             # no mp4, no gif, no temp, no new folder
    monkeypatch.setattr(data, "write_png", real)

    def full_mp4(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(data, "write_video", full_mp4)
    rc, so, e = run_main(argv, capsys)
    assert rc == 2 and e.strip() == (f"error: cannot write {out} (No space left on device); nothing was written: free "
                                      f"some space or pass another --out")
    assert os.listdir(tmp_path) == ["in.png"]
    monkeypatch.setattr(sample, "sample_video", lambda *a, **k: pytest.fail("sampled before the checks"))
    (tmp_path / "v.gif").mkdir()                                          # a folder where the GIF goes
    rc, so, e = run_main(argv, capsys)
    assert rc == 2 and e.strip() == (f"error: cannot write {tmp_path / 'v.gif'}: a folder of that name is in the way; "
                                      f"remove it or pass another --out")
    os.rmdir(tmp_path / "v.gif")
    rc, so, e = run_main(argv[:-4] + ["--frames-dir", "/sys/sfv-frames", "--out", str(out)], capsys)
    if os.path.isdir("/sys") and sys.platform.startswith("linux"):
        assert rc == 2 and re.fullmatch(r"error: cannot write to --frames-dir /sys/sfv-frames \((Permission denied|"
                                        r"Operation not permitted|Read-only file system)\); pass a writable folder",
                                        e.strip()), e


def test_ctrl_c_one_line_exit_130(tmp_path, ckpts, img, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "sample_video", interrupt)
    rc, so, e = run_main([img, "--ckpt", ckpts["bundle"], "--out", str(tmp_path / "v.mp4")], capsys)
    assert rc == 130 and e == "interrupted; nothing was written\n" and not os.path.exists(tmp_path / "v.mp4")
    monkeypatch.setattr(load_svd, "download_official", interrupt)
    rc, so, e = run_main(["--download", "svd_xt"], capsys)
    part = os.path.join(load_svd.CKPT_DIRS[0], "svd_xt.safetensors.part")
    assert rc == 130 and e == f"interrupted; the partial download {part} is kept: run the same command to resume\n"


def test_size_rules_follow_the_model(tmp_path, img, capsys):
    """Sizes are multiples of model.size_multiple: 4 for the toy (16 is its own size; 18 is rounded with a note), and
    the smallest image accepted is one such step."""
    toy = os.path.join(HERE, "assets", "toy_sfv.safetensors")
    out = str(tmp_path / "v.mp4")
    rc, so, e = run_main([img, "--ckpt", toy, "--height", "16", "--width", "16", "--frames", "2", "--out", out], capsys)
    assert rc == 0 and "note:" not in so and f"wrote {out} (2 frames, 16x16, 7 fps, 1 step)" in so, e
    rc, so, e = run_main([img, "--ckpt", toy, "--height", "18", "--width", "100", "--frames", "2", "--out", out], capsys)
    assert rc == 0 and "note: 18x100 is not a multiple of 4; using 16x100 (height x width)" in so, e
    tiny = write_image(str(tmp_path / "tiny.png"), smooth_rgb(3, 3), "rgb24")
    rc, so, e = run_main([tiny, "--ckpt", toy, "--out", out], capsys)
    assert rc == 2 and e.strip() == ("error: image too small: 3x3 px; use an image with at least 4 px on each side "
                                     "(ideally >= the output size, 16x16)")


def test_compile_time_reported_apart_from_denoise(tmp_path, ckpts, img, capsys, monkeypatch):
    """--compile: the UNet is compiled in one warm-up evaluation at the sampling shapes (batch 2 with CFG), timed on
    its own line, so the denoise time is sampling only."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m: (m.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape)), m)[1])
    rc, so, e = run_main([img, "--ckpt", ckpts["bundle"], "--compile", "--steps", "2", "--max-cfg", "2", "--frames", "3",
                          "--out", str(tmp_path / "v.mp4")], capsys)
    assert rc == 0, e
    assert re.search(r"^compiled the UNet \(torch\.compile, one warm-up evaluation\) in \d+\.\d\d s; not counted as "
                     r"denoise time below$", so, re.M), so
    assert calls == [(2, 3, 8, 8, 8)] * 3 and "(4 UNet evals)" in so      # the warm-up, then 2 guided steps


def test_seed_at_the_64_bit_limit_and_gif_output(tmp_path, ckpts, img, capsys):
    out = str(tmp_path / "v.gif")
    rc, so, err = run_main([img, "--ckpt", ckpts["bundle"], "--out", out, "--steps", "1", "--frames", "2",
                            "--seed", str(2 ** 64 - 1)], capsys)
    assert rc == 0, err
    frames, _, codec, _ = decode(out)
    assert codec == "gif" and frames.shape == (2, 64, 64, 3)
    assert not os.path.exists(tmp_path / "v.mp4")


def test_one_step_with_guidance_defaults_says_guidance_is_ignored(tmp_path, ckpts, img, capsys):
    """Plain SVD weights (guidance 1 -> 2.5 by default) sampled with --steps 1: one note; an SF-V bundle: none."""
    base = [img, "--ckpt", ckpts["single"], "--config", "tiny", "--frames", "2", "--out", str(tmp_path / "v.mp4")]
    rc, so, err = run_main(base + ["--steps", "1"], capsys)
    assert rc == 0, err
    notes = [l for l in so.splitlines() if l.startswith("note: one step")]
    assert notes == ["note: one step samples without guidance; --min-cfg/--max-cfg (1/2.5) are ignored (pass "
                     "--steps 25 for guided SVD sampling)"]
    assert "(1 UNet evals)" in so
    rc, so, err = run_main(base + ["--steps", "1", "--max-cfg", "3"], capsys)
    assert rc == 0 and "--min-cfg/--max-cfg (1/3) are ignored" in so
    rc, so, err = run_main(base + ["--steps", "2"], capsys)
    assert rc == 0 and "note: one step" not in so and "(4 UNet evals)" in so
    sfv = make_tiny_checkpoint(str(tmp_path / "sfv"), cfg=replace(TINY, steps=1, min_cfg=1.0, max_cfg=1.0))
    rc, so, err = run_main([img, "--ckpt", sfv, "--frames", "2", "--out", str(tmp_path / "w.mp4")], capsys)
    assert rc == 0 and "note: one step" not in so and "(1 UNet evals)" in so


def test_student_bundle_steps_refused_and_guidance_ignored(tmp_path, img, capsys):
    ck = load_svd.save(SVD(_student()), str(tmp_path / "student.safetensors"))
    base = [img, "--ckpt", ck, "--frames", "2", "--out", str(tmp_path / "v.mp4")]
    rc, so, e = run_main(base + ["--steps", "4"], capsys)
    assert rc == 2 and so == "" and e.strip() == (f"error: bad --steps 4: the SF-V student {ck} takes at most 3 steps "
                                                  f"(one per trained noise level: 700, 70.54, 2.269); pass --steps 1 "
                                                  f"to 3")
    rc, so, e = run_main(base + ["--steps", "2", "--max-cfg", "3"], capsys)
    assert rc == 0, e
    assert so.splitlines()[0] == ("note: an SF-V student samples without guidance (SF-V trains no unconditional "
                                  "branch); --min-cfg/--max-cfg (1/3) are ignored")
    assert "(2 UNet evals)" in so and "2 steps)" in so
    rc, so, e = run_main(base + ["--steps", "3"], capsys)
    assert rc == 0 and "note:" not in so and "(3 UNet evals)" in so, e


def test_cli_error_exit_code_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), str(tmp_path / "missing.png")],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: image not found: {tmp_path / 'missing.png'}; check the path"

# -----------------------------------------------------------------------------
# checkpoint resolution and download


def test_find_checkpoint_order(tmp_path, monkeypatch, capsys, img):
    d = tmp_path / "checkpoints"
    toy = tmp_path / "toy.safetensors"
    env = {}
    with pytest.raises(LoadError, match=r"no weights found .* pass --ckpt PATH or run: python sample.py --download svd_xt"):
        load_svd.find_checkpoint(None, env, [str(d)], str(toy))
    bundle = make_tiny_checkpoint(str(tmp_path / "b"), "bundle")
    os.replace(bundle, toy)
    assert load_svd.find_checkpoint(None, env, [str(d)], str(toy)) == (str(toy), "toy")
    d.mkdir()
    (d / "svd_xt.safetensors.part").write_bytes(b"x")                   # partial downloads are not candidates
    assert load_svd.find_checkpoint(None, env, [str(d)], str(toy)) == (str(toy), "toy")
    (d / "svd.safetensors").write_bytes(b"x")
    (d / "svd_xt_1_1.safetensors").write_bytes(b"x")
    assert load_svd.find_checkpoint(None, env, [str(d)], str(toy)) == (str(d / "svd_xt_1_1.safetensors"), "checkpoints")
    make_tiny_checkpoint(str(d), "bundle")                             # an SF-V bundle beats the official files
    assert load_svd.find_checkpoint(None, env, [str(d)], str(toy)) == (str(d / "tiny_bundle.safetensors"), "checkpoints")
    env = {"SFV_CKPT": str(d / "svd.safetensors")}
    assert load_svd.find_checkpoint(None, env, [str(d)], str(toy)) == (str(d / "svd.safetensors"), "$SFV_CKPT")
    assert load_svd.find_checkpoint("x.safetensors", env, [str(d)], str(toy)) == ("x.safetensors", "--ckpt")
    with pytest.raises(LoadError, match=r"\$SFV_CKPT points to a missing checkpoint"):
        load_svd.find_checkpoint(None, {"SFV_CKPT": str(tmp_path / "gone")}, [str(d)], str(toy))
    # the CLI falls back to the toy model and says so in one line
    monkeypatch.setattr(load_svd, "CKPT_DIRS", [str(tmp_path / "empty")])
    monkeypatch.setattr(load_svd, "TOY_CKPT", str(toy))
    monkeypatch.delenv("SFV_CKPT", raising=False)
    rc, so, e = run_main([img, "--steps", "1", "--frames", "2", "--out", str(tmp_path / "t.mp4")], capsys)
    assert rc == 0, e
    assert so.splitlines()[0].startswith(f"no SF-V/SVD weights found (--ckpt, $SFV_CKPT, checkpoints/): using the bundled toy model {toy}")
    # a checkpoint found in checkpoints/ or named by $SFV_CKPT is named in one line; --ckpt is not repeated
    monkeypatch.setattr(load_svd, "CKPT_DIRS", [str(d)])
    rc, so, e = run_main([img, "--frames", "2", "--out", str(tmp_path / "t.mp4")], capsys)
    assert rc == 0 and so.splitlines()[0] == (f"using {d / 'tiny_bundle.safetensors'} (found in checkpoints/; pass "
                                              f"--ckpt to choose another)"), e
    monkeypatch.setenv("SFV_CKPT", str(toy))
    rc, so, e = run_main([img, "--frames", "2", "--out", str(tmp_path / "t.mp4")], capsys)
    assert rc == 0 and so.splitlines()[0] == f"using {toy} (from $SFV_CKPT; pass --ckpt to choose another)", e
    rc, so, e = run_main([img, "--ckpt", str(toy), "--frames", "2", "--out", str(tmp_path / "t.mp4")], capsys)
    assert rc == 0 and so.startswith("wrote "), e


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one blob with Range support and a sha256 ETag; records request headers."""
    blob, etag, seen = b"", None, []

    def _head(self, code, length, extra=()):
        self.send_response(code)
        self.send_header("Content-Length", str(length))
        if self.etag:
            self.send_header("ETag", f'"{self.etag}"')
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self):
        self.seen.append(("HEAD", dict(self.headers)))
        self._head(200, len(self.blob))

    def do_GET(self):
        self.seen.append(("GET", dict(self.headers)))
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            body = self.blob[start:]
            self._head(206, len(body), [("Content-Range", f"bytes {start}-{len(self.blob) - 1}/{len(self.blob)}")])
        else:
            body = self.blob
            self._head(200, len(body))
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _RangeHandler.seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/svd.safetensors"
    srv.shutdown()


def test_download_resume_and_checks(tmp_path, server):
    blob = os.urandom(300_000)
    _RangeHandler.blob, _RangeHandler.etag = blob, hashlib.sha256(blob).hexdigest()
    dest = str(tmp_path / "ck" / "svd.safetensors")
    os.makedirs(os.path.dirname(dest))
    with open(dest + ".part", "wb") as f:                  # an interrupted earlier download
        f.write(blob[:123_456])
    assert load_svd.download(server, dest, token="tok", chunk_size=10_000, progress=False) == dest
    assert open(dest, "rb").read() == blob and not os.path.exists(dest + ".part")
    (method, h), (method2, h2) = _RangeHandler.seen
    assert (method, method2) == ("HEAD", "GET")
    assert h2["Range"] == "bytes=123456-"                  # resumed, not restarted
    assert h["Authorization"] == h2["Authorization"] == "Bearer tok"
    # a corrupt file fails the sha256 check and is removed
    _RangeHandler.etag = hashlib.sha256(b"something else").hexdigest()
    dest2 = str(tmp_path / "ck" / "svd_xt.safetensors")
    with pytest.raises(LoadError, match="sha256 mismatch .* the corrupt file was removed"):
        load_svd.download(server, dest2, progress=False)
    assert not os.path.exists(dest2) and not os.path.exists(dest2 + ".part")
    # no token -> no Authorization header
    _RangeHandler.etag, _RangeHandler.seen = None, []
    dest3 = str(tmp_path / "ck" / "svd3.safetensors")
    load_svd.download(server, dest3, progress=False)
    assert open(dest3, "rb").read() == blob and all("Authorization" not in h for _, h in _RangeHandler.seen)


def test_download_errors(tmp_path):
    with pytest.raises(LoadError, match=r"network error for http://127\.0\.0\.1:9/x"):
        load_svd.download("http://127.0.0.1:9/x", str(tmp_path / "x"), progress=False)
    assert not os.path.exists(tmp_path / "x")


# =============================================================================
# discriminator.py and train.py

def tiny_trainer(extra=()):
    args = train.parse_args(["--workers", "0", *SMALL_D, *extra])
    torch.manual_seed(0)
    svd = SVD(CONFIGS["tiny"])
    return train.Trainer(args, svd, torch.device("cpu")), svd, args


def tiny_batch(svd, args, n=2, seed=0):
    video = torch.stack([data.SyntheticVideos(100, 4, 64, seed)[i] for i in range(n)])
    enc = data.encode_videos(svd, video, args, list(range(n)), (seed, 0), torch.device("cpu"))
    return {**enc, "keys": list(range(n))}


def run_train(out, *extra, torchrun=0):
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    r = subprocess.run(pre + [os.path.join(ROOT, "train.py"), *COMMON, "--out", str(out), *extra],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_log(out)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def unwritable_path(tmp_path, name):
    """A path `name` inside a folder this process cannot write: a read-only tmp folder, or /sys for root (which
    ignores permissions); the test is skipped if there is none."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):                           # root ignores permissions: a read-only file system instead
        if not (sys.platform.startswith("linux") and os.path.isdir("/sys") and not os.path.exists(f"/sys/{name}")):
            pytest.skip("no unwritable folder to test with")
        ro = "/sys"
    return os.path.join(ro, name)


def train_error(argv):
    """train.main(argv) in-process must end with exit status 2 and no traceback -> its stderr (one line expected)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and "Traceback" not in err.getvalue()
    return err.getvalue().strip()

# -----------------------------------------------------------------------------
# noise-level samplers, losses, optimiser


def test_sigma_samplers_match_targets():
    g = torch.Generator().manual_seed(0)
    s = train.sample_generator_sigma(30000, g)
    levels = sorted(set(s.tolist()))
    assert levels == pytest.approx([2.269, 70.54, 700.0], rel=2e-3)
    freq = torch.tensor([(s == v).float().mean().item() for v in levels])
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.015)

    sd = train.sample_disc_sigma(50000, g)
    grid = model.karras_sigmas(1000)[:-1]
    assert torch.isin(sd, grid).all()                                    # snapped onto the 1000-level grid
    log_s = sd.log()
    # quantiles of log sigma' vs N(-1, 1): z = -1.2816, -0.6745, 0, 0.6745, 1.2816
    for q, z in [(0.1, -1.2816), (0.25, -0.6745), (0.5, 0.0), (0.75, 0.6745), (0.9, 1.2816)]:
        assert torch.quantile(log_s, q).item() == pytest.approx(-1.0 + z, abs=0.04), q
    assert log_s.std().item() == pytest.approx(1.0, abs=0.03)
    # the flags move the distribution
    assert train.sample_disc_sigma(20000, g, p_mean=0.5).log().median().item() == pytest.approx(0.5, abs=0.05)


def test_diffusion_sigma_draws_and_high_sigma_fraction():
    """diffusion mode: log sigma ~ N(train_p_mean, train_p_std^2); --high-sigma-frac f replaces a fraction f of the
    draws by log-uniform ones in [2, sigma_max]."""
    from types import SimpleNamespace

    def draws(*flags):
        tr = SimpleNamespace(args=train.parse_args(["--mode", "diffusion", *flags]), device=torch.device("cpu"))
        return train.Trainer.noise(tr, 0, list(range(4000)), (1,))["s_g"]
    log_s = draws().log()
    assert log_s.mean().item() == pytest.approx(0.7, abs=0.08) and log_s.std().item() == pytest.approx(1.6, abs=0.06)
    s = draws("--high-sigma-frac", "0.5")
    above = (s > 20).float().mean().item()
    lo, hi = math.log(2), math.log(700)
    expected = 0.5 * (hi - math.log(20)) / (hi - lo) + 0.5 * (1 - 0.5 * (1 + math.erf((math.log(20) - 0.7) / (1.6 * 2 ** 0.5))))
    assert above == pytest.approx(expected, abs=0.03)


def test_learning_rate_warmup_and_cosine_decay():
    from types import SimpleNamespace

    def lrs(*flags):
        a = train.parse_args(["--max-steps", "100", *flags])
        return [train.Trainer.lr(SimpleNamespace(args=a, step_num=k), 1.0) for k in range(100)]
    assert lrs() == [1.0] * 100                                             # default: constant
    w = lrs("--warmup", "10", "--lr-final", "0.1")
    assert w[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])      # linear warm-up
    assert w[99] == pytest.approx(0.1) and w[54] == pytest.approx(0.55, abs=0.01)   # cosine: half way at the middle
    assert all(a >= b for a, b in zip(w[10:], w[11:]))                      # decreasing after the warm-up
    # --lr-decay-steps: the same schedule when a run is split into --resume'd pieces with growing --max-steps
    part = [train.Trainer.lr(SimpleNamespace(args=train.parse_args(["--max-steps", "40", "--warmup", "10",
                                                                    "--lr-final", "0.1", "--lr-decay-steps", "100"]),
                                             step_num=k), 1.0) for k in range(40)]
    assert part == pytest.approx(w[:40])


def test_zero_init_makes_blocks_identities():
    """sgm's zero_module init for training from scratch: the UNet's output is 0, and every residual branch is zero,
    so the encoder features equal those of conv_in passed through the skip connections only."""
    unet = model.UNet(CONFIGS["toy"].unet).zero_init_()
    x = torch.randn(2, 8, 6, 16, 16)
    args = (x, torch.rand(2), torch.randn(2, 32), torch.randn(2, 3))
    assert torch.equal(unet(*args), torch.zeros(2, 8, 3, 16, 16))
    for m in unet.modules():
        if isinstance(m, model.ResBlock):
            assert not m.out_layers[-1].weight.any()
    feats = unet.encode_levels(*args)
    h0 = unet.input_blocks[0][0](x.flatten(0, 1))                          # conv_in
    assert torch.allclose(feats[0].flatten(0, 1), h0, atol=1e-6)          # level 0: identity blocks
    # training from a preset in diffusion mode starts there; a fresh SVD does not (parity tests load weights)
    assert model.UNet(CONFIGS["toy"].unet).out[-1].weight.any()


def test_losses():
    x = torch.zeros(2, 3)
    y = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    # the paper's form: per sample sqrt(||d||^2 + c^2) - c, mean over the batch (the default)
    assert train.pseudo_huber(x, y, 1.0).item() == pytest.approx(((25 + 1) ** 0.5 - 1) / 2, rel=1e-6)
    # the per-element mean form: sqrt(mean d^2 + c^2) - c
    assert train.pseudo_huber(x, y, 1.0, "mean").item() == pytest.approx(((25 / 3 + 1) ** 0.5 - 1) / 2, rel=1e-6)
    assert train.parse_args([]).huber_form == "norm"
    real, fake = [torch.tensor([[2.0, 0.0]])], [torch.tensor([[-2.0, 0.5]])]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 + 0.75)  # relu(1-[2,0]) + relu(1+[-2,.5])
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)


def test_sm3_first_step_and_memory():
    p = torch.nn.Parameter(torch.randn(6, 5, 3))
    b = torch.nn.Parameter(torch.randn(7))
    opt = train.SM3([p, b], lr=0.1, betas=(0.0, 0.0))
    p0, b0 = p.detach().clone(), b.detach().clone()
    (p.sum() * 2 - (b ** 2).sum()).backward()
    gp, gb = p.grad.clone(), b.grad.clone()
    opt.step()
    # first step with zero accumulators: nu = g^2, update = lr * sign(g)
    assert torch.allclose(p.detach(), p0 - 0.1 * gp.sign())
    assert torch.allclose(b.detach(), b0 - 0.1 * gb.sign())
    st = opt.state[p]
    assert sum(v.numel() for k, v in st.items() if k.startswith("acc")) == 6 + 5 + 3   # O(sum of dims)
    # it minimises a quadratic with the paper's betas, in both variants
    for variant in ("plain", "debiased"):
        w = torch.nn.Parameter(torch.full((4, 4), 3.0))
        opt = train.SM3([w], lr=0.1, betas=(0.5, 0.999), variant=variant)
        for _ in range(100):
            opt.zero_grad()
            (w ** 2).sum().backward()
            opt.step()
        assert (w ** 2).sum().item() < 0.5, variant
    # with beta2 = 0.999 the plain (reference) first step is 1/sqrt(1 - beta2) ~ 31.6x the bias-corrected one
    steps = {}
    for variant in ("plain", "debiased"):
        w = torch.nn.Parameter(torch.ones(3, 2))
        opt = train.SM3([w], lr=0.01, betas=(0.0, 0.999), variant=variant)
        (w * torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 1.0]])).sum().backward()
        opt.step()
        steps[variant] = (1 - w.detach()).abs()
    assert torch.allclose(steps["plain"] / steps["debiased"], torch.full((3, 2), 1000 ** 0.5), rtol=1e-3)


def sm3_reference(shape, grads, lr, beta1, beta2, eps):
    """SM3-II as stated by Anil et al. 2019 (Alg. SM3-II), element by element in float64, with the EMA and momentum
    of the reference ports: for each index i, nu = beta2 * min_r mu_r[i_r] + (1 - beta2) g^2 (beta2 = 0: min + g^2);
    mu_r[j] = max of nu over the slice i_r = j (beta2 > 0: and never below its old value); 0/1-D tensors keep one
    accumulator per element; m = beta1 m + (1 - beta1) g / sqrt(nu + eps); p -= lr m."""
    import itertools
    idx = list(itertools.product(*[range(n) for n in shape]))
    per_dim = len(shape) > 1
    mu = [[0.0] * n for n in shape] if per_dim else {i: 0.0 for i in idx}
    m, p, out = {i: 0.0 for i in idx}, {i: 0.0 for i in idx}, []
    for g in grads:
        g = {i: float(g[i]) for i in idx}
        nu = {}
        for i in idx:
            low = min(mu[r][i[r]] for r in range(len(shape))) if per_dim else mu[i]
            nu[i] = beta2 * low + (1 - beta2) * g[i] ** 2 if beta2 > 0 else low + g[i] ** 2
        if per_dim:
            new = [[0.0] * n for n in shape]
            for i in idx:
                for r in range(len(shape)):
                    new[r][i[r]] = max(new[r][i[r]], nu[i])
            mu = [[max(o, n) if beta2 > 0 else n for o, n in zip(old, nw)] for old, nw in zip(mu, new)]
        else:
            mu = {i: max(mu[i], nu[i]) if beta2 > 0 else nu[i] for i in idx}
        for i in idx:
            m[i] = beta1 * m[i] + (1 - beta1) * g[i] / math.sqrt(nu[i] + eps)
            p[i] -= lr * m[i]
        out.append(np.array([p[i] for i in idx]).reshape(shape))
    return out


@pytest.mark.parametrize("betas", [(0.5, 0.999), (0.0, 0.0), (0.9, 0.0)])
def test_sm3_plain_matches_reference_update(betas):
    g = torch.Generator().manual_seed(1)
    for shape in [(4, 3), (2, 3, 2), (5,), ()]:
        # gradients of varying scale, so accumulators rise and (SM3-II with beta2 = 0) can fall per slice
        grads = [torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** torch.empty(()).uniform_(-2, 1, generator=g)
                 for _ in range(6)]
        w = torch.nn.Parameter(torch.zeros(shape))
        opt = train.SM3([w], lr=0.01, betas=betas, eps=1e-16, variant="plain")
        ref = sm3_reference(shape, [x.numpy() for x in grads], 0.01, *betas, 1e-16)
        for step, (gr, r) in enumerate(zip(grads, ref)):
            w.grad = gr.float()
            opt.step()
            np.testing.assert_allclose(w.detach().double().numpy(), r, rtol=2e-5, atol=1e-7, err_msg=f"{shape} {step}")
    assert train.parse_args([]).sm3_variant == "plain"

# -----------------------------------------------------------------------------
# discriminator


def test_discriminator_heads_and_ablation():
    torch.manual_seed(0)
    unet = SVD(CONFIGS["tiny"]).unet
    B, T = 2, 4
    x, cond, emb = torch.randn(B, T, 4, 8, 8), torch.randn(B, 4, 8, 8), torch.randn(B, 32)
    ids, s = torch.tensor([[6.0, 127.0, 0.02]] * B), torch.tensor([0.3, 2.0])
    # latent 8x8 over 4 levels: before the downsample 8, 4, 2, 1; after it 4, 2, 1 and the last level's own 1
    for tap, hw in [("after", [16, 4, 1, 1]), ("before", [64, 16, 4, 1])]:
        for heads, n in [("both", 8), ("spatial", 4), ("temporal", 4)]:
            D = Discriminator(unet, heads, hidden=32, cmap_dim=16, embed_dim=32, tap=tap)
            logits = D(x, s, cond, emb, ids)
            assert len(logits) == n
            assert [l.shape for l in logits] == [(B, T * h) for h in hw for _ in range(n // 4)]
            assert not any(p.requires_grad for p in D.backbone.parameters())
            assert all(p.requires_grad for p in D.head_parameters())
            assert not hasattr(D.backbone, "output_blocks") and not hasattr(D.backbone, "middle_block")
    assert train.parse_args([]).disc_tap == "after"
    # the backbone is a copy of the UNet's encoder; "before" = encode_levels, "after" = the output of each level's
    # Downsample block inside the UNet (caught with hooks on the original UNet), the last level's own output
    _, _, c_in, c_noise = edm_precondition(s)
    inp = torch.cat([c_in.view(B, 1, 1, 1, 1) * x, cond[:, None].expand(-1, T, -1, -1, -1)], 2)
    seen = []
    hooks = [unet.input_blocks[e + 1][0].register_forward_hook(lambda m, i, o: seen.append(o)) for e in unet.level_ends[:-1]]
    ref = unet.encode_levels(inp, c_noise, emb, ids)
    for h in hooks:
        h.remove()
    before = Discriminator(unet, "both", 32, 16, 32, tap="before").features(x, s, cond, emb, ids)
    after = Discriminator(unet, "both", 32, 16, 32, tap="after").features(x, s, cond, emb, ids)
    # (the backbone is a separate copy: its fp32 results may differ from the UNet's in the last bits)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(ref, before))
    assert len(seen) == 3
    for a, b in zip(after[:3], seen):
        assert torch.allclose(a.flatten(0, 1), b, atol=1e-5)
    assert torch.allclose(after[3], ref[3], rtol=0, atol=1e-5)
    # per-sample: a sample's logits do not depend on the rest of the batch (needed for DDP == 1 process)
    D = Discriminator(unet, "both", hidden=32, cmap_dim=16, embed_dim=32)
    l2 = score(D(x, s, cond, emb, ids))
    l1 = score(D(x[:1], s[:1], cond[:1], emb[:1], ids[:1]))
    assert torch.allclose(l2[:1], l1, atol=1e-5)
    # the temporal heads see frame order: permuting frames changes their logits
    Dt = Discriminator(unet, "temporal", hidden=32, cmap_dim=16, embed_dim=32)
    assert not torch.allclose(score(Dt(x, s, cond, emb, ids)), score(Dt(x.flip(1), s, cond, emb, ids)), atol=1e-4)


def test_heads_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    D = Discriminator(SVD(CONFIGS["tiny"]).unet, "both", hidden=32, cmap_dim=16, embed_dim=32)
    B, T = 2, 4
    x, cond, emb = torch.randn(B, T, 4, 8, 8), torch.randn(B, 4, 8, 8), torch.randn(B, 32)
    ids, s = torch.tensor([[6.0, 127.0, 0.02]] * B), torch.tensor([0.3, 2.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = D.features(x, s, cond, emb, ids)
        c = D.condition(emb, s, T)
        logits = D.heads(feats, c)
        full = D(x, s, cond, emb, ids)
    assert all(f.dtype == torch.bfloat16 for f in feats)                # the backbone did run under bf16 autocast
    assert c.dtype == torch.float32 and all(l.dtype == torch.float32 for l in logits + full)
    assert score(logits).dtype == torch.float32
    # the heads' numbers under autocast are the fp32 numbers of the same (bf16) features
    ref = D.heads([f.float() for f in feats], D.condition(emb, s, T))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(logits, ref))
    # so R1's finite difference is fp32 too: it agrees with the exact value within the usual fd error
    n = [torch.randn(f.shape) for f in feats]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fd, _ = r1_penalty(D, feats, c, n, "fd")
    exact, _ = r1_penalty(D, feats, c, n, "exact")
    assert fd.item() == pytest.approx(exact.item(), rel=0.1)


def test_r1_exact_and_finite_difference_agree():
    # default sizes and flags (head 256 channels, --r1-fd-eps): both modes estimate the same per-position quantity
    tr, svd, args = tiny_trainer(DEFAULT_D)
    mb = tiny_batch(svd, args)
    D, B, T = tr.D, 2, mb["latents"].shape[1]
    nz = tr.noise(0, mb["keys"], mb["latents"].shape[1:])
    with torch.no_grad():
        feats = D.features(mb["latents"] + nz["s_d"].view(-1, 1, 1, 1, 1) * nz["eps_d"], nz["s_d"], mb["cond"],
                           mb["image_embeds"], tr.ids.expand(B, -1))
    c = D.condition(mb["image_embeds"], nz["s_d"], T)
    n = tr.r1_noise(0, mb["keys"], feats)
    exact, logits = r1_penalty(D, feats, c, n, "exact")
    fd, logits_fd = r1_penalty(D, feats, c, n, "fd", args.r1_fd_eps)
    assert exact.item() > 0.1                                            # per position: O(1), not O(1 / positions)
    assert fd.item() == pytest.approx(exact.item(), rel=0.1)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logits, logits_fd))
    # it is per position: E_n[(J n)_l^2] = ||d logit_l / d f||^2, checked on one head against the brute-force
    # Jacobian (the mean over 64 directions n; one n has a large spread on 64 correlated positions)
    head, f0 = D.spatial[0], feats[0][:1].float().contiguous()          # (1, T, C, 4, 4)
    cs = c[:1].reshape(T, -1).detach()
    J = torch.autograd.functional.jacobian(lambda f: head(f.reshape(T, *f.shape[2:]), cs).reshape(-1), f0)
    per_pos = J.flatten(1).square().sum(1).mean()                        # mean_l ||d logit_l / d f||^2
    g = torch.Generator().manual_seed(0)
    est = torch.stack([torch.func.jvp(lambda f: head(f.reshape(T, *f.shape[2:]), cs), (f0,),
                                      (torch.randn(f0.shape, generator=g),))[1].square().mean() for _ in range(64)])
    assert est.mean().item() == pytest.approx(per_pos.item(), rel=0.15)
    assert per_pos.item() > 10 * J.sum(0).square().sum().item() / J.shape[0] ** 2   # >> the mean logit's
    # exact R1's gradient reaches the heads and the condition embedder, never the backbone
    (args.r1_gamma * exact).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in D.named_parameters()
               if not name.startswith("backbone.") and p.ndim >= 2)
    assert all(p.grad is None for p in D.backbone.parameters())


def test_r1_share_of_the_heads_gradient():
    # tiny config, default heads, at init: gamma * R1 is a non-negligible part of L_D and its gradient on the heads is
    # within [0.25, 4] x the hinge's (gamma 1e-5 on the mean logit gave ~1e-7 x)
    tr, svd, args = tiny_trainer(DEFAULT_D)
    mb = tiny_batch(svd, args)
    nz = tr.noise(0, mb["keys"], mb["latents"].shape[1:])
    _, fakes = tr.g_step([mb], [nz])
    D, B, T = tr.D, 2, mb["latents"].shape[1]
    for p in D.head_parameters():
        p.requires_grad_(True)
    sd, ids = nz["s_d"].view(-1, 1, 1, 1, 1), tr.ids.expand(B, -1)
    with torch.no_grad():
        f_real = D.features(mb["latents"] + sd * nz["eps_d"], nz["s_d"], mb["cond"], mb["image_embeds"], ids)
        f_fake = D.features(fakes[0] + sd * nz["eps_d"], nz["s_d"], mb["cond"], mb["image_embeds"], ids)
    c = D.condition(mb["image_embeds"], nz["s_d"], T)
    r1, logits_r = r1_penalty(D, f_real, c, tr.r1_noise(0, mb["keys"], f_real), "exact")
    hinge = hinge_d_loss(logits_r, D.heads(f_fake, c))
    P = D.head_parameters()
    norm = lambda gs: torch.stack([g.square().sum() for g in gs if g is not None]).sum().sqrt().item()
    g_hinge = norm(torch.autograd.grad(hinge, P, retain_graph=True, allow_unused=True))
    g_r1 = norm(torch.autograd.grad(args.r1_gamma * r1, P, allow_unused=True))
    assert 0.25 < g_r1 / g_hinge < 4, (g_r1, g_hinge)
    share = (args.r1_gamma * r1 / (hinge + args.r1_gamma * r1)).item()
    assert 0.02 < share < 0.3, share


def test_r1_approx_acts_on_the_input():
    # --r1 approx (Seaweed-APT): mean (D(x') - D(x' + s n))^2 over heads and positions, x' the noisy real input, one
    # more backbone forward (of x' + 0.1 n); zero for a D that ignores its input, positive for ours
    tr, svd, args = tiny_trainer(["--r1", "approx"])
    mb = tiny_batch(svd, args)
    x0, cond, emb, ids = tr.inputs(mb)
    nz = tr.noise(0, mb["keys"], x0.shape[1:])
    dirs = lambda ts: tr.r1_noise(0, mb["keys"], ts)
    seen, features = [], tr.D.features
    tr.D.features = lambda x, *rest: (seen.append(x), features(x, *rest))[1]
    _, logs = train.discriminator_loss(tr.D, x0, x0.flip(0), cond, emb, ids, nz, dirs, args)
    x_real = x0 + nz["s_d"].view(-1, 1, 1, 1, 1) * nz["eps_d"]
    assert len(seen) == 3 and torch.equal(seen[0], x_real)              # real, fake, perturbed real
    assert torch.allclose(seen[2] - seen[0], 0.1 * dirs([x_real])[0], atol=1e-5)
    assert logs["r1"].item() > 1e-4
    f_const = [f.detach() for f in features(x_real, nz["s_d"], cond, emb, ids)]
    tr.D.features = lambda x, *rest: f_const                               # a D that ignores its input
    _, blind = train.discriminator_loss(tr.D, x0, x0.flip(0), cond, emb, ids, nz, dirs, args)
    assert blind["r1"].item() == 0.0
    args.r1 = "exact"                                     # the heads' R1 of that D is not zero: another quantity
    _, exact = train.discriminator_loss(tr.D, x0, x0.flip(0), cond, emb, ids, nz, dirs, args)
    assert exact["r1"].item() > 0.1


@pytest.mark.slow
def test_r1_approx_trains(tmp_path):
    log = run_train(tmp_path / "run", "--max-steps", "3", "--r1", "approx")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["r1"] > 0 and 0 < r["r1_share"] < 1 and math.isfinite(r["loss_d"]) for r in log)


def test_r1_exact_prints_no_jit_deprecation_warning():
    # torch.func.jvp's first call builds torch's forward-AD decompositions with torch.jit.script, which warns
    # (DeprecationWarning or FutureWarning, by torch version); a fresh process, so that first call is ours
    code = ("import torch, train, discriminator; from model import CONFIGS, SVD; torch.manual_seed(0); "
            "D = discriminator.Discriminator(SVD(CONFIGS['tiny']).unet, 'both', 32, 16, 32); "
            "f = [torch.randn(1, 4, c, 2, 2) for c in (32, 64, 64, 64)]; c = D.condition(torch.randn(1, 32), "
            "torch.ones(1), 4); r1, _ = discriminator.r1_penalty(D, f, c, [torch.randn_like(x) for x in f]); "
            "print(float(r1) > 0)")
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", "-c", code],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "True" and "jit" not in r.stderr, r.stderr[-2000:]


def test_gradient_isolation():
    tr, svd, args = tiny_trainer()
    mb = tiny_batch(svd, args)
    heads = tr.D.head_parameters()
    # the G step: no head gradient is created or changed (sentinels survive); the generator gets gradients
    for p in heads:
        p.grad = torch.full_like(p, 7.0)
    seen = []
    finish = tr._finish
    tr._finish = lambda opt, params, *a: (seen.append([p.grad is not None for p in params]), finish(opt, params, *a))[1]
    noises = [tr.noise(0, mb["keys"], mb["latents"].shape[1:])]
    _, fakes = tr.g_step([mb], noises)
    tr._finish = finish
    # (cross-attention over one context token gets no q/k gradient, nor the 1x1 middle self-attention)
    assert len(seen) == 1 and len(seen[0]) == len(list(tr.G.parameters())) and sum(seen[0]) > 0.8 * len(seen[0])
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in heads)
    assert all(p.grad is None for p in tr.D.backbone.parameters())
    assert all(not f.requires_grad for f in fakes)
    # the D step: the generator's gradients and weights are not touched; the heads are updated
    for p in heads:
        p.grad = None
    for p in tr.G.parameters():
        p.grad = torch.full_like(p, 3.0)
    g0 = {k: v.clone() for k, v in tr.G.state_dict().items()}
    h0 = [p.detach().clone() for p in heads]
    tr.d_step([mb], noises, fakes)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in tr.G.parameters())
    assert all(torch.equal(g0[k], v) for k, v in tr.G.state_dict().items())
    assert sum(not torch.equal(a, p.detach()) for a, p in zip(h0, heads)) > 0.9 * len(heads)
    assert all(p.grad is None for p in tr.D.backbone.parameters())


def test_real_and_fake_share_sigma_and_eps(monkeypatch):
    tr, svd, args = tiny_trainer()
    mb = tiny_batch(svd, args)
    calls = []
    orig = Discriminator.features

    def spy(self, x, sigma, *rest):
        calls.append((x.detach().clone(), sigma.clone()))
        return orig(self, x, sigma, *rest)
    monkeypatch.setattr(Discriminator, "features", spy)
    noises = [tr.noise(0, mb["keys"], mb["latents"].shape[1:])]
    _, fakes = tr.g_step([mb], noises)
    tr.d_step([mb], noises, fakes)
    (x_gfake, s1), (x_real, s2), (x_fake, s3) = calls                  # G step fake, D step real, D step fake
    assert torch.equal(s1, s2) and torch.equal(s2, s3)
    assert not torch.equal(s2[:1], s2[1:])                               # per sample sigma'
    eps_real, eps_fake = x_real - mb["latents"], x_fake - fakes[0]
    assert torch.allclose(eps_real, eps_fake, atol=1e-4)                 # the same sigma' eps' added to both
    assert torch.allclose(x_gfake, x_fake, atol=1e-6)                    # and the G step judged the same fake input
    nz = tr.noise(0, mb["keys"], mb["latents"].shape[1:])
    assert torch.allclose(eps_real, nz["s_d"].view(-1, 1, 1, 1, 1) * nz["eps_d"], atol=1e-4)


def test_noise_drawn_once_per_micro_batch(monkeypatch):
    # one Trainer.noise call per micro-batch and step, shared by the G and the D step; the objectives are the module's
    # loss functions (a spy on each sees every micro-batch once)
    tr, svd, args = tiny_trainer(["--grad-accum", "2"])
    mb = tiny_batch(svd, args)
    calls = {"noise": 0, "sfv_generator_loss": 0, "discriminator_loss": 0}

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(tr, "noise", count("noise", tr.noise))
    for name in ("sfv_generator_loss", "discriminator_loss"):
        monkeypatch.setattr(train, name, count(name, getattr(train, name)))
    tr.step([mb, mb])
    assert calls == {"noise": 2, "sfv_generator_loss": 2, "discriminator_loss": 2}
    trd, svd, args = tiny_trainer(["--mode", "diffusion"])
    calls = {"diffusion_loss": 0}
    monkeypatch.setattr(train, "diffusion_loss", count("diffusion_loss", train.diffusion_loss))
    trd.step([mb])
    assert calls == {"diffusion_loss": 1}


@pytest.mark.slow
def test_backbone_frozen_heads_and_generator_change():
    tr, svd, args = tiny_trainer(["--lr-g", "1e-3", "--lr-d", "1e-3"])
    mb = tiny_batch(svd, args)
    bb0 = {k: v.clone() for k, v in tr.D.backbone.state_dict().items()}
    heads0 = {k: v.clone() for k, v in tr.D.head_state_dict().items()}
    g0 = {k: v.clone() for k, v in tr.G.state_dict().items()}
    for _ in range(3):
        m = tr.step([mb], log_terms=True)
        assert all(math.isfinite(v) for v in m.values())
        assert m["grad_norm_g_adv"] > 0 and m["grad_norm_g_rec"] > 0 and 0 < m["r1_share"] < 1
    assert all(torch.equal(bb0[k], v) for k, v in tr.D.backbone.state_dict().items())
    assert all(p.grad is None for p in tr.D.backbone.parameters())
    # every head weight moves (a final bias can legitimately get exactly zero gradient: with all hinge terms
    # active, real and fake pull it equally in opposite directions)
    assert all(not torch.equal(heads0[k], v) for k, v in tr.D.head_state_dict().items() if v.ndim >= 2)
    changed = sum(not torch.equal(g0[k], v) for k, v in tr.G.state_dict().items())
    assert changed > 0.9 * len(g0)
    # the adversarial loss alone reaches the generator through the frozen backbone, and its gradient norm is the
    # logged grad_norm_g_adv (the total minus the reconstruction term's gradient)
    tr.G.zero_grad()
    tr.D.requires_grad_(False)
    nz = tr.noise(tr.step_num, mb["keys"], mb["latents"].shape[1:])
    from model import denoise
    x0_hat = denoise(tr.G, mb["latents"] + nz["s_g"].view(-1, 1, 1, 1, 1) * nz["eps"], nz["s_g"], mb["cond"], mb["image_embeds"], tr.ids.expand(2, -1))
    sd = nz["s_d"].view(-1, 1, 1, 1, 1)
    hinge_g_loss(tr.D(x0_hat + sd * nz["eps_d"], nz["s_d"], mb["cond"], mb["image_embeds"], tr.ids.expand(2, -1))).backward()
    assert tr.G.input_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tr.D.backbone.parameters())
    adv = torch.stack([p.grad.square().sum() for p in tr.G.parameters() if p.grad is not None]).sum().sqrt().item()
    tr.G.zero_grad()
    m = tr.step([mb], log_terms=True)
    assert m["grad_norm_g_adv"] == pytest.approx(adv, rel=1e-3)


@pytest.mark.slow
def test_few_steps_reduce_reconstruction_loss():
    # full SF-V step (adversarial term included); the random tiny D's gradients dwarf 0.1 x recon at init, so the
    # reconstruction weight is raised to 3 to see the reconstruction path learn in a few steps. Single steps may go
    # up (the adversarial term is noise to it), so assert the trend with a margin
    tr, svd, args = tiny_trainer(["--optimizer", "adamw", "--lr-g", "3e-4", "--grad-clip", "0", "--recon-weight", "3"])
    mb = tiny_batch(svd, args)
    recon = []
    for _ in range(10):
        tr.step_num = 0                                                   # same sigmas and noises every step
        recon.append(tr.step([mb])["recon"])
    assert recon[-1] < 0.6 * recon[0] and sum(recon[-3:]) < 0.75 * sum(recon[:3]), recon


def test_diffusion_mode_loss_decreases():
    tr, svd, args = tiny_trainer(["--mode", "diffusion", "--optimizer", "adamw", "--lr-g", "3e-4", "--cond-drop", "0"])
    assert tr.D is None
    mb = tiny_batch(svd, args)
    losses = []
    for _ in range(12):
        tr.step_num = 0
        losses.append(tr.step([mb])["loss"])
    assert losses[-1] < 0.5 * losses[0], losses

# -----------------------------------------------------------------------------
# data


def test_synthetic_videos():
    ds = data.SyntheticVideos(50, frames=8, size=64, seed=3)
    v = ds[5]
    assert v.shape == (8, 3, 64, 64) and v.min() >= -1 and v.max() <= 1
    assert torch.equal(v, data.SyntheticVideos(50, 8, 64, 3)[5])          # a pure function of (seed, index)
    assert not torch.equal(v, ds[6]) and not torch.equal(v, data.SyntheticVideos(50, 8, 64, 4)[5])
    assert (v[1:] - v[:-1]).abs().amax(dim=(1, 2, 3)).min() > 0.1       # things move in every frame


def _shape_centre(frame, background):
    """Centre (x, y) in pixels of the shape in frame (3, S, S): weighted by |frame - background|, i.e. by the
    anti-aliased coverage, whose centroid is the shape's position."""
    w = (frame - background.view(3, 1, 1)).abs().sum(0)
    yy, xx = torch.meshgrid(torch.arange(frame.shape[1]) + 0.5, torch.arange(frame.shape[2]) + 0.5, indexing="ij")
    return torch.stack([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])


def test_synthetic_videos_simple_and_static():
    """simple: one shape over a flat background, moving at a random speed in [0.04, 0.08] x size px per frame in a
    random direction (so the first frame does not tell where it goes); static: the same scenes without motion."""
    S = 32
    simple = data.SyntheticVideos(200, 8, S, seed=1, style="simple")
    static = data.SyntheticVideos(200, 8, S, seed=1, style="static")
    angles, steps = [], []
    for i in range(40):
        v, st = simple[i], static[i]
        assert v.shape == st.shape == (8, 3, S, S) and v.min() >= -1 and v.max() <= 1
        assert torch.equal(v[0], st[0])                                     # same scene, same first frame
        assert all(torch.equal(st[t], st[0]) for t in range(8))             # static: every frame is the first
        bg = v[0].flatten(1).median(1).values                               # flat background: most pixels
        assert ((v[0] - bg.view(3, 1, 1)).abs().amax(0) < 1e-6).float().mean() > 0.6
        c0, c1 = _shape_centre(v[0], bg), _shape_centre(v[1], bg)
        step = (c1 - c0).norm().item()
        if 0.3 * S < c0.min() and c0.max() < 0.7 * S:                        # far from a border: no bounce yet
            steps.append(step)
            assert simple.speed[0] * S - 0.05 < step < simple.speed[1] * S + 0.05, step
        angles.append(math.atan2(*(c1 - c0).flip(0).tolist()))
    quadrants = {int((a + math.pi) // (math.pi / 2)) % 4 for a in angles}
    assert quadrants == {0, 1, 2, 3}                                        # every direction occurs
    assert np.std(steps) > 0.15 * S * (simple.speed[1] - simple.speed[0])   # and a range of speeds


def write_test_video(path, n, fps, size=(80, 96)):
    # frame i is uniform grey 16 * i, so the frame index can be read back
    write_mp4(path, np.stack([np.full((*size, 3), 16 * i, np.uint8) for i in range(n)]), fps)


def test_video_folder_skips_corrupt_and_short(tmp_path):
    vids = tmp_path / "videos"
    (vids / "sub").mkdir(parents=True)
    write_test_video(vids / "a.mp4", 14, 14)
    write_test_video(vids / "sub" / "b.mp4", 14, 14)
    write_test_video(vids / "short.mp4", 3, 14)
    (vids / "corrupt.mp4").write_bytes(os.urandom(3000))
    (vids / "notes.txt").write_text("not a video")
    with pytest.warns(UserWarning, match="skipping video"):
        vf = data.VideoFolder(str(vids), frames=4, fps=7, height=64, width=64)
    assert len(vf) == 2
    assert sorted(os.path.basename(p) for p, _ in vf.skipped) == ["corrupt.mp4", "short.mp4"]
    # the index holds what the probe found: "too short" depends on --frames, so a shorter clip can use the file
    short = str(vids / "short.mp4")
    assert "error" in vf.index[str(vids / "corrupt.mp4")] and vf.index[short]["n"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # corrupt.mp4 is skipped again
        assert short in [p for p, *_ in data.VideoFolder(str(vids), 2, 7, 64, 64, vf.index).items]
    # an index entry made from another version of a file (size, mtime) is probed again
    stale = {**vf.index, short: {"n": 999, "fps": 14.0, "stamp": [1, 1]}}
    assert data.probe_videos(str(vids), stale)[short] == vf.index[short]
    # 14 fps source at 7 fps: stride 2; resized to cover 64x64 and centre-cropped
    clip = vf.get(0, seed=1)["video"]
    assert clip.shape == (4, 3, 64, 64)
    grey = (clip.mean(dim=(1, 2, 3)) + 1) * 127.5 / 16                 # frame indices of the clip
    assert torch.allclose(grey[1:] - grey[:-1], torch.full((3,), 2.0), atol=0.25), grey

    # training on the folder does not crash and reports the skipped files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.main([*COMMON, "--data", str(vids), "--out", str(tmp_path / "run"), "--max-steps", "2", "--frames", "4"])
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2] and all(r["skipped_videos"] == 2 for r in log)


@pytest.mark.slow
def test_video_corrupt_at_read_time_is_skipped_and_recorded(tmp_path, capsys):
    vids = tmp_path / "videos"
    vids.mkdir()
    write_test_video(vids / "a.mp4", 14, 14)
    write_test_video(vids / "b.mp4", 14, 14)
    vf = data.VideoFolder(str(vids), frames=4, fps=7, height=64, width=64)
    gone = str(vids / "gone.mp4")
    vf.items[0] = (gone, 14, 14.0)                                        # probed fine, unreadable later
    with pytest.warns(UserWarning, match="gone.mp4"):
        item = vf.get(0, seed=0)
    assert item["skipped"] == [(gone, f"cannot decode video {gone} (FileNotFoundError)")]
    assert item["video"].shape == (4, 3, 64, 64)
    vf.items[1] = (gone, 14, 14.0)
    with pytest.raises(cli.UserError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vf.get(0, seed=0)
    assert str(e.value) == (f"no readable video left in {vids}: all 2 failed to decode, e.g. {gone}; check or replace "
                            f"the videos in --data")
    # a file damaged after a run indexed it as fine (same size and mtime): training skips it, names it, and records
    # it in <out>/video_index.json, so the next run skips it at the scan
    out = tmp_path / "run"
    run = [*COMMON, "--data", str(vids), "--out", str(out), "--max-steps", "2", "--frames", "4"]
    train.main(run)
    b = vids / "b.mp4"
    stat = b.stat()
    b.write_bytes(os.urandom(stat.st_size))
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    with pytest.warns(UserWarning, match=f"skipping video {re.escape(str(b))}"):
        train.main(run)
    assert (f"note: recorded 1 video(s) that failed to decode in {out}/video_index.json, e.g. {b}; later runs skip "
            f"them") in capsys.readouterr().out.splitlines()
    index = json.loads((out / "video_index.json").read_text())
    assert index[str(b)]["error"] == f"cannot decode video {b} (InvalidDataError)" and "n" in index[str(vids / "a.mp4")]
    with pytest.warns(UserWarning, match=f"skipping video {re.escape(str(b))}: cannot decode video"):
        train.main(run)


@pytest.mark.slow
def test_latent_cache(tmp_path):
    out = tmp_path / "run"
    train.main([*COMMON, "--out", str(out), "--max-steps", "2", "--cache", str(tmp_path / "cache"), "--synthetic-size", "3"])
    files = sorted(os.listdir(tmp_path / "cache"))
    assert files == ["00000000.safetensors", "00000001.safetensors", "00000002.safetensors", "index.json"]
    item = data.LatentCache(str(tmp_path / "cache")).get(1, 0)
    assert item["latents"].shape == (4, 4, 8, 8) and item["cond"].shape == (4, 8, 8) and item["image_embeds"].shape == (32,)
    assert [r["step"] for r in read_log(out)] == [1, 2]
    (tmp_path / "cache" / "index.json").write_text('{"n": 3')                # damaged
    with pytest.raises(cli.UserError) as e:
        data.LatentCache(str(tmp_path / "cache"))
    assert str(e.value) == (f"cannot read the latent cache {tmp_path / 'cache' / 'index.json'} (JSONDecodeError); "
                            f"delete the --cache folder to rebuild it")


@pytest.mark.slow
def test_latent_cache_records_what_it_was_built_for(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    run = [*COMMON, "--out", str(out), "--max-steps", "3", "--cache", str(cache), "--synthetic-size", "3"]
    train.main(run)
    built_for = {"init": "tiny", "data": "synthetic", "frames": 4, "height": 64, "width": 64, "cond_aug": 0.02,
                 "seed": 0, "synthetic_style": "textured", "synthetic_size": 3}
    assert json.loads((cache / "index.json").read_text())["built_for"] == built_for
    refused = (f"error: --cache {cache} was built for --frames 4 --cond-aug 0.02, not --frames 2 --cond-aug 0.05; pass "
               f"another --cache folder (it is built on first use), or the settings it was built for")
    assert train_error([*run, "--frames", "2", "--cond-aug", "0.05"]) == refused
    (cache / "index.json").unlink()                                      # a partly built cache: its entries say it
    assert train_error([*run, "--frames", "2", "--cond-aug", "0.05"]) == refused
    # a damaged entry: one line naming the file; deleted, it is encoded again
    entry = cache / "00000001.safetensors"
    good = entry.read_bytes()
    entry.write_bytes(b"\x00" * 100)
    msg = re.split(r"[\r\n]", train_error(run))[-1]
    assert msg == (f"error: damaged latent cache entry {entry} (SafetensorError); delete that file and run again (a "
                   f"missing entry is encoded again)")
    entry.unlink()
    train.main(run)
    assert entry.read_bytes() == good and json.loads((cache / "index.json").read_text())["built_for"] == built_for
    # a cache of an older train.py records nothing: its latent shape is checked, with a note
    (cache / "index.json").write_text(json.dumps({"n": 3, "skipped": []}))
    assert train_error([*run, "--frames", "2"]) == (
        f"error: --cache {cache} holds latents of shape [4, 4, 8, 8], this run needs [2, 4, 8, 8] (2x64x64); pass "
        f"another --cache folder (it is built on first use)")
    capsys.readouterr()
    train.main(run)
    assert (f"note: --cache {cache} does not record what it was built for (an older train.py); only its latent shape "
            f"is checked") in capsys.readouterr().out.splitlines()


def test_user_error_in_a_loader_worker_stays_one_line():
    # a DataLoader re-raises a worker's exception with the worker's traceback in its message; train.py keeps its line
    class Damaged(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise cli.UserError("damaged latent cache entry x.safetensors (SafetensorError); delete that file")
    with pytest.raises(cli.UserError) as e:
        train.next_batch(iter(torch.utils.data.DataLoader(Damaged(), num_workers=1)))
    assert str(e.value) == "damaged latent cache entry x.safetensors (SafetensorError); delete that file"


def test_unwritable_cache_refused_before_the_model_is_built(tmp_path, monkeypatch):
    cache = unwritable_path(tmp_path, "sfv-cache")
    monkeypatch.setattr(train, "build_model_and_data", lambda *a: pytest.fail("the model was built"))
    msg = train_error([*COMMON, "--out", str(tmp_path / "run"), "--cache", cache])
    assert re.fullmatch(rf"error: cannot write to --cache {re.escape(cache)} \((Permission denied|Operation not "
                        rf"permitted|Read-only file system)\); pass a writable folder", msg), msg
    assert not os.path.exists(cache) and not (tmp_path / "run").exists()

# -----------------------------------------------------------------------------
# checkpoints, resume, EMA, samples, distributed


@pytest.mark.slow
def test_checkpoint_bundle_ema_and_samples(tmp_path):
    out = tmp_path / "run"
    tr = train.main([*COMMON, "--out", str(out), "--max-steps", "1", "--sample-every", "1", "--num-samples", "2"])
    torch.manual_seed(0)
    init = SVD(CONFIGS["tiny"]).unet.state_dict()
    g = tr.G.state_dict()
    for k, v in tr.ema.state_dict().items():                             # EMA 0.95 after one step
        assert torch.allclose(v, 0.95 * init[k] + 0.05 * g[k], atol=1e-6), k
    svd = load_svd.load(str(out / "model.safetensors"))                  # what sample.py --ckpt loads
    assert svd.cfg.steps == 1 and svd.cfg.max_cfg == 1.0 and svd.cfg.num_frames == 4
    assert all(torch.equal(v, tr.ema.state_dict()[k]) for k, v in svd.unet.state_dict().items())
    import sample_flags
    assert sample_flags.sampling_defaults(svd)["steps"] == 1
    vids = sorted(os.listdir(out / "samples"))
    assert vids == ["step0000001_0.mp4", "step0000001_1.mp4"]
    with av.open(str(out / "samples" / vids[0])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4
    assert not [f for f in os.listdir(out) if ".tmp" in f]               # atomic writes leave no temp files
    st = torch.load(out / "train_state.pt", weights_only=True)
    assert st["step"] == 1 and set(st) >= {"unet", "ema", "disc", "opt_g", "opt_d", "rng_torch"}
    assert not any(k.startswith("backbone.") for k in st["disc"])


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path):
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *COMMON, "--out", str(killed),
                          "--max-steps", "1000", "--save-every", "2"], env=ENV, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120:
        time.sleep(0.05)
        if (killed / "train_state.pt").exists() and (killed / "log.jsonl").exists() and len(read_log(killed)) >= 3:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    saved = torch.load(killed / "train_state.pt", weights_only=True)["step"]
    assert saved >= 2 and saved % 2 == 0
    end = saved + 3
    resumed = run_train(killed, "--max-steps", str(end), "--save-every", "2", "--resume")
    full = run_train(tmp_path / "full", "--max-steps", str(end), "--save-every", "2")
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == list(range(1, end + 1))
    for a, b in zip(resumed, full):
        for k in LOSS_KEYS:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)
    sa, sb = (torch.load(d / "train_state.pt", weights_only=True) for d in (killed, tmp_path / "full"))
    assert all(torch.equal(sa["unet"][k], sb["unet"][k]) for k in sa["unet"])


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    # --sm3-variant debiased: DDP equivalence does not depend on the update formula, and plain SM3's early steps
    # (~32 lr with beta2 0.999) turn this ill-conditioned random UNet's fp32 summation-order differences (below) into
    # ~lr differences of most weights after two steps, which would blind the sharding check at the end
    opt = ["--sm3-variant", "debiased"]
    one = run_train(tmp_path / "one", "--max-steps", "2", "--batch-size", "2", *opt)
    two = run_train(tmp_path / "two", "--max-steps", "2", "--batch-size", "1", *opt, torchrun=2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        for k in LOSS_KEYS:
            # The random tiny UNet's last level is 1x1 with 2 values per GroupNorm group, so its gradients are
            # ill-conditioned: per-sample gradients ~100x their sum, fp32 summation order shows at ~1e-3 (float64:
            # 1e-9, checked), and after one update the gradient norm itself is chaotic. So: losses and R1 to 1e-4
            # (step 1) and 1e-3 (step 2, which inherits step 1's fp32 update differences); gradient norms at step 1.
            if k.startswith("grad_norm"):
                if a["step"] == 1:
                    assert a[k] == pytest.approx(b[k], rel=1e-2), k
                continue
            rel = 1e-4 if a["step"] == 1 else 1e-3
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-5), (a["step"], k)
    sa, sb = (torch.load(d / "train_state.pt", weights_only=True) for d in (tmp_path / "one", tmp_path / "two"))
    # SM3 steps are ~lr * sign(g) early on, so an element whose fp32 gradient is rounding noise may step the other
    # way: |difference| <= 3 lr after two steps (momentum 0.5); every other element agrees far more closely
    for part, lr in (("unet", 1e-5), ("ema", 1e-5), ("disc", 1e-4)):
        for k in sa[part]:
            assert torch.allclose(sa[part][k], sb[part][k], rtol=0, atol=3 * lr + 1e-6), (part, k)
        d = torch.cat([(sa[part][k] - sb[part][k]).abs().flatten() for k in sa[part]])
        # the median element differs by 0.2-2% of lr depending on the CPU's kernels (1.9e-7 at lr 1e-5 seen);
        # wrong sharding: most elements would differ by ~lr
        assert d.median() < 0.1 * lr, part
    # and the global batch really holds two different samples: batch 1 on one process differs
    train.main([*COMMON, "--out", str(tmp_path / "single"), "--max-steps", "1", "--batch-size", "1", *opt])
    assert read_log(tmp_path / "single")[0]["loss_g"] != pytest.approx(one[0]["loss_g"], rel=1e-3)


def test_help_documents_every_flag():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for name, *_ in train.FLAGS:
        assert "--" + name.replace("_", "-") in r.stdout, name


def test_simulator_tracker_counts_exact_bytes_and_flops():
    # bench.py --simulate's tracker: storages counted from creation to free, views not counted, a matmul's FLOPs
    import bench
    with bench.LiveTensorPeak(flop_formulas=bench.flop_formulas()) as t:
        a = torch.ones(1024, 256)                                       # 1 MiB
        b = torch.ones(256, 512)                                        # 0.5 MiB
        c = a @ b                                                       # 2 MiB; 2 * 1024 * 256 * 512 FLOPs
        v = c.t()                                                       # a view: no new memory
        del a
        d = torch.ones(256, 256)                                        # 0.25 MiB, after a was freed
    assert t.peak == (1024 * 256 + 256 * 512 + 1024 * 512) * 4
    assert t.live == (256 * 512 + 1024 * 512 + 256 * 256) * 4
    assert t.flops == 2 * 1024 * 256 * 512
    del v, c, d


@pytest.mark.slow
def test_simulator_matches_a_real_run():
    # the same code on fake tensors (shapes only) and on real ones: live-tensor peaks and FLOPs within 10%
    import bench
    fake, real = (bench.sim_unet_forward(CONFIGS["tiny"], 4, 16, 16, torch.float32, f) for f in (True, False))
    assert fake["flops"] == real["flops"] > 1e9
    assert fake["act"] == pytest.approx(real["act"], rel=0.1) and real["act"] > 1e6
    fake, real = (bench.sim_train(CONFIGS["tiny"], 4, 64, 64, fake=f) for f in (True, False))
    assert fake["peak"] - fake["base"] == pytest.approx(real["peak"] - real["base"], rel=0.1)
    assert real["peak"] - real["base"] > 1e6


def test_bench_sample_stages_time_model_api():
    # bench.py --sample times the stages through model.py's API (SVD.condition, SVD.sample, vae.decode), not sample.py:
    # SF-V's one evaluation for 1 step, cond + uncond per guided step
    import bench
    torch.manual_seed(0)
    svd = SVD(TINY).eval()
    img = torch.rand(3, 64, 64)
    assert bench.sample_stages(svd, img, 1)["unet_evals"] == 1
    st = bench.sample_stages(svd, img, 2)
    assert st["unet_evals"] == 4 and all(st[k] > 0 for k in ("encode", "denoise", "decode"))


def test_train_memory_benchmark_on_cpu_runs_the_full_step_and_invents_no_figure(capsys):
    # bench.py --train-memory. A CPU has no per-step peak to read (ru_maxrss is the process's lifetime maximum), so the
    # CPU run reports none and only proves that the benchmarked step is the full one (R1, per-term G gradients)
    import bench
    r = bench.train_memory("tiny", "4x64x64", "cpu", SMALL_D)
    assert r["peak_gib"] is None and "not measured (CPU run)" in capsys.readouterr().out
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("loss_d", "r1", "r1_share", "grad_norm_g_adv", "grad_norm_g_rec"))


@pytest.mark.slow
def test_resume_refuses_changed_model_args(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()                                                          # a pid that no longer runs
    stale = out / f".train_state.pt.tmp-{dead.pid}"                        # left by a write killed mid-way
    stale.write_bytes(b"partial")
    (out / "notes.tmp-1").write_text("not our pattern")
    (out / f".model.safetensors.tmp-{os.getppid()}").write_text("a running writer's")
    train.main([*COMMON, "--out", str(out), "--max-steps", "1", "--resume"])      # --resume with no state: fresh
    so = capsys.readouterr().out.splitlines()
    assert so[:2] == [f"removed {stale} (left by an interrupted write)",
                      f"note: --resume: no {out / 'train_state.pt'} yet; starting fresh"]
    assert sorted(f for f in os.listdir(out) if "tmp" in f) == [f".model.safetensors.tmp-{os.getppid()}", "notes.tmp-1"]
    rec = read_log(out)[0]                               # every logged step has R1's share and both G gradient norms
    assert 0.01 < rec["r1_share"] < 0.5 and rec["grad_norm_g_adv"] > 0 and rec["grad_norm_g_rec"] > 0
    st = json.loads(torch.load(out / "train_state.pt", weights_only=True)["args"])
    assert st["disc_tap"] == "after" and st["init"] == "tiny"
    assert train_error([*COMMON, "--out", str(out), "--max-steps", "2", "--resume", "--disc-tap", "before"]) == (
        "error: --resume: the saved run has --disc-tap after, this run --disc-tap before; start a new --out, or pass "
        "--resume-any-args")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *COMMON, "--out", str(out), "--max-steps", "2",
                        "--resume", "--head-channels", "64"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: --resume: the saved run has --head-channels 32, this run "
                                             "--head-channels 64; start a new --out, or pass --resume-any-args"]
    capsys.readouterr()
    train.main([*COMMON, "--out", str(out), "--max-steps", "2", "--resume", "--disc-tap", "before", "--resume-any-args"])
    assert f"resuming from {out / 'train_state.pt'} at step 1" in capsys.readouterr().out.splitlines()
    assert [r["step"] for r in read_log(out)] == [1, 2]
    train.main([*COMMON, "--out", str(out), "--max-steps", "1"])                    # no --resume: a fresh start, said
    assert capsys.readouterr().out.splitlines()[0] == (f"note: {out / 'train_state.pt'} exists but --resume is not "
                                                       f"given; starting fresh (the state is overwritten at the first save)")
    assert [r["step"] for r in read_log(out)] == [1]


@pytest.mark.slow
def test_resume_applies_changed_optimiser_settings(tmp_path, capsys):
    # the loaded optimiser state would bring back the saved run's betas and weight decay: this run's flags win, said in
    # one line; SM3 without momentum (beta1 0) gets one when a resume turns it on
    out = tmp_path / "run"
    train.main([*COMMON, "--out", str(out), "--max-steps", "1", "--beta1", "0"])
    capsys.readouterr()
    changed = ["--lr-d", "2e-4", "--beta1", "0.9", "--weight-decay", "0.05"]
    tr = train.main([*COMMON, "--out", str(out), "--max-steps", "2", "--resume", *changed])
    assert ("note: --resume with changed settings, applied from step 1 on: --lr-d 0.0002 (was 0.0001), --beta1 0.9 "
            "(was 0.0), --weight-decay 0.05 (was 0.0)") in capsys.readouterr().out.splitlines()
    for opt in (tr.opt_g, tr.opt_d):
        assert all(g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0.05 for g in opt.param_groups)
        assert all("momentum" in st for st in opt.state.values())
    st = torch.load(out / "train_state.pt", weights_only=True)
    assert list(st["opt_g"]["param_groups"][0]["betas"]) == [0.9, 0.999]
    # another --optimizer (only with --resume-any-args): a fresh optimiser state, said; not a KeyError 'exp_avg'
    tr = train.main([*COMMON, "--out", str(out), "--max-steps", "3", "--resume", "--resume-any-args", *changed,
                     "--optimizer", "adamw"])
    assert ("note: --resume with changed settings, applied from step 2 on: --optimizer adamw (was sm3); the optimiser "
            "state starts fresh") in capsys.readouterr().out.splitlines()
    assert isinstance(tr.opt_g, torch.optim.AdamW) and tr.step_num == 3
    assert all("exp_avg" in st for st in tr.opt_g.state.values())


def test_run_folder_lock(tmp_path, capsys):
    # a live run's --out is refused before anything in it is touched; a killed run's lock is taken over
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    lock, host = out / "train.lock", socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(f"{live.pid} {host}\n")
        assert train_error([*COMMON, "--out", str(out), "--max-steps", "1"]) == (
            f"error: --out {out} is in use by train.py pid {live.pid} on {host} ({lock}); wait for it to end or pass "
            f"another --out (if no such run is left, delete {lock})")
        assert (out / "log.jsonl").read_text() == '{"step": 1}\n' and lock.read_text() == f"{live.pid} {host}\n"
    finally:
        live.kill()
        live.wait()
    train.main([*COMMON, "--out", str(out), "--max-steps", "1"])           # its holder is gone: taken over
    assert not lock.exists() and [r["step"] for r in read_log(out)] == [1]


def test_only_rank_0_checks_creates_and_locks_out(tmp_path):
    # rank 0's writability probe creates and removes folders; another rank checking --out at that moment saw "a file"
    import run_folder
    args = train.parse_args([*COMMON, "--out", str(tmp_path / "a" / "run")])
    assert run_folder.prepare_out(args, 1, 1) == ([], None) and os.listdir(tmp_path) == []
    run = tmp_path / "a" / "run"
    assert run_folder.prepare_out(args, 0, 1) == ([str(run), str(tmp_path / "a")], str(run / "train.lock"))
    assert os.listdir(run) == ["train.lock"]


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main([*COMMON, "--out", str(out), "--max-steps", "1"])
    before = (out / "train_state.pt").read_bytes()

    def full_disk(obj, f, *a, **k):                     # torch.save's failure on a full disk is a RuntimeError
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", full_disk)
    msg = re.split(r"[\r\n]", train_error([*COMMON, "--out", str(out), "--max-steps", "2", "--resume"]))[-1]
    assert re.fullmatch(rf"error: cannot write to --out {re.escape(str(out))} at step 2 \(the write failed: \[enforce "
                        rf"fail at inline_container.cc:672\] . unexpected pos 704 vs 598; \d+ MiB free there\); free "
                        rf"some space, then continue with --resume", msg), msg
    assert (out / "train_state.pt").read_bytes() == before
    assert sorted(os.listdir(out)) == ["log.jsonl", "model.safetensors", "train_state.pt"]


@pytest.mark.slow
def test_ctrl_c_says_where_the_last_checkpoint_is(tmp_path, monkeypatch):
    import contextlib
    import io

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.Trainer, "step", interrupt)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        train.main([*COMMON, "--out", str(tmp_path / "early")])
    assert e.value.code == 130 and "Traceback" not in err.getvalue()
    assert re.split(r"[\r\n]", err.getvalue().strip())[-1] == "interrupted at step 0; no checkpoint was written"
    assert not (tmp_path / "early").exists()                              # the folder it made, and its lock, removed
    out = tmp_path / "run"
    # (SIGINT back to its default: a shell starts background jobs with it ignored, which Python then keeps)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *COMMON, "--out", str(out), "--max-steps",
                          "1000", "--save-every", "2"], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while time.time() - t0 < 300 and not ((out / "log.jsonl").exists() and len(read_log(out)) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert p.returncode == 130 and "Traceback" not in err and saved >= 2
    m = re.fullmatch(rf"interrupted at step (\d+); the last checkpoint is {re.escape(str(out / 'train_state.pt'))} "
                     rf"\(step {saved}\)", re.split(r"[\r\n]", err.strip())[-1])
    assert m and int(m.group(1)) >= saved, err[-500:]
    assert not (out / "train.lock").exists()


def test_paper_defaults_sizes_and_clipping():
    args = train.parse_args([])
    assert args.grad_clip == 0.0 and args.out == "out/sfv" and train.parse_args(["--mode", "diffusion"]).out == \
        "out/diffusion"
    # SVD-sized models train at SF-V's 448x768; the others at their config's size; the flags win
    assert train.train_size(args, CONFIGS["svd"]) == (14, 448, 768)
    assert train.train_size(args, CONFIGS["svd_xt"]) == (25, 448, 768)
    assert train.train_size(args, CONFIGS["toy"]) == (8, 16, 16) and train.train_size(args, TINY) == (4, 64, 64)
    flags = train.parse_args(["--frames", "7", "--height", "512", "--width", "576"])
    assert train.train_size(flags, CONFIGS["svd"]) == (7, 512, 576)
    # --p-std -1, the paper's literal value, is accepted and draws exactly the sigma' of +1
    a, b = train.parse_args(["--p-std", "-1"]), train.parse_args(["--p-std", "1"])
    train.check_args(a)
    noise = lambda args: train.Trainer.noise(argparse.Namespace(args=args, device=torch.device("cpu")), 3, [0, 1, 2, 3],
                                             (4, 4, 8, 8))
    assert torch.equal(noise(a)["s_d"], noise(b)["s_d"])
    helps = {name: help_ for name, _, _, help_ in train.FLAGS}
    assert "the paper does not mention clipping" in helps["grad_clip"] and "the same distribution" in helps["p_std"]


def test_train_size_rules_follow_the_model(tmp_path, capsys):
    # multiples of model.size_multiple: 64 for SVD-shaped configs, 4 for the toy (latent = pixels, two halvings)
    assert train_error([*COMMON, "--out", str(tmp_path / "a"), "--height", "100", "--width", "100"]) == (
        "error: bad --height 100: must be a multiple of 64 (the latent is 1/8 of the image size and the UNet halves it "
        "3 times); try --height 128")
    assert train_error([*COMMON, "--out", str(tmp_path / "b"), "--init", "toy", "--height", "14", "--width", "14"]) == (
        "error: bad --height 14: must be a multiple of 4 (the latent has the image size and the UNet halves it 2 "
        "times); try --height 16")
    # a toy run at 20x20: the bundle records the student sampler, its trained levels and grid, and keeps the config's
    # own sampling size
    out = tmp_path / "toy"
    train.main([*COMMON, "--init", "toy", "--height", "20", "--width", "20", "--out", str(out), "--max-steps", "1",
                "--sigma-max", "500"])
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote {out / 'model.safetensors'} (step 1) and train_state.pt; sample it with python sample.py IMAGE --ckpt "
        f"{out / 'model.safetensors'}")
    cfg = load_svd.load(str(out / "model.safetensors")).cfg
    assert (cfg.height, cfg.width, cfg.num_frames, cfg.steps, cfg.min_cfg, cfg.max_cfg) == (16, 16, 8, 1, 1.0, 1.0)
    assert cfg.sampler == "student" and (cfg.sigma_min, cfg.sigma_max, cfg.rho) == (0.002, 500.0, 7.0)
    levels = model.karras_sigmas(4, 0.002, 500.0, 7.0)[:3].tolist()
    assert cfg.student_levels == tuple(levels) and levels[0] == pytest.approx(500) and len(levels) == 3
    # a resumed run already at --max-steps: nothing to do, said
    assert train.main([*COMMON, "--init", "toy", "--out", str(out), "--max-steps", "1", "--resume"]) is None
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"nothing to train: {out / 'train_state.pt'} is at step 1, --max-steps 1; pass a larger --max-steps to "
        f"continue")


def test_diffusion_mode_end_to_end(tmp_path):
    out = tmp_path / "run"
    tr = train.main([*COMMON, "--mode", "diffusion", "--out", str(out), "--max-steps", "2", "--sample-every", "2",
                     "--num-samples", "1", "--sample-steps", "2"])
    assert tr.D is None and [set(r) >= {"loss", "lr_g", "grad_norm_g"} for r in read_log(out)] == [True, True]
    svd = load_svd.load(str(out / "model.safetensors"))
    assert svd.cfg.steps == CONFIGS["tiny"].steps                        # a diffusion model keeps multi-step sampling
    assert svd.cfg.sampler == "euler" and svd.cfg.student_levels == () and svd.cfg.sigma_max == 700.0
    assert os.listdir(out / "samples") == ["step0000002_0.mp4"]


def _state_bytes(opt):
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def test_fused_step_equals_the_unfused_update():
    # --fused-step steps each weight in its post-accumulate-grad hook: the same update, gradient norms and per-term
    # gradient norms as the plain path (grad clip off, one micro-batch), and no G gradient is left after the step
    plain, svd, args = tiny_trainer(["--grad-clip", "0"])
    fused, _, _ = tiny_trainer(["--grad-clip", "0", "--fused-step"])
    mb = tiny_batch(svd, args)
    for i in range(2):
        a, b = plain.step([mb], log_terms=i == 1), fused.step([mb], log_terms=i == 1)
        assert set(a) == set(b) and (i == 0 or b["grad_norm_g_adv"] > 0)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (i, k)
    assert all(p.grad is None for p in fused.G.parameters())
    for (n, p), q in zip(plain.G.named_parameters(), fused.G.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), n
    for e, f in zip(plain.ema.parameters(), fused.ema.parameters()):
        assert torch.allclose(e, f, rtol=1e-5, atol=1e-7)


def test_term_gradient_norms_split_backward_equals_the_buffer():
    # one micro-batch: the per-term norms from the split backward (no G-sized buffer); two identical micro-batches
    # (the same mean gradient): from the summed buffer. Same norms, same update
    # (--grad-clip 1: clipping scales the rounding-noise gradients below SM3's eps, so they take no sign step)
    one, svd, args = tiny_trainer(["--grad-clip", "1"])
    two, _, _ = tiny_trainer(["--grad-accum", "2", "--grad-clip", "1"])
    mb = tiny_batch(svd, args)
    a, b = one.step([mb], log_terms=True), two.step([mb, mb], log_terms=True)
    for k in ("grad_norm_g", "grad_norm_g_adv", "grad_norm_g_rec", "loss_g", "recon"):
        assert a[k] == pytest.approx(b[k], rel=1e-4), k
    assert a["grad_norm_g_adv"] > 0 and a["grad_norm_g_rec"] > 0
    # plain SM3's first step is ~lr sign(g) per element (lr 1e-5): an element whose fp32 gradient is rounding noise may
    # step the other way; the rest agree
    d = torch.cat([(p - q).abs().flatten() for p, q in zip(one.G.parameters(), two.G.parameters())])
    assert d.max() <= 2.5e-5 and d.median() < 1e-7, (d.max(), d.median())


@pytest.mark.slow
def test_bf16_optimizer_state_and_host_ema_copy():
    # --optim-state-dtype bf16: the SM3 momentum is stored in bf16 (also after a resume), the first step is the plain
    # one, and three steps stay within bf16 rounding of the momentum (updates ~lr) of the fp32 run
    plain, svd, args = tiny_trainer(["--lr-g", "1e-3"])
    half, _, _ = tiny_trainer(["--lr-g", "1e-3", "--optim-state-dtype", "bf16"])
    mb = tiny_batch(svd, args)
    for i in range(3):
        a, b = plain.step([mb]), half.step([mb])
        for k in ("loss_g", "adv_g", "recon", "loss_d", "r1"):
            assert b[k] == pytest.approx(a[k], rel=1e-5 if i == 0 else 2e-2), (i, k)
    moms = [st["momentum"] for st in half.opt_g.state.values()]
    assert moms and all(m.dtype == torch.bfloat16 for m in moms)
    assert _state_bytes(plain.opt_g) - _state_bytes(half.opt_g) == sum(m.numel() * 2 for m in moms)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
    torch.manual_seed(0)
    moved = (flat(plain.G) - flat(SVD(CONFIGS["tiny"]).unet)).norm()      # the 3 updates of the fp32 run
    d = (flat(plain.G) - flat(half.G)).norm()
    assert 0 < d < 0.02 * moved, (d, moved)
    resumed, _, _ = tiny_trainer(["--optim-state-dtype", "bf16"])
    resumed.load_state_dict(plain.state_dict())                          # an fp32 state resumed with bf16 state
    assert all(st["momentum"].dtype == torch.bfloat16 for st in resumed.opt_g.state.values())
    # --ema-device cpu on a GPU run keeps the EMA as a host copy made tensor by tensor; sampling moves a copy back
    ema = train.copy_module(plain.G, "cpu")
    assert all(torch.equal(e, p) and e.data_ptr() != p.data_ptr() and e.requires_grad == p.requires_grad
               for e, p in zip(ema.parameters(), plain.G.parameters()))
    half_copy = train.copy_module(plain.ema, "cpu", torch.bfloat16)
    assert all(e.dtype == torch.bfloat16 for e in half_copy.parameters())


@pytest.mark.slow
def test_memory_plan_counts_state_bytes_exactly():
    # the plan's state items equal a direct count on the tiny config after a step (optimiser state exists); the
    # gradients are counted where they exist (inside the G step)
    tr, svd, args = tiny_trainer()
    mb = tiny_batch(svd, args)
    seen = []
    finish = tr._finish
    tr._finish = lambda opt, params, *a: (seen.append(sum(p.grad.numel() * 4 for p in params if p.grad is not None)),
                                          finish(opt, params, *a))[1]
    tr.step([mb])
    plan = memory_plan.memory_plan(args, svd.cfg, 4, 64, 64, torch.device("cpu"))
    items = dict(plan["items"])
    n_g = sum(p.numel() for p in tr.G.parameters())
    heads = tr.D.head_parameters()
    assert items["G weights (fp32)"] == n_g * 4 == sum(p.numel() * 4 for p in tr.ema.parameters()) == items["EMA (fp32)"]
    assert items["G optimiser state (sm3, fp32 momentum)"] == _state_bytes(tr.opt_g)
    assert items["G gradients"] == seen[0] < n_g * 4                    # one-key attention: no q/k gradients
    assert items["D backbone (frozen)"] == sum(p.numel() * 4 for p in tr.D.backbone.parameters())
    assert items["D heads + optimiser"] == sum(p.numel() * 4 for p in heads) + _state_bytes(tr.opt_d)
    assert plan["limit"] is None and 0 < plan["term_grads"] < n_g * 4  # one micro-batch: no G-sized buffer
    args2 = train.parse_args(["--workers", "0", *SMALL_D, "--grad-accum", "2"])
    assert memory_plan.memory_plan(args2, svd.cfg, 4, 64, 64, torch.device("cpu"))["term_grads"] == plan["term_grads"] + n_g * 4
    assert plan["peak"] == sum(items.values())
    args2 = train.parse_args(["--workers", "0", *SMALL_D, "--optim-state-dtype", "bf16", "--fused-step", "--grad-clip", "0"])
    items2 = dict(memory_plan.memory_plan(args2, svd.cfg, 4, 64, 64, torch.device("cpu"))["items"])
    moms = sum(st["momentum"].numel() for st in tr.opt_g.state.values())
    assert items2["G optimiser state (sm3, bf16 momentum)"] == _state_bytes(tr.opt_g) - 2 * moms
    assert items2["G gradients (freed as produced: --fused-step)"] == 0


def test_memory_plan_refuses_what_does_not_fit():
    args = train.parse_args(["--workers", "0", *SMALL_D, "--grad-accum", "2"])       # a G-sized term buffer
    plan = memory_plan.memory_plan(args, CONFIGS["tiny"], 4, 64, 64, torch.device("cpu"))
    assert memory_plan.check_plan(dict(plan), args) is None                   # CPU: not checked
    big = sorted(plan["items"], key=lambda it: -it[1])[:3]
    plan["limit"] = plan["peak"] - 1
    with pytest.raises(cli.UserError) as e:
        memory_plan.check_plan(plan, args)
    assert str(e.value) == (
        f"predicted peak {plan['peak'] / 2**30:.1f} GiB does not fit in {plan['limit'] / 2**30:.1f} GiB (--max-memory); "
        f"largest: " + ", ".join(f"{l.split(' (')[0]} {b / 2**30:.1f}" for l, b in big) + " GiB; try --fused-step "
        "--grad-clip 0, --optim-state-dtype bf16, fewer --frames or a smaller --height/--width")
    assert "\n" not in str(e.value)
    plan["limit"] = plan["peak"] + plan["term_grads"] // 2            # only the term-gradient buffer does not fit
    note = memory_plan.check_plan(plan, args)
    assert not args.log_term_grads and note == (
        f"note: --log-term-grads off: the steps that log them need {plan['term_grads'] / 2**30:.1f} GiB more, over "
        f"--max-memory ({(plan['peak'] + plan['term_grads']) / 2**30:.1f} > {plan['limit'] / 2**30:.1f} GiB)")


@pytest.mark.parametrize("flags, msg", [
    (["--fused-step", "--grad-accum", "2", "--grad-clip", "0"],
     "--fused-step steps each weight inside the backward, so it cannot accumulate gradients over --grad-accum 2; pass "
     "--grad-accum 1 (a larger --batch-size), or drop --fused-step"),
    (["--fused-step", "--grad-clip", "1"], "--fused-step steps each weight inside the backward, so it cannot clip the "
                                           "global gradient norm (--grad-clip 1); pass --grad-clip 0, or drop "
                                           "--fused-step"),
    (["--optimizer", "adamw", "--optim-state-dtype", "bf16"],
     "--optim-state-dtype bf16 is implemented for --optimizer sm3 only; pass --optim-state-dtype fp32 with --optimizer "
     "adamw"),
    (["--sample-decode-chunk", "0"], "bad --sample-decode-chunk 0: must be at least 1"),
])
def test_memory_option_conflicts_one_line(tmp_path, flags, msg):
    assert train_error([*COMMON, "--out", str(tmp_path / "run"), *flags]) == "error: " + msg
    assert not (tmp_path / "run").exists()


def test_plan_printed_before_the_first_step(tmp_path, capsys):
    train.main([*COMMON, "--out", str(tmp_path / "run"), "--max-steps", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("memory plan (cpu, 4x64x64, batch 1): EMA on the device, autocast cache on, fused step off, "
                      "optimiser state fp32, checkpointing on, bf16 autocast off, sample decode chunk 2")
    assert out[8].startswith("  predicted peak of a training step") and out[8].endswith("GiB (checked on CUDA only)")

# -----------------------------------------------------------------------------
# bad training inputs: one line `error: <what>; <how to fix>`, exit status 2, checked before any model is built


@pytest.mark.parametrize("flags, msg", [
    (["--max-steps", "-1"], "bad --max-steps -1: must be at least 1"),
    (["--batch-size", "0"], "bad --batch-size 0: must be at least 1"),
    (["--grad-accum", "0"], "bad --grad-accum 0: must be at least 1"),
    (["--lr-g", "nan"], "bad --lr-g nan: must be a finite number"),
    (["--beta2", "1"], "bad --beta2 1.0: must be below 1"),
    (["--cond-drop", "1.5"], "bad --cond-drop 1.5: must be at most 1 (a probability)"),
    (["--sigma-min", "0"], "bad --sigma-min 0.0: must be greater than 0"),
    (["--sigma-max", "0.001"], "bad --sigma-max 0.001: must be greater than --sigma-min 0.002"),
    (["--seed", "-1"], "bad --seed -1: must be at least 0"),
    (["--height", "100", "--width", "100"], "bad --height 100: must be a multiple of 64 (the latent is 1/8 of the "
                                            "image size and the UNet halves it 3 times); try --height 128"),
    (["--height", "128"], "--data synthetic makes square videos, but --height 128 != --width 0; pass equal sizes (or 0 "
                          "for the config's)"),
    (["--device", "nonsense"], "bad --device 'nonsense': not a device; use auto, cpu, cuda, cuda:N or mps"),
    (["--out", ""], "bad --out '': pass the folder for checkpoints, logs and samples, e.g. --out out/sfv"),
    (["--init", "missing.safetensors"], "--init missing.safetensors: no such file or folder, and not a model.CONFIGS "
                                        "preset (svd, svd_xt, tiny, toy); pass a checkpoint path or a preset name"),
    (["--batch-size", str(10 ** 20)], f"bad --batch-size {10 ** 20}: must be at most 65536 (per process)"),
    (["--synthetic-size", str(10 ** 20)], f"bad --synthetic-size {10 ** 20}: must be at most 10000000 (its epoch "
                                          f"permutation is held in memory)"),
    (["--disc-levels", str(10 ** 9)], f"bad --disc-levels {10 ** 9}: must be at most 1000000 (the grid is held in memory)"),
    (["--fps", str(10 ** 20)], f"bad --fps {10 ** 20}: must be at most 1000 (frames per second)"),
    (["--dist-timeout", str(10 ** 14)], f"bad --dist-timeout {10 ** 14}: must be at most 525600 (minutes: one year)"),
    (["--rho", "1e-300"], "bad --sigma-min 0.002 / --sigma-max 700 / --rho 1e-300: the Karras noise grid does not fit fp32 (every sigma > 0, sigma^2 finite); use values near the defaults (0.002 / 700 / 7)"),
    (["--sigma-max", "1e300"], "bad --sigma-min 0.002 / --sigma-max 1e+300 / --rho 7: the Karras noise grid does not fit fp32 (every sigma > 0, sigma^2 finite); use values near the defaults (0.002 / 700 / 7)"),
    (["--sigma-min", "1e-300"], "bad --sigma-min 1e-300 / --sigma-max 700 / --rho 7: the Karras noise grid does not fit fp32 (every sigma > 0, sigma^2 finite); use values near the defaults (0.002 / 700 / 7)"),
])
def test_train_bad_flags_one_line(tmp_path, flags, msg):
    out = tmp_path / "run"
    assert train_error([*COMMON, "--out", str(out), *flags]) == "error: " + msg
    assert not out.exists()                                               # nothing created


def test_train_bad_out_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert train_error([*COMMON, "--out", str(f)]) == f"error: --out {f} is a file; pass a folder (it is created if missing)"
    assert train_error([*COMMON, "--out", str(f / "run")]) == f"error: cannot create --out {f / 'run'}: {f} is a file; pass another --out"
    for name, kind, want in (("log.jsonl", "folder", "file"), ("samples", "file", "folder")):
        out = tmp_path / f"holds-{kind}"
        (out / name).mkdir(parents=True) if kind == "folder" else (out.mkdir(), (out / name).write_text("x"))
        assert train_error([*COMMON, "--out", str(out)]) == (f"error: --out {out} holds a {kind} named {name} where "
                                                             f"train.py writes a {want}; remove it or pass another --out")
        assert os.listdir(out) == [name]
    out = unwritable_path(tmp_path, "sfv-out")
    msg = train_error([*COMMON, "--out", out])
    assert re.fullmatch(rf"error: cannot write to --out {re.escape(out)} \((Permission denied|Operation not permitted|"
                        rf"Read-only file system)\); pass a writable folder", msg), msg
    assert not os.path.exists(out)


def test_train_bad_data_folder(tmp_path):
    out = tmp_path / "run"
    run = [*COMMON, "--out", str(out), "--frames", "4"]
    vids = tmp_path / "videos"
    assert train_error([*run, "--data", str(vids)]) == f"error: --data {vids} does not exist; pass a folder of videos or --data synthetic"
    vids.mkdir()
    (vids / "notes.txt").write_text("not a video")
    assert train_error([*run, "--data", str(vids / "notes.txt")]) == (
        f"error: --data {vids / 'notes.txt'} is a file, not a folder; pass the folder that holds the videos")
    assert train_error([*run, "--data", str(vids)]) == (
        f"error: no videos in {vids} (searched recursively for {', '.join(data.VIDEO_EXTS)}); add videos or pass "
        f"another --data")
    (vids / "sub").mkdir()
    (vids / "corrupt.mp4").write_bytes(os.urandom(3000))
    (vids / "sub" / "empty.webm").write_bytes(b"")
    assert train_error([*run, "--data", str(vids)]) == (
        f"error: no usable videos in {vids}: 2 corrupt; add readable videos")
    write_test_video(vids / "short.mp4", 3, 14)                          # 3 frames; 4 at stride 2 need 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_error([*run, "--data", str(vids)]) == (
            f"error: no usable videos in {vids}: 2 corrupt, 1 too short for 4 frames at 7 fps; add readable videos, "
            f"or lower --frames (or raise --fps: a smaller frame stride)")
    assert not out.exists()


def test_train_bad_init_checkpoint(tmp_path):
    bad = tmp_path / "svd.safetensors"
    bad.write_bytes(b"\x00" * 100)
    msg = train_error([*COMMON, "--out", str(tmp_path / "run"), "--init", str(bad)])
    assert msg.startswith(f"error: {bad} is not a readable safetensors file (") and msg.endswith(
        "; it may be truncated: download it again") and "\n" not in msg
    assert not (tmp_path / "run").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_train_resume_bad_state(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    state = out / "train_state.pt"
    fix = "delete it to start fresh, or restore an intact copy"
    torch.save({"step": 1, "unet": {"w": torch.zeros(1000)}}, state)
    state.write_bytes(state.read_bytes()[:300])                          # truncated
    msg = train_error([*COMMON, "--out", str(out), "--resume"])
    assert msg.startswith(f"error: cannot resume from {state}: it is damaged or truncated (") and msg.endswith(fix)
    assert "\n" not in msg
    torch.save({"step": 1, "a": torch.zeros(1)}, state)
    assert train_error([*COMMON, "--out", str(out), "--resume"]) == (
        f"error: cannot resume from {state}: it is not a train.py training state; {fix}")
    torch.save({"step": 1, "x": _Payload()}, state)                     # unpickling would run a command
    assert train_error([*COMMON, "--out", str(out), "--resume"]) == (
        f"error: refusing to resume from {state}: it holds pickled Python objects, not only tensors (it is read with "
        f"torch.load weights_only=True); {fix}")
    assert not os.path.exists("pwned") and not (out / "pwned").exists()
    assert sorted(os.listdir(out)) == ["train_state.pt"]                  # nothing written


def test_train_divergence_and_cpu_oom_one_line(tmp_path, monkeypatch):
    """A NaN loss stops the run before anything of that step is saved; a CPU allocation failure is the out-of-memory
    line (exit 1). Either way the --out folder made for the run is removed again."""
    import contextlib
    import io
    out = tmp_path / "run"
    msg = train_error([*COMMON, "--out", str(out), "--max-steps", "2", "--cond-aug", "1e30"])
    assert re.split(r"[\r\n]", msg)[-1] == (
        "error: training diverged at step 1 (loss_d nan, not saved); lower --lr-g/--lr-d or check --init, --sigma-max "
        "and --cond-aug, then --resume or start a new --out")
    assert not out.exists()

    def cpu_oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 12800000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(train, "memory_plan", cpu_oom)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        train.main([*COMMON, "--out", str(out)])
    assert e.value.code == 1 and err.getvalue() == (
        "error: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate 12800000000 bytes); "
        "try a smaller --batch-size (with a larger --grad-accum), --grad-ckpt, --bf16, --cache, or fewer --frames / a "
        "smaller --height/--width\n")
    assert not out.exists()


def test_train_cli_error_exit_code_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *COMMON, "--out", str(tmp_path / "run"),
                        "--data", str(tmp_path / "none")], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == (
        f"error: --data {tmp_path / 'none'} does not exist; pass a folder of videos or --data synthetic\n")
    assert not (tmp_path / "run").exists()


# =============================================================================
# evaluate.py and toy.py

# -----------------------------------------------------------------------------
# Frechet distance maths


def _random_spd(d, rng, cond=10.0):
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Q * np.geomspace(1.0, 1.0 / cond, d)) @ Q.T


def _reference_fd(mu1, S1, mu2, S2):
    """Independent of frechet_distance: scipy.linalg.sqrtm(S1 S2) if scipy is there, else the eigenvalues of the
    non-symmetric S1 S2 (real, >= 0, diagonalisable for SPD S1, S2): tr sqrt(S1 S2) = sum sqrt(lambda)."""
    try:
        from scipy.linalg import sqrtm
        tr = np.trace(sqrtm(S1 @ S2)).real
    except ImportError:
        tr = np.sqrt(np.linalg.eigvals(S1 @ S2).real.clip(0)).sum()
    return np.square(mu1 - mu2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr


def test_frechet_distance_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 3, 17):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
        want = np.square(mu1 - mu2).sum() + np.square(np.sqrt(s1) - np.sqrt(s2)).sum()
        got = E.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    # identical Gaussians: 0; symmetric in its arguments
    S = _random_spd(8, rng)
    assert abs(E.frechet_distance(np.ones(8), S, np.ones(8), S)) < 1e-10


def test_frechet_distance_full_covariance():
    rng = np.random.default_rng(1)
    d = 12
    S1, S2 = _random_spd(d, rng), _random_spd(d, rng, cond=100.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = E.frechet_distance(mu1, S1, mu2, S2)
    assert got == pytest.approx(_reference_fd(mu1, S1, mu2, S2), rel=1e-8)
    assert got == pytest.approx(E.frechet_distance(mu2, S2, mu1, S1), rel=1e-9)
    # closed form for proportional covariances S2 = c^2 S1: ||dmu||^2 + (1 - c)^2 tr S1
    c = 1.7
    assert E.frechet_distance(mu1, S1, mu2, c * c * S1) == pytest.approx(
        np.square(mu1 - mu2).sum() + (1 - c) ** 2 * np.trace(S1), rel=1e-9)
    # rank-deficient covariance (fewer samples than dims): finite, >= 0, matches the reference
    A = rng.standard_normal((5, d))
    S3 = A.T @ A
    assert E.frechet_distance(mu1, S3, mu2, S2) == pytest.approx(_reference_fd(mu1, S3, mu2, S2), rel=1e-6)


def test_frechet_distance_from_samples_converges():
    rng = np.random.default_rng(2)
    d = 4
    S1, S2 = _random_spd(d, rng), _random_spd(d, rng)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    want = _reference_fd(mu1, S1, mu2, S2)
    errs = []
    for n in (200, 20000):
        x = rng.multivariate_normal(mu1, S1, n)
        y = rng.multivariate_normal(mu2, S2, n)
        errs.append(abs(E.fd_from_features(torch.from_numpy(x), y) - want))
    assert errs[1] < 0.05 * want and errs[1] < errs[0]
    mu, S = E.stats(np.arange(6.0).reshape(3, 2))
    assert np.allclose(mu, [2, 3]) and np.allclose(S, [[4, 4], [4, 4]])      # unbiased (N - 1) covariance
    with pytest.raises(ValueError):
        E.stats(np.zeros((1, 3)))

# -----------------------------------------------------------------------------
# toy features and metrics


def _moving_square(T=8, shift=(2, 0), size=64, colour=(0.8, -0.5, 0.2), bg=-0.3):
    """A square translating by `shift` px per frame over a flat background with a smooth ramp (T, 3, S, S)."""
    ramp = torch.linspace(-0.2, 0.2, size)
    frames = []
    for t in range(T):
        x = torch.full((3, size, size), bg) + ramp[None, :, None]
        y0, x0 = 20 + shift[1] * t, 16 + shift[0] * t
        x[:, y0:y0 + 14, x0:x0 + 14] = torch.tensor(colour).view(3, 1, 1)
        frames.append(x)
    return torch.stack(frames)


def test_block_flow_recovers_a_known_shift():
    v = _moving_square(shift=(2, 0))                                  # 2 px/frame at 64 = 1 px at 32
    flow, res = E._flows(v[None])
    moving = flow.abs().sum(2) > 0
    assert moving.any()
    assert torch.all(flow[:, :, 0][moving] == 1) and torch.all(flow[:, :, 1][moving] == 0)
    assert res.max() < 1e-5                                           # a pure translation is fully explained
    frozen = v[:1].expand(8, -1, -1, -1)[None]
    f0, r0 = E._flows(frozen)
    assert f0.abs().sum() == 0 and r0.abs().sum() == 0


def test_metrics_sanity():
    v = _moving_square()[None]
    frozen = v[:, :1].expand_as(v)
    assert E.motion_amount(frozen).item() == 0 and E.motion_amount(v).item() > 0
    assert E.warp_error(frozen).item() == 0 and E.warp_error(v).item() < 1e-5
    noisy = (v + 0.2 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert E.warp_error(noisy).item() > 0.05                          # flicker/noise is not explained by motion
    assert E.histogram_drift(frozen).item() == 0
    assert E.histogram_drift(v).item() < 0.05                         # the object moves but stays the same object
    fading = v.clone()
    fading[0, 1:] = fading[0, 1:] * torch.linspace(1, 0.2, 7).view(7, 1, 1, 1)
    assert E.histogram_drift(fading).item() > 5 * E.histogram_drift(v).item()
    assert E.first_frame_psnr(v, v[:, 0]).item() == pytest.approx(100.0)  # mse floor 1e-10
    assert E.first_frame_psnr(v, v[:, 0] + 0.2).item() == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-4)
    h = E.soft_histogram(v[0], bins=4)
    assert h.shape == (8, 64) and torch.allclose(h.sum(1), torch.ones(8))


def test_toy_fd_floors_the_standardising_std():
    """A feature constant on the real clips (e.g. the flicker of a flat background) counts a deviation in units of
    E.STD_FLOOR, not of its ~0 std: a 0.001 shift costs 0.01, a 0.1 shift 100."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 4, generator=g, dtype=torch.float64)
    real[:, 3] = 0.0003
    fake = real.clone()
    fake[:, 3] += 0.001
    assert E.toy_fd(real, fake) == pytest.approx((0.001 / E.STD_FLOOR) ** 2, rel=1e-6)
    fake[:, 3] += 0.099
    assert E.toy_fd(real, fake) == pytest.approx((0.1 / E.STD_FLOOR) ** 2, rel=1e-6)


@pytest.mark.slow
def test_toy_features_see_appearance_and_motion():
    """Two independent real sets are close; first-frame copies (SF-V without temporal heads' failure), shuffled
    frames and blurred frames are far."""
    from train import SyntheticVideos
    ds = SyntheticVideos(10 ** 6, 8, 64, seed=0)
    n = 128
    A = torch.stack([ds.video(i) for i in range(n)])
    B = torch.stack([ds.video(i) for i in range(n, 2 * n)])
    fa = E.video_features(A)
    assert fa.shape == (n, 64) and fa.dtype == torch.float64 and torch.isfinite(fa).all()
    rr = E.evaluate_videos(B, A, real_features=fa)
    frozen = E.evaluate_videos(B[:, :1].expand_as(B), A, real_features=fa)
    shuffled = E.evaluate_videos(B[:, torch.tensor([0, 5, 2, 7, 1, 4, 6, 3])], A, real_features=fa)
    blur = torch.nn.functional.avg_pool2d(B.flatten(0, 1), 5, 1, 2).reshape(B.shape)
    blurred = E.evaluate_videos(blur, A, real_features=fa)
    assert frozen["fd"] > 10 * rr["fd"] and frozen["fd_motion"] > 10 * rr["fd_motion"]
    assert shuffled["fd_motion"] > 10 * rr["fd_motion"]
    assert blurred["fd_app"] > 3 * rr["fd_app"]
    assert frozen["motion"] == 0 and 0.8 < rr["motion"] < 1.25
    # real vs real stays near the floor in both halves
    assert rr["fd_app"] < 0.5 * blurred["fd_app"] and rr["fd"] < 0.2 * frozen["fd"]


def _square_clip(T=8, S=16, side=4, step=1, bg=(-0.3, 0.2, 0.1), col=(0.8, -0.5, 0.6)):
    """A side x side square of colour `col` moving `step` px right per frame over a flat `bg`: (T, 3, S, S)."""
    v = torch.tensor(bg).view(1, 3, 1, 1).repeat(T, 1, S, S)
    for t in range(T):
        v[t, :, 5:5 + side, 2 + step * t:2 + step * t + side] = torch.tensor(col).view(3, 1, 1)
    return v


def test_largest_component_and_toy_colours():
    m = torch.zeros(2, 8, 8, dtype=torch.bool)
    m[0, 0:2, 0:2] = True                                             # 4 px
    m[0, 2, 2] = m[0, 3, 3] = True                                    # joined diagonally: 6 px (8-connected)
    m[0, 5:8, 6:8] = True                                             # 6 px, separate
    m[0, 0, 7] = True                                                 # 1 px
    a = torch.zeros(8, 8, dtype=torch.bool)
    a[0:2, 0:2] = a[2, 2] = a[3, 3] = True
    got = E.largest_component(m)
    assert torch.equal(got[0], a) and not got[1].any()               # a tie: the blob that ends first; empty stays empty
    m[0, 4, 7] = True                                                 # the second blob grows to 7 px and wins
    b = torch.zeros(8, 8, dtype=torch.bool)
    b[5:8, 6:8] = b[4, 7] = True
    assert torch.equal(E.largest_component(m)[0], b)
    bg, col = E.toy_colours(_square_clip()[:1])
    assert torch.allclose(bg, torch.tensor([[-0.3, 0.2, 0.1]])) and torch.allclose(col, torch.tensor([[0.8, -0.5, 0.6]]))


def test_toy_measures_on_a_square_moving_one_pixel_per_frame():
    v = _square_clip()[None]
    assert E.centroid_speed(v).tolist() == [1.0]
    assert E.displacement(v).tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]
    assert torch.equal(E.solidity(v), torch.ones(1, 8))
    assert E.off_colour(v).abs().max() < 1e-6 and E.background_noise(v).abs().max() == 0
    frozen = v[:, :1].expand_as(v)
    assert E.centroid_speed(frozen).tolist() == [0.0] and torch.equal(E.solidity(frozen), torch.ones(1, 8))
    # the shape vanishes after frame 3: its centroid stays where it was last seen, its solidity drops to 0
    gone = v.clone()
    gone[0, 4:] = torch.tensor([-0.3, 0.2, 0.1]).view(3, 1, 1)
    assert E.centroid_speed(gone).item() == pytest.approx(3 / 7)
    assert E.solidity(gone)[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    # a one-pixel speck of the shape colour elsewhere is not the shape (largest blob) and not background noise
    speck = v.clone()
    speck[0, 5, :, 13, 13] = torch.tensor([0.8, -0.5, 0.6])
    assert E.centroid_speed(speck).tolist() == [1.0] and E.background_noise(speck).abs().max() == 0
    # the summary: means with bootstrap errors (0 for identical clips), the speed ratio to real clips
    m = E.toy_measures(v.repeat(4, 1, 1, 1, 1), v[:, 0].repeat(4, 1, 1, 1), frozen.repeat(3, 1, 1, 1, 1) + 0 * v)
    assert list(m) == ["psnr0", "speed", "speed_x_real", "disp1", "solid_last", "off_colour_last", "background"]
    assert list(m) == list(E.TOY_MEASURES)
    assert m["speed"] == (1.0, 0.0) and m["disp1"] == (1.0, 0.0) and m["solid_last"] == (1.0, 0.0)
    assert m["psnr0"] == (pytest.approx(100.0), 0.0) and m["background"] == (0.0, 0.0)
    assert m["off_colour_last"][0] < 1e-6 and m["speed_x_real"][0] == math.inf
    assert E.toy_measures(v, real=v) == {k: m[k] for k in m if k != "psnr0"} | {"speed_x_real": (1.0, 0.0)}


def test_toy_measures_of_noise_blur_and_a_wrong_colour():
    g = torch.Generator().manual_seed(0)
    v = _square_clip()[None].repeat(64, 1, 1, 1, 1)
    s = 0.05
    noisy = v + s * torch.randn(v.shape, generator=g)
    # background: E|N(0, s)| = s sqrt(2/pi). off-colour: the distance from the segment is the noise across it (a 2-D
    # Gaussian, mean s sqrt(pi/2)) where the pixel projects inside the segment, the whole 3-D noise (mean
    # 2 s sqrt(2/pi)) where it projects past an end (half of the pixels: every pixel is background or shape)
    assert E.background_noise(noisy).mean().item() == pytest.approx(s * math.sqrt(2 / math.pi), rel=0.03)
    want_off = s * (math.sqrt(math.pi / 2) + 2 * math.sqrt(2 / math.pi)) / 2
    assert E.off_colour(noisy).mean().item() == pytest.approx(want_off, rel=0.03)
    assert E.centroid_speed(noisy).mean().item() == pytest.approx(1.0, abs=0.01)
    assert E.solidity(noisy).mean().item() > 0.98
    # blur: frame t is the first frame box-blurred t times: it stays on the colour segment but stops being solid
    b = [v[0, 0]]
    for _ in range(7):
        b.append(torch.nn.functional.avg_pool2d(torch.nn.functional.pad(b[-1][None], (1,) * 4, mode="replicate"),
                                                3, 1)[0])
    blur = torch.stack(b)[None]
    sol = E.solidity(blur)[0]
    assert sol[0] == 1 and torch.all(sol[1:] <= sol[:-1]) and sol[-1] < 0.5
    assert E.off_colour(blur).max() < 1e-6 and E.centroid_speed(blur).item() < 1e-5
    # a wrong colour: the last frame's 16 shape pixels turn green: off-colour = 16/256 of green's distance from
    # the segment, and the shape is gone (solidity 0)
    green = v[:1].clone()
    green[0, -1, :, 5:9, 9:13] = torch.tensor([-0.5, 0.9, -0.5]).view(3, 1, 1)
    p, a, b_ = np.array([-0.5, 0.9, -0.5]), np.array([-0.3, 0.2, 0.1]), np.array([0.8, -0.5, 0.6])
    t = np.clip((p - a) @ (b_ - a) / ((b_ - a) @ (b_ - a)), 0, 1)
    assert E.off_colour(green)[0, -1].item() == pytest.approx(16 / 256 * np.linalg.norm(p - a - t * (b_ - a)), rel=1e-5)
    assert E.solidity(green)[0, -1] == 0


def test_toy_measures_on_real_toy_clips_and_sub_pixel_motion():
    """Real toy clips: exact colours, no off-colour, no background noise, solid throughout; an anti-aliased disc (the
    toy's renderer) moving (0.6, 0.3) px per frame is tracked to a few hundredths of a pixel."""
    ds = data.SyntheticVideos(10 ** 6, 8, 16, seed=0, style="simple")
    n = 64
    v = torch.stack([ds.video(i) for i in range(n)])
    scenes = [ds.scene(np.random.default_rng([0, i])) for i in range(n)]
    bg, col = E.toy_colours(v[:, 0])
    assert torch.equal(bg, torch.stack([s[0][:, 0, 0] for s in scenes]))
    assert torch.equal(col, torch.stack([s[1][0][4].flatten() for s in scenes]))
    assert E.off_colour(v).max() < 1e-6 and E.background_noise(v).max() == 0
    assert E.solidity(v).min() > 0.98
    yy, xx = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(16) + 0.5, indexing="ij")
    frames = []
    for t in range(8):
        d = ((xx - 4.2 - 0.6 * t).square() + (yy - 5.1 - 0.3 * t).square()).sqrt()
        a = (3.0 - d + 0.5).clamp(0, 1)
        frames.append(torch.tensor([-0.2, 0.1, 0.3]).view(3, 1, 1) * (1 - a) + torch.tensor([0.9, 0.9, -0.6]).view(3, 1, 1) * a)
    disc = torch.stack(frames)[None]
    assert E.centroid_speed(disc).item() == pytest.approx(math.hypot(0.6, 0.3), abs=0.01)
    assert torch.allclose(E.displacement(disc)[0], torch.arange(8) * math.hypot(0.6, 0.3), atol=0.05)
    assert E.solidity(disc).min() > 0.98


def test_bootstrap_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=g, dtype=torch.float64)
    mean, se = E.bootstrap_mean(x, n_boot=400, seed=3)
    assert mean == x.mean().item() and se == pytest.approx(x.std().item() / 20, rel=0.15)
    assert E.bootstrap_mean(x, n_boot=400, seed=3) == (mean, se)      # seeded
    assert E.bootstrap_mean(torch.full((10,), 2.5)) == (2.5, 0.0)
    # a ratio of paired clips resamples both with the same indices: x / 2x is 0.5 in every resample
    assert E.bootstrap_mean(x + 5, divide_by=2 * (x + 5)) == (pytest.approx(0.5), pytest.approx(0, abs=1e-12))
    assert E.bootstrap_mean(x + 5, divide_by=2 * (x[:300] + 5))[1] > 0     # unpaired sets: resampled independently

# -----------------------------------------------------------------------------
# FVD command with a fake TorchScript I3D (same call convention as StyleGAN-V's i3d_torchscript.pt)


class _FakeI3D(torch.nn.Module):
    """Checks the StyleGAN-V convention (N, 3, T, 224, 224) in [-1, 1], rescale=False, resize=False,
    return_features=True, and returns 6 simple features."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False):
        if rescale or resize or not return_features:
            raise RuntimeError("wrong I3D flags")
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[2] != 16 or x.shape[3] != 224 or x.shape[4] != 224:
            raise RuntimeError("wrong I3D input shape")
        if x.min() < -1.0001 or x.max() > 1.0001:
            raise RuntimeError("I3D input not in [-1, 1]")
        m = x.mean((2, 3, 4))                                         # (N, 3) colour
        dt = (x[:, :, 1:] - x[:, :, :-1]).abs().mean((2, 3, 4))       # (N, 3) motion
        return torch.cat([m, dt], 1)


def _video_dir(root, n, seed, moving=True, T=16):
    root.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        col = rng.integers(30, 220, 3)
        frames = np.full((T, 48, 64, 3), 40, np.uint8)
        for t in range(T):
            x = 8 + (2 * t if moving else 0)
            frames[t, 16:32, x:x + 16] = col
        write_mp4(root / f"v{i}.mp4", frames)
    return str(root)


def save_torchscript(module, path):
    """torch.jit.script(module).save(path) without torch.jit.script's own deprecation warning (a
    DeprecationWarning on torch 2.13, a FutureWarning on 2.14)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(path)


@pytest.fixture(scope="module")
def fake_i3d(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    save_torchscript(_FakeI3D(), str(path))
    return str(path)


def test_fvd_command_with_fake_i3d(tmp_path, fake_i3d, capsys):
    real = _video_dir(tmp_path / "real", 5, 0)
    same = _video_dir(tmp_path / "same", 5, 0)
    static = _video_dir(tmp_path / "static", 5, 1, moving=False)
    short = _video_dir(tmp_path / "short", 2, 2, T=8)
    assert E.main(["fvd", "--i3d", fake_i3d, real, same]) == 0
    out = capsys.readouterr().out
    assert out.startswith("FVD ") and "5 real, 5 generated" in out
    assert float(out.split()[1]) == pytest.approx(0.0, abs=1e-6)
    d, nr, nf = E.fvd(fake_i3d, real, static)
    assert d > 1e-3 and (nr, nf) == (5, 5)
    # the same number from the features directly
    with warnings.catch_warnings(record=True) as caught:                # newer torch deprecates TorchScript
        warnings.simplefilter("always")
        i3d = E.load_i3d(fake_i3d)
    assert not [w for w in caught if "jit" in str(w.message)], [str(w.message) for w in caught]
    prep = lambda v: E.i3d_preprocess(v, 224)
    want = E.fd_from_features(E.i3d_features(i3d, E.load_folder(real, 16, prep)),
                              E.i3d_features(i3d, E.load_folder(static, 16, prep)))
    assert d == pytest.approx(want)
    # a non-square frame is resized on its short side and centre-cropped
    assert E.i3d_preprocess(torch.zeros(3, 3, 48, 64)).shape == (3, 3, 224, 224)
    # clear one-line errors, exit code 2
    empty = tmp_path / "empty"
    empty.mkdir()
    notts = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, notts)
    cases = [(["--i3d", str(tmp_path / "missing.pt"), real, same], "I3D file not found"),
             (["--i3d", str(notts), real, same], "not a TorchScript file"),
             (["--i3d", fake_i3d, str(tmp_path / "nope"), same], "video folder not found"),
             (["--i3d", fake_i3d, real, str(empty)], "no videos in"),
             (["--i3d", fake_i3d, real, short], "0 usable video(s)")]
    for args, msg in cases:
        assert E.main(["fvd"] + args) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err


def test_toy_fd_command(tmp_path, capsys):
    real = _video_dir(tmp_path / "real", 4, 0, T=8)
    static = _video_dir(tmp_path / "static", 4, 1, moving=False, T=8)
    assert E.main(["toy-fd", real, static]) == 0
    out = capsys.readouterr().out
    assert out.startswith("toy FD ") and math.isfinite(float(out.split()[2]))


class _NaNI3D(torch.nn.Module):
    """_FakeI3D's features, NaN for every clip whose top-left pixel is bright."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False):
        nan = torch.where(x[:, 0, 0, 0, 0] > 0, float("nan"), 1.0)
        return x.mean((2, 3, 4)) * nan[:, None]


def test_evaluate_careless_inputs_one_line(tmp_path, fake_i3d, capsys):
    real = _video_dir(tmp_path / "real", 5, 0)
    short = _video_dir(tmp_path / "short", 2, 2, T=8)

    def err(args):
        assert E.main(args) == 2
        e = capsys.readouterr().err
        assert "Traceback" not in e and e.count("\n") == 1, e
        return e.strip()

    fvd = ["fvd", "--i3d", fake_i3d]
    assert err(fvd + ["--batch", "0", real, real]) == "error: bad --batch 0: must be at least 1"
    assert err(fvd + ["--batch", "-1", real, real]) == "error: bad --batch -1: must be at least 1"
    assert err(fvd + ["--size", "0", real, real]) == "error: bad --size 0: must be at least 1"
    assert err(fvd + ["--frames", "0", real, real]) == "error: bad --frames 0: must be at least 1"
    assert err(["toy-fd", "--frames", "2", real, real]) == "error: bad --frames 2: must be at least 3"
    clip = os.path.join(real, "v0.mp4")
    assert err(fvd + [real, clip]) == f"error: {clip} is a file, not a folder; pass the folder that holds the videos"
    # both folders are checked before any work (the I3D never runs on REAL_DIR)
    assert err(fvd + [real, str(tmp_path / "nope")]).startswith(f"error: video folder not found: {tmp_path / 'nope'};")
    # an undecodable video: which file, remove or re-encode it (it used to be skipped)
    broken = _video_dir(tmp_path / "broken", 3, 3)
    (tmp_path / "broken" / "x.mp4").write_bytes(b"not a video")
    bad = os.path.join(broken, "x.mp4")
    want = f"error: cannot decode video {bad} (InvalidDataError); remove it from {broken} or re-encode it"
    assert err(fvd + [real, broken]) == want and err(["toy-fd", real, broken]) == want
    # too few videos with --frames frames: the --frames that works (>= 3 for toy-fd, where 2 frames cannot)
    assert err(fvd + [real, short]) == (
        f"error: {short}: 0 usable video(s) with >= 16 frames (2 shorter, the longest has 8); the Frechet distance "
        f"needs at least 2 (hundreds for a stable number): pass --frames 8 or fewer")
    two = _video_dir(tmp_path / "two", 1, 4, T=2)
    write_mp4(tmp_path / "two" / "w.mp4", np.zeros((5, 48, 64, 3), np.uint8))
    assert err(["toy-fd", real, two]) == (
        f"error: {two}: 0 usable video(s) with >= 8 frames (2 shorter, the longest has 5); the Frechet distance needs "
        f"at least 2 (hundreds for a stable number): add videos")
    assert err(["toy-fd", "--frames", "5", real, two]) == (
        f"error: {two}: 1 usable video(s) with >= 5 frames (1 shorter, the longest has 2); the Frechet distance needs "
        f"at least 2 (hundreds for a stable number): add videos")
    # some videos shorter: skipped with one warning, the rest evaluated
    mixed = _video_dir(tmp_path / "mixed", 3, 5)
    write_mp4(tmp_path / "mixed" / "z.mp4", np.zeros((8, 48, 64, 3), np.uint8))
    assert E.main(fvd + [real, mixed]) == 0
    out, e = capsys.readouterr()
    assert e == f"warning: skipped 1 of 4 videos in {mixed} (< 16 frames), e.g. {os.path.join(mixed, 'z.mp4')}\n"
    assert "5 real, 3 generated videos" in out
    # the I3D rejects its input: the shape it got and what to check
    e = err(fvd + ["--frames", "8", real, real])
    assert e.startswith("error: the I3D failed on input (5, 3, 8, 224, 224) (") and e.endswith(
        "wrong I3D input shape); check --size (StyleGAN-V's I3D takes 224) and --frames")
    # non-finite features: which set, instead of numpy's LinAlgError
    nan_i3d = str(tmp_path / "nan_i3d.pt")
    save_torchscript(_NaNI3D(), nan_i3d)
    (tmp_path / "bright").mkdir()
    for i in range(3):
        write_mp4(tmp_path / "bright" / f"b{i}.mp4", np.full((16, 48, 64, 3), 200 + 10 * i, np.uint8))
    assert err(["fvd", "--i3d", nan_i3d, real, str(tmp_path / "bright")]) == (
        f"error: the I3D features of 3 of 3 videos in {tmp_path / 'bright'} are not finite (NaN or inf); check the "
        f"I3D file (StyleGAN-V's i3d_torchscript.pt) and try --device cpu")
    with pytest.raises(ValueError, match=r"^features not finite \(NaN or inf\) in 1 of 3 rows$"):
        E.fd_from_features(np.eye(3), np.array([[0, 1, 2], [1, np.nan, 0], [2, 2, 2.0]]))


def test_evaluate_out_of_memory_one_line(monkeypatch, capsys):
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 9633792000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(E, "fvd", oom)
    monkeypatch.setattr(E, "load_folder", oom)
    assert E.main(["fvd", "--i3d", "x.pt", "a", "b"]) == 1
    assert capsys.readouterr().err == ("error: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to "
                                       "allocate 9633792000 bytes); try a lower --batch or --size, or fewer videos\n")
    monkeypatch.setattr(E, "list_videos", lambda folder: [])
    assert E.main(["toy-fd", "a", "b"]) == 1
    assert capsys.readouterr().err.endswith("bytes); try fewer videos\n")


def test_evaluate_help_describes_every_argument_with_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")                              # argparse wraps at the terminal width
    for cmd, want in ((["--help"], ["COMMAND", "fvd", "toy-fd"]),
                      (["fvd", "--help"], ["(default: 16)", "(default: 224)", "(default: 8)", "(default: auto)"]),
                      (["toy-fd", "--help"], ["(default: 8)"])):
        with pytest.raises(SystemExit):
            E.parse_args(cmd)
        out = capsys.readouterr().out
        lines = out[out.index("positional arguments:"):].splitlines()
        for arg in ("REAL_DIR", "FAKE_DIR") if cmd[0] != "--help" else ("COMMAND",):
            line = next(l for l in lines if l.strip().startswith(arg))
            assert len(line.split()) > 1, (cmd, line)                 # the argument has a text
        assert all(w in out for w in want) and "default: None" not in out, out

# -----------------------------------------------------------------------------
# the toy latent: a linear autoencoder on 4x4 patches (PCA, whitened)


def test_toy_linear_latent():
    from model import SVD, CONFIGS, VAEConfig, LinearPatchLatent
    x = torch.rand(6, 3, 16, 24) * 2 - 1
    plain = LinearPatchLatent(VAEConfig(z_channels=48, linear_patch_size=4, scale_factor=1.0))   # unfitted: pixel_unshuffle
    z = plain.encode(x)[0]
    assert torch.equal(z, torch.nn.functional.pixel_unshuffle(x, 4))
    assert torch.equal(plain.decode(z.reshape(2, 3, 48, 4, 6)).flatten(0, 1), x)
    # 4x4 patches, 12 of 48 components: lossy but close; whitened to std 1 / scale_factor
    for sf in (1.0, 0.25):
        lat = LinearPatchLatent(VAEConfig(z_channels=12, linear_patch_size=4, scale_factor=sf))
        fit = torch.cat([data.SyntheticVideos(64, 8, 64, 0).video(i) for i in range(32)])
        lat.fit(fit)
        z = lat.encode(fit)[0]                                               # (N, 12, 16, 16)
        assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(12), atol=1e-4 / sf)
        assert torch.allclose(z.var(dim=(0, 2, 3)) * sf ** 2, torch.ones(12), atol=2e-3)
        held = torch.stack([data.SyntheticVideos(4, 8, 64, 99).video(i) for i in range(4)])     # (4, 8, 3, 64, 64)
        rec = lat.decode(lat.encode(held.flatten(0, 1))[0].reshape(4, 8, 12, 16, 16) * sf)
        psnr = 10 * torch.log10(4 / (rec - held).square().mean()).item()
        assert 30 < psnr < 60, psnr
    # the toy config: pixel space (1x1 patches, 3 colour components): lossless; the diffusion latent z * scale_factor
    # has unit variance, the conditioning latent z is 1 / scale_factor times larger (as SVD's)
    cfg = CONFIGS["toy"]
    svd = SVD(cfg)
    fit = torch.cat([data.SyntheticVideos(64, 8, 16, 0, style="simple").video(i) for i in range(32)])
    svd.fit_linear_latent(fit)
    z = svd.vae.encode(fit)[0]                                               # (N, 3, 16, 16)
    assert z.shape[1] == cfg.vae.z_channels == cfg.unet.out_channels == 3 and cfg.unet.in_channels == 6
    assert torch.allclose((z * cfg.vae.scale_factor).var(dim=(0, 2, 3)), torch.ones(3), atol=2e-3)
    assert torch.equal(svd.cond_encoder.encode(fit[:4])[0], svd.vae.encode(fit[:4])[0])   # one encoder, as in SVD
    rec = svd.vae.decode((z * cfg.vae.scale_factor).reshape(32, 8, 3, 16, 16))
    assert torch.allclose(rec, fit.reshape(32, 8, 3, 16, 16), atol=1e-5)


def test_toy_latent_fitted_by_train_and_kept_in_bundle(tmp_path):
    import train
    from model import SVD, CONFIGS
    out = tmp_path / "t"
    train.main(["--data", "synthetic", "--init", "toy", "--mode", "diffusion", "--max-steps", "1", "--batch-size", "1",
                "--workers", "0", "--sample-every", "0", "--no-grad-ckpt", "--out", str(out), "--synthetic-size", "64",
                "--synthetic-style", "simple"])
    svd = load_svd.load(str(out / "model.safetensors"))
    ref = SVD(CONFIGS["toy"])
    ref.fit_linear_latent(torch.cat([data.SyntheticVideos(64, 8, 16, 0, style="simple").video(i) for i in range(64)]))
    for name, buf in ref.vae.named_buffers():
        assert torch.allclose(dict(svd.vae.named_buffers())[name], buf), name
    assert not torch.equal(svd.vae.proj, torch.eye(3))

def test_bundled_toy_models_load_and_sample():
    """assets/toy_sfv.safetensors (sample.py's fallback: 1 step) and assets/toy_teacher.safetensors (25 steps + CFG),
    fp16 files, load as the pixel-space toy and sample from assets/example.png a clip that starts from the image
    and moves."""
    from model import LinearPatchLatent, SVDConfig
    img = data.read_image(os.path.join(HERE, "assets", "example.png"))     # a held-out first frame, shown 4x
    assert img.shape == (3, 64, 64)
    for name, steps, evals in (("toy_sfv", 1, 1), ("toy_teacher", 25, 50)):
        path = os.path.join(HERE, "assets", f"{name}.safetensors")
        assert os.path.getsize(path) < 8e6
        svd = load_svd.load(path)
        assert isinstance(svd.vae, LinearPatchLatent) and isinstance(svd.cond_encoder, LinearPatchLatent)
        c = svd.cfg
        assert c.vae.linear_patch_size == 1 and c.steps == steps and (c.num_frames, c.height, c.width) == (8, 16, 16)
        small = data.resize_center_crop(img, c.height, c.width).clamp(0, 1)
        video, st = sample.sample_video(svd, small, seed=0)
        assert video.shape == (8, 3, 16, 16) and st["unet_evals"] == evals
        psnr = 10 * torch.log10(1 / (video[0] - small).square().mean()).item()
        assert psnr > 25, (name, psnr)                                        # frame 0 follows the image
        assert (video[1:] - video[:-1]).abs().mean() > 5e-3, name            # and the clip moves
    old = svd.cfg.to_dict()                                                   # bundles of the older config name load
    old["vae"]["space_to_depth"] = old["vae"].pop("linear_patch_size")
    assert SVDConfig.from_dict(old) == svd.cfg


# -----------------------------------------------------------------------------
# toy pipeline smoke run (CI): every stage for a few steps, then the table


@pytest.mark.slow
def test_toy_smoke(tmp_path, capsys, monkeypatch):
    import toy
    shipped = {f: os.path.getmtime(os.path.join(toy.ASSETS, f)) for f in os.listdir(toy.ASSETS)}
    assert toy.main(["--smoke", "--out", str(tmp_path / "toy")]) == 0
    results = json.loads((tmp_path / "toy" / "results.json").read_text())
    rows = results["rows"]
    names = [r["name"] for r in rows]
    # every row of toy.ROWS; the refinement rows only where the student bundle refines (model.py's student sampler)
    want = ["real"] + [r[0] for r in toy.ROWS if r[0] not in ("sfv_2", "sfv_3")]
    assert [r["row"] for r in rows if r["row"] not in ("sfv_2", "sfv_3")] == want
    assert {"sfv_no_temporal", "sfv_no_spatial", "sfv_r1_fd"} <= {r["row"] for r in rows}
    for r in rows[1:]:
        for k in ("fd", "fd_app", "fd_motion", "psnr0", "motion", "warp", "drift", "s_clip", "solid_last",
                  "speed_x_real", "disp1", "off_colour_last", "background"):
            assert math.isfinite(r[k]), (r["name"], k)
    for r in rows:                                                   # bootstrap spread of the FD and of the measures
        lo, hi = r["fd_ci"]
        assert lo <= hi and r["fd_se"] > 0 and math.isfinite(r["fd_se"]), (r["row"], lo, r["fd"], hi)
        assert r["solid_last_se"] >= 0 and math.isfinite(r["background_se"]), r["row"]
    assert rows[0]["speed_x_real"] == pytest.approx(1, abs=0.5)       # two real sets move alike
    table = (tmp_path / "toy" / "table.md").read_text()
    for name in names:
        assert table.count(f"| {name} |") == 2                         # the FD table and the measures' table
    assert "python toy.py --smoke" in table and " ± " in table and "| solid at last frame ↑ |" in table
    assert [c["step"] for c in results["curve"]] == list(toy.SMOKE["curve"])          # the teacher's learning curve
    assert all(math.isfinite(c["fd_1"]) and math.isfinite(c["fd_25"]) for c in results["curve"])
    assert set(results["logs"]) == {k for k in toy.MODELS if k != "teacher"}          # the SF-V runs' D/G logs
    for x in ("student", "frozen"):                                  # the student's D, per frame (curves.png)
        assert {k: len(v) for k, v in results["d_gaps"][x].items()} == {"spatial": 8, "temporal": 8}
        assert all(math.isfinite(g) for v in results["d_gaps"][x].values() for g in v)
    # nothing frozen: x is the real clip, noised with the same sigma' and eps', so every gap is exactly 0
    same = toy.d_gaps(str(tmp_path / "toy" / "sfv_both"), str(tmp_path / "toy" / "teacher" / "model.safetensors"),
                      toy.clips(4, toy.HELD_OUT_SEED), frozen=())["frozen"]
    assert same == {"spatial": [0.0] * 8, "temporal": [0.0] * 8}
    c = CONFIGS["toy"]
    png = data.read_image(str(tmp_path / "toy" / "compare.png"))      # rows: real + the models; columns: frames
    assert png.shape[0] == 3 and min(png.shape[1:]) > c.height
    with av.open(str(tmp_path / "toy" / "compare.gif")) as g:
        assert sum(1 for _ in g.decode(video=0)) == c.num_frames
    for stage in ("teacher", "sfv_both", "sfv_spatial", "sfv_temporal", "sfv_r1_fd"):
        assert (tmp_path / "toy" / stage / "model.safetensors").exists()
    # --resume keeps the finished stages (no training) and reproduces the table
    capsys.readouterr()
    assert toy.main(["--smoke", "--resume", "--out", str(tmp_path / "toy")]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing ") - out.count("reusing row ") == len(toy.SMOKE["curve"]) + len(toy.MODELS) - 1
    assert out.count("reusing row ") == len(rows) - 1 and "python train.py" not in out
    again = json.loads((tmp_path / "toy" / "results.json").read_text())["rows"]
    assert [r["fd"] for r in again] == pytest.approx([r["fd"] for r in rows], rel=1e-9)
    assert not (tmp_path / "toy" / "assets").exists()                # --smoke never touches the assets
    assert shipped == {f: os.path.getmtime(os.path.join(toy.ASSETS, f)) for f in os.listdir(toy.ASSETS)}


def test_toy_frame_scores_split_the_logits_by_frame(monkeypatch):
    """toy.frame_scores (the per-frame D picture in curves.png): every head made to output its own frame index (the
    spatial heads get frames as (B*T) samples, the temporal ones as the last axis) -> exactly 0..T-1 per frame, for
    each head type, through Discriminator.heads' own flattening."""
    import toy
    from discriminator import DiscHead
    torch.manual_seed(0)
    unet = SVD(CONFIGS["tiny"]).unet
    B, T = 2, 4
    x, cond, emb = torch.randn(B, T, 4, 8, 8), torch.randn(B, 4, 8, 8), torch.randn(B, 32)
    ids, s = torch.tensor([[6.0, 127.0, 0.02]] * B), torch.tensor([0.3, 2.0])

    def frame_index(self, h, c):
        if h.ndim == 4:                                              # spatial: (B*T, C, H, W) -> (B*T, H, W)
            return (torch.arange(h.shape[0]) % T).float().view(-1, 1, 1).expand(-1, *h.shape[2:])
        return torch.arange(h.shape[2]).float().expand(h.shape[0], -1)   # temporal: (B*H*W, C, T) -> (B*H*W, T)
    monkeypatch.setattr(DiscHead, "forward", frame_index)
    want = torch.arange(T).float().expand(B, -1)
    for heads in ("both", "spatial", "temporal"):
        D = Discriminator(unet, heads, hidden=32, cmap_dim=16, embed_dim=32)
        got = toy.frame_scores(D, D(x, s, cond, emb, ids), T)
        assert set(got) == {"both": {"spatial", "temporal"}}.get(heads, {heads})
        for v in got.values():
            assert torch.equal(v, want), (heads, v)


def test_toy_cli_defaults_and_one_line_errors(tmp_path, capsys, monkeypatch):
    """python toy.py writes to out/toy and leaves assets/ alone unless --assets; careless flags are one line
    (exit 2) before any training; Ctrl-C is one line (exit 130); a damaged curve.json on --resume is named."""
    import toy
    a = toy.parse_args([])
    assert (a.out, a.assets, a.mode) == (os.path.join("out", "toy"), False, None)
    assert toy.parse_args(["--lesson"]).out == os.path.join("out", "toy_lesson")
    assert toy.parse_args(["--evaluate-assets"]).out == os.path.join("out", "toy_evaluate")
    with pytest.raises(SystemExit):
        toy.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for words in ("never touched", "~7 min", "out/toy_lesson", "out/toy_evaluate", "default 6"):
        assert words in help_text, words

    def no_training(argv):
        raise AssertionError("trained before checking the flags")
    monkeypatch.setattr(toy.train, "main", no_training)

    def err(argv):
        capsys.readouterr()
        code = toy.main(argv)
        e = capsys.readouterr().err
        assert len(e.strip().splitlines()) == 1, e
        return code, e.strip()
    f = tmp_path / "file"
    f.write_text("x")
    assert err(["--out", str(f)]) == (2, f"error: --out {f} is a file; pass a folder (it is created if missing)")
    out = str(tmp_path / "o")
    assert err(["--pic-clips", "0", "--out", out]) == (2, "error: bad --pic-clips 0: must be 1 to 128 (the held-out "
                                                          "clips)")
    assert err(["--smoke", "--pic-clips", "9", "--out", out]) == (2, "error: bad --pic-clips 9: must be 1 to 8 (the "
                                                                     "held-out clips)")
    assert err(["--lesson", "--assets", "--out", out]) == (2, "error: --assets works with the full run or "
                                                              "--evaluate-assets; drop it with --lesson")
    curve = tmp_path / "o" / "teacher" / "curve.json"
    curve.parent.mkdir(parents=True)
    curve.write_text('[{"step": 2, "train_seconds": 1.0, "fd_1"')       # cut by a kill
    code, e = err(["--smoke", "--resume", "--out", out])
    assert code == 2 and e.startswith(f"error: --resume: {curve} is damaged (JSONDecodeError: ") and e.endswith(
        "); delete it to measure the learning curve again (the teacher's checkpoints are kept)")
    curve.write_text('[{"train_seconds": 1.0}]')                        # valid JSON, not a curve
    assert err(["--smoke", "--resume", "--out", out])[1].startswith(f"error: --resume: {curve} is damaged (KeyError: ")

    def interrupt(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(toy.train, "main", interrupt)
    assert err(["--smoke", "--out", str(tmp_path / "i")]) == (
        130, f"interrupted; finished stages and checkpoints are in {tmp_path / 'i'}/ (python toy.py --resume "
             f"continues a full run)")


@pytest.mark.slow
def test_toy_evaluate_assets_recomputes_the_table_from_the_bundled_models(tmp_path, capsys, monkeypatch):
    """--evaluate-assets: the table from the bundled models, no training, assets/ untouched; --resume keeps the rows
    of unchanged bundles (and says so) with the same numbers."""
    import toy
    monkeypatch.setattr(toy, "FULL", dict(toy.FULL, n_eval=6, n_latency=1))
    monkeypatch.setattr(toy.train, "main", lambda argv: pytest.fail("trained"))
    shipped = {f: os.path.getmtime(os.path.join(toy.ASSETS, f)) for f in os.listdir(toy.ASSETS)}
    out = tmp_path / "ev"
    assert toy.main(["--evaluate-assets", "--out", str(out), "--pic-clips", "2"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    keys = [r["row"] for r in rows]
    assert keys[:4] == ["real", "teacher_25", "teacher_1", "sfv_1"]
    assert all(math.isfinite(r["fd"]) and math.isfinite(r["solid_last"]) for r in rows)
    assert "python toy.py --evaluate-assets" in (out / "table.md").read_text()
    capsys.readouterr()
    assert toy.main(["--evaluate-assets", "--resume", "--out", str(out), "--pic-clips", "2"]) == 0
    assert capsys.readouterr().out.count("reusing row ") == len(rows) - 1
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r["fd"] for r in again] == pytest.approx([r["fd"] for r in rows], rel=1e-9)
    assert shipped == {f: os.path.getmtime(os.path.join(toy.ASSETS, f)) for f in os.listdir(toy.ASSETS)}


def test_bench_cli_one_line_errors_and_help(capsys, monkeypatch):
    """bench.py: careless flags are one line `error: ...` (exit 2) before any work; Ctrl-C one line (exit 130);
    --help shows every default and lists only configs that exist."""
    import bench
    from model import CONFIGS

    def err(argv):
        capsys.readouterr()
        code = bench.main(argv)
        e = capsys.readouterr().err.strip()
        assert len(e.splitlines()) == 1, e
        return code, e
    assert err(["--sample", "--steps", "0"]) == (2, "error: bad --steps 0: must be at least 1")
    assert err(["--rounds", "0"]) == (2, "error: bad --rounds 0: must be at least 1")
    assert err(["--sample", "--configs", "tiny,huge"]) == (
        2, "error: unknown --configs entry 'huge'; choose from " + ", ".join(bench.sample_configs()))
    if not torch.cuda.is_available():
        assert err(["--train-memory", "--device", "cuda"]) == (
            2, "error: --device cuda: CUDA is not available on this machine; use --device cpu (or auto)")
    assert err(["--train-memory", "--memory-shape", "4x64"]) == (
        2, "error: bad --memory-shape 4x64: must be TxHxW in pixels, e.g. 14x448x768")
    assert err(["--train-memory", "--memory-shape", "4x100x64"]) == (
        2, "error: bad --memory-shape 4x100x64: frames >= 1 and height, width positive multiples of 64 (the model's "
           "size multiple); e.g. 14x448x768")
    assert err(["--train-memory", "--memory-config", "bogus"]) == (
        2, "error: unknown --memory-config 'bogus'; choose from " + ", ".join(CONFIGS))

    def interrupt(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "unet_main", interrupt)
    assert err([]) == (130, "interrupted; bench.py writes no files, nothing was lost")
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 3)" in out and "(default: tiny,medium)" in out and "(default: cpu)" in out
    for name in bench.sample_configs():
        assert name in out
    assert set(bench.sample_configs()) - {"medium"} <= set(CONFIGS)          # medium: defined in bench.py itself
