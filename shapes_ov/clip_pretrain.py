"""Pre-training the Shapes-OV CLIP teacher, and its zero-shot check (shapes_ov/world.py steps 2 and 3).

* ``render_stream(cfg)`` -> the pre-training pool, a stream of (image, caption) pairs separate
  from the dataset and covering all 16 categories: crops of single objects out of freshly rendered
  scenes (captioned with one of ``clip_pretrain.single_captions``) and whole scenes resized to the
  input size (captioned like the dataset).
* ``pretrain_clip(cfg, pool, ckpt_path)`` -> (``clip.model.CLIP`` with a ViT image tower, stats,
  timing), resumable from ``ckpt_path`` (saved every ``clip_pretrain.ckpt_every`` steps): symmetric
  InfoNCE where pairs whose captions describe the same thing are not each other's negatives. Half
  the captions get 1-2 random words that no caption or prompt uses, so the text tower learns to
  ignore unseen words (the eval templates' words are unseen by design). The budget is
  ``clip_pretrain.max_steps`` (linear warm-up, then cosine to 0): counted in steps, never in
  seconds, so the same seed gives the same teacher on a quiet or a busy machine.
* ``save_clip(model, path)``: a plain state dict with fp16 weights like OpenAI's checkpoints, so
  ``clip.load(path, jit=False)`` (and clip_io.load_clip) rebuilds it.
* ``evaluate_teacher(cfg, clip_path, val_ann, val_images)``: 16-way zero-shot accuracy on crops of
  val objects (a square of ``clip_pretrain.eval_crop_scale`` x the box's longer side, centred,
  shifted into the image, resized to the input size) against ``teacher.templates``
  prompt-ensembled class embeddings. Keys: zero_shot_acc_base, zero_shot_acc_novel,
  zero_shot_acc_all, per_class, num_crops, num_crops_base, num_crops_novel, crop_scale, templates.

References: shapes_ov/README.md §2 (the teacher recipe, measured in §2.2); CLIP (Radford et
al. 2021) for the model, the loss and the optimiser settings.
Deviations
* Stream singles are crops of rendered scenes made with the evaluation's crop routine (random
  context scale and jitter), so neighbours' fragments appear in them as they do in val crops.
* Random filler words in the teacher's captions (clip_pretrain.filler_prob): not in CLIP; an
  augmentation that makes a text tower trained on ~100 distinct phrasings robust to new ones.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import config as config_lib
import devices
import rundir
from knowledge.clip_io import load_clip, text_embeddings
from shapes_ov.shapes import (SPLITS, category_probs, drawable_classes, make_captions,
                              parallel_map, render_scene)

with warnings.catch_warnings():  # clip-anytorch imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip

_TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # clip/clip.py _transform (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def crop_resized(image: Image.Image, box, scale: float, out_size: int, shift=(0.0, 0.0)):
    """Square context crop: side = scale x the box's longer side, centred on the box (plus
    ``shift`` x side), moved inside the image, resized (bicubic, sub-pixel box) to out_size."""
    w, h = image.size
    x0, y0, x1, y1 = box
    side = min(scale * max(x1 - x0, y1 - y0), w, h)
    cx, cy = (x0 + x1) / 2 + shift[0] * side, (y0 + y1) / 2 + shift[1] * side
    left = min(max(cx - side / 2, 0.0), w - side)
    top = min(max(cy - side / 2, 0.0), h - side)
    box = (left, top, left + side, top + side)
    return image.resize((out_size, out_size), Image.BICUBIC, box=box)


def _render_stream_job(job):
    """Worker: one stream scene -> (scene at input size, its caption, object crops, labels)."""
    world, names, probs, pre, index = job
    rng = np.random.default_rng([world.seed, SPLITS["stream"], index])
    image, objects = render_scene(rng, world, names, probs)
    n = pre.image_resolution
    captions = make_captions(objects, drawable_classes(world, names), world, rng)
    caption = captions[int(rng.integers(len(captions)))] if captions else ""
    crops, labels = [], []
    for _ in range(pre.crops_per_object):
        for o in objects:
            scale = rng.uniform(*pre.crop_scale)
            shift = rng.uniform(-pre.crop_jitter, pre.crop_jitter, 2)
            crops.append(np.asarray(crop_resized(image, o["box"], scale, n, shift)))
            labels.append(o["category"])
    scene = np.asarray(image.resize((n, n), Image.BICUBIC))
    return scene, caption, crops, labels


def render_stream(cfg):
    """The pre-training pool: dict of uint8 tensors singles (N,n,n,3) / scenes (M,n,n,3),
    long single_labels (N,), and scene_captions (list of M str)."""
    names = config_lib.class_names(cfg)
    # the teacher's "web" holds the distractors too, named; clip_pretrain.novel_weight < 1 makes
    # novel shapes rarer in it
    probs = category_probs(len(cfg.data.base_classes), len(cfg.data.novel_classes),
                           len(cfg.world.distractor_classes), cfg.clip_pretrain.novel_weight)
    jobs = [(cfg.world, names, probs, cfg.clip_pretrain, i)
            for i in range(cfg.clip_pretrain.num_scenes)]
    results = parallel_map(_render_stream_job, jobs, cfg.world.workers, "render teacher stream")
    results = [r for r in results if r[1]]  # a scene where nothing could be placed has no caption
    return {"singles": torch.from_numpy(np.stack([c for r in results for c in r[2]])),
            "single_labels": torch.tensor([l for r in results for l in r[3]]),
            "scenes": torch.from_numpy(np.stack([r[0] for r in results])),
            "scene_captions": [r[1] for r in results]}


def check_templates(templates: list[str], names: list[str], captions: list[str]) -> None:
    """The eval prompts must be phrasings the teacher never saw (shapes_ov/README.md §2.1)."""
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"teacher.templates: '{t}' has no '{{}}' for the class name")
        for n in names:
            prompt = t.format(n).lower().rstrip(".").strip()
            hit = next((c for c in captions if prompt in c.lower()), None)
            if hit is not None:
                raise ValueError(f"teacher.templates: the prompt '{prompt}' occurs in the "
                                 f"teacher's training caption '{hit}'; pick phrasings the "
                                 "captions never use")


def build_clip(pre):
    """A fresh ``clip.model.CLIP`` from the clip_pretrain section (ViT image tower)."""
    for key in ("vision_width", "transformer_width"):
        if getattr(pre, key) % 64:
            raise ValueError(f"clip_pretrain.{key}={getattr(pre, key)} must be a multiple of 64: "
                             "clip.load infers the number of heads as width // 64")
    if pre.image_resolution % pre.vision_patch_size:
        raise ValueError("clip_pretrain.image_resolution must be a multiple of vision_patch_size")
    return clip.model.CLIP(pre.embed_dim, pre.image_resolution, pre.vision_layers, pre.vision_width,
                           pre.vision_patch_size, pre.context_length, pre.vocab_size,
                           pre.transformer_width, pre.transformer_width // 64,
                           pre.transformer_layers)


def contrastive_loss(image_emb, text_emb, keys, logit_scale):
    """Symmetric InfoNCE (CLIP) with label-aware negatives.

    image_emb/text_emb: (B, D) L2-normalised pairs; keys: (B,) id of what each caption describes.
    A caption j != i with keys[j] == keys[i] truly describes image i too, so it is masked out of
    i's negatives (shapes_ov/README.md §2.1); the mask is symmetric, so the same holds text-to-image.
    """
    logits = logit_scale * image_emb @ text_emb.t()  # (B, B)
    eye = torch.eye(len(keys), dtype=torch.bool, device=keys.device)
    logits = logits.masked_fill((keys[:, None] == keys[None, :]) & ~eye, float("-inf"))
    target = torch.arange(len(keys), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def insert_filler(tokens, filler_ids, prob: float, gen):
    """With probability ``prob`` per caption, insert 1-2 random filler tokens at random places
    between SOT and EOT. Fillers are words no caption or prompt uses, so the text tower learns
    to ignore words it has never been trained on, as the eval templates' words are. (B, T) ids."""
    out = tokens.clone()
    for i in torch.nonzero(torch.rand(len(tokens), generator=gen) < prob).flatten().tolist():
        ids = tokens[i][tokens[i] != 0].tolist()  # [SOT, words..., EOT]
        room = tokens.shape[1] - len(ids)
        for _ in range(min(int(torch.randint(1, 3, (1,), generator=gen)), room)):
            pos = int(torch.randint(1, len(ids), (1,), generator=gen))  # after SOT, before EOT
            ids.insert(pos, int(filler_ids[torch.randint(len(filler_ids), (1,), generator=gen)]))
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def pretrain_clip(cfg, pool: dict, ckpt_path: str | Path | None = None):
    """Train a CLIP on the stream pool for clip_pretrain.max_steps steps.

    With ``ckpt_path``, every ``clip_pretrain.ckpt_every`` steps the training state (weights,
    optimizer, schedule, random generator, losses) is saved there atomically, and a call that
    finds a checkpoint made with the same settings continues from it: a killed pre-training
    resumes and ends with the same weights as one never interrupted. Returns (model, stats,
    timing): stats are the same for the same settings, timing holds the measurements."""
    pre = cfg.clip_pretrain
    names = drawable_classes(cfg.world, config_lib.class_names(cfg))  # single_labels index these
    device = devices.resolve_device(cfg.run.device)
    if pre.threads > 0:
        torch.set_num_threads(pre.threads)
    gen = torch.Generator().manual_seed(cfg.world.seed)
    torch.manual_seed(cfg.world.seed)
    model = build_clip(pre).to(device).train()

    # Text side: singles are captioned by one of the single_captions phrasings of their noun;
    # scenes by their own caption. keys: class index for singles, 16 + caption id for scenes.
    single_tok = clip.tokenize([p.format(n) for n in names for p in pre.single_captions],
                               context_length=pre.context_length)
    single_tok = single_tok.view(len(names), len(pre.single_captions), -1)  # (C, P, T)
    unique = {c: i for i, c in enumerate(sorted(set(pool["scene_captions"])))}
    scene_key = torch.tensor([len(names) + unique[c] for c in pool["scene_captions"]])
    scene_tok = clip.tokenize(unique, context_length=pre.context_length)[scene_key - len(names)]
    used = torch.cat([single_tok.flatten(), scene_tok.flatten(), clip.tokenize(
        [t.format(n) for n in names for t in cfg.teacher.templates], context_length=77).flatten()])
    filler = torch.ones(pre.vocab_size - 2, dtype=torch.bool)  # the last two ids are SOT, EOT
    filler[used[used < len(filler)]] = False
    filler_ids = torch.nonzero(filler).flatten()
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    decay = [p for p in model.parameters() if p.ndim >= 2]  # shapes_ov/README.md §2.2: wd on >= 2-D only
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": pre.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=pre.lr,
                            betas=(0.9, 0.98), eps=1e-6,  # betas/eps: CLIP paper, ViT rows
                            fused=device.type == "cuda" or _TORCH_VERSION >= (2, 4))  # CPU: 2.4+
    n_single = round(pre.batch_size * pre.single_fraction)
    n_scene = pre.batch_size - n_single
    # linear warm-up from lr / warmup_steps, then cosine to 0 at max_steps (stepped per step)
    sched = torch.optim.lr_scheduler
    schedule = sched.SequentialLR(opt, [
        sched.LinearLR(opt, 1 / pre.warmup_steps, 1.0, total_iters=max(pre.warmup_steps - 1, 1)),
        sched.CosineAnnealingLR(opt, T_max=max(pre.max_steps - pre.warmup_steps, 1))],
        milestones=[pre.warmup_steps])
    use_amp = devices.resolve_amp(pre.amp, device)  # "auto": bf16 only where native
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)
    start, losses, first = time.time(), [], 1
    # what decides the weights (everything but how often to log or save); a checkpoint made with
    # other settings is not resumed
    key = {"clip_pretrain": {k: v for k, v in config_lib.config_to_dict(cfg)["clip_pretrain"].items()
                             if k not in ("log_every", "ckpt_every")},
           "world": config_lib.config_to_dict(cfg)["world"] | {"workers": None},  # any count
           "class_names": names, "templates": list(cfg.teacher.templates),
           "precision": "bfloat16" if use_amp else "float32"}
    if ckpt_path is not None and Path(ckpt_path).is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["key"] == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            gen.set_state(state["generator"])
            losses, first = state["losses"], state["step"] + 1
    bar = rundir.progress_bar(desc="pre-train teacher", total=pre.max_steps, initial=first - 1,
                            leave=False)
    for step in range(first, pre.max_steps + 1):
        lr = schedule.get_last_lr()[0]
        si = torch.randint(len(pool["singles"]), (n_single,), generator=gen)
        ci = torch.randint(len(pool["scenes"]), (n_scene,), generator=gen)
        labels = pool["single_labels"][si]
        phr = torch.randint(len(pre.single_captions), (n_single,), generator=gen)
        images = torch.cat([pool["singles"][si], pool["scenes"][ci]])  # (B, n, n, 3) uint8
        images = images.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, n, n)
        flip = torch.rand(n_single, generator=gen) < 0.5  # singles only: scene captions say left
        images[:n_single][flip] = images[:n_single][flip].flip(-1)
        images = ((images - mean) / std).to(device)
        tokens = torch.cat([single_tok[labels, phr], scene_tok[ci]])  # (B, T)
        if pre.filler_prob > 0:
            tokens = insert_filler(tokens, filler_ids, pre.filler_prob, gen)
        tokens = tokens.to(device)
        keys = torch.cat([labels, scene_key[ci]]).to(device)  # (B,)
        with amp:
            img = model.encode_image(images)
            txt = model.encode_text(tokens)
        img = img.float() / img.float().norm(dim=-1, keepdim=True)
        txt = txt.float() / txt.float().norm(dim=-1, keepdim=True)
        loss = contrastive_loss(img, txt, keys, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP: temperature capped at 100
        losses.append(loss.item())
        bar.update(1)
        if step % pre.log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-pre.log_every:]):.3f}", lr=f"{lr:.2e}",
                            s_per_step=f"{(time.time() - start) / (step - first + 1):.3f}")
        if ckpt_path is not None and pre.ckpt_every and step % pre.ckpt_every == 0 \
                and step < pre.max_steps:
            state = {"key": key, "step": step, "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
                     "generator": gen.get_state(), "losses": losses}
            rundir.write_atomic(ckpt_path, lambda tmp: torch.save(state, tmp))
    bar.close()
    seconds = time.time() - start
    stats = {"train_steps": pre.max_steps,
             "final_loss": round(float(np.mean(losses[-pre.log_every:])), 4) if losses else None,
             "num_singles": len(pool["singles"]), "num_scenes": len(pool["scenes"]),
             "device": str(device), "precision": key["precision"]}
    timing = {"train_seconds": round(seconds, 1), "steps_this_run": pre.max_steps - first + 1,
              "seconds_per_step": round(seconds / max(pre.max_steps - first + 1, 1), 4),
              "threads": torch.get_num_threads()}
    return model.eval(), stats, timing


def save_clip(model, path: str | Path) -> None:
    """Save as OpenAI does: a plain state dict with the weights clip.model.convert_weights makes
    fp16, so clip.load(path, jit=False) rebuilds exactly this model. Atomic (rundir.write_atomic)."""
    half = copy.deepcopy(model).cpu().float()
    clip.model.convert_weights(half)
    rundir.write_atomic(path, lambda tmp: torch.save(half.state_dict(), tmp))


def evaluate_teacher(cfg, clip_path: Path, val_ann: Path, val_images: Path) -> dict:
    """16-way zero-shot accuracy of the CLIP at ``clip_path`` on crops of every object of the
    COCO file ``val_ann`` (images in ``val_images``)."""
    device = devices.resolve_device(cfg.run.device)
    model, preprocess = load_clip(str(clip_path), device)
    names = config_lib.class_names(cfg)
    num_base = len(cfg.data.base_classes)
    val = json.loads(Path(val_ann).read_text())
    files = {im["id"]: im["file_name"] for im in val["images"]}
    text = text_embeddings(model, names, list(cfg.teacher.templates)).to(device)  # (C, D)
    n = model.visual.input_resolution
    anns = sorted(val["annotations"], key=lambda a: (a["image_id"], a["id"]))
    preds, labels, batch, image_id, image = [], [], [], None, None

    def flush():
        with torch.no_grad():
            emb = model.encode_image(torch.stack(batch).to(device)).float()  # (b, D)
        preds.append((emb @ text.t()).argmax(1).cpu())  # cosine up to a positive factor
        batch.clear()

    for a in rundir.progress_bar(anns, desc="teacher eval", leave=False):
        if a["image_id"] != image_id:
            image_id = a["image_id"]
            image = Image.open(Path(val_images) / files[image_id]).convert("RGB")
        x, y, w, h = a["bbox"]
        crop = crop_resized(image, (x, y, x + w, y + h), cfg.clip_pretrain.eval_crop_scale, n)
        batch.append(preprocess(crop))
        labels.append(a["category_id"] - 1)
        if len(batch) == cfg.clip_pretrain.eval_batch_size:
            flush()
    if batch:
        flush()
    if not labels:
        raise ValueError(f"{val_ann} has no annotations to evaluate the teacher on")
    preds, labels = torch.cat(preds), torch.tensor(labels)
    correct = (preds == labels).float()
    base = labels < num_base

    def frac(m):
        return round(correct[m].mean().item(), 4) if m.any() else None

    return {"zero_shot_acc_base": frac(base), "zero_shot_acc_novel": frac(~base),
            "zero_shot_acc_all": frac(torch.ones_like(base)),
            "per_class": {nm: frac(labels == c) for c, nm in enumerate(names)},
            "num_crops": len(labels), "num_crops_base": int(base.sum()),
            "num_crops_novel": int((~base).sum()),
            "crop_scale": cfg.clip_pretrain.eval_crop_scale,
            "templates": list(cfg.teacher.templates)}
