"""Convert the released official checkpoint ``HD_OVD_adamixer.pth`` into a project checkpoint.

    python -m tools.convert_adamixer HD_OVD_adamixer.pth --config configs/ov_coco_adamixer_r50.yaml \
        --resources ../ovd_resources --out runs/hd_ovd_adamixer/ckpt.pth
    python evaluate.py runs/hd_ovd_adamixer/ckpt.pth --set data.root=../dataset/coco

The official file is an mmcv checkpoint ``{'meta', 'state_dict', 'optimizer'}`` of the mmdetection
fork (ADAMIXER.md §4 lists its key names and shapes; the file itself was not inspected here, so
every name below is checked at conversion time instead of trusted). The project model is
``hdovd.build_hdovd(cfg)`` with ``model.detector: adamixer`` (adamixer.AdaMixerOV inside
hdovd.HDOVDAdaMixer). The ``optimizer`` entry is not used: the result is for evaluation or
initialisation, not for resuming the official run.

Contract
* ``read_official_checkpoint(path) -> (state_dict, meta)``; ``module.`` prefixes (DDP) are stripped.
* ``convert_state_dict(official, model) -> dict``: a state dict for ``model.load_state_dict(...,
  strict=True)``. Every official key is mapped (a key no rule knows is an error), every project key
  is filled: from the official tensor, or, for the keys of ``NOT_IN_OFFICIAL``, from ``model``
  itself. A project key left without a value, a rule that points at a key the model lacks, or a
  shape that differs is an error (``ConversionError``, a ValueError) naming the keys; nothing is
  dropped silently. Size-agnostic: the shapes come from the model built from the config.
* ``build_model(cfg, resources)``: the model that receives the weights, with the official DetPro
  texts. ``convert_checkpoint(path, cfg, resources, out)`` writes the project checkpoint (atomic):
  ``{"model", "config", "step", "metrics": None, "converted_from"}``, which evaluate.py's
  ``load_checkpoint`` reads like a train.py checkpoint.

Where the two module structures differ (each case checked against adamixer.py and ADAMIXER.md §2)
* Self-attention: mmcv ``attention.attn`` is an ``nn.MultiheadAttention``; its ``in_proj_weight``
  (3D, D) holds the q, k, v rows in torch's own layout, so it is copied as is. The project's module
  is ``batch_first``, the official one sequence-first: that changes the call, not the weights. The
  (B·H, N, N) IoF mask is batch-major in both.
* FFN: mmcv ``ffn.layers.0.0`` (Linear in Sequential(Linear, ReLU, Dropout)) and ``ffn.layers.1``
  are the project's ``ffn.0`` and ``ffn.2`` (Sequential(Linear, ReLU, Linear)); both add the
  identity and then apply ``ffn_norm``.
* ``reg_fcs``: Linear at 3k, LayerNorm at 3k+1, ReLU at 3k+2 in both, so indices {0,3,6} and
  {1,4,7} keep their numbers; ``cls_fcs`` = Linear 0, LayerNorm 1 in both; ``objness`` →
  ``objectness`` (0 and 2).
* Mixing generator (``parameter_generator.0`` → ``mixing.generator``): per group, the official
  output is split [M (c·c), S (P_out·P_in)], M viewed as (c_in, c_in) (HD; AdaMixer (c_in, c_out),
  the same while out_dim is unset) and applied as X·M, S viewed as (P_out, P_in) and applied as S·X;
  ``AdaptiveMixing.forward`` reads the same rows in the same order, and both flatten the mixed
  (G, P_out, c) block for ``out_proj`` in (g, p, c) order. No transpose: copied as is.
* Offset generator (``sampling_offset_generator.0`` → ``offsets``): the official 3·G·P outputs are
  viewed (G·P, 3), group-major, then split (G, P) by ``sampling_3d``; the project reshapes to
  (G, P, 3) in the same order. Copied as is.
* Generator heads: ``anchor_deltas.{0,2}`` → ``reg.{0,2}``, ``objectness_logits.{0,2}`` →
  ``obj.{0,2}``. The per-level ``scales.{l}.scale`` [1] (P3..P6) are gathered into the project's
  one vector ``scales`` [L]; ``obj_scale``/``obj_bias`` [1] become 0-d tensors. ``conv1``/``conv2``
  (ConvModule: conv without bias + ``gn``) are ``tower1``/``tower2`` = Sequential(conv, GN, ReLU).
* ``roi_head.visual2text.layers.{0,1,2}`` (Linear layers with GELU between, METHOD §3.1) →
  ``projector.mlp.{0,2,4}``; ``roi_head.fc1``/``fc2`` (the W_t generator) → ``projector.fc1``/``fc2``;
  ``roi_head.linear_transform``/``layernorm`` (H3) → ``image_head.proj``/``norm``;
  ``roi_head.bg_embedding.weight`` [1, T] (nn.Embedding) → ``classifier.bg_embedding`` [T].
* Backbone: mmdet's ResNet-50 names are torchvision's (SyncBN is saved under ``bn``): ``backbone.``
  → ``detector.backbone.body.``. The saved config sets ``model.backbone_weights: ""`` (the ImageNet
  file is not needed, its weights are replaced), which builds plain BatchNorm2d instead of
  FrozenStatsBatchNorm2d: the same keys, and in eval mode the same function (stored statistics).
  FPN: mmdet ``lateral_convs.{i}.conv`` / ``fpn_convs.{i}.conv`` → torchvision
  ``inner_blocks.{i}.0`` / ``layer_blocks.{i}.0`` (nearest top-down upsampling and the stride-2
  1×1 max-pool P6 in both, ADAMIXER.md C2). ``norms.{l}`` → ``level_norms.{l}``.
Not checked here: whether the project's inference reproduces the official numbers (no COCO on this
machine). The converted model computes what its config says; with configs/ov_coco_adamixer_r50.yaml
that is the official computation up to adamixer.py's and hdovd.py's listed deviations.
"""
from __future__ import annotations

import argparse
import copy
import pickle
import re
import sys
from pathlib import Path

import torch

import config as config_lib
import rundir
import hdovd
from knowledge import official

SQUEEZE = "squeeze"  # a third entry of a rule: the official shape is (1, *project shape)
# (official prefix, project prefix[, SQUEEZE]): the rest of the key is kept. "{n}" is an index and
# "{head}" main_head or aux_head; both are carried over. One rule per official module.
RENAMES = [
    ("backbone.", "detector.backbone.body."),  # conv1, bn1, layer{1-4}.{i}.{conv,bn}{1-3}, downsample
    ("neck.lateral_convs.{n}.conv.", "detector.backbone.fpn.inner_blocks.{n}.0."),
    ("neck.fpn_convs.{n}.conv.", "detector.backbone.fpn.layer_blocks.{n}.0."),
    ("norms.{n}.", "detector.level_norms.{n}."),
    # query generator (PromptAnchorHead2, StaRPNHead)
    ("rpn_head.token_norm.", "detector.generator.content_norm."),
    ("rpn_head.conv1.conv.", "detector.generator.tower1.0."),
    ("rpn_head.conv1.gn.", "detector.generator.tower1.1."),
    ("rpn_head.conv2.conv.", "detector.generator.tower2.0."),
    ("rpn_head.conv2.gn.", "detector.generator.tower2.1."),
    ("rpn_head.{head}.anchor_deltas.", "detector.generator.{head}.reg."),
    ("rpn_head.{head}.objectness_logits.", "detector.generator.{head}.obj."),
    ("rpn_head.{head}.obj_scale", "detector.generator.{head}.obj_scale", SQUEEZE),
    ("rpn_head.{head}.obj_bias", "detector.generator.{head}.obj_bias", SQUEEZE),
    # decoder stages (AdaMixerDecoderStagePrompt)
    ("roi_head.bbox_head.{n}.iof_tau", "detector.stages.{n}.iof_tau"),
    ("roi_head.bbox_head.{n}.attention.attn.", "detector.stages.{n}.attention."),
    ("roi_head.bbox_head.{n}.attention_norm.", "detector.stages.{n}.attention_norm."),
    ("roi_head.bbox_head.{n}.sampling_n_mixing.sampling_offset_generator.0.", "detector.stages.{n}.offsets."),
    ("roi_head.bbox_head.{n}.sampling_n_mixing.adaptive_mixing.parameter_generator.0.",
     "detector.stages.{n}.mixing.generator."),
    ("roi_head.bbox_head.{n}.sampling_n_mixing.adaptive_mixing.out_proj.", "detector.stages.{n}.mixing.out_proj."),
    ("roi_head.bbox_head.{n}.sampling_n_mixing.norm.", "detector.stages.{n}.mixing_norm."),
    ("roi_head.bbox_head.{n}.ffn.layers.0.0.", "detector.stages.{n}.ffn.0."),
    ("roi_head.bbox_head.{n}.ffn.layers.1.", "detector.stages.{n}.ffn.2."),
    ("roi_head.bbox_head.{n}.ffn_norm.", "detector.stages.{n}.ffn_norm."),
    ("roi_head.bbox_head.{n}.cls_fcs.", "detector.stages.{n}.cls_fcs."),
    ("roi_head.bbox_head.{n}.fc_cls.", "detector.stages.{n}.fc_cls."),
    ("roi_head.bbox_head.{n}.reg_fcs.", "detector.stages.{n}.reg_fcs."),
    ("roi_head.bbox_head.{n}.fc_reg.", "detector.stages.{n}.fc_reg."),
    ("roi_head.bbox_head.{n}.objness.", "detector.stages.{n}.objectness."),
    # projector, H3 head and background of AdaMixerDecoderPrompt
    ("roi_head.visual2text.layers.0.", "detector.projector.mlp.0."),
    ("roi_head.visual2text.layers.1.", "detector.projector.mlp.2."),
    ("roi_head.visual2text.layers.2.", "detector.projector.mlp.4."),
    ("roi_head.fc1.", "detector.projector.fc1."),
    ("roi_head.fc2.", "detector.projector.fc2."),
    ("roi_head.linear_transform.", "detector.image_head.proj."),
    ("roi_head.layernorm.", "detector.image_head.norm."),
    ("roi_head.bg_embedding.weight", "classifier.bg_embedding", SQUEEZE),
]
# official per-level scalars [1] gathered into one project vector [L], element l = level l (P3..P6)
GATHERED = [("rpn_head.{head}.scales.{n}.scale", "detector.generator.{head}.scales")]
# Project state the official checkpoint does not hold, and what it gets (from ``build_model``)
NOT_IN_OFFICIAL = {
    r"class_embeddings": "the DetPro class texts of the config's classes, L2-normalised "
                         "(official: read from the embedding file at start-up, a plain attribute)",
    r"detector\.generator\.objectness_text": "the DetPro 'whole entity' text, L2-normalised "
                                             "(official obj_embeddings, a plain attribute)",
    r"train_steps": "train.max_steps of the config: the released run finished, its warm-up is over",
    r"(instance\.\d+|image)\.queue_(student|teacher)\.(feats|count)":
        "empty H1/H3 queues (official: non-persistent buffers, empty after loading too)",
    r"text_space\.\d+\.(bank|updates)": "the base class texts, 0 updates (official: the EMA "
                                        "centroids are not saved and restart from the texts)",
}


class ConversionError(ValueError):
    """The official file or its keys do not fit the model of the config; the message says which."""


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)")
                      .replace(r"\{head\}", r"(?P<head>main_head|aux_head)"))


_RULES = [(_pattern(src), dst, SQUEEZE in extra) for src, dst, *extra in RENAMES]
_GATHER = [(_pattern(src), dst) for src, dst in GATHERED]
_REVERSE = [(_pattern(dst), src) for src, dst, *_ in RENAMES]  # for messages about missing keys


def project_key(key: str):
    """The project name of official ``key``: (name, squeeze, level) with level None unless the
    value is element ``level`` of a gathered vector; None when no rule knows the key."""
    for pattern, dst in _GATHER:
        m = pattern.fullmatch(key)
        if m:
            return dst.format(**m.groupdict()), False, int(m["n"])
    for pattern, dst, squeeze in _RULES:
        m = pattern.match(key)
        if m:
            return dst.format(**m.groupdict()) + key[m.end():], squeeze, None
    return None


def official_key(key: str) -> str:
    """The official name a project ``key`` is expected under (for error messages)."""
    for pattern, src in _REVERSE:
        m = pattern.match(key)
        if m:
            return src.format(**m.groupdict()) + key[m.end():]
    gathered = re.fullmatch(r"detector\.generator\.(main_head|aux_head)\.scales", key)
    return f"rpn_head.{gathered[1]}.scales.{{0..L-1}}.scale" if gathered else "?"


def _listed(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(keys[:limit]) + more


def convert_state_dict(official_state: dict, model: torch.nn.Module) -> dict:
    """Official state dict → a complete state dict of ``model`` (module docstring: the rules)."""
    target = model.state_dict()
    out, unknown, problems = {}, [], []
    gathered: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in official_state.items():
        found = project_key(key)
        if found is None:
            unknown.append(key)
            continue
        name, squeeze, level = found
        if name not in target:
            problems.append(f"'{key}' -> '{name}', which the model of this config lacks")
            continue
        if level is not None:  # one element of a gathered vector, [1] each
            if value.shape != (1,):
                problems.append(f"'{key}' has shape {tuple(value.shape)}, expected (1,)")
            gathered.setdefault(name, {})[level] = value.reshape(())
            continue
        want = tuple(target[name].shape)
        if tuple(value.shape) != ((1,) + want if squeeze else want):
            problems.append(f"'{key}' has shape {tuple(value.shape)} but '{name}' needs {want}"
                            + (" (with a leading 1 in the official file)" if squeeze else ""))
            continue
        out[name] = value.reshape(want).to(target[name].dtype)
    for name, levels in gathered.items():
        want = target[name].shape[0]
        if sorted(levels) != list(range(want)):
            problems.append(f"'{name}' needs {want} levels from '{official_key(name)}', the file "
                            f"has levels {sorted(levels)}")
            continue
        out[name] = torch.stack([levels[i] for i in range(want)]).to(target[name].dtype)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} official keys have no place in the project model: {_listed(unknown)}. "
            f"The file is not the official HD-OVD AdaMixer checkpoint, or its modules differ from "
            f"ADAMIXER.md §4; add a rule to knowledge/convert_adamixer.py RENAMES if the key is a "
            f"module the project has under another name")
    if problems:
        raise ConversionError(
            f"the official file does not fit the model built from the config: {_listed(problems)}. "
            f"Check the config's architecture keys (model.backbone, model.fpn_channels, "
            f"adamixer.num_stages, num_heads, num_groups, in_points, out_points, ffn_dim, "
            f"num_reg_fcs; the class text width) against the official run")
    no_counterpart = re.compile("|".join(f"(?:{p})" for p in NOT_IN_OFFICIAL))
    missing = [k for k in target if k not in out and not no_counterpart.fullmatch(k)]
    if missing:
        raise ConversionError(
            f"the official file lacks {len(missing)} tensors the project model needs: "
            + _listed([f"'{official_key(k)}' (for '{k}')" for k in missing])
            + "; the file is incomplete (re-download it) or not the official AdaMixer checkpoint")
    return {k: out[k] if k in out else v.clone() for k, v in target.items()}


def read_official_checkpoint(path, allow_pickle: bool = False) -> tuple[dict, dict]:
    """The ``state_dict`` and ``meta`` of an mmcv checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"official checkpoint '{path}' not found; download HD_OVD_adamixer.pth "
                              f"(official HD-OVD README, model zoo) and pass its path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ConversionError(f"'{path}' holds Python objects besides tensors ({e}); if you trust "
                              f"the file, run again with --allow-pickle") from None
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise ConversionError(f"cannot read '{path}' ({type(e).__name__}: {e}); is the download "
                              f"complete?") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        got = list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConversionError(f"'{path}' is not an mmcv checkpoint: expected a dict with "
                              f"'state_dict' (and 'meta', 'optimizer'), got {got}")
    if state and all(k.startswith("module.") for k in state):  # saved from the DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    meta = ckpt.get("meta")
    return state, meta if isinstance(meta, dict) else {}


def build_model(cfg, resources) -> torch.nn.Module:
    """The HDOVDAdaMixer of ``cfg`` with the DetPro texts of ``resources`` (official.py reads them)
    and ``train_steps`` past the warm-up: every project key of ``NOT_IN_OFFICIAL`` holds its value."""
    if cfg.model.detector != "adamixer":
        raise ConversionError(f"the config has model.detector={cfg.model.detector!r}; the official "
                              f"AdaMixer checkpoint needs a config with model.detector: adamixer "
                              f"(configs/ov_coco_adamixer_r50.yaml)")
    texts = official.load_class_embeddings(resources, config_lib.class_names(cfg))
    model = hdovd.build_hdovd(cfg, class_embeddings=texts["embeddings"])
    with torch.no_grad():
        model.detector.generator.objectness_text.copy_(texts["objectness"])  # (T,), normalised
        model.train_steps.fill_(cfg.train.max_steps)
    return model


def convert_checkpoint(official_path, cfg, resources, out_path, allow_pickle: bool = False) -> dict:
    """Read, convert, check by loading strictly, and write the project checkpoint; returns it."""
    state, meta = read_official_checkpoint(official_path, allow_pickle)
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone_weights = ""  # the converted weights replace ImageNet's (module docstring)
    cfg.teacher.official_resources = str(resources)
    model = build_model(cfg, resources)
    converted = convert_state_dict(state, model)
    model.load_state_dict(converted, strict=True)
    ckpt = {"model": converted, "config": config_lib.config_to_dict(cfg),
            "step": cfg.train.max_steps, "metrics": None,
            "converted_from": {"file": str(official_path), "tensors": len(state),
                               **{k: meta.get(k) for k in ("epoch", "iter", "mmdet_version")},
                               "not_in_official": NOT_IN_OFFICIAL}}
    rundir.write_atomic(Path(out_path), lambda tmp: torch.save(ckpt, tmp))
    return ckpt


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.convert_adamixer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the official HD_OVD_adamixer.pth (mmcv checkpoint)")
    config_lib.add_config_args(parser, default="configs/ov_coco_adamixer_r50.yaml")
    parser.add_argument("--resources", default=None, help="the official ovd_resources/ folder with the "
                        "DetPro text files (default: the config's teacher.official_resources)")
    parser.add_argument("--out", default="runs/hd_ovd_adamixer/ckpt.pth",
                        help="the project checkpoint to write (default: %(default)s)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a checkpoint that holds Python objects (only a file you trust)")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.config_from_args(args)
        resources = args.resources or cfg.teacher.official_resources
        if not resources:
            raise ConversionError("the DetPro text files are needed: pass --resources <ovd_resources> "
                                  f"or set teacher.official_resources; {official.DOWNLOAD}")
        ckpt = convert_checkpoint(args.checkpoint, cfg, resources, args.out, args.allow_pickle)
    except (ValueError, FileNotFoundError) as e:  # ConversionError, OfficialResourcesError, ConfigError
        sys.exit(f"convert_adamixer: error: {e}")
    filled = [k for k in ckpt["model"] if any(re.fullmatch(p, k) for p in NOT_IN_OFFICIAL)]
    print(f"converted {ckpt['converted_from']['tensors']} official tensors into "
          f"{len(ckpt['model']) - len(filled)} project keys; {len(filled)} project keys have no "
          f"official counterpart (class texts, objectness text, step count, H1/H3 queues, H2 EMA "
          f"banks; see NOT_IN_OFFICIAL)")
    print(f"wrote {args.out}; evaluate it with `python evaluate.py {args.out}` (numbers unverified)")


if __name__ == "__main__":
    main()
