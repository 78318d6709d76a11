"""
Tests for the SVD/SF-V reimplementation. No weights are downloaded: tiny random configs are built with the
reference implementations (diffusers, transformers), saved in BOTH official layouts (an sgm-keyed single file and a
diffusers folder) and loaded through load_svd.py; our outputs must match the references numerically.
Run: python -m pytest -q test_sfv.py
"""
import os
import pickle
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import load_svd
from load_svd import LoadError
from model import CONFIGS, SVD, edm_precondition

torch.set_num_threads(min(4, os.cpu_count() or 1))
TINY = CONFIGS["tiny"]
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

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
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    c = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio), num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                         projection_dim=cfg.embed_dim, hidden_act="gelu", layer_norm_eps=cfg.norm_eps)
    return _randomize(CLIPVisionModelWithProjection(c), 3).eval()

# -----------------------------------------------------------------------------
# an independent diffusers -> sgm renaming (written from the notes' rules, not from load_svd.py) used to
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
    # EDM v-prediction, written out from the notes: c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1), c_in = 1/sqrt(s^2+1)
    c_in, c_out, c_skip = 1 / (sigma ** 2 + 1) ** 0.5, -sigma / (sigma ** 2 + 1) ** 0.5, 1 / (sigma ** 2 + 1)
    inp = torch.cat([c_in * x, cond[:, None].expand(-1, T, -1, -1, -1)], dim=2)
    with torch.no_grad():
        F_ = refs["unet"](inp, torch.full((B,), 0.25 * torch.log(torch.tensor(sigma)).item()), encoder_hidden_states=emb[:, None],
                          added_time_ids=ids).sample
        ref = c_skip * x + c_out * F_
        ours = svd.denoise(x, s, cond, emb, ids)
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


def test_pickle_refused_or_weights_only(tmp_path, single_sd):
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(LoadError, match=r"^refusing to load .*evil\.ckpt: not a plain tensor checkpoint"):
        load_svd.load(evil, config=TINY)
    plain = tmp_path / "svd_tiny.ckpt"
    torch.save({"state_dict": single_sd}, plain)       # a legacy checkpoint of plain tensors loads (weights_only)
    svd = load_svd.load(plain, config=TINY)
    torch.testing.assert_close(svd.unet.out[2].bias, single_sd["model.diffusion_model.out.2.bias"])


def test_error_not_found_and_bad_folder(tmp_path):
    with pytest.raises(LoadError, match="^checkpoint not found: "):
        load_svd.load(tmp_path / "nope.safetensors")
    with pytest.raises(LoadError, match="is a folder but not a diffusers SVD folder"):
        load_svd.load(tmp_path)


def test_official_shapes_recognised_without_config(refs):
    with pytest.raises(LoadError, match=re.escape("unrecognised SVD shapes (UNet conv_in [32, 8, 3, 3]); pass the model config explicitly")):
        load_svd.load(refs["single"])
