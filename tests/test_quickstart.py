"""bench/quickstart.py on a tiny world: a fresh quick start runs end to end and its JSON has every
phase with positive seconds and FLOPs (the world render has none: PIL drawing), and the detector's
FLOPs scale with train.max_steps (2 steps there, 4 in a second run on the same world read back
with --from-run)."""
import json

import pytest

import train
from bench import quickstart  # bench/ is a namespace package under the repository root
from conftest import REPO, tiny_overrides

TINY_CLIP = ["clip_pretrain.embed_dim=32", "clip_pretrain.image_resolution=32",  # fast steps
             "clip_pretrain.vision_layers=1", "clip_pretrain.vision_width=64",
             "clip_pretrain.transformer_width=64", "clip_pretrain.transformer_layers=1",
             "clip_pretrain.batch_size=8"]
PHASES = ["world render", "teacher pre-training", "proposal network", "knowledge extraction",
          "detector training", "evaluation", "other"]


def _phases(result: dict) -> dict:
    return {p["phase"]: p for p in result["phases"]}


def test_quickstart_budget_on_a_tiny_world(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the quick start's process, on shared cores
    sets = tiny_overrides(tmp_path / "world") + TINY_CLIP + [
        f"run.out_dir={tmp_path / 'runs'}", "train.ckpt_every=0"]
    out = tmp_path / "quickstart.json"
    result = quickstart.main(["--set", *sets, "train.max_steps=2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))

    phases = _phases(result)
    assert list(phases) == PHASES
    for name in PHASES[:-1]:
        assert phases[name]["seconds"] > 0, name
    for name in PHASES[1:-1]:
        assert phases[name]["flops"] > 0 and phases[name]["gflops_per_s"] > 0, name
        assert phases[name]["ratio_to_gemm"] > 0
        assert phases[name]["precision"] in ("float32", "bfloat16")
    assert phases["world render"]["flops"] is None
    assert sum(p["share"] for p in result["phases"]) == pytest.approx(1.0, abs=0.01)
    assert {"cpu", "cores", "torch", "bf16_native", "precision"} <= set(result["machine"])

    # A second detector run on the same world and knowledge, 4 steps, read back from its files.
    train.main(["--config", str(REPO / "config.yaml"), "--set", *sets, "run.name=four",
                "train.max_steps=4"])
    again = _phases(quickstart.main(["--from-run", str(tmp_path / "runs" / "four"),
                                     "--out", str(tmp_path / "four.json")]))
    two, four = phases["detector training"], again["detector training"]
    assert (two["steps"], four["steps"]) == (2, 4)
    assert four["flops"] == pytest.approx(2 * two["flops"], rel=0.01)
    assert again["teacher pre-training"]["flops"] == phases["teacher pre-training"]["flops"]
