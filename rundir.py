"""What a run writes and reads back: atomic files, progress, the run directory, checkpoints,
exact resume, random states and log.jsonl. train.py runs the loop; this file keeps its record.

The run directory ``<run.out_dir>/<run.name>/`` (rank 0 writes, the other ranks only read)
-----------------------------------------------------------------------------------------
* ``config.yaml``: the resolved config (``RunLog``).
* ``log.jsonl`` (``RunLog``): first one ``{"kind": "run", "step": 0, "device", "world_size",
  "precision": devices.precision_report}`` line (the autocast dtype each phase resolved to); one
  ``{"kind": "train", "step", "epoch", "lr", <loss_*> unscaled, <loss_*>_scaled (times its
  weight), "total", <stat_*>, "grad_norm", "ms_per_step", "images_per_s", "eta_s"}`` line per
  ``train.log_every`` steps, averages over the steps since the last line (losses are means over
  the ranks, the rest rank 0's); one ``{"kind": "eval", "step", AP50_novel, ..., "eval_s"}`` line
  per evaluation. ``ms_per_step``, ``images_per_s``, ``eta_s``, ``eval_s`` are measurements; every other file and
  value is the same for the same config and seed (CPU, same thread count).
* ``ckpt.pth`` (``save_checkpoint``): ``{"model": unwrapped state_dict, "optimizer", "scheduler",
  "scaler" (float16 AMP only), "step", "world_size", "config": config_to_dict(cfg), "metrics":
  last metrics or None, "rng": [per-rank {"python", "numpy", "torch", "cuda"}], "rank_buffers":
  [per-rank model buffers] under DDP (each rank's BatchNorm statistics, queues and EMA bank), else
  None}``: tensors and plain Python types only, so it loads with ``torch.load(weights_only=True)``
  and opening a checkpoint runs no code. The layout is nanoGPT's checkpoint dict, plus the RNG.
* ``metrics.json`` and ``loss_curves.png``: train.py's ``write_results`` (evaluate.py's metrics).

Every file is written atomically (``write_atomic``: a kill never leaves half a file); log.jsonl is
appended, and a torn last line is dropped on resume.

Resume (``train.resume``, default on): a run directory with ``ckpt.pth`` (one file, always the
latest checkpoint) continues at its step with the same weights, buffers, LR, optimizer moments,
RNG states, data order (same sampler epoch; the batches already consumed in that epoch are
skipped) and augmentation (seeded per sample), for any ``data.num_workers``: a run killed at any
point and started again with the same command ends with the same weights and ``metrics.json`` as
one never interrupted (tests/test_reliability.py). Only the ``RESUMABLE_KEYS`` may differ from the
checkpoint's config; anything else is an error listing the keys.

Progress (``progress_bar``): tqdm on a terminal, whole lines at most every
``PROGRESS_INTERVAL_S`` seconds in a log file or CI, nothing off rank 0.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import config


# ----------------------------------------------------------------------------------------------
# Files: atomic writes and one-line errors
# ----------------------------------------------------------------------------------------------

def write_atomic(path: str | Path, write) -> None:
    """``write(tmp)`` into a temporary file, then rename it to ``path``.

    Readers (and a kill at any moment) see the old file or the new one, never half of one:
    os.replace is atomic on POSIX within a file system. The temporary file has the name of
    ``path``, in a hidden folder ``.<host>.<pid>.tmp/`` beside it (per process, so shards never
    collide, on one machine or several sharing a disk): formats that record the file's name
    (torch.save names its archive folder after it) then give the same bytes on every run. Folders are created when missing; the temporary file is removed
    when ``write`` fails. Used for every output: annotations, images, the teacher, knowledge files,
    checkpoints, logs' configs, metrics and detections.
    """
    path = Path(path)
    tmp_dir = path.parent / f".{socket.gethostname()}.{os.getpid()}.tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / path.name
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        with contextlib.suppress(OSError):  # empty unless this process is writing another file
            tmp_dir.rmdir()

def error_line(e: BaseException) -> str:
    """The message of ``e`` for a CLI's one-line error. An error raised inside a DataLoader worker
    reaches the main process re-raised with the worker's whole traceback in its message; of that
    the user needs the last line, the original error."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]  # "data.DataError: <message>"
    return text


# ----------------------------------------------------------------------------------------------
# Progress of long steps (the world, the knowledge, evaluation): ``progress_bar`` returns a tqdm
# to use exactly like one (iterate it, ``update``, ``set_postfix``, ``close``):
# * on a terminal (stderr is a TTY): tqdm itself, unchanged;
# * otherwise: ``LineProgress``, the same counters as whole lines on stderr ("desc: 40%| 240/600
#   [01:10<01:45, 3.4it/s, loss=0.71]"), at most every ``PROGRESS_INTERVAL_S`` seconds plus the
#   first and the last, because tqdm's carriage-return redraws become one unreadable line in a
#   log file or CI (tqdm's own ``disable=None`` drops the progress entirely instead, and a CI log
#   of a 15-minute step then shows nothing for 15 minutes);
# * ``master=False``: disabled; ``master=None`` (the default) means "rank 0 or not distributed",
#   read from torchrun's ``RANK`` variable, so every process of a torchrun job can call it.
# ----------------------------------------------------------------------------------------------

PROGRESS_INTERVAL_S = 30.0  # a line every 30 s: a 15-minute step writes ~30 lines; chosen here

class LineProgress(tqdm):
    """tqdm that prints a refresh as its own line, at most every ``mininterval`` seconds (tqdm's
    own throttle does not cover ``set_postfix``), plus the first and the last count."""

    printed_n, printed_t = None, 0.0  # count and time of the last line printed

    def display(self, msg=None, pos=None, force: bool = False):
        if msg == "":  # tqdm clearing a bar before close: nothing to clear in a log
            return False
        now = time.monotonic()
        if not force and self.printed_n is not None and now - self.printed_t < self.mininterval:
            return True
        self.fp.write((msg or self.__str__()) + "\n")
        self.fp.flush()
        self.printed_n, self.printed_t = self.n, now
        return True

    def close(self):
        if not self.disable and self.printed_n != self.n:
            self.display(force=True)  # the final count, once
        self.leave = False  # tqdm's own closing would add a blank line (leave) or a carriage return
        super().close()

def progress_bar(iterable=None, total=None, desc: str | None = None, master: bool | None = None,
                 **kwargs) -> tqdm:
    """A progress bar for a step longer than a few seconds (the section comment above)."""
    if master is None:
        master = os.environ.get("RANK", "0") == "0"
    if not master:
        return tqdm(iterable, total=total, desc=desc, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, **kwargs)
    kwargs.setdefault("mininterval", PROGRESS_INTERVAL_S)
    kwargs.pop("dynamic_ncols", None)  # no terminal to size to
    kwargs["ascii"] = True  # "#" bars: a log file may not be read as UTF-8
    return LineProgress(iterable, total=total, desc=desc, **kwargs)


# ----------------------------------------------------------------------------------------------
# The run directory, checkpoints and exact resume (the contract above)
# ----------------------------------------------------------------------------------------------

# Config keys a resumed run may change: where it runs, how it logs and evaluates, how long it
# trains. (run.seed is not among them: it sets the data order.)
RESUMABLE_KEYS = ("run.name", "run.out_dir", "run.device", "eval.", "data.num_workers",
                  "train.max_steps", "train.milestones", "train.log_every", "train.eval_every",
                  "train.ckpt_every", "train.resume")


def check_run_dir(run_dir: Path) -> None:
    """Fail at the start, not after hours of preparation, when the run directory cannot be
    written; remove the temporary files a killed run left there (write_atomic's)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):
            shutil.rmtree(stale)
        write_atomic(run_dir / ".write_test", lambda tmp: tmp.write_text("ok"))
        (run_dir / ".write_test").unlink()
    except OSError as e:
        raise config.ConfigError(f"run directory '{run_dir}' cannot be written ({e}); set "
                                 f"run.out_dir to a writable folder (the run goes into "
                                 f"<run.out_dir>/<run.name>)") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict, current: dict, ckpt_path) -> None:
    """Raise ConfigError listing every key (other than RESUMABLE_KEYS) that differs."""
    a, b = _flatten(saved), _flatten(current)
    differing = sorted(k for k in set(a) | set(b)
                       if a.get(k, "<missing>") != b.get(k, "<missing>")
                       and not k.startswith(RESUMABLE_KEYS))
    if differing:
        lines = [f"  {k}: checkpoint {a.get(k, '<missing>')!r} != now {b.get(k, '<missing>')!r}"
                 for k in differing]
        raise config.ConfigError(
            f"cannot resume from '{ckpt_path}': the config differs in keys that change the "
            "training itself:\n" + "\n".join(lines) + "\nUse another run.name for a new run, "
            "or --set train.resume=false to start this one over.")


def save_checkpoint(path: Path, raw_model, optimizer, scheduler, scaler, step: int,
                    world_size: int, cfg: config.Config, metrics: dict | None, rng: list,
                    rank_buffers: list | None = None) -> None:
    """The checkpoint of the contract above, written atomically (write_atomic): a crash
    never leaves a half-written ckpt.pth. A failed write (a full disk: torch.save raises a
    RuntimeError, plain writes an OSError) becomes an OSError saying the previous file is intact."""
    state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler.is_enabled() else None,
             "step": step, "world_size": world_size, "config": config.config_to_dict(cfg),
             "metrics": metrics, "rng": rng, "rank_buffers": rank_buffers}
    try:
        write_atomic(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:
        free_mb = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(f"cannot write checkpoint '{path}' at step {step} ({e}; {free_mb:.0f} MB "
                      f"free there). The previous checkpoint is intact: free disk space (or set "
                      f"run.out_dir to another disk) and run the same command again, it resumes "
                      f"from there") from None


def load_checkpoint(path: Path, cfg: config.Config, raw_model, optimizer, scheduler, scaler,
                    rank: int, world_size: int) -> tuple[int, dict | None]:
    """Restore everything needed for the next step to be the one an uninterrupted run takes;
    returns (step, metrics of the last evaluation or None)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors, plain types
        saved_config = ckpt["config"]
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise config.ConfigError(
            f"cannot resume from '{path}': not a readable train.py checkpoint ({type(e).__name__}: "
            f"{e}). Delete it (or --set train.resume=false) to start this run over, or use "
            f"another run.name") from None
    check_resume_config(saved_config, config.config_to_dict(cfg), path)
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world_size:
        set_rng_state(ckpt["rng"][rank])
        if ckpt.get("rank_buffers"):  # DDP: this rank's own BatchNorm statistics, queues, bank
            raw_model.load_state_dict(ckpt["rank_buffers"][rank], strict=False)
    elif rank == 0:
        print(f"train.py: checkpoint was written by {len(ckpt['rng'])} processes, now "
              f"{world_size}: data order and random streams will not continue exactly")
    if rank == 0:
        print(f"train.py: resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt.get("metrics")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's random states (python, numpy, torch CPU, and CUDA when present), as tensors
    and plain types only, so that the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _as_tuples(x):
    """random.setstate wants the nested tuples random.getstate gave (a checkpoint may hold lists)."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rank_states(ddp: bool, world_size: int, raw_model) -> tuple[list[dict], list | None]:
    """(every rank's random states, every rank's model buffers or None with one process),
    gathered (a collective: all ranks must call it). Under DDP each process keeps its own buffers
    (broadcast_buffers=False: BatchNorm statistics, the distillation queues and EMA bank), and
    "model" holds rank 0's only, so the checkpoint keeps all of them for an exact resume."""
    if not ddp:
        return [rng_state()], None
    names = {n for n, _ in raw_model.named_buffers()}
    buffers = {k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items() if k in names}
    states = [None] * world_size
    dist.all_gather_object(states, (rng_state(), buffers))
    return [s[0] for s in states], [s[1] for s in states]


def _parse(line: str) -> dict | None:
    """One log.jsonl record, or None for a blank line or the torn last line of a killed run."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class RunLog:
    """The run directory's ``config.yaml`` and ``log.jsonl`` (rank 0 only; on other ranks a
    RunLog writes nothing).

    ``add(step, epoch, lr, values)`` collects one step's values; every ``log_every`` steps (and at
    ``max_steps``) their window averages go out as one train line (and the tqdm bar moves), with ms per step measured
    over the window minus ``pause()``d time (evaluation, checkpoints). ``write(record)`` writes any
    other line (evaluations). Opened at a resumed ``step``, the lines a dead run logged after its last checkpoint
    (steps that will now be redone) and a line it was killed while writing are dropped first.
    """

    def __init__(self, run_dir: Path, step: int, master: bool, cfg: config.Config, world_size: int):
        self.file = None
        self.log_every, self.max_steps = cfg.train.log_every, cfg.train.max_steps
        self.images_per_step = cfg.train.batch_size * world_size
        self.window, self.t0 = defaultdict(list), time.time()
        self.bar = progress_bar(total=self.max_steps, initial=step, master=master, desc="train",
                                     dynamic_ncols=True)  # plain lines when stderr is a log file
        if not master:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # the resolved config, beside the log
        write_atomic(run_dir / "config.yaml", lambda tmp: config.dump_config(cfg, tmp))
        path = run_dir / "log.jsonl"
        if step > 0 and path.is_file():
            lines = path.read_text().splitlines()
            kept = [l for l, r in zip(lines, map(_parse, lines)) if r is not None and r["step"] <= step]
            write_atomic(path, lambda tmp: Path(tmp).write_text("".join(l + "\n" for l in kept)))
        self.file = open(path, "a" if step > 0 else "w")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def add(self, step: int, epoch: int, lr: float, values: dict, device: torch.device) -> None:
        for k, v in values.items():
            self.window[k].append(v)
        self.bar.update(1)
        self.bar.set_postfix(total=f"{values['total']:.3f}", lr=f"{lr:.2e}")
        if step % self.log_every and step != self.max_steps:
            return
        dt = (time.time() - self.t0) / len(self.window["total"])
        record = {"kind": "train", "step": step, "epoch": epoch, "lr": lr}
        record.update({k: sum(v) / len(v) for k, v in sorted(self.window.items())})
        record.update({"ms_per_step": 1000 * dt, "images_per_s": self.images_per_step / dt,
                       "eta_s": dt * (self.max_steps - step)})
        if device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        self.write(record)
        self.window, self.t0 = defaultdict(list), time.time()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) does not count as step time."""
        start = time.time()
        yield
        self.t0 += time.time() - start

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
