"""Loading an OpenAI-format CLIP offline, and its prompt-ensembled text embeddings.

* ``load_clip(name_or_path, device, clip_dir)`` -> (model, preprocess): an OpenAI model name
  ("ViT-B/32", looked up in ``clip_search_dirs``: teacher.clip_dir, $HDOVD_CLIP_DIR,
  ~/.cache/clip; never downloaded) or a path; JIT archives and plain state dicts alike (shapes_ov/world.py
  saves the Shapes-OV teacher as a state dict). ViT image towers only (OAKE needs the tokens).
* ``load_templates(cfg)`` -> the prompt templates (teacher.templates or teacher.templates_file).
* ``text_embeddings(model, names, templates)`` -> FloatTensor[C, D] on CPU, L2-normalised.
* ``class_texts(cfg)`` -> (embeddings FloatTensor[C, D], objectness FloatTensor[D]): the class
  texts the detector classifies with, read back from extract.py's ``class_embeddings.pt`` (or the
  official DetPro files with ``teacher.official_resources``); what train.py passes to build_hdovd.
* ``TeacherError``: a teacher input is missing or invalid (the message says what to do).

Used by knowledge/extract.py (class and caption-noun texts), shapes_ov/world.py (the teacher's zero-shot check) and
evaluate.py (a custom vocabulary). References: CLIP's ``clip.load`` and its ImageNet prompt
ensemble (notebooks/Prompt_Engineering_for_ImageNet.ipynb).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import config
from knowledge import official

with warnings.catch_warnings():  # clip imports the deprecated pkg_resources (harmless)
    warnings.simplefilter("ignore", UserWarning)
    import clip


def model_device(model) -> torch.device:
    """The device of a CLIP model (its first vision conv)."""
    return model.visual.conv1.weight.device


class TeacherError(RuntimeError):
    """A teacher input is missing or invalid; the message names the file/key and the fix."""


# ----------------------------------------------------------------------------------------------
# 1. Loading CLIP (offline only: never downloads)
# ----------------------------------------------------------------------------------------------

def clip_search_dirs(clip_dir: str = "") -> list[Path]:
    """Folders searched for OpenAI checkpoints: clip_dir, $HDOVD_CLIP_DIR, ~/.cache/clip."""
    dirs = [clip_dir, os.environ.get("HDOVD_CLIP_DIR", ""), os.path.expanduser("~/.cache/clip")]
    return [Path(d) for d in dirs if d]


def resolve_clip_path(name_or_path: str, clip_dir: str = "") -> Path:
    """A checkpoint file for an OpenAI model name ("ViT-B/32") or an existing path."""
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    urls = clip.clip._MODELS  # name -> download URL; the file name is the URL's last part
    if name_or_path not in urls:
        raise TeacherError(
            f"teacher.clip_model '{name_or_path}' is neither a file nor an OpenAI CLIP name "
            f"({', '.join(urls)}); for Shapes-OV build the teacher with "
            f"`python -m shapes_ov --config config.yaml`")
    file_name = os.path.basename(urls[name_or_path])
    dirs = clip_search_dirs(clip_dir)
    for d in dirs:
        if (d / file_name).is_file():
            return d / file_name
    raise TeacherError(
        f"CLIP checkpoint {file_name} for '{name_or_path}' not found; expected at "
        f"{' or '.join(str(d / file_name) for d in dirs)} (this machine is offline). Download "
        f"{urls[name_or_path]} on a connected machine and put it at one of these paths "
        f"(teacher.clip_dir or $HDOVD_CLIP_DIR name the folder), or set teacher.clip_model to "
        f"its path")


def load_clip(name_or_path: str, device="cpu", clip_dir: str = ""):
    """(model, preprocess) from an OpenAI name or a path; JIT archives and state dicts alike.

    clip.load rebuilds an eager ``clip.model.CLIP`` from either format (``jit=False``); weights are
    fp32 on CPU and fp16 on CUDA, as clip.load makes them. The model is in eval mode.
    """
    path = resolve_clip_path(name_or_path, clip_dir)
    try:
        with warnings.catch_warnings():  # clip.load probes for a JIT archive first (deprecated API)
            warnings.simplefilter("ignore", FutureWarning)
            model, preprocess = clip.load(str(path), device=device, jit=False)
    except Exception as e:  # torch raises several types for foreign/truncated files
        raise TeacherError(f"cannot load CLIP checkpoint '{path}' (teacher.clip_model): {e}") \
            from None
    if not hasattr(model.visual, "transformer"):
        raise TeacherError(f"CLIP checkpoint '{path}' has a ResNet image tower; OAKE box embeddings "
                           f"need a ViT (e.g. ViT-B/32)")
    return model.eval().requires_grad_(False), preprocess


# ----------------------------------------------------------------------------------------------
# 2. Text embeddings (prompt ensemble)
# ----------------------------------------------------------------------------------------------

def load_templates(cfg) -> list[str]:
    """teacher.templates, or the lines of teacher.templates_file when it is set."""
    t = cfg.teacher
    if t.templates_file:
        path = Path(t.templates_file)
        if not path.is_file():
            raise TeacherError(f"teacher.templates_file '{path}' not found (one template per line, "
                               f"e.g. vocab/imagenet_templates.txt)")
        templates = [ln.strip() for ln in path.read_text().splitlines()
                     if ln.strip() and not ln.startswith("#")]
    else:
        templates = list(t.templates)
    bad = [x for x in templates if x.count("{}") != 1]
    if not templates or bad:
        raise TeacherError(f"prompt templates must each contain one '{{}}', got {bad or templates}")
    return templates


@torch.no_grad()
def text_embeddings(model, names: list[str], templates: list[str], batch_size: int = 512):
    """FloatTensor[C, D] on CPU: mean over templates of normalised text embeddings, re-normalised.

    CLIP's ImageNet recipe. Used for class names, the objectness text and caption nouns alike.
    """
    prompts = [t.format(n) for n in names for t in templates]  # C*T, class-major
    try:
        tokens = clip.tokenize(prompts, context_length=model.context_length)
    except RuntimeError as e:
        raise TeacherError(f"a prompt is longer than the text tower's {model.context_length} "
                           f"tokens ({e}); shorten teacher.templates or the name") from None
    out = []
    for chunk in tokens.split(batch_size):
        out.append(F.normalize(model.encode_text(chunk.to(model_device(model))).float(), dim=-1))
    emb = torch.cat(out).view(len(names), len(templates), -1).mean(1)  # (C, T, D) -> (C, D)
    return F.normalize(emb, dim=-1).cpu()


# ----------------------------------------------------------------------------------------------
# 3. The class texts, read back (the model layer gets them as tensors and reads no file)
# ----------------------------------------------------------------------------------------------

def class_texts(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [C, D], objectness [D]), float32 and L2-normalised: the configured classes in
    order and the "whole entity" text of AdaMixer's query generator (docs/METHOD.md §1.2).

    Read from knowledge/extract.py's ``class_embeddings.pt`` and checked against the configured
    classes; with ``teacher.official_resources``, from the official DetPro files (never a copy)."""
    if cfg.teacher.official_resources:
        saved = official.load_class_embeddings(cfg.teacher.official_resources, config.class_names(cfg))
    else:
        path = Path(cfg.data.root) / cfg.data.knowledge_dir / "class_embeddings.pt"
        if not path.is_file():
            raise FileNotFoundError(f"class text embeddings '{path}' not found; build them with "
                                    f"`python -m knowledge --config <your config>`")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        names = config.class_names(cfg)
        if list(saved["class_names"]) != names:
            raise ValueError(f"{path} lists classes {saved['class_names']} but the config has "
                             f"{names}; re-run `python -m knowledge --config <your config>`")
    return saved["embeddings"].float(), saved["objectness"].float()
