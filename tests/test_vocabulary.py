"""A custom vocabulary (issue 13): the known classes compete in the softmax, and the Python API.

* ``predict.compete_with_known``: known names (case ignored) are the checkpoint's own rows, only new
  names are embedded, the report indexes the user's order.
* On a model whose RoI embeddings are set by hand, a square scored against the vocabulary
  ["rectangle"] alone is forced into "rectangle" (the defect), and competing with the known
  classes it is not reported, while a real rectangle still is (p1 alone and the H1 ensemble);
  a runner-up "rectangle" on a square survives class-wise NMS, not the agnostic one.
* ``predict.Predictor`` on an untrained small model (no checkpoint file, no CLIP): every image
  type gives the same detections, boxes come back in the original frame, known names give the
  full-vocabulary detections restricted to them and need no teacher, a new name without a
  teacher is a clear error, ``draw`` returns and saves a picture.
The precision/recall numbers of a trained checkpoint are in bench/vocabulary.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import config
import predict
import hdovd
from conftest import REPO
from knowledge import clip_io

D = 64
SQUARE = "diamond"  # the base class playing the square (config.yaml's ladder world has no "square")
SMALL = ["model.fpn_channels=32", "model.representation_size=64", "model.rpn_pre_nms_test=300",
         "model.rpn_post_nms_test=100", "eval.batch_size=2"]
ALL_OFF = ["distill.instance=false", "distill.class_wise=false", "distill.text_space=false",
           "distill.image=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(*shape, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def build(*overrides):
    """A small model of the Shapes-OV config whose "rectangle" text is close to "square"'s
    (cosine 0.71), as look-alike classes are; returns (cfg, model in eval mode)."""
    cfg = config.load_config(REPO / "config.yaml", SMALL + list(overrides))
    names = config.class_names(cfg)
    emb = unit(len(names), D, seed=0)
    square, rect = names.index(SQUARE), names.index("rectangle")
    emb[rect] = F.normalize(emb[square] + F.normalize(emb[rect] - (emb[rect] @ emb[square]) * emb[square], dim=0), dim=0)
    torch.manual_seed(0)
    return cfg, hdovd.build_hdovd(cfg, class_embeddings=emb).eval()


def test_compete_with_known_reuses_known_rows_and_embeds_only_new_names():
    known, known_text = ["circle", "square", "ring"], unit(3, D, seed=1)
    calls = []

    def embed(names):
        calls.append(list(names))
        return unit(len(names), D, seed=2)

    text, report = predict.compete_with_known([" Ring", "kite", "SQUARE", "moon"], known, known_text, embed)
    assert calls == [["kite", "moon"]]
    assert torch.equal(text[:3], known_text) and torch.equal(text[3:], unit(2, D, seed=2))
    assert report.tolist() == [2, 3, 1, 4]  # ring, kite, square, moon

    def no_embedding(names):
        raise AssertionError(f"embedded {names} although every name is known")

    text, report = predict.compete_with_known(["circle"], known, known_text, no_embedding)
    assert torch.equal(text, known_text) and report.tolist() == [0]


@pytest.mark.parametrize("hierarchies", [ALL_OFF, ["distill.image=false"]], ids=["p1", "H1-ensemble"])
def test_known_classes_stop_a_custom_vocabulary_from_forcing_labels(hierarchies):
    cfg, model = build(*hierarchies)
    names = config.class_names(cfg)
    square, rect = names.index(SQUARE), names.index("rectangle")
    # two RoIs of one image: a square and a rectangle, embedded exactly like their class texts
    rois = model.class_embeddings[[square, rect]]
    out = {"boxes": [torch.tensor([[10.0, 10.0, 50.0, 50.0], [70.0, 60.0, 120.0, 90.0]])],
           "roi_text_emb": rois, "roi_vis_emb": rois}

    # alone: softmax over [rectangle; background]: the square is forced into "rectangle"
    alone = model.detections(out, model.class_embeddings[[rect]], num_base_classes=0)[0]
    assert sorted(alone["scores"].tolist(), reverse=True)[1] > 0.9

    text, report = predict.compete_with_known(["rectangle"], names, model.class_embeddings,
                                            embed=lambda n: pytest.fail("all names are known"))
    known = model.detections(out, text, model.num_base_classes, report)[0]
    assert known["labels"].tolist() == [0]
    assert known["boxes"].tolist() == [[70.0, 60.0, 120.0, 90.0]] and known["scores"][0] > 0.9

    # both names asked: both reported, each under its own name, in the user's order
    text, report = predict.compete_with_known(["rectangle", SQUARE], names, model.class_embeddings, None)
    both = model.detections(out, text, model.num_base_classes, report)[0]
    by_label = {int(l): b for l, b in zip(both["labels"], both["boxes"].tolist())}
    assert by_label == {0: [70.0, 60.0, 120.0, 90.0], 1: [10.0, 10.0, 50.0, 50.0]}

    # a third RoI on the square, 1 px off, that looks a little like a rectangle: class-wise NMS
    # keeps it as a second name on the square; agnostic NMS leaves the square its best name only
    mixed = F.normalize(0.55 * rois[0] + 0.45 * rois[1], dim=0)
    out3 = {"boxes": [torch.cat([out["boxes"][0], torch.tensor([[11.0, 10.0, 51.0, 50.0]])])],
            "roi_text_emb": torch.cat([rois, mixed[None]]), "roi_vis_emb": torch.cat([rois, mixed[None]])}
    text, report = predict.compete_with_known(["rectangle"], names, model.class_embeddings, None)
    classwise = model.detections(out3, text, model.num_base_classes, report)[0]
    assert len(classwise["boxes"]) == 2 and [11.0, 10.0, 51.0, 50.0] in classwise["boxes"].tolist()
    agnostic = model.detections(out3, text, model.num_base_classes, report, agnostic_nms=True)[0]
    assert agnostic["boxes"].tolist() == [[70.0, 60.0, 120.0, 90.0]]


def _scene() -> np.ndarray:
    """A 256 x 192 (w x h) uint8 picture with two bright shapes on a dark background."""
    img = np.full((192, 256, 3), 30, dtype=np.uint8)
    img[40:100, 30:90] = 230
    img[110:170, 150:240] = (200, 220, 90)
    return img


def test_predictor_inputs_frame_known_names_and_drawing(tmp_path):
    cfg, model = build(*ALL_OFF)
    model.inference["score_thresh"] = 0.0  # untrained: keep every box so that there is something to compare
    predictor = predict.Predictor(model, cfg, "cpu")
    arr = _scene()
    Image.fromarray(arr).save(tmp_path / "scene.png")
    inputs = [Image.fromarray(arr), arr, arr / 255.0, torch.from_numpy(arr).permute(2, 0, 1),
              torch.from_numpy(arr).permute(2, 0, 1) / 255.0, str(tmp_path / "scene.png"),
              tmp_path / "scene.png"]
    dets = predictor(inputs)  # no vocabulary: the checkpoint's classes
    ref = dets[0]
    assert len(ref.boxes) > 0 and ref.vocabulary == config.class_names(cfg)
    for d in dets[1:]:
        torch.testing.assert_close(d.boxes, ref.boxes)
        assert d.labels.tolist() == ref.labels.tolist()

    # boxes in the ORIGINAL frame: Shapes-OV's data.max_size 128 resizes 256x192 to 128x96
    tensor, _ = predictor.transform(Image.fromarray(arr), {"boxes": torch.zeros(0, 4)})
    assert tensor.shape == (3, 96, 128)
    raw = model.detect([tensor], agnostic_nms=True)[0]
    torch.testing.assert_close(ref.boxes, raw["boxes"] * 2)
    assert (ref.boxes[:, 2] <= 256).all() and (ref.boxes[:, 3] <= 192).all()

    # known names (any case): the same detections as the full vocabulary, restricted to the names,
    # without the teacher CLIP; base/novel from the checkpoint's split
    wanted = sorted(set(ref.names))[:2]
    sub = predictor(arr, vocabulary=[w.upper() for w in wanted])
    keep = torch.tensor([n in wanted for n in ref.names])
    torch.testing.assert_close(sub.boxes, ref.boxes[keep])
    torch.testing.assert_close(sub.scores, ref.scores[keep])
    assert sub.names == [n.upper() for n in ref.names if n in wanted]
    assert sub.novel == [w in cfg.data.novel_classes for w in wanted]
    assert predictor.clip is None

    coco = ref.to_coco(image_id=7)
    assert coco[0]["image_id"] == 7 and coco[0]["category_id"] == int(ref.labels[0]) + 1
    picture = ref.draw(tmp_path / "out" / "scene_dets.png", score_thresh=0.0)
    assert picture.size[0] == 512 and picture.size[1] == 384  # small images are drawn enlarged
    assert Image.open(tmp_path / "out" / "scene_dets.png").size == picture.size
    assert np.asarray(picture).std() > 0


def test_predictor_errors_name_the_problem(tmp_path):
    cfg, model = build(*ALL_OFF, f"teacher.clip_model={tmp_path / 'missing' / 'clip.pt'}")
    predictor = predict.Predictor(model, cfg, "cpu")
    arr = _scene()
    with pytest.raises(clip_io.TeacherError, match=r"\['kite'\].*teacher\.clip_model"):
        predictor(arr, vocabulary=["circle", "kite"])
    with pytest.raises(ValueError, match="holds no class names"):
        predictor(arr, vocabulary=" , ")
    with pytest.raises(ValueError, match=r"names \['Ring', 'ring'\] more than once"):
        predictor(arr, vocabulary="Ring,ring")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        predictor(tmp_path / "nope.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png' is not an image"):
        predictor(str(tmp_path / "notes.png"))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        predictor(arr.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        predictor(torch.zeros(5, 8, 8))
