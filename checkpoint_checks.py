"""
The checks that guard reading a weights file (load_svd.load): what a file holds, from its first bytes; a legacy
torch file read only with torch.load(weights_only=True), naming the Python objects a refused pickle would import;
a file that is not SVD's (e.g. a Stable Diffusion image model); an SF-V bundle's config values, and its tensors
against its config. Every failure is a LoadError, a cli.UserError: one line, what is wrong and how to fix it.
"""
import pickle
import pickletools
import re
import warnings
import zipfile

import torch

from cli import UserError


class LoadError(UserError, ValueError):
    """A checkpoint that cannot be found, downloaded or loaded."""


def short(keys, n=8):
    """The first n of the sorted keys, for a message: 'a, b, ... (+k more)'."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")

# -----------------------------------------------------------------------------
# the file


def file_kind(path):
    """What a file holds, from its first bytes: "safetensors" (an 8-byte header length, then the JSON header), "zip"
    (torch.save), "pickle" (a legacy torch.save or a raw pickle, protocol >= 2) or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror}; check the file permissions") from None
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "safetensors" if len(head) == 9 and head[8:9] == b"{" else None


def what_file(path):
    """'a text file' or 'an unknown binary format', for the message of a file that is not a checkpoint."""
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        head.decode("utf-8")
        return "a text file" if head else "an empty file"
    except UnicodeDecodeError as e:
        return "a text file" if e.start > len(head) - 4 else "an unknown binary format"


def checkpoint_kind(path):
    """"safetensors" (by its name or its first bytes) or "torch" (a torch.save zip or a pickle); LoadError for any
    other file, saying what it looks like."""
    kind = file_kind(path)
    if kind is None and not path.endswith(".safetensors"):
        raise LoadError(f"{path} is not a checkpoint ({what_file(path)}, neither safetensors nor a PyTorch "
                        f"file); pass svd.safetensors, a diffusers folder or an SF-V bundle")
    return "safetensors" if path.endswith(".safetensors") or kind == "safetensors" else "torch"


def pickle_globals(path):
    """Globals (module.name) a legacy (non-zip) pickle imports, read with pickletools (nothing runs); [] if
    unparsable."""
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


def torch_load(path):
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
            names = [m.group(1)] if m else ([] if is_zip else pickle_globals(path))
            what = (f"it imports Python objects ({', '.join(dict.fromkeys(names))}) that would run when unpickled"
                    if names else "it holds pickled Python objects, not only tensors")
            raise LoadError(f"refusing to load {path}: {what}; only plain tensor checkpoints are loaded "
                            f"(torch.load weights_only=True): convert a checkpoint you trust to .safetensors") from None
        first = msg.strip().splitlines()[0][:120] if msg.strip() else ""
        raise LoadError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}); it may be "
                        f"truncated or not a checkpoint: download it again or convert it to .safetensors") from None


def torch_state_dict(path):
    """The tensors of a torch file's state dict (its "state_dict" entry, if it has one) -> {key: tensor}."""
    sd = torch_load(path)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise LoadError(f"{path} does not contain a state dict; convert it to .safetensors")
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}

# -----------------------------------------------------------------------------
# its contents


def reject_non_svd(path, shapes):
    """A single file's {key: shape} must hold SVD's UNet: sgm keys with temporal layers."""
    unet = [k for k in shapes if k.startswith("model.diffusion_model.")]
    if not unet:
        raise LoadError(f"{path} is not an SVD checkpoint: none of its {len(shapes)} keys (e.g. "
                        f"'{next(iter(shapes), '')}') is an SVD UNet key (model.diffusion_model.*); "
                        f"use svd.safetensors / svd_xt.safetensors or a diffusers SVD folder")
    if not any(".time_stack." in k for k in unet):
        cin = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
        raise LoadError(f"{path} is not an SVD checkpoint: it looks like a Stable Diffusion image model (UNet without "
                        f"temporal layers, conv_in {list(cin) if cin else '?'}); use the SVD image-to-video weights")


def config_problem(cfg):
    """What is wrong with a config's sampling defaults and sampler fields (which sample.py uses unchecked), or None."""
    lv = cfg.student_levels
    for name, low in (("num_frames", 1), ("steps", 1), ("height", 1), ("width", 1), ("fps_id", 0),
                      ("motion_bucket_id", 0), ("cond_aug", 0), ("min_cfg", -100), ("max_cfg", -100)):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and low <= v < float("inf")):
            return f"{name} {v!r}: must be a number >= {low}"
    if cfg.sampler not in ("euler", "student"):
        return f"sampler {cfg.sampler!r} is neither 'euler' nor 'student'"
    if not (0 < cfg.sigma_min < cfg.sigma_max < float("inf") and cfg.rho > 0):
        return f"sigma_min {cfg.sigma_min:g}, sigma_max {cfg.sigma_max:g}, rho {cfg.rho:g}: need 0 < min < max, rho > 0"
    if cfg.sampler == "student" and not (lv and all(0 < b < a for a, b in zip((float("inf"),) + lv, lv))
                                         and lv[0] < float("inf")):
        return f"student_levels {list(lv)}: need positive noise levels, descending"
    if cfg.sampler == "student" and not 1 <= cfg.steps <= len(lv):
        return f"steps {cfg.steps}: a student takes 1 to {len(lv)} steps (one per trained level)"
    return None


def check_bundle_config(path, cfg):
    """A bundle's config (config_problem): LoadError if it has a bad value."""
    bad = config_problem(cfg)
    if bad:
        raise LoadError(f"bundle {path} has a bad value in its config ({bad}); save or download it again")


def check_bundle_tensors(path, ours, shapes):
    """A bundle holds exactly the tensors of its config, ours {name: shape}, at their shapes; shapes: the file's."""
    missing, extra = sorted(set(ours) - set(shapes)), sorted(set(shapes) - set(ours))
    if missing or extra:
        raise LoadError(_bundle_mismatch(path, missing, extra, ours, shapes))
    bad = next((k for k in ours if tuple(shapes[k]) != ours[k]), None)
    if bad is not None:
        raise LoadError(f"bundle {path}: shape mismatch for '{bad}': checkpoint has {list(shapes[bad])}, model "
                        f"expects {list(ours[bad])} (from the bundle's config); the file was edited or is damaged: "
                        f"save or download it again")


def _bundle_mismatch(path, missing, extra, ours, shapes):
    """The message of a bundle whose tensor names are not its config's (a renamed key is named as such)."""
    fix = "use the file as train.py wrote it, or save or download it again"
    if len(missing) == len(extra) == 1 and ours[missing[0]] == tuple(shapes[extra[0]]):
        return (f"bundle {path} has a tensor '{extra[0]}' where its config expects '{missing[0]}' (the same shape "
                f"{list(ours[missing[0]])}: renamed?); rename it back to '{missing[0]}', or {fix}")
    what = ([f"lacks {len(missing)} tensors of its config ({short(missing)})"] if missing else []) + \
           ([f"has {len(extra)} tensors its config does not define ({short(extra)})"] if extra else [])
    return f"bundle {path} does not match its config: it {' and '.join(what)}; {fix}"
