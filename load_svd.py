"""
Load Stability AI's official SVD weights (and our own SF-V bundles) into model.SVD.

Layouts:
  single file   svd.safetensors / svd_xt.safetensors / svd_xt_1_1.safetensors (sgm key names; our module names
                are the sgm names, so this is a prefix strip)
  diffusers     a folder with unet/, vae/, image_encoder/ (renamed keys, split q/k/v in CLIP, Linear VAE attention)
  bundle        one .safetensors of ours: state dict with our names + the SVDConfig as JSON in the metadata
  legacy        .ckpt/.pt/.pth/.bin with the single-file names, read only with torch.load(weights_only=True)

Strict: every parameter is filled exactly once; every checkpoint key is consumed or on a named list of known-unused
keys; shape mismatches name the key and both shapes. Memory-frugal: the model is built on the meta device and each
tensor is read lazily, converted to the target dtype/device and placed, so the fp32 file is never held twice.

Also here: LoadError (cli.UserError for checkpoints),
finding a checkpoint (find_checkpoint) and the explicit download of the official weights (download_official).
"""
import hashlib
import http.client
import json
import os
import pickle
import pickletools
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import replace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import UserError, atomic_write
from model import SVD, SVDConfig, CONFIGS

BUNDLE_FORMAT = "sfv-bundle"
HERE = os.path.dirname(os.path.abspath(__file__))
CKPT_ENV = "SFV_CKPT"                                             # env var naming a checkpoint
CKPT_DIRS = ["checkpoints", os.path.join(HERE, "checkpoints")]     # searched in order (cwd first)
TOY_CKPT = os.path.join(HERE, "assets", "toy_sfv.safetensors")     # the bundled toy model (the fallback)
OFFICIAL = {  # download name -> (Hugging Face repo, file)
    "svd": ("stabilityai/stable-video-diffusion-img2vid", "svd.safetensors"),
    "svd_xt": ("stabilityai/stable-video-diffusion-img2vid-xt", "svd_xt.safetensors"),
    "svd_xt_1_1": ("stabilityai/stable-video-diffusion-img2vid-xt-1-1", "svd_xt_1_1.safetensors"),
}
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"

# single-file prefixes of our four sub-networks
SGM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "cond_encoder": "conditioner.embedders.3.encoder.",
    "clip": "conditioner.embedders.0.open_clip.model.visual.",
}
# keys present in the official files that SVD never uses
KNOWN_UNUSED = {
    "single": [
        (r"conditioner\.embedders\.0\.open_clip\.model\.(token_embedding|positional_embedding|ln_final|text_projection"
         r"|logit_scale|attn_mask|transformer)\b", "OpenCLIP text-tower leftovers"),
        (r"conditioner\.embedders\.3\.encoder\.(decoder|post_quant_conv)\.", "the conditioning autoencoder's unused decoder"),
    ],
    "diffusers": [(r"image_encoder/vision_model\.embeddings\.position_ids$", "a transformers buffer")],
}


class LoadError(UserError, ValueError):
    """A checkpoint that cannot be found, downloaded or loaded."""


# -----------------------------------------------------------------------------
# atomic writes: a temp file in the same folder, then os.replace (never a half-written file under the real name)


# -----------------------------------------------------------------------------
# key maps: our parameter name -> (source keys, how to combine them)
# kinds: "copy"; "view" (Linear (C, C) <-> 1x1 conv (C, C, 1, 1)); "cat" (q, k, v -> in_proj); "t" (transpose)


def _diffusers_res(rest, temporal_prefix):
    """sgm ResBlock names inside a UNet VideoResBlock -> diffusers SpatioTemporalResBlock names."""
    sub = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    if rest.startswith("time_mixer."):
        return rest
    prefix = "spatial_res_block."
    if rest.startswith("time_stack."):
        prefix, rest = temporal_prefix, rest[len("time_stack."):]
    layer, param = rest.rsplit(".", 1)
    return prefix + sub[layer] + "." + param


def _diffusers_attn(rest):
    rest = re.sub(r"^time_stack\.", "temporal_transformer_blocks.", rest)
    rest = re.sub(r"^time_pos_embed\.0\.", "time_pos_embed.linear_1.", rest)
    return re.sub(r"^time_pos_embed\.2\.", "time_pos_embed.linear_2.", rest)


def unet_to_diffusers(key, cfg):
    """Our (= sgm) UNet key -> the diffusers UNetSpatioTemporalConditionModel key (a pure renaming)."""
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for a, b in fixed.items():
        if key.startswith(a):
            return b + key[len(a):]
    n = cfg.num_res_blocks + 1
    m = re.match(r"middle_block\.(\d+)\.(.*)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i == 1:
            return "mid_block.attentions.0." + _diffusers_attn(rest)
        return f"mid_block.resnets.{i // 2}." + _diffusers_res(rest, "temporal_res_block.")
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)", key)
    if m is None:
        raise KeyError(key)
    kind, i, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    sub = int(sub)
    if kind == "input_blocks":
        b, j = (i - 1) // n, (i - 1) % n
        if j == cfg.num_res_blocks:
            return f"down_blocks.{b}.downsamplers.0.conv." + rest[len("op."):]
        blk = f"down_blocks.{b}."
    else:
        b, j = i // n, i % n
        blk = f"up_blocks.{b}."
    if sub == 0:
        return blk + f"resnets.{j}." + _diffusers_res(rest, "temporal_res_block.")
    if rest.startswith("conv."):                                      # Upsample at .1 or .2
        return blk + "upsamplers.0." + rest
    return blk + f"attentions.{j}." + _diffusers_attn(rest)


def vae_to_diffusers(key, cfg):
    """Our (= sgm) VAE key (encoder.*, quant_conv.*, decoder.*) -> (diffusers AutoencoderKLTemporalDecoder key, kind)."""
    sub = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    time = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2"}
    part, rest = key.split(".", 1)
    if part == "quant_conv":
        return key, "copy"
    m = re.match(r"mid\.attn_1\.(\w+)\.(\w+)$", rest)
    if m:
        return f"{part}.mid_block.attentions.0.{attn[m.group(1)]}.{m.group(2)}", "view" if m.group(2) == "weight" else "copy"
    rest = rest.replace("norm_out.", "conv_norm_out.").replace("conv_out.time_mix_conv.", "time_conv_out.")
    rest = re.sub(r"^mid\.block_(\d)\.", lambda g: f"mid_block.resnets.{int(g.group(1)) - 1}.", rest)
    if part == "encoder":
        rest = re.sub(r"^down\.(\d+)\.block\.(\d+)\.", r"down_blocks.\1.resnets.\2.", rest)
        rest = re.sub(r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", rest)
        m = re.match(r"(.*resnets\.\d+\.)(\w+)\.(\w+)$", rest)
        if m:
            rest = m.group(1) + sub[m.group(2)] + "." + m.group(3)
        return f"encoder.{rest}", "copy"
    n = len(cfg.ch_mult)
    rest = re.sub(r"^up\.(\d+)\.block\.(\d+)\.", lambda g: f"up_blocks.{n - 1 - int(g.group(1))}.resnets.{g.group(2)}.", rest)
    rest = re.sub(r"^up\.(\d+)\.upsample\.", lambda g: f"up_blocks.{n - 1 - int(g.group(1))}.upsamplers.0.", rest)
    rest = re.sub(r"(resnets\.\d+\.)mix_factor$", r"\1time_mixer.mix_factor", rest)
    m = re.match(r"(.*resnets\.\d+\.)(.*)\.(\w+)$", rest)
    if m and not rest.endswith("mix_factor"):
        head, layer, param = m.groups()
        if layer.startswith("time_stack."):
            rest = head + "temporal_res_block." + time[layer[len("time_stack."):]] + "." + param
        else:
            rest = head + "spatial_res_block." + sub[layer] + "." + param
    return f"decoder.{rest}", "copy"


def clip_to_hf(key):
    """Our (= open_clip visual) key -> ([transformers CLIPVisionModelWithProjection keys], kind)."""
    fixed = {"conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "class_embedding": "vision_model.embeddings.class_embedding",
             "positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
             "ln_post.weight": "vision_model.post_layernorm.weight", "ln_post.bias": "vision_model.post_layernorm.bias"}
    if key in fixed:
        return [fixed[key]], "copy"
    if key == "proj":
        return ["visual_projection.weight"], "t"
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", key)
    if m is None:
        raise KeyError(key)
    layer, rest = f"vision_model.encoder.layers.{m.group(1)}.", m.group(2)
    m = re.match(r"attn\.in_proj_(weight|bias)$", rest)
    if m:
        return [f"{layer}self_attn.{x}_proj.{m.group(1)}" for x in "qkv"], "cat"
    sub = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
           "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
    for a, b in sub.items():
        if rest.startswith(a):
            return [layer + b + rest[len(a):]], "copy"
    raise KeyError(key)


def key_map(cfg: SVDConfig, layout):
    """{our parameter name: ([source keys], kind)} for layout 'single' or 'diffusers' (source keys of the diffusers
    layout are 'unet/...', 'vae/...', 'image_encoder/...'). Built from a meta-device model: no memory used."""
    with torch.device("meta"):
        names = list(SVD(cfg).state_dict().keys())
    out = {}
    for name in names:
        part, rest = name.split(".", 1)
        if layout == "single":
            out[name] = ([SGM_PREFIX[part] + rest], "copy")
        elif part == "unet":
            out[name] = (["unet/" + unet_to_diffusers(rest, cfg.unet)], "copy")
        elif part in ("vae", "cond_encoder"):   # diffusers has one encoder (+ quant_conv): it feeds both
            k, kind = vae_to_diffusers(rest, cfg.vae)
            out[name] = (["vae/" + k], kind)
        else:
            ks, kind = clip_to_hf(rest)
            out[name] = (["image_encoder/" + k for k in ks], kind)
    return out


def _combined_shape(shapes, kind):
    if kind == "cat":
        return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
    if kind == "t":
        return tuple(shapes[0][::-1])
    return tuple(shapes[0])


def _combine(tensors, kind, shape):
    if kind == "cat":
        return torch.cat(tensors, dim=0)
    if kind == "t":
        return tensors[0].t().contiguous()
    return tensors[0].reshape(shape)          # "copy" is a no-op reshape; "view" adds/drops the 1x1 conv dims


def _short(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def match(cfg: SVDConfig, layout, source_shapes):
    """Check a checkpoint's {key: shape} against our model for `layout`; returns (plan, skipped) or raises LoadError.
    plan: {our name: ([source keys], kind)}; skipped: {reason: count} of known-unused keys."""
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in SVD(cfg).state_dict().items()}
    plan = key_map(cfg, layout)
    missing, consumed = [], set()
    for name, (srcs, kind) in plan.items():
        if any(s not in source_shapes for s in srcs):
            missing.append(srcs[0])
            continue
        consumed.update(srcs)
        got = _combined_shape([tuple(source_shapes[s]) for s in srcs], kind)
        want = ours[name]
        if kind == "view" and got != want and (got + (1, 1) == want or got == want + (1, 1)):
            got = want
        if got != want:
            raise LoadError(f"shape mismatch for '{srcs[0]}': checkpoint has {list(got)}, model expects {list(want)} "
                            f"(wrong config? pass the matching config or use the official weights)")
    skipped, unexpected = {}, []
    for k in source_shapes:
        if k in consumed:
            continue
        reason = next((why for pat, why in KNOWN_UNUSED.get(layout, []) if re.match(pat, k)), None)
        if reason is None:
            unexpected.append(k)
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    if missing:
        raise LoadError(f"checkpoint is missing {len(missing)} keys: {_short(missing)} (incomplete or not an SVD checkpoint)")
    if unexpected:
        raise LoadError(f"checkpoint has {len(unexpected)} unexpected keys: {_short(unexpected)} "
                        f"(a different model or config; pass the matching config)")
    return plan, skipped

# -----------------------------------------------------------------------------
# reading


class _Source:
    """Lazy, uniform access to tensors in safetensors files (safe_open) or a weights_only torch.load dict."""

    def __init__(self):
        self.files = {}     # tag -> handle (safe_open) or dict

    def open(self, tag, path):
        if path.endswith(".safetensors"):
            try:
                self.files[tag] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:
                raise LoadError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                                f"it may be truncated: download it again") from None
        else:
            sd = _torch_load(path)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
            if not isinstance(sd, dict):
                raise LoadError(f"{path} does not contain a state dict; convert it to .safetensors")
            self.files[tag] = {k: v for k, v in sd.items() if torch.is_tensor(v)}
        return self.files[tag]

    def shapes(self):
        out = {}
        for tag, f in self.files.items():
            pre = "" if tag == "" else tag + "/"
            if isinstance(f, dict):
                out.update({pre + k: tuple(v.shape) for k, v in f.items()})
            else:
                out.update({pre + k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return out

    def get(self, key):
        tag, k = key.split("/", 1) if "/" in key else ("", key)
        f = self.files[tag]
        if isinstance(f, dict):
            return f[k]
        try:
            return f.get_tensor(k)
        except Exception as e:
            raise LoadError(f"could not read '{key}' ({str(e).splitlines()[0]}); the file may be truncated: "
                            f"download it again") from None


def _pickle_globals(path):
    """The module.name globals a (legacy, non-zip) pickle file imports, read statically with pickletools (nothing is
    executed). Best effort: [] when the stream cannot be parsed."""
    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(arg)
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
    except Exception:
        pass
    return found


def _torch_load(path):
    """A .ckpt/.pt/.pth/.bin through torch.load(weights_only=True): only tensors and plain containers, never code.
    Zip-format files (torch >= 1.6) are memory-mapped; legacy (pre-zip) files are read into memory."""
    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():          # torch notes a non-default pickle protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:
        msg = str(e)
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in msg:
            m = re.search(r"GLOBAL (\S+)", msg)
            names = [m.group(1)] if m else ([] if is_zip else _pickle_globals(path))
            what = (f"it imports Python objects ({', '.join(dict.fromkeys(names))}) that would run when unpickled"
                    if names else "it holds pickled Python objects, not only tensors")
            raise LoadError(f"refusing to load {path}: {what}; only plain tensor checkpoints are loaded "
                            f"(torch.load weights_only=True): convert a checkpoint you trust to .safetensors") from None
        first = msg.strip().splitlines()[0][:120] if msg.strip() else ""
        raise LoadError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}); it may be "
                        f"truncated or not a checkpoint: download it again or convert it to .safetensors") from None


def _diffusers_file(folder, sub, stem, dtype):
    """Pick unet/diffusion_pytorch_model[.fp16].safetensors (fp16 file when loading in half precision)."""
    cands = [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    if dtype in (torch.float16, torch.bfloat16):
        cands.reverse()
    for c in cands:
        p = os.path.join(folder, sub, c)
        if os.path.isfile(p):
            return p
    raise LoadError(f"diffusers folder {folder} has no {sub}/{stem}.safetensors (or .fp16.safetensors); "
                    f"download the complete folder")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _official_config(name_hint, unet_in_shape):
    cfg = CONFIGS["svd_xt" if "xt" in name_hint.lower() else "svd"]
    if unet_in_shape is not None and tuple(unet_in_shape) != (cfg.unet.model_channels, cfg.unet.in_channels, 3, 3):
        raise LoadError(f"unrecognised SVD shapes (UNet conv_in {list(unet_in_shape)}); pass the model config explicitly")
    return cfg


def _reject_non_svd(path, shapes):
    unet = [k for k in shapes if k.startswith("model.diffusion_model.")]
    if not unet:
        raise LoadError(f"{path} is not an SVD checkpoint: none of its {len(shapes)} keys (e.g. "
                        f"'{next(iter(shapes), '')}') is an SVD UNet key (model.diffusion_model.*); "
                        f"use svd.safetensors / svd_xt.safetensors or a diffusers SVD folder")
    if not any(".time_stack." in k for k in unet):
        cin = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
        raise LoadError(f"{path} is not an SVD checkpoint: it looks like a Stable Diffusion image model (UNet without "
                        f"temporal layers, conv_in {list(cin) if cin else '?'}); use the SVD image-to-video weights")


def load(path, config=None, dtype=torch.float32, device="cpu"):
    """Load an official single file, a diffusers folder, a legacy .ckpt (weights_only) or our bundle -> SVD (eval mode).

    config: an SVDConfig for non-official shapes (e.g. tiny models); otherwise the official shapes are recognised.
    The returned model has .load_info = {"layout", "path", "skipped", "metadata"}."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LoadError(f"checkpoint not found: {path}; pass a path to svd.safetensors, a diffusers folder or an SF-V bundle")
    src, metadata = _Source(), {}
    if os.path.isdir(path):
        layout = "diffusers"
        if not os.path.isdir(os.path.join(path, "unet")):
            raise LoadError(f"{path} is a folder but not a diffusers SVD folder (no unet/ inside); pass the file or the "
                            f"folder that holds unet/, vae/ and image_encoder/")
        for tag, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("image_encoder", "model")):
            src.open(tag, _diffusers_file(path, tag, stem, dtype))
        shapes = src.shapes()
        if config is None:
            frames = _read_json(os.path.join(path, "unet", "config.json")).get("num_frames", 14)
            config = _official_config("xt" if frames == 25 else "", shapes.get("unet/conv_in.weight"))
        config = replace(config, vae=replace(config.vae, use_quant_conv=True))   # diffusers' vae/ has a quant_conv
    else:
        f = src.open("", path)
        metadata = (f.metadata() or {}) if not isinstance(f, dict) else {}
        shapes = src.shapes()
        if metadata.get("format") == BUNDLE_FORMAT:
            layout = "bundle"
            try:
                config = SVDConfig.from_dict(json.loads(metadata["config"]))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise LoadError(f"bundle {path} has a damaged config in its metadata ({type(e).__name__}); save or "
                                f"download it again") from None
        else:
            layout = "single"
            _reject_non_svd(path, shapes)
            if config is None:
                config = _official_config(os.path.basename(path), shapes.get("model.diffusion_model.input_blocks.0.0.weight"))
    if layout == "bundle":
        with torch.device("meta"):
            want = {k: ([k], "copy") for k in SVD(config).state_dict()}
        extra = sorted(set(shapes) - set(want))
        missing = sorted(set(want) - set(shapes))
        if missing or extra:
            raise LoadError(f"bundle {path} does not match its config: missing {_short(missing)}; unexpected {_short(extra)}")
        plan, skipped = want, {}
    else:
        plan, skipped = match(config, layout, shapes)

    with torch.device("meta"):
        svd = SVD(config)
    ours = {k: tuple(v.shape) for k, v in svd.state_dict().items()}
    state, used = {}, set()
    for name, (srcs, kind) in plan.items():
        t = _combine([src.get(s) for s in srcs], kind, ours[name])
        if used.intersection(srcs):   # diffusers' one VAE encoder fills both vae.encoder and cond_encoder: own copies
            t = t.clone()
        used.update(srcs)
        if tuple(t.shape) != ours[name]:
            raise LoadError(f"shape mismatch for '{srcs[0]}': checkpoint has {list(t.shape)}, model expects {list(ours[name])}")
        state[name] = t.to(device=device, dtype=dtype)   # one source tensor alive at a time
    svd.load_state_dict(state, strict=True, assign=True)
    svd.eval()
    svd.load_info = {"layout": layout, "path": path, "skipped": skipped, "metadata": metadata}
    return svd


def save(svd: SVD, path, extra_metadata=None):
    """Write our bundle atomically: one safetensors file, our parameter names, config JSON in the metadata (plus
    extra_metadata, e.g. the training step). The sampling defaults live in the config."""
    meta = {"format": BUNDLE_FORMAT, "config": json.dumps(svd.cfg.to_dict())}
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in svd.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

# -----------------------------------------------------------------------------
# finding a checkpoint: --ckpt > $SFV_CKPT > checkpoints/ > the bundled toy model


def bundle_metadata(path):
    """The metadata of a safetensors file (a bundle's config, format tag, training step), without reading tensors;
    {} if it has none or is not a readable safetensors file."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def is_bundle(path):
    """True if path is one of our SF-V bundles (a safetensors file with our format tag in its metadata)."""
    return bundle_metadata(path).get("format") == BUNDLE_FORMAT


def candidates(folder):
    """Usable checkpoints in a folder, best first: SF-V bundles, then svd_xt_1_1, svd_xt, svd, then others
    (diffusers folders and other files). Partial downloads and temp files are skipped."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if os.path.isdir(p) and os.path.isdir(os.path.join(p, "unet")):
            out.append((3, p))
        elif os.path.isfile(p) and name.endswith((".safetensors", ".ckpt", ".pt", ".pth")) and ".tmp-" not in name:
            stem = name.rsplit(".", 1)[0]
            rank = 0 if name.endswith(".safetensors") and is_bundle(p) else {"svd_xt_1_1": 1, "svd_xt": 2, "svd": 2.5}.get(stem, 3)
            out.append((rank, p))
    return [p for _, p in sorted(out, key=lambda r: r[0])]


def find_checkpoint(ckpt=None, env=None, dirs=None, toy=None):
    """ckpt > $SFV_CKPT > the first of candidates(d) for d in dirs (default CKPT_DIRS) > the toy bundle (default
    TOY_CKPT). -> (path, is_toy). Raises LoadError when nothing is found."""
    env = os.environ if env is None else env
    if ckpt:
        return ckpt, False
    if env.get(CKPT_ENV):
        if not os.path.exists(env[CKPT_ENV]):
            raise LoadError(f"${CKPT_ENV} points to a missing checkpoint: {env[CKPT_ENV]}; fix or unset it")
        return env[CKPT_ENV], False
    for d in CKPT_DIRS if dirs is None else dirs:
        found = candidates(d)
        if found:
            return found[0], False
    toy = TOY_CKPT if toy is None else toy
    if os.path.isfile(toy):
        return toy, True
    raise LoadError(f"no weights found (--ckpt, ${CKPT_ENV}, checkpoints/) and the toy model {toy} is missing; "
                    f"pass --ckpt PATH or run: python sample.py --download svd_xt")

# -----------------------------------------------------------------------------
# explicit download (never implicit): HTTP with resume, size and sha256 checks


def _sha256_etag(headers):
    for k in ("X-Linked-Etag", "ETag"):
        m = re.fullmatch(r'(?:W/)?"?([0-9a-fA-F]{64})"?', (headers.get(k) or "").strip())
        if m:
            return m.group(1).lower()
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _http_error(e, url):
    if e.code in (401, 403):
        return LoadError(f"access denied (HTTP {e.code}) for {url}: the SVD weights are gated: accept the licence on "
                         f"the model page and set HF_TOKEN=<your token>")
    return LoadError(f"download failed (HTTP {e.code} {e.reason}) for {url}; check the name or try again later")


def download(url, dest, token=None, chunk_size=1 << 20, progress=True):
    """Fetch url to dest: resumes dest + '.part' with an HTTP Range request, tqdm bar, checks the size against
    Content-Length / X-Linked-Size and the sha256 against an ETag / X-Linked-Etag that is one. Returns dest.
    The token (Bearer) goes to the first host only, never to the redirect target."""
    from tqdm import tqdm

    def request(method, extra=None):
        r = urllib.request.Request(url, method=method, headers={"User-Agent": "sfv-sample", **(extra or {})})
        if token:
            r.add_unredirected_header("Authorization", f"Bearer {token}")
        return r

    try:   # metadata from the first hop (the Hub answers a HEAD with a redirect carrying X-Linked-Size/-Etag)
        head = urllib.request.build_opener(_NoRedirect).open(request("HEAD"), timeout=60).headers
    except urllib.error.HTTPError as e:
        if not 300 <= e.code < 400:
            raise _http_error(e, url) from None
        head = e.headers
    except (urllib.error.URLError, OSError) as e:
        raise LoadError(f"network error for {url}: {getattr(e, 'reason', e)}; check the connection or download the "
                        f"file yourself into checkpoints/") from None
    total = head.get("X-Linked-Size") or (head.get("Content-Length") if head.get("Location") is None else None)
    total = int(total) if total else None
    sha = _sha256_etag(head)

    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    start = os.path.getsize(part) if os.path.exists(part) else 0
    if total is not None and start > total:
        os.remove(part)
        start = 0
    if total is None or start < total:
        extra = {"Range": f"bytes={start}-"} if start else {}
        try:
            resp = urllib.request.urlopen(request("GET", extra), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code != 416:
                raise _http_error(e, url) from None
            os.remove(part)                         # our partial file does not fit the remote one: start over
            return download(url, dest, token, chunk_size, progress)
        except (urllib.error.URLError, OSError) as e:
            raise LoadError(f"network error for {url}: {getattr(e, 'reason', e)}; run the same command to resume") from None
        if resp.status != 206:                      # the server ignored the range: start from zero
            start = 0
        if total is None and resp.headers.get("Content-Length"):
            total = start + int(resp.headers["Content-Length"])
        with resp, open(part, "ab" if start else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=os.path.basename(dest), disable=not progress) as bar:
            try:
                while True:
                    buf = resp.read(chunk_size)
                    if not buf:
                        break
                    f.write(buf)
                    bar.update(len(buf))
            except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                raise LoadError(f"download interrupted ({type(e).__name__}: {e}); run the same command again to resume") from None
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise LoadError(f"download incomplete: {size} of {total} bytes in {part}; run the same command again to resume")
    if sha is not None:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for buf in iter(lambda: f.read(1 << 24), b""):
                h.update(buf)
        if h.hexdigest() != sha:
            os.remove(part)
            raise LoadError(f"sha256 mismatch for {dest} (expected {sha}, got {h.hexdigest()}); the corrupt file was "
                            f"removed: run the same command again")
    os.replace(part, dest)
    return dest


def download_official(name, folder=None, progress=True):
    """The official single file OFFICIAL[name] into folder (default CKPT_DIRS[0]); a no-op if it is there."""
    repo, fname = OFFICIAL[name]
    dest = os.path.join(CKPT_DIRS[0] if folder is None else folder, fname)
    if os.path.isfile(dest):
        if progress:
            print(f"{dest} already downloaded")
        return dest
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if progress:
        print(f"downloading {repo}/{fname} -> {dest}")
    return download(HF_URL.format(repo=repo, file=fname), dest, token=token, progress=progress)
