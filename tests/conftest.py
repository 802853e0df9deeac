"""Shared test setup: a tiny Shapes-OV world built once per test session. (The repository root is
on sys.path through pytest.ini's ``pythonpath``; the ``cuda`` marker is registered there too.)"""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(root: Path) -> list[str]:
    """``--set`` values for a world small enough for tests: 24 train / 8 val images, a teacher
    pre-trained for 3 steps and a proposal network for 5 (plumbing, not accuracy), and a narrow
    detector. The untrained teacher cannot calibrate the pseudo-label weight, so it is fixed."""
    return [
        f"data.root={root}", f"teacher.clip_model={root / 'teacher' / 'clip.pt'}",
        "world.num_train=24", "world.num_val=8", "world.workers=1",
        "clip_pretrain.num_scenes=64", "clip_pretrain.batch_size=16",
        "clip_pretrain.max_steps=3",
        "teacher.proposals.max_steps=5",
        "teacher.proposals.batch_size=4", "teacher.calibration_images=24",
        "teacher.weight_a=1.0", "teacher.weight_mu=0.3", "teacher.weight_sigma=0.05",
        "model.fpn_channels=32", "model.representation_size=128",
        "model.rpn_pre_nms_train=400", "model.rpn_post_nms_train=200",
        "model.rpn_pre_nms_test=200", "model.rpn_post_nms_test=100",
        "model.roi_batch_size=64", "model.pseudo_min_side_px=8",
        "distill.instance_queue_size=64", "distill.image_queue_size=16",
        "data.num_workers=0", "train.batch_size=2", "train.log_every=1",
        "eval.batch_size=8", "eval.max_images=4",
    ]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> list[str]:
    """Build the tiny world, its teacher and the offline knowledge once (train.prepare, the
    preparation path train.py runs); returns the ``--set`` overrides that point at it."""
    import config
    import train

    overrides = tiny_overrides(tmp_path_factory.mktemp("tiny_shapes_ov"))
    train.prepare(config.load_config(REPO / "config.yaml", overrides))
    return overrides


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small ops on one intra-op thread, then restore the setting.

    Measured here on the shared 2-core machine (load ≈ 7): one training step of the test model took
    0.09 s wall with 1 thread and 9 s with torch's default 2 (OpenMP threads spin against the other
    processes); these tensors are too small to gain from a second thread anyway.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_detects_the_boxes(model, images, targets) -> None:
    """Every target box has a detection with IoU > 0.5, and the best-scoring one among them
    carries the box's label (the check after a one-batch overfit)."""
    from torchvision.ops import box_iou

    model.eval()
    for det, t in zip(model.detect(images), targets):
        for box, label in zip(t["boxes"], t["labels"]):
            overlapping = (box_iou(box[None], det["boxes"])[0] > 0.5).nonzero().flatten()
            assert len(overlapping) > 0, f"no detection with IoU > 0.5 for box {box.tolist()}"
            best = overlapping[det["scores"][overlapping].argmax()]
            assert int(det["labels"][best]) == int(label), (box.tolist(), det["labels"][overlapping].tolist())


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_world, tmp_path_factory):
    """The checkpoint of a 1-step train.py run on the tiny world (plumbing, not accuracy), trained
    once per session for the tests of evaluate.py and predict.py (they only read it)."""
    import train

    out = tmp_path_factory.mktemp("tiny_run")
    train.main(["--config", str(REPO / "config.yaml"), "--set", *tiny_world,
                f"run.out_dir={out}", "run.name=r", "train.max_steps=1"])
    return out / "r" / "ckpt.pth"
