"""Behavioural tests of tools/convert_adamixer.py (the released HD_OVD_adamixer.pth → a project
checkpoint). No official file is on this machine: the official state dicts are synthesised here
from project models with random weights, under the names and shapes of ADAMIXER.md §4, by
``official_state`` below, written by hand from that list and independent of the converter's tables.

What is checked
* Round trip (configs/ov_coco_adamixer_r50.yaml at a small width, and once at the official shapes):
  every official key is used, every project key is filled, the load is strict, and the converted
  model's decoder stages and ``detect`` give exactly the original model's values. The project keys
  without an official counterpart are exactly the documented ones (texts, step count, queues, banks).
* Layouts: one decoder stage computed from its official description on the OFFICIAL tensors
  (sequence-first attention, mmcv FFN, offsets viewed (G·P, 3), mixing parameters split into M
  (c, c) applied as X·M and S (P_out, P_in) applied as S·X) equals the converted project stage.
* The command writes a checkpoint that evaluate.py's loader reads, with the DetPro texts of the
  resources folder, and it detects like the original.
* A leftover, missing or mis-shaped key, a missing level scale, a config with fewer stages and a
  file that is not an mmcv checkpoint are errors that name the key or file.
"""
import pytest
import torch
import torch.nn.functional as F

import adamixer
import box_ops
import config
import evaluate
import hdovd
from conftest import REPO
from knowledge import official
from tools import convert_adamixer

CONFIG = REPO / "configs" / "ov_coco_adamixer_r50.yaml"
SMALL = ["model.backbone_weights=''", "model.fpn_channels=32", "adamixer.num_stages=2",
         "adamixer.num_queries=12", "adamixer.num_heads=2", "adamixer.in_points=8",
         "adamixer.out_points=8", "adamixer.ffn_dim=64", "adamixer.shuffle_channels=8",
         "adamixer.fill_queries=true", "distill.instance_queue_size=16", "distill.image_queue_size=8"]
D = 64  # class text width of the small model (official 512)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops on one thread


# ----------------------------------------------------------------------------------------------
# The official names (ADAMIXER.md §4), written out by hand
# ----------------------------------------------------------------------------------------------

def _wb(pairs):  # weight and bias of each (project module, official module)
    return {f"{p}.{leaf}": f"{o}.{leaf}" for p, o in pairs for leaf in ("weight", "bias")}


# a decoder stage: project name → official name under roi_head.bbox_head.{s}.
STAGE = {"iof_tau": "iof_tau",
         "attention.in_proj_weight": "attention.attn.in_proj_weight",
         "attention.in_proj_bias": "attention.attn.in_proj_bias",
         **_wb([("attention.out_proj", "attention.attn.out_proj"), ("attention_norm", "attention_norm"),
                ("offsets", "sampling_n_mixing.sampling_offset_generator.0"),
                ("mixing.generator", "sampling_n_mixing.adaptive_mixing.parameter_generator.0"),
                ("mixing.out_proj", "sampling_n_mixing.adaptive_mixing.out_proj"),
                ("mixing_norm", "sampling_n_mixing.norm"),
                ("ffn.0", "ffn.layers.0.0"), ("ffn.2", "ffn.layers.1"), ("ffn_norm", "ffn_norm"),
                ("cls_fcs.0", "cls_fcs.0"), ("cls_fcs.1", "cls_fcs.1"), ("fc_cls", "fc_cls"),
                ("reg_fcs.0", "reg_fcs.0"), ("reg_fcs.1", "reg_fcs.1"), ("reg_fcs.3", "reg_fcs.3"),
                ("reg_fcs.4", "reg_fcs.4"), ("reg_fcs.6", "reg_fcs.6"), ("reg_fcs.7", "reg_fcs.7"),
                ("fc_reg", "fc_reg"), ("objectness.0", "objness.0"), ("objectness.2", "objness.2")])}
# a generator head: project name → official name under rpn_head.{main,aux}_head.
HEAD = _wb([("reg.0", "anchor_deltas.0"), ("reg.2", "anchor_deltas.2"),
            ("obj.0", "objectness_logits.0"), ("obj.2", "objectness_logits.2")])
TOP = {"detector.generator.tower1.0.weight": "rpn_head.conv1.conv.weight",
       "detector.generator.tower2.0.weight": "rpn_head.conv2.conv.weight",
       **_wb([("detector.generator.tower1.1", "rpn_head.conv1.gn"),
              ("detector.generator.tower2.1", "rpn_head.conv2.gn"),
              ("detector.generator.content_norm", "rpn_head.token_norm"),
              ("detector.projector.mlp.0", "roi_head.visual2text.layers.0"),
              ("detector.projector.mlp.2", "roi_head.visual2text.layers.1"),
              ("detector.projector.mlp.4", "roi_head.visual2text.layers.2"),
              ("detector.projector.fc1", "roi_head.fc1"), ("detector.projector.fc2", "roi_head.fc2"),
              ("detector.image_head.proj", "roi_head.linear_transform"),
              ("detector.image_head.norm", "roi_head.layernorm")])}
NOT_SAVED = ("class_embeddings", "train_steps", "detector.generator.objectness_text",
             "instance.", "image.queue_", "text_space.")  # what the official file cannot hold


def official_state(model) -> tuple[dict, set]:
    """(the official state dict of ``model``'s weights, the project keys it has no name for)."""
    out, skipped = {}, set()
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if k in TOP:
            out[TOP[k]] = v
        elif k.startswith("detector.backbone.body."):  # mmdet ResNet = torchvision names
            out["backbone." + k[len("detector.backbone.body."):]] = v
        elif k.startswith("detector.backbone.fpn."):  # ...fpn.inner_blocks.{i}.0.weight
            kind = {"inner_blocks": "lateral_convs", "layer_blocks": "fpn_convs"}[parts[3]]
            out[f"neck.{kind}.{parts[4]}.conv.{parts[6]}"] = v
        elif k.startswith("detector.level_norms."):
            out[f"norms.{parts[2]}.{parts[3]}"] = v
        elif k.startswith("detector.stages."):
            out[f"roi_head.bbox_head.{parts[2]}.{STAGE['.'.join(parts[3:])]}"] = v
        elif k.startswith("detector.generator.main_head.") or k.startswith("detector.generator.aux_head."):
            head, name = parts[2], ".".join(parts[3:])
            if name == "scales":  # one Scale module per level, [1] each
                for level, s in enumerate(v):
                    out[f"rpn_head.{head}.scales.{level}.scale"] = s.reshape(1).clone()
            elif name in ("obj_scale", "obj_bias"):
                out[f"rpn_head.{head}.{name}"] = v.reshape(1).clone()
            else:
                out[f"rpn_head.{head}.{HEAD[name]}"] = v
        elif k == "classifier.bg_embedding":  # nn.Embedding(1, T)
            out["roi_head.bg_embedding.weight"] = v[None].clone()
        else:
            assert k.startswith(NOT_SAVED), f"no official name for {k}"
            skipped.add(k)
    return out, skipped


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def build(overrides, seed, emb, objectness=None):
    """A model of the COCO AdaMixer config; every parameter and BN statistic moved off its init
    (zero-initialised layers included), so that a misplaced tensor changes the outputs."""
    cfg = config.load_config(CONFIG, overrides)
    torch.manual_seed(seed)
    model = hdovd.build_hdovd(cfg, class_embeddings=emb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=g)
            elif name.endswith("running_mean"):
                b.normal_(0.0, 0.1, generator=g)
        if objectness is not None:
            model.detector.generator.objectness_text.copy_(objectness)
    return cfg, model.eval()


def texts(num, dim, seed=0):
    return F.normalize(torch.randn(num, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def image(h=96, w=128, seed=3):
    return torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small():
    """(cfg, original model, its official state dict, project keys without an official name)."""
    cfg, model = build(SMALL, seed=1, emb=texts(65, D))
    off, skipped = official_state(model)
    return cfg, model, off, skipped


def convert_into_fresh(cfg_overrides, off, seed=2, emb=None):
    """Convert ``off`` into a model of another seed (the same class texts) and load it strictly."""
    _, fresh = build(cfg_overrides, seed=seed, emb=texts(65, D) if emb is None else emb)
    state = convert_adamixer.convert_state_dict(off, fresh)
    fresh.load_state_dict(state, strict=True)
    return fresh, state


def assert_same_outputs(a, b, img):
    with torch.no_grad():
        out_a, out_b = a.detector.decode([img]), b.detector.decode([img])
    for sa, sb in zip(out_a["stages"], out_b["stages"], strict=True):
        for key in ("boxes", "obj_logits", "embed"):
            assert torch.equal(sa[key], sb[key]), key
    det_a, det_b = a.detect([img])[0], b.detect([img])[0]
    assert len(det_a["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(det_a[key], det_b[key]), key


# ----------------------------------------------------------------------------------------------
# Round trip and layouts
# ----------------------------------------------------------------------------------------------

def test_round_trip_fills_every_key_and_detects_identically(small):
    cfg, model, off, skipped = small
    assert "roi_head.bbox_head.1.sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight" in off
    fresh, state = convert_into_fresh(SMALL, off)
    assert set(state) == set(model.state_dict())
    for k, v in model.state_dict().items():  # the official tensors, and the model's own for the rest
        assert torch.equal(state[k], v), k
    # the project keys with no official counterpart are exactly the documented ones
    assert skipped == {k for k in state if any(k.startswith(p) for p in NOT_SAVED)}
    assert {k.split(".")[0] for k in skipped} == {"class_embeddings", "train_steps", "detector",
                                                  "instance", "image", "text_space"}
    assert_same_outputs(model, fresh, image())


def test_round_trip_at_the_official_shapes():
    """The released config's shapes (R50, FPN 256, 6 stages of 8 heads, P 32/128, FFN 2048, T 512):
    only the query count is small (it shapes no weight), so the CPU forward stays short."""
    overrides = ["model.backbone_weights=''", "adamixer.num_queries=8", "adamixer.fill_queries=true"]
    _, model = build(overrides, seed=1, emb=texts(65, 512))
    off, _ = official_state(model)
    assert off["roi_head.bbox_head.5.sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight"].shape \
        == (32768, 256)
    assert off["roi_head.bbox_head.0.sampling_n_mixing.sampling_offset_generator.0.weight"].shape == (384, 256)
    assert off["rpn_head.main_head.objectness_logits.2.weight"].shape == (512, 256, 1, 1)
    assert off["roi_head.visual2text.layers.1.weight"].shape == (1024, 1024)
    fresh, _ = convert_into_fresh(overrides, off, emb=texts(65, 512))
    assert_same_outputs(model, fresh, image(64, 64))


def official_stage(sd, p, query, xyzr, levels, strides, heads, groups, in_points, out_points):
    """``AdaMixerDecoderStagePrompt`` from ADAMIXER.md §2 on the official tensors ``sd[p + name]``:
    returns (query', xyzr', f, objectness logit)."""
    b, n, d = query.shape
    w = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    pe = adamixer.position_encoding(xyzr, d // 4)  # C6 (tested in test_adamixer.py)
    mask = adamixer.iof_attention_bias(box_ops.xyzr_to_xyxy(xyzr), w["iof_tau"])  # (B·H, N, N)
    q = (query + pe).transpose(0, 1)  # (N, B, D): mmcv's sequence-first nn.MultiheadAttention
    attn, _ = F.multi_head_attention_forward(
        q, q, q, d, heads, w["attention.attn.in_proj_weight"], w["attention.attn.in_proj_bias"],
        None, None, False, 0.0, w["attention.attn.out_proj.weight"], w["attention.attn.out_proj.bias"],
        training=False, need_weights=False, attn_mask=mask)
    query = F.layer_norm(q + attn, (d,), w["attention_norm.weight"], w["attention_norm.bias"]).transpose(0, 1)
    # make_sample_points: offsets viewed (B, N, 1, G·P, 3); sampling_3d splits G·P into (G, P)
    sn = "sampling_n_mixing."
    off = F.linear(query, w[sn + "sampling_offset_generator.0.weight"],
                   w[sn + "sampling_offset_generator.0.bias"]).view(b, n, 1, groups * in_points, 3)
    z, r = xyzr[..., 2:3], xyzr[..., 3:4]
    wh = 2.0 ** z * torch.cat([2.0 ** (-r / 2), 2.0 ** (r / 2)], dim=-1)  # (B, N, 2)
    xy = xyzr[:, :, None, None, :2] + off[..., :2] * wh[:, :, None, None]
    points = torch.cat([xy, z[:, :, None, None] + off[..., 2:3]], dim=-1).view(b, n, groups, in_points, 3)
    x = adamixer.sample_3d_reference(levels, strides, points)  # (B, N, G, P, c)
    # AdaptiveMixing: per group [M (c·c), S (P_out·P_in)], M (c_in, c_in), S (P_out, P_in)
    c, am = d // groups, sn + "adaptive_mixing."
    params = F.linear(query, w[am + "parameter_generator.0.weight"], w[am + "parameter_generator.0.bias"])
    m, s = params.reshape(b * n, groups, -1).split([c * c, out_points * in_points], dim=2)
    out = x.reshape(b * n, groups, in_points, c) @ m.reshape(b * n, groups, c, c)
    out = F.relu(F.layer_norm(out, [in_points, c]))
    out = F.relu(F.layer_norm(s.reshape(b * n, groups, out_points, in_points) @ out, [out_points, c]))
    out = F.linear(out.reshape(b, n, -1), w[am + "out_proj.weight"], w[am + "out_proj.bias"])
    query = F.layer_norm(query + out, (d,), w[sn + "norm.weight"], w[sn + "norm.bias"])
    # mmcv FFN with identity, then ffn_norm
    hidden = F.relu(F.linear(query, w["ffn.layers.0.0.weight"], w["ffn.layers.0.0.bias"]))
    query = F.layer_norm(query + F.linear(hidden, w["ffn.layers.1.weight"], w["ffn.layers.1.bias"]),
                         (d,), w["ffn_norm.weight"], w["ffn_norm.bias"])
    cls = F.layer_norm(F.linear(query, w["cls_fcs.0.weight"], w["cls_fcs.0.bias"]), (d,),
                       w["cls_fcs.1.weight"], w["cls_fcs.1.bias"])
    f = F.linear(cls, w["fc_cls.weight"], w["fc_cls.bias"])
    reg = query
    for i in (0, 3, 6):  # Linear, LayerNorm, ReLU
        reg = F.relu(F.layer_norm(F.linear(reg, w[f"reg_fcs.{i}.weight"], w[f"reg_fcs.{i}.bias"]), (d,),
                                  w[f"reg_fcs.{i + 1}.weight"], w[f"reg_fcs.{i + 1}.bias"]))
    delta = F.linear(reg, w["fc_reg.weight"], w["fc_reg.bias"])
    obj = F.linear(F.relu(F.linear(query, w["objness.0.weight"], w["objness.0.bias"])),
                   w["objness.2.weight"], w["objness.2.bias"])
    refined = torch.cat([xyzr[..., :2] + delta[..., :2] * 2.0 ** z, xyzr[..., 2:] + delta[..., 2:]], dim=-1)
    return query, refined, f, obj.squeeze(-1)


def test_converted_stage_computes_the_official_stage(small):
    cfg, model, off, _ = small
    fresh, _ = convert_into_fresh(SMALL, off)
    a = cfg.adamixer
    g = torch.Generator().manual_seed(5)
    strides = [4, 8, 16, 32]
    levels = [torch.randn(1, cfg.model.fpn_channels, 64 // s, 64 // s, generator=g) for s in strides]
    query = torch.randn(1, 5, cfg.model.fpn_channels, generator=g)
    xyzr = torch.cat([torch.rand(1, 5, 2, generator=g) * 64, 3.5 + torch.rand(1, 5, 1, generator=g),
                      0.5 * torch.randn(1, 5, 1, generator=g)], dim=-1)
    with torch.no_grad():
        got = fresh.detector.stages[1](adamixer.FeatureAtlas(levels, strides), query, xyzr)
        want = official_stage(off, "roi_head.bbox_head.1.", query, xyzr, levels, strides,
                              a.num_heads, a.num_groups, a.in_points, a.out_points)
    for name, x, y in zip(("query", "xyzr", "f", "objectness"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_generator_scalars_land_on_their_level(small):
    _, model, off, _ = small
    off = dict(off, **{f"rpn_head.aux_head.scales.{i}.scale": torch.tensor([10.0 + i]) for i in range(4)})
    off["rpn_head.main_head.obj_bias"] = torch.tensor([-7.0])
    _, state = convert_into_fresh(SMALL, off)
    assert state["detector.generator.aux_head.scales"].tolist() == [10.0, 11.0, 12.0, 13.0]  # P3..P6
    assert state["detector.generator.main_head.obj_bias"].shape == () and \
        float(state["detector.generator.main_head.obj_bias"]) == -7.0


# ----------------------------------------------------------------------------------------------
# The command and evaluate.py's loader
# ----------------------------------------------------------------------------------------------

def test_command_writes_a_checkpoint_evaluate_loads(small, tmp_path, capsys):
    _, _, off, _ = small
    raw_texts, raw_obj = 3 * texts(65, D, seed=7), 2 * texts(1, D, seed=8)  # files are not normalised
    resources = tmp_path / "ovd_resources"
    resources.mkdir()
    torch.save(raw_texts, resources / official.CLASS_EMBEDDINGS)
    torch.save(raw_obj, resources / official.OBJECTNESS_EMBEDDING)
    # the original model holds the DetPro texts and "whole entity" as the official run read them
    _, model = build(SMALL, seed=1, emb=F.normalize(raw_texts, dim=-1),
                     objectness=F.normalize(raw_obj, dim=-1)[0])
    off, _ = official_state(model)
    path = tmp_path / "HD_OVD_adamixer.pth"
    torch.save({"meta": {"epoch": 12, "iter": 80832, "mmdet_version": "2.27.0"},
                "state_dict": {"module." + k: v for k, v in off.items()}, "optimizer": {}}, path)
    out = tmp_path / "runs" / "hd_ovd_adamixer" / "ckpt.pth"
    convert_adamixer.main([str(path), "--config", str(CONFIG), "--resources", str(resources),
                           "--out", str(out), "--set", *SMALL])
    assert "no official counterpart" in capsys.readouterr().out
    loaded, cfg, ckpt = evaluate.load_checkpoint(out)
    assert cfg.model.backbone_weights == "" and ckpt["converted_from"]["iter"] == 80832
    assert int(ckpt["model"]["train_steps"]) == cfg.train.max_steps  # past the warm-up
    model.train_steps.copy_(loaded.train_steps)  # the released run too: p1·p2 at test, not p1 alone
    assert_same_outputs(model, loaded, image())


# ----------------------------------------------------------------------------------------------
# Errors name the key or file
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"roi_head.bbox_head.0.shadow.weight": torch.zeros(2)}),
     "roi_head.bbox_head.0.shadow.weight"),
    (lambda sd: sd.pop("roi_head.bbox_head.1.fc_reg.bias"),
     "'roi_head.bbox_head.1.fc_reg.bias' (for 'detector.stages.1.fc_reg.bias')"),
    (lambda sd: sd.update({"roi_head.bbox_head.0.iof_tau": torch.zeros(3)}),
     r"'roi_head.bbox_head.0.iof_tau' has shape (3,) but 'detector.stages.0.iof_tau' needs (2,)"),
    (lambda sd: sd.pop("rpn_head.aux_head.scales.3.scale"), "has levels [0, 1, 2]"),
    (lambda sd: sd.pop("backbone.layer3.2.bn3.running_var"), "'backbone.layer3.2.bn3.running_var'"),
])
def test_key_errors_name_the_key(small, change, message):
    _, model, off, _ = small
    bad = dict(off)
    change(bad)
    with pytest.raises(convert_adamixer.ConversionError) as e:
        convert_into_fresh(SMALL, bad)
    assert message in str(e.value)


def test_fewer_stages_in_the_config_is_an_error(small):
    _, model, off, _ = small
    with pytest.raises(convert_adamixer.ConversionError, match=r"'roi_head\.bbox_head\.1\..*lacks"):
        convert_into_fresh(SMALL + ["adamixer.num_stages=1"], off)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(convert_adamixer.ConversionError, match="not found"):
        convert_adamixer.read_official_checkpoint(tmp_path / "absent.pth")
    plain = tmp_path / "plain.pth"
    torch.save({"model": {}}, plain)
    with pytest.raises(convert_adamixer.ConversionError, match=r"plain\.pth' is not an mmcv checkpoint"):
        convert_adamixer.read_official_checkpoint(plain)
    with pytest.raises(SystemExit) as e:  # no DetPro texts given: the message says how to give them
        convert_adamixer.main([str(plain), "--config", str(CONFIG), "--set", *SMALL])
    assert "--resources" in str(e.value.code)
