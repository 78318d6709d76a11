"""
What the command-line scripts share (sample.py, train.py, toy.py, evaluate.py, bench.py): the one-line error for
expected failures (UserError), for running out of memory (oom_text) and for Ctrl-C (interrupted), atomic file writes
(and the temp files a killed writer leaves), folder checks, the choice of device, and a flag table's parser and
bounds (train.py's FLAGS).
"""
import argparse
import errno
import json
import math
import operator
import os
import re
import sys
import tempfile

import torch

# -----------------------------------------------------------------------------
# errors: one line, "error: <what is wrong>; <how to fix it>", never a traceback


class UserError(Exception):
    """An expected failure caused by the input (a file, a flag, the network), not a bug. The message is one line:
    "<what is wrong>; <how to fix it>". The CLIs print it as `error: <message>` and exit with status 2."""


def oom_text(e):
    """The allocator's message of an out-of-memory failure, one line (CUDA's OutOfMemoryError, the CPU allocator's
    RuntimeError "can't allocate memory", Python's MemoryError); None if `e` is not one."""
    text = str(e).strip()
    if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or isinstance(e, RuntimeError) and
            ("out of memory" in text or "can't allocate memory" in text)):
        return None
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", text.splitlines()[0] if text else "")
    text = re.sub(r"\.?\s*Error code \d+ \(.*\)$", "", text)     # the CPU allocator's errno, said already
    return text[:100] or type(e).__name__


def interrupted(where):
    """Ctrl-C (KeyboardInterrupt) in a CLI's main(): print `interrupted; <where>` on stderr (where the last
    checkpoint or output is, or that nothing was written) and return the shell's exit status for SIGINT, 130.
    Usage: `except KeyboardInterrupt: return cli.interrupted("nothing was written")`."""
    print(f"interrupted; {where}", file=sys.stderr)
    return 130

# -----------------------------------------------------------------------------
# files and folders: atomic writes (a temp file in the same folder, then os.replace: never a half-written file)

TMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")                         # .<name>.tmp-<pid>


def atomic_write(path, write_fn):
    """write_fn(tmp_path) writes the content; it is moved to `path` only when complete. The temp file (same folder,
    `.<name>.tmp-<pid>`) is removed on any failure. Returns path."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_all(writes):
    """Several files that belong together (a video and its frames): writes [(path, write_fn(tmp_path))], each to
    its temp file first; only when every one is complete are they moved to their paths, so a failure (a full disk,
    an unwritable folder) leaves none of them. On failure the temps are removed and the error names the path
    (OSError.filename) whose write failed. Returns the paths."""
    for path, _ in writes:                                   # a folder in the way would fail the moves half-way
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    tmps = []
    try:
        for path, write_fn in writes:
            path = os.fspath(path)
            tmps.append(os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}"))
            try:
                write_fn(tmps[-1])
            except OSError as e:
                e.filename = path                                    # the output, not its temp name
                raise
        for (path, _), tmp in zip(writes, tmps):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return [os.fspath(p) for p, _ in writes]


def write_text(path, text):
    """Atomic text file (atomic_write)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj, indent=None):
    """Atomic JSON file (atomic_write)."""
    write_text(path, json.dumps(obj, indent=indent))


def remove_stale_temps(folder):
    """Delete atomic_write's temp files in `folder` left by processes that no longer run (killed mid-write).
    Only names matching `.<name>.tmp-<pid>` are touched. Returns the removed paths."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = TMP_RE.match(name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue                                                     # its writer is still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        os.remove(os.path.join(folder, name))
        removed.append(os.path.join(folder, name))
    return removed


def check_folder(flag, path, writable=False):
    """A folder flag: `path` is a folder or can be created as one (its nearest existing parent is a folder); with
    `writable`, a file can be created in it (tried, then undone: the folders made for the try are removed again).
    -> the folders that are missing, deepest first. UserError otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; pass a folder (it is created if missing)")
    missing, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UserError(f"cannot create {flag} {path}: {p} is a file; pass another {flag}")
    if writable:
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            raise UserError(f"cannot write to {flag} {path} ({e.strerror or e}); pass a writable folder") from None
        finally:
            remove_folders(missing)
    return missing


def remove_folders(folders):
    """Remove the folders that check_folder found missing (deepest first) if they are still empty."""
    for f in folders:
        try:
            os.rmdir(f)
        except OSError:
            pass

# -----------------------------------------------------------------------------
# devices


def pick_device(name="auto"):
    """--device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps -> torch.device; UserError if unusable here."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"bad --device {name!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                        f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not mps:
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu (or auto)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: unsupported device type {dev.type}; use auto, cpu, cuda, cuda:N or mps")
    return dev

# -----------------------------------------------------------------------------
# a flag table: rows (name, default, bounds, help), each --name-with-dashes. bounds: a text flag's choices (a tuple),
# or a number's limits, each "op integer (note)" with op >=, >, <=, < (the error message quotes the note)

BOUND = re.compile(r"([<>]=?) (\d+)(?: \(([^)]*)\))?")            # "op value (note)"
OPS = {">=": (operator.ge, "at least"), ">": (operator.gt, "greater than"), "<=": (operator.le, "at most"),
       "<": (operator.lt, "below")}


def flag_parser(flags, description):
    """An argparse parser of the table `flags`: booleans as --x / --no-x, choices from a tuple of bounds, the
    default shown in --help."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, default, bounds, help_ in flags:
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(flag, default=default, type=type(default), help=help_,
                           choices=bounds if isinstance(bounds, tuple) else None)
    return p


def check_bounds(flags, args):
    """UserError "bad --flag v: must be ..." for a non-finite float flag, then for a value outside its row's bounds."""
    for name, *_ in flags:
        v = getattr(args, name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"bad --{name.replace('_', '-')} {v}: must be a finite number")
    for name, _, bounds, _ in flags:
        for op, limit, note in BOUND.findall(bounds) if isinstance(bounds, str) else ():
            v = getattr(args, name)
            if not OPS[op][0](v, int(limit)):
                raise UserError(f"bad --{name.replace('_', '-')} {v}: must be {OPS[op][1]} {limit}"
                                + (f" ({note})" if note else ""))
