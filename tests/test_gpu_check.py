"""bench/gpu_check.py cannot rot: its --dry-run (tiny sizes, CPU) runs every step that does not
need CUDA: the cuda-marked tests (skipped here), the generated COCO-layout directory, the random
CLIP and ResNet-50 files, ``python -m knowledge``, both OV-COCO configs trained under torchrun
(gloo), the same-batch timing against torchvision from the checkpoints, and the JSON."""
import json
import subprocess
import sys

import torch

from conftest import REPO


def test_gpu_check_dry_run():
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    done = [l for l in p.stdout.splitlines() if l.startswith("gpu_check: done ")]
    summary = json.loads(done[-1].removeprefix("gpu_check: done "))
    assert not summary["out"].startswith(str(REPO / "bench" / "results"))  # a temp dir unless --out
    result = json.loads(open(summary["out"]).read())

    assert result["mode"] == "dry-run" and result["errors"] == []
    assert result["device"]["type"] == "cpu" and result["device"]["torch"] == torch.__version__
    tests = result["tests"]
    assert tests["returncode"] == 0 and tests["failed"] == 0 and tests["skipped"] + tests["passed"] >= 8
    assert result["data"]["coco"]["train_images"] == 4 and result["knowledge"]["returncode"] == 0
    for student in ("faster_rcnn", "adamixer"):
        run = result["train"][student]["fp32"]
        assert run["returncode"] == 0 and run["device"] == "cpu" and run["images_per_s"] > 0
        assert run["precision"]["train"] == "float32" and run["steps"] == result["sizes"]["steps"]
        assert run["batch_per_gpu"] == 2 and run["image_size"] == [128, 96]
        assert result["checkpoint_cuda_to_cpu"][student]["strict_load"]
        assert result["same_batch"][student]["fp32"]["ratio_vs_torchvision"] > 0
        assert result["paper_schedule"][student]["fp32"]["hours"] > 0
    assert result["same_batch"]["torchvision_fasterrcnn_resnet50_fpn"]["fp32"]["ms_per_step"] > 0
