"""Train an HD-OVD detector: one process per device, DDP under torchrun, evaluation at the end.

    python train.py --config config.yaml              # one process: the GPU if there is one, else CPU
    torchrun --standalone --nproc_per_node=4 train.py --config config.yaml   # 4 GPUs, NCCL
    torchrun --standalone --nproc_per_node=2 train.py --config config.yaml --set run.device=cpu
    python train.py --config config.yaml --set run.name=smoke train.max_steps=20 eval.max_images=16
    python train.py --config config.yaml --print-config   # every config key, resolved; then exit
Any config works the same way (OV-COCO: the paper settings in configs/).

Order (nanoGPT's train.py): config → torchrun env → DDP init (gloo on CPU, NCCL on CUDA) → seed +
rank → missing preparation on rank 0 (``python -m shapes_ov`` for Shapes-OV, then ``python -m
knowledge``) while the other ranks wait at a barrier → data → model → optimizer + schedule →
resume → loop → final evaluation + checkpoint. What the run writes (log.jsonl, ckpt.pth, exact
resume): rundir.py. The model API: ``hdovd.build_hdovd(cfg, class_embeddings)``,
``model(images, targets)`` → dict of unweighted ``loss_*`` (summed with ``hdovd.loss_weights``)
and ``stat_*`` (logged only); evaluation through ``evaluate.evaluate_model``.

The learning rate (``train.lr``) is for the global batch ``batch_size × world_size``: when you
change either, scale it linearly (Goyal et al. 2017, the rule the official configs follow).
Schedule: docs/METHOD.md §8.4 (AdamW/SGD, linear warm-up 500 iters ratio 0.001, ×0.1 at epochs 8
and 11 of 12, grad clip 1.0 for AdaMixer); the warm-up formula is mmcv's ``LrUpdaterHook``.

Deviations
* Steps, not epochs: milestones and warm-up are in optimizer steps (mmdet counts decay in epochs);
  epochs only set the sampler's shuffling seed.
* N processes and one with the same global batch see the same images with the same flips in every
  step, but their losses differ slightly: BatchNorm statistics, the RPN/RoI samplers' random
  streams and the distillation queues are per process (official: SyncBN on GPUs; torch has no
  SyncBN on CPU). tests/test_reliability.py measures the difference.
* No aspect-ratio grouping (mmdet ``GroupSampler``): a batch may mix portrait and landscape images
  and pad to a near-square canvas (up to ~1.6x compute per step on COCO); one plain permutation
  keeps ``batches`` simple (exact resume, the same images for N processes and one). The padding
  changes features near an image's border a little (convolutions read it); AdaMixer's GroupNorm
  over the padded map changes them everywhere (adamixer.py's header says what it does about it).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import config
import devices
import data
import evaluate
import hdovd
import rundir
from knowledge import clip_io, extract
from shapes_ov import world

# torch 2.14 deprecates DDP's broadcast_buffers and, for rank-local buffers (our queues), advises
# keeping it until its replacement exists: no need to say so once per rank.
warnings.filterwarnings("ignore", ".*broadcast_buffers", FutureWarning)


# ----------------------------------------------------------------------------------------------
# Schedule, optimizer, checkpoint helpers (plain functions; the loop in main() uses them).
# ----------------------------------------------------------------------------------------------

def lr_factor(step: int, train_cfg: config.TrainConfig) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): mmcv's linear warm-up, then step decay.

    Warm-up (mmcv LrUpdaterHook, 'linear'): factor = 1 - (1 - step/warmup_steps)(1 - warmup_ratio),
    i.e. ``warmup_ratio`` at step 0 rising linearly to 1 at ``warmup_steps``. Decay: × gamma for
    every milestone ≤ step (mmdet 'step' policy, here in steps instead of epochs).
    """
    decay = train_cfg.gamma ** sum(step >= m for m in train_cfg.milestones)
    if step < train_cfg.warmup_steps:
        k = (1 - step / train_cfg.warmup_steps) * (1 - train_cfg.warmup_ratio)
        return (1 - k) * decay
    return decay


def amp_setting(train_cfg: config.TrainConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """(autocast on?, dtype) of ``train.amp``. "auto": bf16 where the device runs it natively
    (devices.resolve_amp), else fp32. true: ``train.amp_dtype`` on CUDA (bf16 or fp16); on CPU
    bf16 only (CPU fp16 autocast is slow; bf16 ran 1.5x faster than fp32 per step on 2 cores with
    AVX512-BF16, LOG.md)."""
    if train_cfg.amp_dtype not in ("bfloat16", "float16"):
        raise config.ConfigError(f"train.amp_dtype={train_cfg.amp_dtype!r}: use bfloat16 or float16")
    if train_cfg.amp == "auto":
        return devices.resolve_amp("auto", device), torch.bfloat16
    dtype = getattr(torch, train_cfg.amp_dtype)
    return train_cfg.amp and (device.type == "cuda" or dtype == torch.bfloat16), dtype


def may_leave_parameters_unused(cfg: config.Config) -> bool:
    """Whether a training step can leave a trainable parameter without gradient, so that DDP must
    look for such parameters (``find_unused_parameters``: one more autograd traversal per step, and
    a warning in every run where it finds none). A hierarchy switched off leaves its head unused
    (H1's visual head, H3's image head, AdaMixer's text projector); AdaMixer's pseudo-box warm-up
    leaves them unused in its first steps. With every hierarchy on, every parameter gets a
    gradient in every step, with or without pseudo boxes (tests/test_train.py checks both ways)."""
    d = cfg.distill
    adamixer = cfg.model.detector == "adamixer"
    hierarchy_off = not (d.instance and d.class_wise and d.image) or (adamixer and not d.text_space)
    warmup = adamixer and round(cfg.adamixer.pseudo_warmup_fraction * cfg.train.max_steps) > 0
    return hierarchy_off or warmup


def build_optimizer(model: torch.nn.Module, cfg: config.Config) -> torch.optim.Optimizer:
    """AdamW or SGD+momentum over all trainable parameters (optionally without decay on 1-D
    norms/biases, the official Swin-B setting)."""
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if t.no_decay_norm_bias and p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    raise config.ConfigError(f"train.optimizer={t.optimizer!r}: use 'adamw' or 'sgd'")


def run_is_complete(step: int, metrics: dict | None, cfg: config.Config, run_dir: Path,
                    master: bool) -> bool:
    """Whether the checkpoint is trained to ``train.max_steps`` and evaluated there (the same
    command run again). Rank 0 then writes the results a kill just before them left unwritten."""
    if step < cfg.train.max_steps or metrics is None or metrics.get("step") != step:
        return False
    if master:
        print(f"train.py: {run_dir / 'ckpt.pth'} is already trained to step {step} and evaluated")
        if not all((run_dir / f).is_file() for f in ("metrics.json", "loss_curves.png")):
            write_results(run_dir, metrics)
    return True


def run_evaluation(model, val_set, device, cfg: config.Config, step: int, log: rundir.RunLog) -> dict:
    """evaluate.py's metrics of ``model`` at ``step`` (sharded over ranks), logged on rank 0.

    Under DDP every rank first takes rank 0's BatchNorm statistics (mmdet DistEvalHook's
    broadcast_bn_buffer): each rank keeps its own (broadcast_buffers=False), and the shards must
    be scored by one model, the one the checkpoint holds, so that ``python evaluate.py ckpt.pth``
    gives the same numbers."""
    if dist.is_available() and dist.is_initialized():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                dist.broadcast(m.running_mean, 0)
                dist.broadcast(m.running_var, 0)
    start = time.time()
    m, _ = evaluate.evaluate_model(model, val_set, device, cfg.eval.batch_size,
                                   num_workers=cfg.data.num_workers, max_images=cfg.eval.max_images)
    m = {"step": step, **m}
    log.write({"kind": "eval", **m, "eval_s": time.time() - start})  # eval_s: a measurement
    if log.file is not None:
        tqdm.write(evaluate.format_table(m, cfg.data.base_classes, cfg.data.novel_classes))
    return m


def write_results(run_dir: Path, metrics: dict) -> None:
    """Rank 0, at the end: ``metrics.json``, then ``loss_curves.png`` from the closed log.jsonl.

    The metrics are the result; the picture is a view of the log. So a picture that cannot be
    drawn or saved (matplotlib's backend or fonts, a full disk, an unreadable log: OSError,
    RuntimeError, ValueError, OverflowError) is a warning, and the run still ends well. Anything
    else (a TypeError, a KeyError) is a bug in the code and is raised."""
    evaluate.write_metrics(metrics, run_dir / "metrics.json")
    try:
        evaluate.plot_loss_curves(run_dir / "log.jsonl", run_dir / "loss_curves.png")
    except (OSError, RuntimeError, ValueError, OverflowError) as e:
        warnings.warn(f"train.py: loss_curves.png not drawn ({type(e).__name__}: {e}); "
                      f"metrics.json and the checkpoint are complete", RuntimeWarning, stacklevel=2)


def mean_over_ranks(losses: dict, total: torch.Tensor, names: list[str], ddp: bool,
                    world_size: int) -> dict[str, float]:
    """{name: mean over the ranks} of every loss in ``names`` (0 where this batch has none) and
    of ``total``, in one all-reduce (DETR's reduce_dict: N processes log what one process with
    their global batch would). ``names`` must be the same on every rank and hold every loss."""
    if set(losses) - set(names):  # a new loss term needs its config weight
        raise KeyError(f"no loss weight in cfg.loss for {sorted(set(losses) - set(names))}")
    reduced = torch.stack([losses[k].detach() if k in losses else total.new_zeros(())
                           for k in names] + [total.detach()])  # (len(names) + 1,)
    if ddp:
        dist.all_reduce(reduced)
        reduced /= world_size
    return dict(zip(names + ["total"], reduced.tolist()))


def log_values(outputs: dict, mean: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """One step's values for log.jsonl (the contract above): this rank's ``stat_*``, and from
    ``mean`` (mean_over_ranks) each ``loss_*`` unscaled, its ``loss_*_scaled`` and ``total``."""
    values = {k: v.item() for k, v in outputs.items() if not k.startswith("loss_")}
    for k in (k for k in outputs if k.startswith("loss_")):
        values[k], values[f"{k}_scaled"] = mean[k], weights[k] * mean[k]
    values["total"] = mean["total"]
    return values


def to_device(obj, device):
    """Move tensors inside nested dicts/lists (targets, their knowledge dicts) to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def prepare(cfg: config.Config) -> None:
    """Run the missing preparation steps: Shapes-OV and its teacher (shapes_ov/world.py), then the offline
    CLIP knowledge (knowledge/extract.py). Each step skips what is already built."""
    if cfg.data.dataset == "shapes_ov" and not world.world_is_built(cfg):
        print("train.py: Shapes-OV or its teacher is missing, building it (shapes_ov/world.py)")
        world.build_world(cfg)
    if not extract.knowledge_is_built(cfg):
        print("train.py: offline CLIP knowledge is missing, extracting it (knowledge/extract.py)")
        extract.build_knowledge(cfg)


def batches(dataset, cfg: config.Config, rank: int, world_size: int, start_step: int, pin: bool):
    """Yield (epoch, images, targets) forever, starting at optimizer step ``start_step``.

    Each epoch is a DistributedSampler permutation (seed ``run.seed``, ``set_epoch(epoch)``; also
    used with one process so both paths shuffle alike), cut into ``batch_size`` batches per rank
    (drop_last). Resuming at step s starts in epoch s // steps_per_epoch and skips the batches of
    that epoch already consumed, so the data order continues exactly. Each sample goes to the
    dataset as ``(index, seed)`` with the seed drawn from (run.seed, epoch, index): its flip is
    the same whichever worker or process loads it, so a resumed run with ``data.num_workers > 0``
    and a run on N processes with the same global batch see the same augmented images.
    """
    bs = cfg.train.batch_size
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=cfg.run.seed, drop_last=True)
    steps_per_epoch = len(sampler) // bs
    if steps_per_epoch == 0:
        fit = len(dataset) // bs  # processes that get a full batch each
        raise data.DataError(
            f"the training set has {len(dataset)} images, fewer than one batch of "
            f"train.batch_size={bs} for each of {world_size} processes; "
            + (f"use at most --nproc_per_node={fit} or a smaller train.batch_size" if fit else
               "use a smaller train.batch_size"))
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = [(i, int(np.random.SeedSequence([cfg.run.seed, epoch, i]).generate_state(1)[0]))
                   for i in list(sampler)[skip * bs: steps_per_epoch * bs]]
        # An explicit generator keeps DataLoader from drawing its worker seed from the global RNG,
        # which would make a resumed run's random stream differ from an uninterrupted one.
        gen = torch.Generator().manual_seed(cfg.run.seed * 100_003 + epoch * 1_009 + rank)
        loader = DataLoader(dataset, batch_size=bs, sampler=indices, drop_last=True,
                            num_workers=cfg.data.num_workers, collate_fn=data.collate,
                            pin_memory=pin, generator=gen)
        for images, targets in loader:
            yield epoch, images, targets
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# main: reads straight through.
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config key, with its resolved value: python train.py --config config.yaml "
               "--print-config (config.py documents each key and its source).")
    config.add_config_args(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config tree (defaults + file + --set) and exit")
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    cfg = config.config_from_args(args)
    if args.print_config:
        print(yaml.safe_dump(config.config_to_dict(cfg), sort_keys=False), end="")
        return None

    # --- torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one plain process.
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = devices.resolve_device(cfg.run.device)
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    else:
        rank, world_size = 0, 1
    master = rank == 0  # logs, writes files, checkpoints
    if master:
        print(f"train.py: {devices.precision_line(cfg, device)}", flush=True)
    rundir.seed_everything(cfg.run.seed + rank)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt_path = run_dir / "ckpt.pth"

    # --- Preparation once, on rank 0. COCO-sized extraction takes hours: run `python -m knowledge`
    # first (sharded), since the barrier below times out after 30 min (gloo) / 10 min (NCCL).
    if master:
        rundir.check_run_dir(run_dir)  # now, not after the preparation
        prepare(cfg)
    if ddp:
        dist.barrier()

    # --- Data, model (DDP-wrapped), optimizer, schedule, AMP.
    train_set = data.build_dataset(cfg, "train", knowledge=True)
    val_set = data.build_dataset(cfg, "val", knowledge=False)
    data.check_training_set(train_set, verbose=master)
    raw_model = model = hdovd.build_hdovd(cfg, *clip_io.class_texts(cfg)).to(device)
    if ddp:
        # broadcast_buffers=False (mmdet): each rank keeps its own queues and BatchNorm statistics.
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=may_leave_parameters_unused(cfg), broadcast_buffers=False)
    weights = hdovd.loss_weights(cfg)
    optimizer = build_optimizer(raw_model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
    use_amp, amp_dtype = amp_setting(cfg.train, device)
    # Loss scaling only matters for float16; a disabled GradScaler passes every call through.
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    # --- Resume: model, optimizer, schedule, scaler, step, RNG (the data order follows the step).
    step, metrics = 0, None
    if cfg.train.resume and ckpt_path.is_file():
        step, metrics = rundir.load_checkpoint(ckpt_path, cfg, raw_model, optimizer, scheduler, scaler,
                                               rank, world_size)
    if run_is_complete(step, metrics, cfg, run_dir, master):
        if ddp:
            dist.destroy_process_group()
        return metrics
    log = rundir.RunLog(run_dir, step, master, cfg, world_size)
    if step == 0:  # what "auto" became here (a resumed run keeps its first line: exact resume)
        log.write({"kind": "run", "step": 0, "device": str(device), "world_size": world_size,
                   "precision": devices.precision_report(cfg, device)})
    save = lambda at_step, states, m: master and rundir.save_checkpoint(  # noqa: E731
        ckpt_path, raw_model, optimizer, scheduler, scaler, at_step, world_size, cfg, m, *states)

    # --- The loop: batch → forward → weighted sum → non-finite stop → backward → clip → step.
    data_iter = batches(train_set, cfg, rank, world_size, step, pin=device.type == "cuda")
    model.train()
    while step < cfg.train.max_steps:
        epoch, images, targets = next(data_iter)
        images, targets = to_device((images, targets), device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            outputs = model(images, targets)
        losses = {k: v.float() for k, v in outputs.items() if k.startswith("loss_")}
        total = sum(weights[k] * v for k, v in losses.items())

        # One all-reduce gives every rank the mean of each loss over the ranks, which the log shows,
        # and stops every rank when any has a non-finite loss (a lone exit would hang the others in
        # the next all-reduce). Nothing is saved then: the last checkpoint stays the good one.
        mean = mean_over_ranks(losses, total, sorted(weights), ddp, world_size)
        if not all(map(math.isfinite, mean.values())):
            log.close()  # the progress bar's line ends before the loss dict
            print(f"[rank {rank}] step {step + 1}: total={total.item()} "
                  f"losses={ {k: v.item() for k, v in outputs.items()} }", file=sys.stderr)
            if ddp:
                dist.destroy_process_group()
            sys.exit(f"train.py: non-finite loss in step {step + 1} (loss dict above); the last "
                     f"checkpoint in {run_dir} is untouched. Try a lower train.lr, a longer "
                     f"train.warmup_steps or train.clip_grad_norm > 0.")

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        values = log_values(outputs, mean, weights)  # stat_*: this rank's; loss_*: mean over ranks
        if cfg.train.clip_grad_norm > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
            values["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg.train.clip_grad_norm).item()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1

        # --- Logging (on rank 0), evaluation and checkpoints; their time is not step time.
        lr = scheduler.get_last_lr()[0]
        log.add(step, epoch, lr, values, device)
        with log.paused():
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                metrics = run_evaluation(model, val_set, device, cfg, step, log)
            if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < cfg.train.max_steps:
                save(step, rundir.all_rank_states(ddp, world_size, raw_model), metrics)

    # --- End: checkpoint first (a crash in evaluation keeps the weights), then evaluate. RNG states
    # and rank buffers are taken before evaluation changes any: a longer resumed run continues exactly.
    states = rundir.all_rank_states(ddp, world_size, raw_model)
    save(step, states, metrics)
    metrics = run_evaluation(model, val_set, device, cfg, step, log)
    save(step, states, metrics)
    log.close()  # log.jsonl complete: the loss curves are drawn from it
    if master:
        write_results(run_dir, metrics)
    if ddp:
        dist.destroy_process_group()
    return metrics


def cli(argv=None) -> dict | None:
    """``python train.py``: main() with the errors a user can fix (config, data, teacher, files,
    disks) printed as one line that names the problem and the fix; exit status 1, no traceback."""
    try:
        return main(argv)
    except (config.ConfigError, data.DataError, clip_io.TeacherError, OSError, ValueError) as e:
        for bar in list(getattr(tqdm, "_instances", ())):  # end an open progress bar's line first
            bar.close()
        sys.exit(f"train.py: error: {rundir.error_line(e)}")


if __name__ == "__main__":
    cli()
