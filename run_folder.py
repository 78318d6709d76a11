"""
train.py's run folder (--out): what it holds, the lock that keeps a second run out of it, the --resume state and
which changed flags a resume applies or refuses, and the probe index of --data's videos kept there.
"""
import json
import os
import pickle
import socket

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
from cli import UserError, write_json, write_text
from data import file_stamp, probe_videos, unusable_videos, video_paths
from distributed import barrier

# -----------------------------------------------------------------------------
# the folder and its lock


OUT_FILES = ("model.safetensors", "train_state.pt", "log.jsonl", "video_index.json", "train.lock")  # and samples/


def prepare_out(args, rank, world):
    """Check that --out (and --cache, unless it is complete) can be written and holds no folder where a file goes
    (or the reverse), create them, lock --out (lock_out), remove stale temp files of interrupted writes
    (cli.remove_stale_temps: our own `.<name>.tmp-<pid>` files only). Rank 0 alone: the writability probe creates
    and removes folders, which another rank's checks would see half-done; the others wait for it (if its checks
    fail, torchrun stops them). -> (the folders created now, removed again if the start fails; the lock file or None)"""
    if rank > 0:
        barrier(world)
        return [], None
    created = cli.check_folder("--out", args.out)
    created = (cli.check_folder("--cache", args.cache) if args.cache else []) + created   # cache first: in out?
    for name in OUT_FILES + ("samples",):                                 # what train.py writes into --out
        path, want = os.path.join(args.out, name), "folder" if name == "samples" else "file"
        if os.path.exists(path) and os.path.isdir(path) != (want == "folder"):
            raise UserError(f"--out {args.out} holds a {'file' if want == 'folder' else 'folder'} named {name} where "
                            f"train.py writes a {want}; remove it or pass another --out")
    to_write = [("--out", args.out)] + ([("--cache", args.cache)] if args.cache and not os.path.exists(
        os.path.join(args.cache, "index.json")) else [])
    try:
        for flag, folder in to_write:
            cli.check_folder(flag, folder, writable=True)                # writable, not just present
            os.makedirs(folder, exist_ok=True)
        lock = lock_out(args.out)
    except UserError:
        cli.remove_folders(created)
        raise
    for d in (args.out, os.path.join(args.out, "samples"), args.cache):
        for path in cli.remove_stale_temps(d) if d else []:
            print(f"removed {path} (left by an interrupted write)")
    barrier(world)
    return created, lock


def lock_out(out):
    """<out>/train.lock holds "<pid> <host>" of the run that uses --out. A lock whose process no longer runs (a killed
    run) is taken over; one of a live run, or of another host (which cannot be checked), is refused. -> its path"""
    path = os.path.join(out, "train.lock")
    while True:
        try:
            with open(path, "x") as f:                         # exclusive create: of two runs starting, one wins
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            return path
        except FileExistsError:
            holder = lock_holder(path)
            if holder:
                raise UserError(f"--out {out} is in use by train.py pid {holder[0]} on {holder[1]} ({path}); wait for "
                                f"it to end or pass another --out (if no such run is left, delete {path})") from None
            unlock(path)                                                    # a killed run's: taken over


def lock_holder(path):
    """(pid, host) of the run holding the lock file at `path`, or None if it is gone: its process has ended, or is
    this one (an earlier train.main of toy.py), or the file is unreadable (cut by a kill)."""
    try:
        with open(path) as f:
            pid, host = f.read().split()[:2]
        pid = int(pid)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname():
        return pid, host
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except (PermissionError, OverflowError):
        pass                                                   # runs under another user (or an absurd pid: held)
    return pid, host


def unlock(path):
    """Remove a lock file that no live run holds (ours, or a killed run's)."""
    if path and lock_holder(path) is None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# -----------------------------------------------------------------------------
# --resume: the saved state, the flags it must keep, the log after its step


MODEL_ARGS = ("mode", "init", "disc_heads", "head_channels", "cmap_dim", "cond_embed_dim", "disc_tap", "bf16",
              "optimizer", "sm3_variant")          # define the networks or the optimiser state; a resume must keep them
RUN_ARGS = ("resume", "resume_any_args", "max_steps", "out", "device", "workers", "log_every", "log_term_grads",
            "save_every", "sample_every", "num_samples", "sample_steps", "sample_decode_chunk", "dist_timeout",
            "max_memory", "grad_ckpt", "ema_device", "autocast_cache", "fused_step")   # how it runs, not what it learns
STATE_KEYS = {"step", "unet", "ema", "opt_g", "rng_torch", "skipped_run"}


def read_state(args, master):
    """The --resume state: <out>/train_state.pt (torch.load weights_only=True), or None (fresh start, with a note).
    UserError if it is damaged, unsafe, not a training state, or from a run with other model-defining arguments.
    Other changed flags are applied, with a one-line note naming them; another --optimizer (--resume-any-args)
    starts the optimiser state fresh (st["fresh_optimizer"])."""
    path = os.path.join(args.out, "train_state.pt")
    if not os.path.exists(path):
        if args.resume and master:
            print(f"note: --resume: no {path} yet; starting fresh")
        return None
    if not args.resume:
        if master:
            print(f"note: {path} exists but --resume is not given; starting fresh (the state is overwritten at the "
                  f"first save)")
        return None
    fix = "delete it to start fresh, or restore an intact copy"
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UserError(f"cannot resume from {path}: it is damaged ({str(e).strip().splitlines()[0][:100]}); "
                            f"{fix}") from None
        raise UserError(f"refusing to resume from {path}: it holds pickled Python objects, not only tensors (it is "
                        f"read with torch.load weights_only=True); {fix}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
        raise UserError(f"cannot resume from {path}: it is damaged or truncated ({type(e).__name__}: {first}); "
                        f"{fix}") from None
    if not isinstance(st, dict) or not STATE_KEYS <= set(st) or not isinstance(st.get("args", ""), str):
        raise UserError(f"cannot resume from {path}: it is not a train.py training state; {fix}")
    try:
        saved = json.loads(st.get("args") or "{}")
        diff = resume_mismatch(saved, args)
    except (ValueError, AttributeError):
        raise UserError(f"cannot resume from {path}: its saved arguments are not readable; {fix}") from None
    if diff and not args.resume_any_args:
        raise UserError(f"--resume: {diff}; start a new --out, or pass --resume-any-args")
    st["fresh_optimizer"] = saved.get("optimizer", args.optimizer) != args.optimizer
    changed = [f"--{k.replace('_', '-')} {v} (was {saved[k]})" for k, v in vars(args).items()
               if k in saved and k not in RUN_ARGS and saved[k] != v]
    if changed and master:
        print(f"note: --resume with changed settings, applied from step {st['step']} on: {', '.join(changed)}"
              + ("; the optimiser state starts fresh" if st["fresh_optimizer"] else ""))
    return st


def resume_mismatch(saved, args):
    """The first model-defining argument whose saved value (dict `saved`) differs from this run's, as a phrase; None
    if all agree (arguments the saved run did not record are not compared)."""
    for k in MODEL_ARGS:
        if k in saved and saved[k] != getattr(args, k):
            flag = "--" + k.replace("_", "-")
            return f"the saved run has {flag} {saved[k]}, this run {flag} {getattr(args, k)}"
    return None



def load_resume(tr, st, args, master):
    """Load the --resume state into the trainer and drop log lines after its step; without one, a fresh log."""
    log_path = os.path.join(args.out, "log.jsonl")
    if st is None:
        if master and os.path.exists(log_path):
            os.remove(log_path)
        return
    path = os.path.join(args.out, "train_state.pt")
    try:
        tr.load_state_dict(st, optimizer_state=not st["fresh_optimizer"])
    except (KeyError, RuntimeError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
        raise UserError(f"cannot resume from {path} with these arguments ({type(e).__name__}: {first}); pass the "
                        f"saved run's arguments, or start a new --out") from None
    if master and os.path.exists(log_path):                              # drop log lines after the checkpoint
        with open(log_path) as f:
            lines = [l for l in f if logged_step(l) <= tr.step_num]
        write_text(log_path, "".join(lines))
    if master:
        print(f"resuming from {path} at step {tr.step_num}")


def logged_step(line):
    """The step of a log.jsonl line; infinity for a blank or damaged line (e.g. cut by a kill)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")

# -----------------------------------------------------------------------------
# --data's probe index (<out>/video_index.json)


def probe_data(args, rank, world):
    """--data's probe index {path: {n, fps, stamp} | {error, stamp}} (kept in <out>/video_index.json, so resumes skip
    the scan); None for synthetic data. UserError if the folder is missing, holds no videos, or only unreadable ones."""
    if args.data == "synthetic":
        return None
    index_path = os.path.join(args.out, "video_index.json")
    try:
        with open(index_path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    index = probe_videos(args.data, old if isinstance(old, dict) else {}, rank, world)
    skipped = [(p, index[p]["error"]) for p in video_paths(args.data) if "error" in index[p]]
    if len(skipped) == len(video_paths(args.data)):
        raise unusable_videos(args.data, skipped, 0, args.fps)
    return index


def record_unreadable(args, source, found, rank, world):
    """Videos that failed to decode during training ([(path, reason)], this rank's), gathered over ranks, marked as
    errors in the probe index and in <out>/video_index.json (rank 0), so later runs skip them at the scan. -> []"""
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, found)
        found = [v for part in parts for v in part]
    index = getattr(source, "index", None)                              # VideoFolder's; a cache has none
    new = {p: r for p, r in found if index is not None and "error" not in index.get(p, {})}
    if new:
        for p, r in new.items():
            index[p] = {"error": r, **({"stamp": file_stamp(p)} if os.path.exists(p) else {})}
        if rank == 0:
            write_json(os.path.join(args.out, "video_index.json"), index)
            tqdm.write(f"note: recorded {len(new)} video(s) that failed to decode in {args.out}/video_index.json, "
                       f"e.g. {next(iter(new))}; later runs skip them")
    return []
