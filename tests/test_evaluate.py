"""evaluate.py: the novel / base / all AP50 split against numbers computed by hand, result
conversion to the original frame, the checkpoint error messages, the val command and the
``--images`` pass-through to predict.py (whose own tests are tests/test_predict.py)."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import evaluate

# Four categories: two base (circle, square), two novel (ring, crescent), plus "star" (base) that
# has no GT box at all (COCOeval gives it precision -1; it must not enter any mean).
CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "ring"},
        {"id": 4, "name": "crescent"}, {"id": 5, "name": "star"}]
BASE_IDS, NOVEL_IDS = [1, 2, 5], [3, 4]


def _gt(tmp_path) -> COCO:
    """Two 100x100 images. circle: one box per image; square: one box; ring: two boxes (one per
    image); crescent: one box."""
    boxes = [  # (image_id, category_id, xywh)
        (1, 1, [10, 10, 20, 20]), (2, 1, [50, 50, 30, 30]),
        (1, 2, [60, 10, 20, 20]),
        (1, 3, [10, 60, 10, 10]), (2, 3, [5, 5, 20, 20]),
        (2, 4, [60, 5, 25, 25]),
    ]
    gt = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in (1, 2)],
          "categories": CATS,
          "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b,
                           "area": b[2] * b[3], "iscrowd": 0} for k, (i, c, b) in enumerate(boxes)]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return COCO(str(path))


def _det(image_id, cat, bbox, score):
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


DETECTIONS = [
    # circle: both boxes exact, nothing else -> precision 1 at every recall point: AP50 = 100.
    _det(1, 1, [10, 10, 20, 20], 0.9), _det(2, 1, [50, 50, 30, 30], 0.8),
    # square: a false positive (no overlap) at score 0.9, then the exact box at 0.8.
    # Ranked: FP (P=0/1, R=0), TP (P=1/2, R=1). COCO interpolates precision as the max precision at
    # any recall >= r, so every one of the 101 recall points r = 0, 0.01, ..., 1 gets 0.5: AP50 = 50.
    _det(1, 2, [0, 80, 15, 15], 0.9), _det(1, 2, [60, 10, 20, 20], 0.8),
    # ring: one of its two boxes found, with IoU 0.62 (box [5,5,20,12.4] inside GT [5,5,20,20]:
    # 248/400); the other missed. Max recall 0.5 at precision 1: recall points 0..0.50 (51 of 101)
    # get 1, the rest 0 -> AP50 = 51/101 = 50.495. At IoU thresholds 0.5, 0.55, 0.6 it is a TP,
    # at 0.65..0.95 (7 thresholds) a FP -> AP at those thresholds is 0.
    _det(2, 3, [5, 5, 20, 12.4], 0.7),
    # crescent: no detection -> 0. star has no GT: its false positive is not scored at all.
    _det(1, 5, [30, 30, 10, 10], 0.95),
]
RING = 100 * 51 / 101


def test_split_metrics_match_hand_computed_values(tmp_path):
    m = evaluate.coco_metrics(_gt(tmp_path), DETECTIONS, BASE_IDS, NOVEL_IDS)
    assert m["per_class_AP50"] == pytest.approx({"circle": 100.0, "square": 50.0, "ring": RING,
                                                 "crescent": 0.0})
    assert "star" not in m["per_class_AP50"]  # no GT -> excluded (COCO's convention)
    assert m["AP50_base"] == pytest.approx((100 + 50) / 2)
    assert m["AP50_novel"] == pytest.approx((RING + 0) / 2)
    assert m["AP50_all"] == pytest.approx((100 + 50 + RING + 0) / 4)
    # AP over IoU 0.5:0.95: exact boxes score at all 10 thresholds, the ring TP at 3 of them.
    assert m["AP_all"] == pytest.approx((100 + 50 + RING * 3 / 10 + 0) / 4)
    assert m["AP_base"] == pytest.approx((100 + 50) / 2)
    assert m["AP_novel"] == pytest.approx((RING * 3 / 10 + 0) / 2)
    assert m["AP75_novel"] == pytest.approx(0.0)  # the ring hit (IoU 0.62) misses IoU 0.75
    assert m["num_detections"] == len(DETECTIONS)


def test_tighter_novel_box_scores_at_iou_075(tmp_path):
    # The same detections with the ring box tightened to [5,5,20,15.6] (IoU 312/400 = 0.78): a
    # TP at the 6 thresholds 0.5..0.75, so AP75 sees it and AP (0.5:0.95) doubles its share.
    dets = [_det(2, 3, [5, 5, 20, 15.6], 0.7) if d["category_id"] == 3 else d for d in DETECTIONS]
    m = evaluate.coco_metrics(_gt(tmp_path), dets, BASE_IDS, NOVEL_IDS)
    assert m["AP50_novel"] == pytest.approx((RING + 0) / 2)
    assert m["AP75_novel"] == pytest.approx((RING + 0) / 2)
    assert m["AP_novel"] == pytest.approx((RING * 6 / 10 + 0) / 2)
    assert m["AP_base"] == pytest.approx((100 + 50) / 2)


def test_results_are_not_modified(tmp_path):
    dets = [dict(d) for d in DETECTIONS]
    evaluate.coco_metrics(_gt(tmp_path), dets, BASE_IDS, NOVEL_IDS)
    assert dets == DETECTIONS  # loadRes adds keys to the dicts it gets; ours must stay clean


def test_img_ids_restrict_the_evaluation(tmp_path):
    # Only image 1: circle 1 GT found (100), square 50, ring's image-1 box missed (0); crescent
    # has no GT in image 1 and drops out.
    m = evaluate.coco_metrics(_gt(tmp_path), DETECTIONS, BASE_IDS, NOVEL_IDS, img_ids=[1])
    assert m["per_class_AP50"] == pytest.approx({"circle": 100.0, "square": 50.0, "ring": 0.0})
    assert m["AP50_novel"] == pytest.approx(0.0)
    assert m["AP50_base"] == pytest.approx(75.0)


def test_empty_results_give_zeros(tmp_path):
    m = evaluate.coco_metrics(_gt(tmp_path), [], BASE_IDS, NOVEL_IDS)
    assert all(m[k] == 0.0 for k in evaluate.METRIC_KEYS)
    assert m["per_class_AP50"] == {"circle": 0.0, "square": 0.0, "ring": 0.0, "crescent": 0.0}
    evaluate.format_table(m, ["circle", "square", "star"], ["ring", "crescent"])  # prints fine


def test_detections_map_back_to_the_original_frame():
    # A 201x100 (w x h) image resized to 128x64: data.py rounds the grid, so the per-axis ratios
    # (128/201, 64/100) differ from the nominal scale 0.64; the inverse must use them.
    target = {"image_id": 7, "orig_size": torch.tensor([100, 201]), "size": torch.tensor([64, 128]),
              "scale": 0.64, "flipped": False}
    det = {"boxes": torch.tensor([[12.8, 6.4, 64.0, 32.0], [100.0, 0.0, 140.0, 70.0]]),
           "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([1, 0])}
    res = evaluate.detections_to_coco([det], [target], label_to_cat_id=[11, 22])
    rx, ry = 201 / 128, 100 / 64
    assert res[0]["category_id"] == 22 and res[1]["category_id"] == 11
    assert res[0]["image_id"] == 7 and res[0]["score"] == pytest.approx(0.9)
    assert res[0]["bbox"] == pytest.approx([12.8 * rx, 6.4 * ry, 51.2 * rx, 25.6 * ry], abs=0.01)
    # second box leaves the image after rescaling: clipped to w=201, h=100
    x1, y1, w, h = res[1]["bbox"]
    assert x1 + w == pytest.approx(201) and y1 + h == pytest.approx(100)


def test_flipped_eval_image_is_an_error():
    target = {"image_id": 1, "orig_size": torch.tensor([10, 10]), "size": torch.tensor([10, 10]),
              "scale": 1.0, "flipped": True}
    det = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.zeros(1).long()}
    with pytest.raises(ValueError, match="flipped"):
        evaluate.detections_to_coco([det], [target], [1])


def test_precision_recall_curves_match_hand_computed_values(tmp_path):
    m = evaluate.coco_metrics(_gt(tmp_path), DETECTIONS, BASE_IDS, NOVEL_IDS, curves=True)
    curves = m["pr_curves"]
    assert len(curves["recall"]) == 101 and curves["recall"][0] == 0 and curves["recall"][-1] == 1
    # base: circle precision 100 and square 50 at every recall point (star has no GT: left out)
    assert curves["base"] == pytest.approx([75.0] * 101)
    # novel: ring 100 up to recall 0.5 then 0, crescent 0 everywhere
    assert curves["novel"] == pytest.approx([50.0] * 51 + [0.0] * 50)
    assert "pr_curves" not in evaluate.coco_metrics(_gt(tmp_path), DETECTIONS, BASE_IDS, NOVEL_IDS)


def test_plots_are_written(tmp_path):
    m = evaluate.coco_metrics(_gt(tmp_path), DETECTIONS, BASE_IDS, NOVEL_IDS, curves=True)
    evaluate.plot_ap_per_class(m["per_class_AP50"], ["circle", "square", "star"], ["ring", "crescent"],
                               tmp_path / "p" / "ap.png")
    evaluate.plot_pr_curves(m["pr_curves"], tmp_path / "p" / "pr.png")
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "train", "step": 1, "loss_cls_scaled": 2.0, "loss_box_scaled": 0.5, "total": 2.5},
        {"kind": "eval", "step": 1, "AP50_novel": 3.0},
        {"kind": "train", "step": 2, "loss_cls_scaled": 1.0, "loss_box_scaled": 0.25, "total": 1.25}]))
    evaluate.plot_loss_curves(log, tmp_path / "p" / "loss.png")
    for name in ("ap.png", "pr.png", "loss.png"):
        with Image.open(tmp_path / "p" / name) as im:
            assert im.size[0] >= 480 and np.asarray(im.convert("L")).std() > 0
    with pytest.raises(FileNotFoundError, match="train.py writes"):
        evaluate.plot_loss_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.py writes"):
        evaluate.load_checkpoint(tmp_path / "nope.pth")
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        evaluate.load_checkpoint(tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="not a train.py checkpoint"):
        evaluate.main([str(tmp_path / "other.pth")])


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    import config
    import hdovd
    from conftest import REPO

    cfg = config.load_config(REPO / "config.yaml")  # ResNet-18 from scratch: no weights file
    names = config.class_names(cfg)
    model = hdovd.build_hdovd(cfg, class_embeddings=torch.randn(len(names), 32))
    state = model.state_dict()
    state.pop(next(k for k in state if k.endswith("weight")))  # a weight the model expects
    torch.save({"model": state, "config": config.config_to_dict(cfg)}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="do not fit the model built from its config"):
        evaluate.load_checkpoint(tmp_path / "ckpt.pth")


def _val_images(tiny_world, n):
    import config
    from conftest import REPO

    cfg = config.load_config(REPO / "config.yaml", tiny_world)
    return sorted((REPO / cfg.data.root / cfg.data.val_images).glob("*.png"))[:n]


def test_val_command_writes_metrics_detections_and_plots(tiny_ckpt, tmp_path):
    metrics = evaluate.main([str(tiny_ckpt), "--set", "eval.max_images=3", "--out",
                             str(tmp_path / "ev"), "--plots", str(tmp_path / "plots")])
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["num_images"] == 3 and saved["step"] == 1 and "pr_curves" not in saved
    assert set(evaluate.METRIC_KEYS) <= set(saved) and saved == json.loads(json.dumps(metrics))
    dets = json.loads((tmp_path / "ev" / "detections_val.json").read_text())
    assert dets and {d["image_id"] for d in dets} <= {1, 2, 3}
    assert all(len(d["bbox"]) == 4 and 0 <= d["bbox"][0] <= 128 for d in dets)
    for name in ("ap50_per_class.png", "pr_curves.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0


def test_images_flag_forwards_to_predict(tiny_ckpt, tiny_world, tmp_path, capsys):
    """``evaluate.py ckpt --images`` runs predict.py for one release (issue 21), saying so."""
    val = _val_images(tiny_world, 1)
    evaluate.main([str(tiny_ckpt), "--images", str(val[0]), "--out", str(tmp_path / "o")])
    assert "moved to predict.py" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["images"][0]["file_name"] == str(val[0])


def test_help_is_short():
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        evaluate.main(["--help"])
    assert len(out.getvalue().splitlines()) <= 40, out.getvalue()
