"""Safe checkpoints and export.py (issue 22): a pickle that would run code is refused before it
runs; an older checkpoint (numpy RNG states) gets one conversion command; the ONNX graph of an
untrained small Faster R-CNN matches the PyTorch predictor within 1e-3 for two vocabularies and
two image sizes (onnxruntime, the same post-processing)."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
import evaluate
import export
import hdovd
import predict
from conftest import REPO

SMALL = ["model.fpn_channels=32", "model.representation_size=64", "model.rpn_pre_nms_test=300",
         "model.rpn_post_nms_test=100", "inference.score_thresh=0.0", "distill.image=false",
         "teacher.clip_model=missing/clip.pt"]

pytestmark = pytest.mark.usefixtures("one_thread")


def small_predictor() -> predict.Predictor:
    """An untrained small Faster R-CNN with H1 on (so the graph holds the two-member ensemble)."""
    cfg = config.load_config(REPO / "config.yaml", SMALL)
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(len(config.class_names(cfg)), 64), dim=-1)
    return predict.Predictor(hdovd.build_hdovd(cfg, class_embeddings=emb), cfg, "cpu")


class WritesAFile:
    """A pickle payload: unpickling it calls exec, which writes ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path):
    proof = tmp_path / "proof.txt"
    pickle.loads(pickle.dumps(WritesAFile(proof)))  # the payload is real: plain unpickling runs it
    assert proof.exists()
    marker = tmp_path / "pwned.txt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}, "extra": WritesAFile(marker)},
               tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"needs arbitrary unpickling .*builtins\.exec.*refused, and "
                                         r"nothing in it ran"):
        evaluate.load_checkpoint(tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="arbitrary unpickling"):
        export.convert_checkpoint(tmp_path / "evil.pth", tmp_path / "out.pth")
    with pytest.raises(SystemExit, match="arbitrary unpickling"):
        evaluate.main([str(tmp_path / "evil.pth")])
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_an_older_checkpoint_is_converted_by_one_command(tmp_path, capfd):
    p = small_predictor()
    p.save(tmp_path / "new.pth")
    old = torch.load(tmp_path / "new.pth", weights_only=True)
    old["rng"] = [{"numpy": np.random.get_state(), "torch": torch.get_rng_state()}]  # as before
    torch.save(old, tmp_path / "old.pth")
    with pytest.raises(ValueError, match=r"older checkpoint.*python predict\.py convert "):
        evaluate.load_checkpoint(tmp_path / "old.pth")
    predict.main(["convert", str(tmp_path / "old.pth"), str(tmp_path / "converted.pth")])
    converted = torch.load(tmp_path / "converted.pth", weights_only=True)
    assert set(converted) == {"model", "config", "step", "vocabulary"}
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    a, b = p(image), predict.Predictor.from_pretrained(tmp_path / "converted.pth", "cpu")(image)
    torch.testing.assert_close(a.boxes, b.boxes)
    with pytest.raises(SystemExit):  # export.py runs in its own process: its message on stderr
        predict.main(["convert", str(tmp_path / "new.pth"), str(tmp_path / "again.pth")])
    assert "nothing to convert" in capfd.readouterr().err


def test_onnx_graph_matches_the_predictor(tmp_path):
    pytest.importorskip("onnxruntime")
    p = small_predictor()
    p.save(tmp_path / "small.pth")
    predict.main(["export", str(tmp_path / "small.pth"), "--onnx", str(tmp_path / "small.onnx")])
    onnx_detector = export.OnnxDetector(tmp_path / "small.onnx", p, threads=1)
    rng = np.random.default_rng(0)
    for shape in [(192, 256, 3), (100, 77, 3)]:  # two sizes: the graph's H and W are dynamic
        image = rng.integers(0, 255, shape, dtype=np.uint8)
        for vocabulary in [None, p.class_names[::-1]]:  # classes are a graph input (here reordered)
            ref, got = p(image, vocabulary), onnx_detector(image, vocabulary)
            assert len(ref) > 10 and len(got) == len(ref), (shape, vocabulary)
            assert got.labels.tolist() == ref.labels.tolist()
            torch.testing.assert_close(got.boxes, ref.boxes, atol=1e-3, rtol=0)
            torch.testing.assert_close(got.scores, ref.scores, atol=1e-3, rtol=0)
    adamixer = config.load_config(REPO / "config.yaml", ["model.detector=adamixer"])
    with pytest.raises(ValueError, match="is not exported"):
        export.export_onnx(type("P", (), {"cfg": adamixer})(), tmp_path / "a.onnx")
