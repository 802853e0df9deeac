"""predict.py and imagefiles.py (issue 22): the command on files, folders and globs, streamed and
resumable; every PIL mode, EXIF orientation, huge and bomb-sized images, broken files; the saved
vocabulary without CLIP; the Detections API; the README's Python example.

The model is either the 1-step tiny-world checkpoint (``tiny_ckpt``: it has a teacher CLIP, so
new names can be embedded) or an untrained small one saved by ``Predictor.save`` (``small_ckpt``:
no training, no CLIP)."""
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO

import config
import hdovd
import imagefiles
import predict
from conftest import REPO
from knowledge import clip_io

SMALL = ["model.fpn_channels=32", "model.representation_size=64", "model.rpn_pre_nms_test=300",
         "model.rpn_post_nms_test=100", "inference.score_thresh=0.0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def small_predictor(clip_model="missing/clip.pt") -> predict.Predictor:
    cfg = config.load_config(REPO / "config.yaml", SMALL + [f"teacher.clip_model={clip_model}"])
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(len(config.class_names(cfg)), 64), dim=-1)
    return predict.Predictor(hdovd.build_hdovd(cfg, class_embeddings=emb), cfg, "cpu")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.pth"
    small_predictor().save(path)
    return path


def scene(w=160, h=120, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 30, dtype=np.uint8)
    x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y:y + h // 3, x:x + w // 3] = 230
    return img


def run(args, capsys=None):
    """predict.main; returns (summary or the SystemExit message, stderr)."""
    try:
        result = predict.main([str(a) for a in args])
    except SystemExit as e:
        result = e
    return result, (capsys.readouterr().err if capsys else "")


def test_vocabulary_parsing(tmp_path):
    assert predict.parse_vocabulary(" ring, circle ,dog,") == ["ring", "circle", "dog"]
    assert predict.parse_vocabulary(["hot dog", " kite "]) == ["hot dog", "kite"]
    with pytest.raises(ValueError, match="holds no class names"):
        predict.parse_vocabulary(" , ")
    with pytest.raises(ValueError, match=r"names \['Dog', 'dog'\] more than once"):
        predict.parse_vocabulary("dog,Dog")
    (tmp_path / "names.txt").write_text("# mine\nhot dog\n\n kite \n")
    assert predict.read_vocabulary_file(tmp_path / "names.txt") == ["hot dog", "kite"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no class names"):
        predict.read_vocabulary_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        predict.read_vocabulary_file(tmp_path / "nope.txt")


def test_every_pil_mode_16_bit_grey_transparency_and_exif(tmp_path):
    rgb = Image.fromarray(scene())
    for mode in ("L", "LA", "RGBA", "P", "CMYK", "1"):
        rgb.convert(mode).save(tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    grey16 = (np.arange(120 * 160).reshape(120, 160) % 2 * 65535).astype(np.uint16)  # 0 / 65535
    Image.fromarray(grey16).save(tmp_path / "grey16.png")  # a 16-bit grey PNG
    for f in sorted(tmp_path.iterdir()):
        im = imagefiles.open_image(f)
        assert im.mode == "RGB" and im.size == (160, 120), f
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    px = np.asarray(imagefiles.open_image(tmp_path / "grey16.png"))
    assert set(np.unique(px)) == {0, 255}  # scaled from 16 bits, not clipped to white
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(imagefiles.to_rgb(clear)).min() == 255  # transparency shows as white
    # a phone photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to view)
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(tmp_path / "phone.jpg", exif=exif)
    assert imagefiles.open_image(tmp_path / "phone.jpg").size == (120, 160)


def test_bombs_truncated_files_and_huge_images(tmp_path, monkeypatch):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # 900 MP RGB claimed in 57 bytes
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="bomb.png' is refused as a possible decompression bomb"):
        imagefiles.open_image(tmp_path / "bomb.png")
    Image.fromarray(scene()).save(tmp_path / "good.jpg", quality=90)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:600])
    with pytest.raises(ValueError, match="cut.jpg' is not an image file PIL can read"):
        imagefiles.open_image(tmp_path / "cut.jpg")
    # between MAX_IMAGE_PIXELS and twice that PIL only warns: the image is read and resized
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000 * 3000 // 2 + 1)
    Image.new("RGB", (4000, 3000), (40, 40, 40)).save(tmp_path / "huge.png")
    dets = small_predictor()(tmp_path / "huge.png")
    assert dets.image.size == (4000, 3000) and len(dets) > 0
    assert dets.boxes[:, 2].max() <= 4000 and dets.boxes[:, 3].max() <= 3000


def test_folder_glob_and_list_in_one_call_with_threshold_and_resume(small_ckpt, tmp_path, capsys):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    (tmp_path / "more").mkdir()
    for i, rel in enumerate(["photos/a.png", "photos/sub/b.jpg", "more/c.png", "more/d.png", "e.png"]):
        Image.fromarray(scene(seed=i)).save(tmp_path / rel)
    (tmp_path / "photos" / "notes.txt").write_text("not an image: skipped by extension")
    out = tmp_path / "out"
    args = [small_ckpt, "--images", tmp_path / "photos", str(tmp_path / "more" / "*.png"),
            tmp_path / "e.png", "--out", out, "--score-thresh", "0.0", "--batch-size", "2"]
    summary, _ = run(args)
    assert summary == {"done": 5, "skipped": 0, "failed": []}
    files = [im["file_name"] for im in json.loads((out / "dataset.json").read_text())["images"]]
    assert [f.replace(str(tmp_path) + "/", "") for f in files] == [
        "photos/a.png", "photos/sub/b.jpg", "more/c.png", "more/d.png", "e.png"]
    for name in ("a", "sub/b", "c", "d", "e"):
        assert Image.open(out / f"{name}.png").size == (512, 384)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(out / "dataset.json"))
        results = coco.loadRes(str(out / "detections.json"))
    assert len(results.anns) > 0 and len(coco.cats) == len(config.class_names(config.load_config(REPO / "config.yaml")))
    # --score-thresh filters the JSON: keep the scores above a cut between two of them
    scores = sorted({a["score"] for a in results.anns.values()})
    cut = (scores[len(scores) // 2] + scores[len(scores) // 2 + 1]) / 2
    run(args[:-4] + ["--out", tmp_path / "cut", "--score-thresh", cut, "--no-pictures"])
    kept = json.loads((tmp_path / "cut" / "detections.json").read_text())
    assert len(kept) == sum(a["score"] > cut for a in results.anns.values())
    assert min(d["score"] for d in kept) > cut and not list((tmp_path / "cut").glob("*.png"))
    # a rerun skips what is done; a new image gets the next id
    Image.fromarray(scene(seed=9)).save(tmp_path / "photos" / "z.png")
    summary, _ = run(args)
    assert summary == {"done": 1, "skipped": 5, "failed": []}
    ids = [im["id"] for im in json.loads((out / "dataset.json").read_text())["images"]]
    assert sorted(ids) == [1, 2, 3, 4, 5, 6]
    # another vocabulary into the same folder would mix two results files: refused
    message, _ = run(args + ["--vocabulary", "circle"])
    assert "holds results for" in str(message)


def test_a_broken_file_is_named_and_the_run_goes_on(small_ckpt, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.fromarray(scene(seed=i)).save(tmp_path / "photos" / f"{i}.jpg")
    (tmp_path / "photos" / "1.jpg").write_bytes((tmp_path / "photos" / "1.jpg").read_bytes()[:500])
    message, err = run([small_ckpt, "--images", tmp_path / "photos", "--out", tmp_path / "o"], capsys)
    assert isinstance(message, SystemExit) and message.code != 0
    assert "1 images could not be read" in str(message)
    assert len([ln for ln in err.splitlines() if "1.jpg' is not an image file" in ln]) == 1
    done = json.loads((tmp_path / "o" / "dataset.json").read_text())["images"]
    assert [im["file_name"].rsplit("/", 1)[1] for im in done] == ["0.jpg", "2.jpg"]


def test_peak_memory_does_not_grow_with_the_folder(small_ckpt, tmp_path):
    """Peak RSS of a 300-image run within 1.2x of a 30-image one (subprocesses, ru_maxrss)."""
    script = textwrap.dedent(f"""
        import resource, sys, torch
        torch.set_num_threads(1)
        import predict
        predict.main([{str(small_ckpt)!r}, "--images", sys.argv[1], "--out", sys.argv[2],
                      "--score-thresh", "0.0"])
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    peaks = {}
    for n in (30, 300):
        folder = tmp_path / f"in{n}"
        folder.mkdir()
        for i in range(n):
            Image.fromarray(scene(64, 48, seed=i)).save(folder / f"{i:04d}.png")
        done = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / f"out{n}")],
                              capture_output=True, text=True, timeout=600, cwd=REPO)  # imports the project
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[n] = int(done.stdout.split()[-1])
        assert len(json.loads((tmp_path / f"out{n}" / "dataset.json").read_text())["images"]) == n
    assert peaks[300] <= 1.2 * peaks[30], peaks


def test_saved_vocabulary_detects_without_clip(tiny_ckpt, tiny_world, tmp_path):
    clip_file = tmp_path / "clip_copy.pt"
    shutil.copy(config.load_config(REPO / "config.yaml", tiny_world).teacher.clip_model, clip_file)
    predictor = predict.Predictor.from_pretrained(tiny_ckpt, "cpu", [f"teacher.clip_model={clip_file}",
                                                                      "inference.score_thresh=0.0"])
    predictor.set_vocabulary("ring, kite ,circle")
    image = scene()
    online = predictor(image)
    predictor.save(tmp_path / "mine.pth")
    saved = torch.load(tmp_path / "mine.pth", weights_only=True)["vocabulary"]
    assert saved["names"] == ["ring", "kite", "circle"] and saved["embedded_names"] == ["kite"]
    clip_file.unlink()
    loaded = predict.Predictor.from_pretrained(tmp_path / "mine.pth", "cpu")
    baked = loaded(image)
    assert loaded.clip is None and baked.vocabulary == ["ring", "kite", "circle"]
    torch.testing.assert_close(baked.boxes, online.boxes)
    torch.testing.assert_close(baked.scores, online.scores)
    assert baked.labels.tolist() == online.labels.tolist()
    with pytest.raises(clip_io.TeacherError, match=r"\['moon'\] are not classes of this checkpoint "
                                                   r"nor in its saved vocabulary.*teacher\.clip_model"):
        loaded.set_vocabulary("ring,moon")
    # the same from the command line
    out = tmp_path / "cli"
    shutil.copy(config.load_config(REPO / "config.yaml", tiny_world).teacher.clip_model, clip_file)
    run([tiny_ckpt, "--vocabulary", "kite,star", "--save-vocabulary", out / "ks.pth",
         "--set", f"teacher.clip_model={clip_file}"])
    clip_file.unlink()
    Image.fromarray(image).save(tmp_path / "scene.png")
    run([out / "ks.pth", "--images", tmp_path / "scene.png", "--out", out])
    cats = json.loads((out / "dataset.json").read_text())["categories"]
    assert [(c["name"], c["novel"]) for c in cats] == [("kite", True), ("star", False)]


def test_detections_api(tmp_path):
    dets = small_predictor()(scene(), score_thresh=0.0)
    assert len(dets) > 3 and dets.score_thresh == 0.0
    top = dets[dets.scores >= dets.scores[2]]
    assert len(top) == 3 and len(dets[:2]) == 2 and len(dets[[0, 2]]) == 2 and len(dets[0]) == 1
    assert len(dets.above(float(dets.scores[1]))) == 2
    hf = dets.to_dict()
    assert set(hf[0]) == {"score", "label", "box"} and hf[0]["label"] == dets.names[0]
    assert set(hf[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"}
    assert all(isinstance(v, int) for v in hf[0]["box"].values())
    picture = dets.draw(tmp_path / "d.png", score_thresh=0.0)
    plain = dets[[]].draw()
    assert picture.size == plain.size == (512, 384) == Image.open(tmp_path / "d.png").size
    assert np.abs(np.asarray(picture, dtype=int) - np.asarray(plain, dtype=int)).sum() > 0


def test_images_command_writes_pictures_and_coco_results(tiny_ckpt, tiny_world, tmp_path):
    cfg = config.load_config(REPO / "config.yaml", tiny_world)
    val = sorted((REPO / cfg.data.root / cfg.data.val_images).glob("*.png"))[:2]
    out = tmp_path / "out"
    run([tiny_ckpt, "--images", *val, "--vocabulary", "ring, circle ,kite", "--out", out,
         "--score-thresh", "0.0"])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "dataset.json"))
        results = gt.loadRes(str(out / "detections.json"))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == ["ring", "circle", "kite"]
    assert [c["novel"] for c in gt.loadCats(gt.getCatIds())] == [True, False, True]
    assert [gt.imgs[i]["file_name"] for i in (1, 2)] == [str(v) for v in val]
    assert len(results.anns) > 0 and {a["image_id"] for a in results.anns.values()} <= {1, 2}
    (tmp_path / "names.txt").write_text("crescent\nstar\n")
    run([tiny_ckpt, "--images", val[0], "--vocabulary-file", tmp_path / "names.txt", "--out", tmp_path / "f"])
    cats = json.loads((tmp_path / "f" / "dataset.json").read_text())["categories"]
    assert [c["name"] for c in cats] == ["crescent", "star"]


def test_command_errors_are_one_clear_line(tiny_ckpt, tiny_world, tmp_path, capsys):
    cfg = config.load_config(REPO / "config.yaml", tiny_world)
    val = str(sorted((REPO / cfg.data.root / cfg.data.val_images).glob("*.png"))[0])
    cases = [
        (["--images", val, "--vocabulary", " , "], "holds no class names"),
        (["--images", val, "--vocabulary", "ring,Ring"], r"\['Ring', 'ring'\] more than once"),
        (["--images", str(tmp_path / "nope.png")], "nope.png' not found"),
        (["--images", str(tmp_path / "*.jpg")], r"no image file matches"),
        (["--images", val, "--vocabulary", "ring,kite", "--set",
          f"teacher.clip_model={tmp_path / 'gone' / 'clip.pt'}"], r"\['kite'\] .*teacher\.clip_model"),
    ]
    for args, pattern in cases:
        message, _ = run([tiny_ckpt, *args, "--out", tmp_path / "o"])
        assert re.search(pattern, str(message)), (args, message)
    _, err = run([tiny_ckpt], capsys)
    assert "give --images" in err


def test_help_is_short_with_examples():
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        predict.main(["--help"])
    assert len(out.getvalue().splitlines()) <= 40 and "examples:" in out.getvalue()


def test_readme_api_example_runs_as_written(tiny_ckpt, tiny_world, tmp_path, monkeypatch):
    """The README's Python example, verbatim, against the tiny checkpoint put where it looks."""
    readme = (REPO / "README.md").read_text()
    code = next(block.split("\n", 1)[1] for block in readme.split("```")[1::2]
                if block.startswith("python\n") and "Predictor.from_pretrained" in block)
    ckpt_path = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    image_path = re.search(r'predictor\("([^"]+)"', code).group(1)
    picture = re.search(r'\.draw\("([^"]+)"\)', code).group(1)
    (tmp_path / ckpt_path).parent.mkdir(parents=True)
    shutil.copy(tiny_ckpt, tmp_path / ckpt_path)
    (tmp_path / image_path).parent.mkdir(parents=True)
    cfg = config.load_config(REPO / "config.yaml", tiny_world)
    shutil.copy(sorted((REPO / cfg.data.root / cfg.data.val_images).glob("*.png"))[0], tmp_path / image_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    with Image.open(tmp_path / picture) as im:
        assert im.size[0] >= 512
