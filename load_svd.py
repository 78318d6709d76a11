"""
Load Stability AI's official SVD weights (and our own SF-V bundles) into model.SVD; save bundles; find a checkpoint
(--ckpt > $SFV_CKPT > checkpoints/ > the bundled toy model); download the official weights, only when asked.

Layouts:
  single file   svd.safetensors / svd_xt.safetensors / svd_xt_1_1.safetensors (sgm key names; our module names
                are the sgm names, so this is a prefix strip)
  diffusers     a folder with unet/, vae/, image_encoder/ (renamed keys, split q/k/v in CLIP, Linear VAE attention)
  bundle        one .safetensors of ours: state dict with our names + the SVDConfig as JSON in the metadata
  legacy        .ckpt/.pt/.pth/.bin with the single-file names, read only with torch.load(weights_only=True)

Strict: every parameter is filled exactly once; every checkpoint key is consumed or on a named list of known-unused
keys; shape mismatches name the key and both shapes. Memory-frugal: the model is built on the meta device and each
tensor is read lazily, converted to the target dtype/device and placed, so the fp32 file is never held twice.
Every failure is a LoadError, a cli.UserError: one line, what is wrong and how to fix it (checkpoint_checks.py holds
it and the checks that guard reading a file: its kind, weights_only torch.load, a bundle's config and tensors).
"""
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import replace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint_checks import (LoadError, check_bundle_config, check_bundle_tensors, checkpoint_kind, reject_non_svd,
                               short, torch_state_dict)
from cli import atomic_write
from model import SVD, SVDConfig, CONFIGS, karras_sigmas

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
SHA256_ETAG = re.compile(r'(?:W/)?"?([0-9a-fA-F]{64})"?')             # an ETag that is the file's sha256

# single-file prefixes of our four sub-networks
SGM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "cond_encoder": "conditioner.embedders.3.encoder.",
              "clip": "conditioner.embedders.0.open_clip.model.visual."}
# sgm ResBlock layers -> diffusers ResnetBlock layers (UNet: in_/emb_/out_layers; VAE: norm1, conv1, nin_shortcut)
RES_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
             "out_layers.3": "conv2", "skip_connection": "conv_shortcut", "nin_shortcut": "conv_shortcut"}
# open_clip visual -> transformers CLIPVisionModelWithProjection name prefixes (the last five: inside a layer)
CLIP_NAMES = {"conv1.": "vision_model.embeddings.patch_embedding.",
              "class_embedding": "vision_model.embeddings.class_embedding",
              "positional_embedding": "vision_model.embeddings.position_embedding.weight",
              "ln_pre.": "vision_model.pre_layrnorm.", "ln_post.": "vision_model.post_layernorm.",
              "ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
              "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
# keys present in the official files that SVD never uses
KNOWN_UNUSED = {
    "single": [
        (r"conditioner\.embedders\.0\.open_clip\.model\.(token_embedding|positional_embedding|ln_final|text_projection"
         r"|logit_scale|attn_mask|transformer)\b", "OpenCLIP text-tower leftovers"),
        (r"conditioner\.embedders\.3\.encoder\.(decoder|post_quant_conv)\.",
         "the conditioning autoencoder's unused decoder"),
    ],
    "diffusers": [(r"image_encoder/vision_model\.embeddings\.position_ids$", "a transformers buffer")],
}


# -----------------------------------------------------------------------------
# key maps: our parameter name -> (source keys, how to combine them)
# kinds: "copy"; "view" (Linear (C, C) <-> 1x1 conv (C, C, 1, 1)); "cat" (q, k, v -> in_proj); "t" (transpose)


def _diffusers_res(rest):
    """sgm VideoResBlock names (UNet, VAE decoder) -> diffusers SpatioTemporalResBlock names."""
    if rest.endswith("mix_factor"):                       # UNet: time_mixer.mix_factor; VAE decoder: mix_factor
        return "time_mixer.mix_factor"
    layer, param = rest.rsplit(".", 1)
    if layer.startswith("time_stack."):
        return "temporal_res_block." + RES_NAMES[layer[len("time_stack."):]] + "." + param
    return "spatial_res_block." + RES_NAMES.get(layer, layer) + "." + param


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
    m = re.match(r"middle_block\.(\d+)\.(.*)", key)                   # resnet, attention, resnet
    if m and m.group(1) == "1":
        return "mid_block.attentions.0." + _diffusers_attn(m.group(2))
    if m:
        return f"mid_block.resnets.{int(m.group(1)) // 2}." + _diffusers_res(m.group(2))
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)", key)
    if m is None:
        raise KeyError(key)
    down, i, sub, rest = m.group(1) == "input_blocks", int(m.group(2)), int(m.group(3)), m.group(4)
    b, j = divmod(i - 1, n) if down else divmod(i, n)          # input block 0 is conv_in
    if down and j == cfg.num_res_blocks:
        return f"down_blocks.{b}.downsamplers.0.conv." + rest[len("op."):]
    blk = f"down_blocks.{b}." if down else f"up_blocks.{b}."
    if sub == 0:
        return blk + f"resnets.{j}." + _diffusers_res(rest)
    if rest.startswith("conv."):                                      # Upsample at .1 or .2
        return blk + "upsamplers.0." + rest
    return blk + f"attentions.{j}." + _diffusers_attn(rest)


def vae_to_diffusers(key, cfg):
    """Our (= sgm) VAE key (encoder.*, quant_conv.*, decoder.*) -> (diffusers AutoencoderKLTemporalDecoder key,
    kind)."""
    part, rest = key.split(".", 1)
    if part == "quant_conv":
        return key, "copy"
    m = re.match(r"mid\.attn_1\.(\w+)\.(\w+)$", rest)
    if m:
        attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[m.group(1)]
        return f"{part}.mid_block.attentions.0.{attn}.{m.group(2)}", "view" if m.group(2) == "weight" else "copy"
    rest = rest.replace("norm_out.", "conv_norm_out.").replace("conv_out.time_mix_conv.", "time_conv_out.")
    rest = re.sub(r"^mid\.block_(\d)\.", lambda g: f"mid_block.resnets.{int(g.group(1)) - 1}.", rest)
    if part == "encoder":
        rest = re.sub(r"^down\.(\d+)\.block\.(\d+)\.", r"down_blocks.\1.resnets.\2.", rest)
        rest = re.sub(r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", rest)
        return "encoder." + rest.replace(".nin_shortcut.", ".conv_shortcut."), "copy"
    n = len(cfg.ch_mult)
    rest = re.sub(r"^up\.(\d+)\.block\.(\d+)\.", lambda g: f"up_blocks.{n - 1 - int(g.group(1))}.resnets.{g.group(2)}.",
                  rest)
    rest = re.sub(r"^up\.(\d+)\.upsample\.", lambda g: f"up_blocks.{n - 1 - int(g.group(1))}.upsamplers.0.", rest)
    m = re.match(r"(.*resnets\.\d+\.)(.*)$", rest)
    return "decoder." + (m.group(1) + _diffusers_res(m.group(2)) if m else rest), "copy"


def clip_to_hf(key):
    """Our (= open_clip visual) key -> ([transformers CLIPVisionModelWithProjection keys], kind)."""
    if key == "proj":
        return ["visual_projection.weight"], "t"
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", key)
    layer, rest = (f"vision_model.encoder.layers.{m.group(1)}.", m.group(2)) if m else ("", key)
    m = re.match(r"attn\.in_proj_(weight|bias)$", rest)
    if m:
        return [f"{layer}self_attn.{x}_proj.{m.group(1)}" for x in "qkv"], "cat"
    for a, b in CLIP_NAMES.items():
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
    return tensors[0].reshape(shape) if kind == "view" else tensors[0]       # view: adds/drops the 1x1 conv dims


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
        got, want = _combined_shape([tuple(source_shapes[s]) for s in srcs], kind), ours[name]
        if kind == "view" and got != want and (got + (1, 1) == want or got == want + (1, 1)):
            got = want
        if got != want:
            raise LoadError(f"shape mismatch for '{srcs[0]}': checkpoint has {list(got)}, model expects {list(want)} "
                            f"(wrong config? pass the matching config or use the official weights)")
    rest = [k for k in source_shapes if k not in consumed]
    reasons = [next((why for pat, why in KNOWN_UNUSED.get(layout, []) if re.match(pat, k)), None) for k in rest]
    unexpected = [k for k, why in zip(rest, reasons) if why is None]
    skipped = {why: reasons.count(why) for why in dict.fromkeys(reasons) if why is not None}
    if missing:
        raise LoadError(f"checkpoint is missing {len(missing)} keys: {short(missing)} (incomplete or not an SVD "
                        f"checkpoint)")
    if unexpected:
        raise LoadError(f"checkpoint has {len(unexpected)} unexpected keys: {short(unexpected)} "
                        f"(a different model or config; pass the matching config)")
    return plan, skipped

# -----------------------------------------------------------------------------
# reading


class _Source:
    """The tensors of checkpoint files under one key space (tag/key; tag '' adds plain keys): .shapes {key: shape}
    up front, get(key) reads one tensor (lazily with safe_open, or from a weights_only torch.load dict)."""

    def __init__(self):
        self.files, self.shapes = {}, {}     # tag -> safe_open handle or dict; key -> shape

    def open(self, tag, path):
        """Add the tensors of `path` -> its safetensors metadata ({} if none)."""
        pre = tag + "/" if tag else ""
        if checkpoint_kind(path) == "safetensors":
            try:
                f = safe_open(path, framework="pt", device="cpu")
            except Exception as e:
                raise LoadError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                                f"it may be truncated: download it again") from None
            self.shapes.update({pre + k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            f = torch_state_dict(path)
            self.shapes.update({pre + k: tuple(v.shape) for k, v in f.items()})
        self.files[tag] = f
        return {} if isinstance(f, dict) else f.metadata() or {}

    def get(self, key):
        tag, k = key.split("/", 1) if "/" in key else ("", key)
        f = self.files[tag]
        try:
            return f[k] if isinstance(f, dict) else f.get_tensor(k)
        except Exception as e:
            raise LoadError(f"could not read '{key}' ({str(e).splitlines()[0]}); the file may be truncated: "
                            f"download it again") from None


def _diffusers_file(folder, sub, stem, dtype):
    """folder/sub/stem.safetensors or stem.fp16.safetensors (the fp16 file first when loading in half precision)."""
    names = [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    for name in names[::-1] if dtype in (torch.float16, torch.bfloat16) else names:
        if os.path.isfile(os.path.join(folder, sub, name)):
            return os.path.join(folder, sub, name)
    raise LoadError(f"diffusers folder {folder} has no {sub}/{stem}.safetensors (or .fp16.safetensors); "
                    f"download the complete folder")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _official_config(xt, shapes):
    """CONFIGS svd_xt or svd (the same shapes, other sampling defaults); the UNet's conv_in must have their shape."""
    cfg = CONFIGS["svd_xt" if xt else "svd"]
    cin = shapes.get("unet/conv_in.weight", shapes.get("model.diffusion_model.input_blocks.0.0.weight"))
    if cin is not None and tuple(cin) != (cfg.unet.model_channels, cfg.unet.in_channels, 3, 3):
        raise LoadError(f"unrecognised SVD shapes (UNet conv_in {list(cin)}); pass the model config explicitly")
    return cfg


def load(path, config=None, dtype=torch.float32, device="cpu"):
    """An official single file, a diffusers folder, a legacy .ckpt (weights_only) or our bundle -> SVD (eval mode).
    config: an SVDConfig for non-official shapes (e.g. tiny models); otherwise the official shapes are recognised.
    The model carries .load_info = {"layout", "path", "skipped", "metadata"}."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LoadError(f"checkpoint not found: {path}; pass a path to svd.safetensors, a diffusers folder or an SF-V "
                        f"bundle")
    src, metadata = _Source(), {}
    if os.path.isdir(path):
        layout = "diffusers"
        if not os.path.isdir(os.path.join(path, "unet")):
            raise LoadError(f"{path} is a folder but not a diffusers SVD folder (no unet/ inside); pass the file or "
                            f"the folder that holds unet/, vae/ and image_encoder/")
        for tag, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("image_encoder", "model")):
            src.open(tag, _diffusers_file(path, tag, stem, dtype))
        if config is None:
            frames = _read_json(os.path.join(path, "unet", "config.json")).get("num_frames")
            config = _official_config(frames == 25, src.shapes)
        config = replace(config, vae=replace(config.vae, use_quant_conv=True))   # diffusers' vae/ has a quant_conv
    else:
        metadata = src.open("", path)
        layout = "bundle" if metadata.get("format") == BUNDLE_FORMAT else "single"
        if layout == "bundle":
            try:
                raw = json.loads(metadata["config"])
                config = SVDConfig.from_dict(raw)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise LoadError(f"bundle {path} has a damaged config in its metadata ({type(e).__name__}); save or "
                                f"download it again") from None
            if not config.student_levels and (metadata.get("mode") == "sfv" or
                                              ("mode" not in metadata and "sampler" not in raw and config.steps == 1)):
                config = replace(config, sampler="student", student_levels=old_student_levels(config))   # older bundles
            check_bundle_config(path, config)
        else:
            reject_non_svd(path, src.shapes)
            if config is None:
                config = _official_config("xt" in os.path.basename(path).lower(), src.shapes)

    with torch.device("meta"):
        svd = SVD(config)
    ours = {k: tuple(v.shape) for k, v in svd.state_dict().items()}
    if layout == "bundle":                        # our names and shapes: exactly the model's
        check_bundle_tensors(path, ours, src.shapes)
        plan, skipped = {k: ([k], "copy") for k in ours}, {}
    else:
        plan, skipped = match(config, layout, src.shapes)
    state, used = {}, set()
    for name, (srcs, kind) in plan.items():
        t = _combine([src.get(s) for s in srcs], kind, ours[name])
        if used.intersection(srcs):   # diffusers' one VAE encoder fills both vae.encoder and cond_encoder: own copies
            t = t.clone()
        used.update(srcs)
        if tuple(t.shape) != ours[name]:
            raise LoadError(f"shape mismatch for '{srcs[0]}': checkpoint has {list(t.shape)}, model expects "
                            f"{list(ours[name])}")
        state[name] = t.to(device=device, dtype=dtype)   # one source tensor alive at a time
    svd.load_state_dict(state, strict=True, assign=True)
    svd.eval()
    svd.load_info = {"layout": layout, "path": path, "skipped": skipped, "metadata": metadata}
    return svd


def old_student_levels(cfg, levels=4):
    """The trained noise levels of an SF-V bundle saved before bundles recorded them (no sampler field, or the
    field's default "euler" in a bundle whose metadata says mode sfv): train.py's default grid, the `levels`-level
    Karras grid without its smallest level (its --gen-levels 4)."""
    return tuple(karras_sigmas(levels, cfg.sigma_min, cfg.sigma_max, cfg.rho)[:-2].tolist())


def save(svd: SVD, path, extra_metadata=None):
    """Write our bundle atomically: one safetensors file, our parameter names, config JSON in the metadata (plus
    extra_metadata, e.g. the training step). The sampling defaults live in the config."""
    meta = {"format": BUNDLE_FORMAT, "config": json.dumps(svd.cfg.to_dict()),
            **{k: str(v) for k, v in (extra_metadata or {}).items()}}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in svd.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

# -----------------------------------------------------------------------------
# finding a checkpoint: --ckpt > $SFV_CKPT > checkpoints/ > the bundled toy model


def bundle_metadata(path):
    """A safetensors file's metadata (a bundle's format tag, config, training step) without reading tensors; {} if
    none."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def candidates(folder):
    """Usable checkpoints in a folder, best first: SF-V bundles, svd_xt_1_1, svd_xt, svd, then the rest (diffusers
    folders, other files). Partial downloads and temp files are skipped."""
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        p = os.path.join(folder, name)
        if os.path.isdir(p) and os.path.isdir(os.path.join(p, "unet")):
            out.append((3, p))
        elif os.path.isfile(p) and name.endswith((".safetensors", ".ckpt", ".pt", ".pth")) and ".tmp-" not in name:
            bundle = name.endswith(".safetensors") and bundle_metadata(p).get("format") == BUNDLE_FORMAT
            out.append((0 if bundle else {"svd_xt_1_1": 1, "svd_xt": 2, "svd": 2.5}.get(name.rsplit(".", 1)[0], 3), p))
    return [p for _, p in sorted(out, key=lambda r: r[0])]


def find_checkpoint(ckpt=None, env=None, dirs=None, toy=None):
    """ckpt > $SFV_CKPT > candidates(d) for d in dirs (default CKPT_DIRS) > toy (default TOY_CKPT) -> (path, source),
    source: "--ckpt", "$SFV_CKPT", "checkpoints" (found in one of dirs) or "toy"."""
    env = os.environ if env is None else env
    if ckpt:
        return ckpt, "--ckpt"
    if env.get(CKPT_ENV):
        if not os.path.exists(env[CKPT_ENV]):
            raise LoadError(f"${CKPT_ENV} points to a missing checkpoint: {env[CKPT_ENV]}; fix or unset it")
        return env[CKPT_ENV], "$" + CKPT_ENV
    for d in CKPT_DIRS if dirs is None else dirs:
        found = candidates(d)
        if found:
            return found[0], "checkpoints"
    toy = TOY_CKPT if toy is None else toy
    if os.path.isfile(toy):
        return toy, "toy"
    raise LoadError(f"no weights found (--ckpt, ${CKPT_ENV}, checkpoints/) and the toy model {toy} is missing; "
                    f"pass --ckpt PATH or run: python sample.py --download svd_xt")

# -----------------------------------------------------------------------------
# explicit download (never implicit): HTTP with resume, size and sha256 checks


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _request_error(e, url, fix):
    """The LoadError of a failed request: an HTTP status (401/403: the gated licence) or the network (then `fix`)."""
    if not isinstance(e, urllib.error.HTTPError):
        return LoadError(f"network error for {url}: {getattr(e, 'reason', e)}; {fix}")
    if e.code in (401, 403):
        return LoadError(f"access denied (HTTP {e.code}) for {url}: the SVD weights are gated: accept the licence on "
                         f"the model page and set HF_TOKEN=<your token>")
    return LoadError(f"download failed (HTTP {e.code} {e.reason}) for {url}; check the name or try again later")


def download(url, dest, token=None, chunk_size=1 << 20, progress=True):
    """Fetch url to dest, resuming dest + '.part' (HTTP Range); checks the size (Content-Length / X-Linked-Size) and
    the sha256 (an ETag / X-Linked-Etag that is one). The token goes to the first host only, not to a redirect."""
    from tqdm import tqdm

    def request(method, extra=None):
        r = urllib.request.Request(url, method=method, headers={"User-Agent": "sfv-sample", **(extra or {})})
        if token:
            r.add_unredirected_header("Authorization", f"Bearer {token}")
        return r

    try:   # metadata from the first hop (the Hub answers a HEAD with a redirect carrying X-Linked-Size/-Etag)
        head = urllib.request.build_opener(_NoRedirect).open(request("HEAD"), timeout=60).headers
    except (urllib.error.URLError, OSError) as e:
        if not (isinstance(e, urllib.error.HTTPError) and 300 <= e.code < 400):
            raise _request_error(e, url, "check the connection or download the file yourself into "
                                         "checkpoints/") from None
        head = e.headers
    total = head.get("X-Linked-Size") or (head.get("Content-Length") if head.get("Location") is None else None)
    total = int(total) if total else None
    etags = [(head.get(k) or "").strip() for k in ("X-Linked-Etag", "ETag")]
    sha = next((m.group(1).lower() for m in map(SHA256_ETAG.fullmatch, etags) if m), None)

    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    start = os.path.getsize(part) if os.path.exists(part) else 0
    if total is not None and start > total:
        os.remove(part)
        start = 0
    if total is None or start < total:
        try:
            resp = urllib.request.urlopen(request("GET", {"Range": f"bytes={start}-"} if start else {}), timeout=60)
        except (urllib.error.URLError, OSError) as e:
            if not (isinstance(e, urllib.error.HTTPError) and e.code == 416):
                raise _request_error(e, url, "run the same command to resume") from None
            os.remove(part)                         # our partial file does not fit the remote one: start over
            return download(url, dest, token, chunk_size, progress)
        if resp.status != 206:                      # the server ignored the range: start from zero
            start = 0
        if total is None and resp.headers.get("Content-Length"):
            total = start + int(resp.headers["Content-Length"])
        with resp, open(part, "ab" if start else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=os.path.basename(dest),
                     disable=not progress) as bar:
            try:
                for buf in iter(lambda: resp.read(chunk_size), b""):
                    f.write(buf)
                    bar.update(len(buf))
            except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                raise LoadError(f"download interrupted ({type(e).__name__}: {e}); run the same command again to "
                                f"resume") from None
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise LoadError(f"download incomplete: {size} of {total} bytes in {part}; run the same command again to resume")
    if sha is not None:
        with open(part, "rb") as f:
            got = hashlib.file_digest(f, "sha256").hexdigest()
        if got != sha:
            os.remove(part)
            raise LoadError(f"sha256 mismatch for {dest} (expected {sha}, got {got}); the corrupt file was "
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
