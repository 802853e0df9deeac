"""Where a run computes and in what precision: ``run.device`` and the autocast keys.

* ``resolve_device(cfg.run.device)`` → ``torch.device`` ("auto": CUDA when available).
* ``bf16_is_native(device)``; ``resolve_amp(setting, device)``: true/false as given, "auto" → bf16
  only where native (CUDA with bf16, a CPU whose oneDNN reports bf16: AVX512-BF16 or AMX), since
  emulated bf16 is 15-50x slower than fp32 (a 1024² matmul 52x on a Zen 3 EPYC, issue 20).
* ``precision_report(cfg, device)`` / ``precision_line``: what each autocast key (``clip_pretrain``,
  ``teacher``, ``teacher.proposals``, ``train``) resolved to, as a run prints and records it.
"""
from __future__ import annotations

import torch

from configurator import ConfigError


def resolve_device(name: str):
    """``run.device``: "auto" picks CUDA when available; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but CUDA is not available; use --set run.device=cpu "
                          f"or auto")
    return torch.device(name)


def bf16_is_native(device) -> bool:
    """Does ``device`` run bf16 matmuls natively? CUDA: compute capability with bf16 (Ampere and
    later; emulation does not count). CPU: oneDNN's own check (AVX512-BF16 or AMX), the kernels
    CPU autocast dispatches to. Anything else: no."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_amp(setting: bool | str, device) -> bool:
    """An autocast key's value for ``device``: true/false as given, "auto" → ``bf16_is_native``."""
    return bf16_is_native(device) if setting == "auto" else bool(setting)


def precision_report(cfg, device) -> dict:
    """The resolved precision of every autocast key on ``device`` (what a run prints and records):
    {"bf16_native": bool, "clip_pretrain" | "teacher" | "teacher.proposals" | "train": dtype name}.
    ``train`` honours ``train.amp_dtype`` when forced on; the preparation phases autocast to bf16."""
    def name(setting, dtype="bfloat16"):
        return dtype if resolve_amp(setting, device) else "float32"

    t = cfg.train
    return {"bf16_native": bf16_is_native(device),
            "clip_pretrain": name(cfg.clip_pretrain.amp), "teacher": name(cfg.teacher.amp),
            "teacher.proposals": name(cfg.teacher.proposals.amp),
            "train": name(t.amp, t.amp_dtype if t.amp is True else "bfloat16")}


def precision_line(cfg, device) -> str:
    """One line for the start of a run: where bf16 is native and what each autocast key became."""
    r = precision_report(cfg, device)
    where = f"{device.type.upper()} {'runs' if r['bf16_native'] else 'does not run'} bf16 natively"
    phases = ", ".join(f"{k} {v}" for k, v in r.items() if k != "bf16_native")
    return f"precision: {where}; {phases}"
