"""Bad-input catalogue (issue 14): every case a user can run into goes through a command line
entry point (``train.cli``, ``evaluate.main``, ``knowledge.extract.main``, ``shapes_ov.world.main``)
and must end in one line, exit status 1, that names the problem and the fix, with no traceback. ``test_command_prints_one_line_without_traceback`` runs ``python train.py`` as a real
process; the others call the entry points in-process and catch the SystemExit.

Cases (the test that covers each):
  annotation JSON missing ........................ test_annotation_file_missing
  annotation JSON empty / corrupt / not COCO ..... test_annotation_file_unreadable[*],
                                                   test_corrupt_val_file_of_the_world
  categories missing from the split .............. test_categories_missing_from_the_split
  image missing / corrupt / not an image / size .. test_image_unreadable[*] (with 2 data workers:
                                                   an error raised in a worker arrives unwrapped)
  zero-area / out-of-image boxes, image without
  a base box (dropped, counted and reported) ..... test_degenerate_boxes_are_dropped_and_reported[*]
  no image with a base box at all ................ test_no_image_with_a_base_box
  knowledge file missing / corrupt / row count ... test_knowledge_file_bad[*]
  CLIP weights missing offline, CLIP unreadable .. test_clip_weights_missing_offline,
                                                   test_clip_checkpoint_unreadable
  resume from another detector / vocabulary size,
  a damaged checkpoint ........................... test_resume_from_a_foreign_checkpoint[*]
  evaluate a checkpoint that does not fit ........ test_evaluate_checkpoint_that_does_not_fit[*]
  unknown / mistyped config keys, no config file . test_config_mistakes[*]
  empty or duplicate vocabulary (config, --vocabulary)
                                                   test_vocabulary_mistakes[*]
  --nproc_per_node larger than the dataset allows  test_more_processes_than_batches (the check in
                                                   train.batches; under torchrun every rank prints it)
  a run directory that cannot be written ......... test_run_directory_not_writable
  a full disk during a checkpoint ................ test_full_disk_during_a_checkpoint
  NaN in a loss: stops, keeps the last good checkpoint
                                                   test_nan_loss_keeps_the_last_good_checkpoint
Also elsewhere, at the function level: a Shapes-OV root built from another world config
(test_shapes_ov.py), missing COCO source files for ``tools/ov_coco.py`` (test_data.py), a
checkpoint that is not a train.py one (test_evaluate.py).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import config
import data
import evaluate
import predict
import train
from conftest import REPO
from knowledge import extract
from shapes_ov import world

CONFIG = REPO / "config.yaml"
NUM_CLASSES = len(config.class_names(config.load_config(CONFIG)))


def _error(cli, argv, *patterns) -> str:
    """Run ``cli(argv)``; it must exit with one message matching every pattern, no traceback."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    message = str(e.value.code)
    assert e.value.code not in (0, None) and "Traceback" not in message, message
    for pattern in patterns:
        assert re.search(pattern, message, re.S), f"{pattern!r} not in: {message}"
    return message


def _path(sets: list[str], key: str) -> Path:
    """The value of ``key`` (data.root, run.out_dir) in a list of --set overrides."""
    return Path(next(s for s in sets if s.startswith(f"{key}="))[len(key) + 1:])


@pytest.fixture
def copy(tiny_world, tmp_path):
    """A private copy of the tiny world to damage (its teacher folder linked, not copied); returns
    (its --set overrides, its root)."""
    source, root = _path(tiny_world, "data.root"), tmp_path / "world"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("teacher"))
    os.symlink(source / "teacher", root / "teacher")
    sets = [s for s in tiny_world if not s.startswith("data.root=")]
    return sets + [f"data.root={root}", f"run.out_dir={tmp_path / 'runs'}", "train.max_steps=1",
                   "eval.max_images=2"], root


def _train(sets, *extra) -> list[str]:
    return ["--config", str(CONFIG), "--set", *sets, *extra]


@pytest.fixture(scope="module")
def checkpoint(tiny_world, tmp_path_factory):
    """A 1-step checkpoint of the tiny world."""
    out = tmp_path_factory.mktemp("bad_input_run")
    train.main(_train(tiny_world, f"run.out_dir={out}", "run.name=one", "train.max_steps=1",
                      "eval.max_images=2"))
    return out / "one" / "ckpt.pth"


def _edit_json(path: Path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


# ------------------------------------------------------------------------------------------------
# Annotation files
# ------------------------------------------------------------------------------------------------

def test_annotation_file_missing(copy, checkpoint):
    sets, root = copy
    (root / "annotations" / "instances_val.all.json").unlink()
    _error(evaluate.main, [str(checkpoint), "--set", f"data.root={root}"],
           r"annotation file '.*instances_val\.all\.json' not found", r"python -m shapes_ov")


@pytest.mark.parametrize("content, problem", [
    ("", "not valid JSON"), ('{"images": [{"id": 1, ', "not valid JSON"),
    ('{"images": []}', "not COCO format")], ids=["empty", "truncated", "not-coco"])
def test_annotation_file_unreadable(copy, content, problem):
    sets, root = copy
    (root / "annotations" / "instances_train.base.json").write_text(content)
    _error(train.cli, _train(sets), rf"instances_train\.base\.json' is {problem}",
           r"python -m shapes_ov --config config\.yaml --force")


def test_corrupt_val_file_of_the_world(copy):
    sets, root = copy
    path = root / "annotations" / "instances_val.all.json"
    path.write_bytes(path.read_bytes()[:100])
    _error(train.cli, _train(sets), r"instances_val\.all\.json is not a Shapes-OV annotation file",
           r"python -m shapes_ov --config config\.yaml --force")


def test_categories_missing_from_the_split(copy):
    sets, root = copy
    _edit_json(root / "annotations" / "instances_train.base.json",
               lambda c: c.update(categories=[x for x in c["categories"] if x["name"] != "star"]))
    _error(train.cli, _train(sets), r"instances_train\.base\.json' has no categories named \['star'\]",
           r"check data\.base_classes/novel_classes")


# ------------------------------------------------------------------------------------------------
# Images and boxes
# ------------------------------------------------------------------------------------------------

def _damage_images(root: Path, how: str) -> None:
    for png in (root / "train").glob("*.png"):
        if how == "missing":
            png.unlink()
        elif how == "truncated":
            png.write_bytes(png.read_bytes()[:80])
        elif how == "not-an-image":
            png.write_text("not an image")
        else:  # another size than the annotation file says
            Image.new("RGB", (10, 10)).save(png)


@pytest.mark.parametrize("how, problem", [
    ("missing", r"image file '.*\.png' not found \(named by the annotation file's 'file_name'\)"),
    ("truncated", r"cannot read image file '.*\.png'"),
    ("not-an-image", r"cannot read image file '.*\.png' \(cannot identify image file"),
    ("other-size", r"image file '.*\.png' is 10x10 but '.*instances_train\.base\.json' says 128x128")],
    ids=["missing", "truncated", "not-an-image", "other-size"])
def test_image_unreadable(copy, how, problem):
    sets, root = copy
    _damage_images(root, how)
    fix = r"python -m shapes_ov --config config\.yaml --force" if how != "other-size" else ""
    _error(train.cli, _train(sets, "data.num_workers=2"), problem, fix)


@pytest.mark.parametrize("edit, dropped, left_out", [
    (lambda a: a.update(bbox=[a["bbox"][0], a["bbox"][1], 0.0, a["bbox"][3]], area=0.0), 1, 0),
    (lambda a: a.update(bbox=[500.0, 500.0, 20.0, 20.0]), 1, 0),  # wholly outside the image
    (None, 0, 1)], ids=["zero-area", "outside-image", "image-without-base-box"])
def test_degenerate_boxes_are_dropped_and_reported(copy, capsys, edit, dropped, left_out):
    sets, root = copy
    cfg = config.load_config(CONFIG, sets)
    before = data.build_dataset(cfg, "train", knowledge=False)
    path = root / "annotations" / "instances_train.base.json"
    content = json.loads(path.read_text())
    per_image = [a["image_id"] for a in content["annotations"]]
    # an annotation of an image with two or more boxes, so that one box less leaves it in
    victim = next(a for a in content["annotations"] if per_image.count(a["image_id"]) > 1
                  and a["image_id"] in before.ids)
    if edit is None:  # its image loses every box
        content["annotations"] = [a for a in content["annotations"]
                                  if a["image_id"] != victim["image_id"]]
    else:
        edit(victim)
    path.write_text(json.dumps(content))
    after = data.build_dataset(cfg, "train", knowledge=False)
    assert after.num_dropped_boxes - before.num_dropped_boxes == dropped
    assert after.num_skipped_images - before.num_skipped_images == left_out
    train.cli(_train(sets))  # trains: the problem is reported, not fatal
    out = capsys.readouterr().out
    assert re.search(rf"instances_train\.base\.json': {after.num_dropped_boxes} boxes dropped "
                     rf"\(a side under data\.min_box_side px.*{after.num_skipped_images} images "
                     rf"without a base box left out", out), out


def test_no_image_with_a_base_box(copy):
    sets, root = copy
    _edit_json(root / "annotations" / "instances_train.base.json", lambda c: c.update(annotations=[]))
    _error(train.cli, _train(sets), r"no image of '.*instances_train\.base\.json' has a usable "
                                    r"base-class box", r"check that data\.base_classes")


# ------------------------------------------------------------------------------------------------
# Offline knowledge and the CLIP teacher
# ------------------------------------------------------------------------------------------------

def _damage_knowledge(root: Path, how: str) -> None:
    for f in (root / "knowledge").glob("0*.pt"):
        if how == "missing":
            f.unlink()
        elif how == "corrupt":
            f.write_bytes(f.read_bytes()[:100])
        else:  # one GT row fewer than the annotation file has boxes
            k = torch.load(f, weights_only=True)
            k["gt_ann_ids"], k["gt_emb"] = k["gt_ann_ids"][:-1], k["gt_emb"][:-1]
            torch.save(k, f)


@pytest.mark.parametrize("how, problem", [
    ("missing", r"knowledge file '.*\.pt' for image \d+ not found"),
    ("corrupt", r"cannot read knowledge file '.*\.pt'"),
    ("rows", r"knowledge file '.*\.pt' has no gt_emb row for annotation ids \[\d+")],
    ids=["missing", "corrupt", "row-count"])
def test_knowledge_file_bad(copy, how, problem):
    sets, root = copy
    _damage_knowledge(root, how)
    _error(train.cli, _train(sets, "data.num_workers=1"), problem,
           r"re-run `python -m knowledge --config config\.yaml`")


def test_clip_weights_missing_offline(copy, tmp_path, monkeypatch):
    sets, _ = copy
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip
    monkeypatch.delenv("HDOVD_CLIP_DIR", raising=False)
    _error(extract.main, _train(sets, "teacher.clip_model=ViT-B/32", "teacher.clip_dir=''") + ["--force"],
           r"CLIP checkpoint ViT-B-32\.pt for 'ViT-B/32' not found.*\(this machine is offline\)",
           r"Download https://\S+ on a connected machine")


def test_clip_checkpoint_unreadable(copy, tmp_path):
    sets, _ = copy
    bad = tmp_path / "clip.pt"
    bad.write_text("not a checkpoint")
    _error(extract.main, _train(sets, f"teacher.clip_model={bad}") + ["--force"],
           r"knowledge: error: cannot load CLIP checkpoint '.*clip\.pt' \(teacher\.clip_model\)")


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def _run_with_checkpoint(copy, checkpoint, change) -> list[str]:
    """The copy's --set, with run.name "resumed" whose ckpt.pth is ``checkpoint`` changed."""
    sets, root = copy
    run = _path(sets, "run.out_dir") / "resumed"
    run.mkdir(parents=True)
    ckpt = torch.load(checkpoint, weights_only=True)
    if change == "damaged":
        (run / "ckpt.pth").write_bytes(checkpoint.read_bytes()[:1000])
    else:
        change(ckpt["config"])
        torch.save(ckpt, run / "ckpt.pth")
    return sets + ["run.name=resumed", "train.max_steps=2"]


@pytest.mark.parametrize("change, problem", [
    (lambda c: c["model"].update(detector="adamixer"),
     r"model\.detector: checkpoint 'adamixer' != now 'faster_rcnn'"),
    (lambda c: c["data"].update(novel_classes=c["data"]["novel_classes"][:-1]),
     r"data\.novel_classes: checkpoint \[.*\] != now \["),
    ("damaged", r"not a readable train\.py checkpoint")],
    ids=["other-detector", "other-vocabulary-size", "damaged"])
def test_resume_from_a_foreign_checkpoint(copy, checkpoint, change, problem):
    sets = _run_with_checkpoint(copy, checkpoint, change)
    _error(train.cli, _train(sets), r"cannot resume from '.*ckpt\.pth'", problem,
           r"train\.resume=false|another run\.name")


@pytest.mark.parametrize("overrides, problem", [
    (["model.representation_size=64"], r"do not fit the model built from its config .*cannot be "
                                        r"used with this checkpoint"),
    (["data.novel_classes=[ring]"], rf"trained on {NUM_CLASSES} classes but the config names "
                                    rf"{NUM_CLASSES - 3} .*detect other names with predict\.py --vocabulary"),
    ("damaged", r"cannot read checkpoint '.*ckpt\.pth' .*complete train\.py checkpoint")],
    ids=["other-width", "other-vocabulary-size", "damaged"])
def test_evaluate_checkpoint_that_does_not_fit(checkpoint, tmp_path, overrides, problem):
    if overrides == "damaged":
        damaged = tmp_path / "ckpt.pth"
        damaged.write_bytes(checkpoint.read_bytes()[:1000])
        checkpoint, overrides = damaged, []
    _error(evaluate.main, [str(checkpoint), *(["--set", *overrides] if overrides else [])],
           r"evaluate\.py: error: ", problem)


# ------------------------------------------------------------------------------------------------
# Config and vocabulary
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, problem", [
    (["--set", "train.lrr=1"], r"unknown config key 'train\.lrr'; valid keys in 'train': .*\blr\b"),
    (["--set", "train.lr=fast"], r"config key 'train\.lr' expects a float, got 'fast'"),
    (["--set", "tran.lr=1"], r"unknown config section 'tran'; valid keys in '<root>': .*\btrain\b"),
    (["--config", "absent.yaml"], r"config file 'absent\.yaml' not found; the default is config\.yaml")],
    ids=["unknown-key", "mistyped-value", "unknown-section", "no-config-file"])
def test_config_mistakes(argv, problem):
    for cli in (train.cli, extract.main, world.main):
        _error(cli, ["--config", str(CONFIG), *argv], problem)


@pytest.mark.parametrize("cli, argv, problem", [
    ("train", ["data.novel_classes=[ring,ring,rectangle,trapezoid]"],
     r"name \['ring'\] more than once; list each class once"),
    ("train", ["data.base_classes=[]"], r"data\.base_classes is empty; list the classes"),
    ("predict", ["--vocabulary", " , "], r"--vocabulary ' , ' holds no class names; give names"),
    ("predict", ["--vocabulary", "cat,dog,Cat"], r"--vocabulary names \['Cat', 'cat'\] more than once")],
    ids=["duplicate-class", "no-base-class", "empty-vocabulary", "duplicate-vocabulary"])
def test_vocabulary_mistakes(tiny_world, checkpoint, cli, argv, problem):
    if cli == "train":
        _error(train.cli, _train(tiny_world, *argv), problem)
    else:
        image = str(_path(tiny_world, "data.root") / "val" / "000001.png")
        _error(predict.main, [str(checkpoint), "--images", image, *argv], problem)


# ------------------------------------------------------------------------------------------------
# Processes, run directory, disk, NaN
# ------------------------------------------------------------------------------------------------

def test_more_processes_than_batches(tiny_world):
    cfg = config.load_config(CONFIG, tiny_world + ["train.batch_size=8"])
    train_set = data.build_dataset(cfg, "train", knowledge=False)
    fit = len(train_set) // 8
    with pytest.raises(data.DataError, match=rf"fewer than one batch of train\.batch_size=8 for each "
                                             rf"of {fit + 1} processes; use at most "
                                             rf"--nproc_per_node={fit} or a smaller train\.batch_size"):
        next(train.batches(train_set, cfg, 0, fit + 1, 0, pin=False))
    cfg.train.batch_size = len(train_set) + 1
    with pytest.raises(data.DataError, match=r"use a smaller train\.batch_size$"):
        next(train.batches(train_set, cfg, 0, 1, 0, pin=False))


def test_run_directory_not_writable(copy, tmp_path):
    sets, _ = copy
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _error(train.cli, _train(sets, f"run.out_dir={blocker}"),
           r"run directory '.*a_file/shapes_ov_frcnn' cannot be written", r"set run\.out_dir to a writable")


def test_full_disk_during_a_checkpoint(copy, monkeypatch):
    sets, _ = copy
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint meets a full disk
        saves.append(f)
        if len(saves) == 2:
            if Path("/dev/full").exists():  # what torch.save raises when the disk is full
                return real_save(obj, "/dev/full")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", save)
    _error(train.cli, _train(sets, "run.name=disk", "train.max_steps=3", "train.ckpt_every=1"),
           r"cannot write checkpoint '.*ckpt\.pth' at step 2", r"MB free there\)\. The previous "
           r"checkpoint is intact: free disk space .* run the same command again")
    monkeypatch.undo()
    run = _path(sets, "run.out_dir") / "disk"
    assert torch.load(run / "ckpt.pth", weights_only=True)["step"] == 1
    assert not list(run.glob(".*.tmp"))


def test_nan_loss_keeps_the_last_good_checkpoint(copy, monkeypatch, capsys):
    sets, _ = copy
    real_build = train.hdovd.build_hdovd

    def build(cfg, *args, **kwargs):  # the model's third forward returns a NaN loss
        model = real_build(cfg, *args, **kwargs)
        forward, calls = model.forward, []

        def poisoned(images, targets):
            out = forward(images, targets)
            calls.append(1)
            if len(calls) == 3:
                out["loss_cls"] = out["loss_cls"] * float("nan")
            return out
        model.forward = poisoned
        return model

    monkeypatch.setattr(train.hdovd, "build_hdovd", build)
    argv = _train(sets, "run.name=nan", "train.max_steps=4", "train.ckpt_every=2")
    _error(train.cli, argv, r"non-finite loss in step 3 \(loss dict above\); the last checkpoint in "
                            r".*nan is untouched\. Try a lower train\.lr")
    assert "loss_cls" in capsys.readouterr().err  # the loss dict
    monkeypatch.undo()
    run = _path(sets, "run.out_dir") / "nan"
    assert torch.load(run / "ckpt.pth", weights_only=True)["step"] == 2
    assert train.cli(argv)["step"] == 4  # the same command resumes from it


# ------------------------------------------------------------------------------------------------
# The real command: one line on stderr, exit status 1
# ------------------------------------------------------------------------------------------------

def test_command_prints_one_line_without_traceback(copy):
    sets, root = copy
    _damage_knowledge(root, "corrupt")  # met by a DataLoader worker: its traceback stays inside
    proc = subprocess.run([sys.executable, "train.py", *_train(sets, "data.num_workers=1")], cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  ") and "%|" not in line]  # warnings, progress bars
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and re.match(r"train\.py: error: cannot read knowledge file", lines[0]), \
        proc.stderr
