"""train.py: the LR schedule, atomic checkpoints, the resume config check, and (on a tiny Shapes-OV
world built once per session in conftest.py) exact resume, the loss-curve picture and the stop on
a non-finite loss.
Runs with 2 gloo processes, killed runs and bad inputs: tests/test_reliability.py and
tests/test_bad_input.py."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import config
import hdovd
import rundir
import train
from conftest import REPO


def _train_cfg(**kw) -> config.TrainConfig:
    return config.TrainConfig(**{"warmup_steps": 10, "warmup_ratio": 0.001, "milestones": [20, 30],
                                 "gamma": 0.1, **kw})


def test_schedule_warmup_and_step_decay():
    t = _train_cfg()
    f = [train.lr_factor(s, t) for s in range(40)]
    assert f[0] == pytest.approx(0.001)  # mmcv linear warm-up starts at warmup_ratio
    assert f[5] == pytest.approx(0.001 + 0.5 * 0.999)  # halfway: linear
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # rising through the warm-up
    assert f[10] == f[19] == 1.0  # warm-up over, before the first milestone
    assert f[20] == pytest.approx(0.1) and f[29] == pytest.approx(0.1)  # x gamma from step 20
    assert f[30] == pytest.approx(0.01) and f[39] == pytest.approx(0.01)  # x gamma again from 30


def test_schedule_drives_the_optimizer_lr():
    t = _train_cfg(warmup_steps=0, milestones=[2])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: train.lr_factor(s, t))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.5, 0.05, 0.05])


def test_optimizer_choice_and_decay_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    cfg = config.load_config(None, ["train.optimizer=sgd", "train.momentum=0.8",
                                    "train.no_decay_norm_bias=true"])
    opt = train.build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.8
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert [p.ndim for g in decayed for p in g["params"]] == [2]  # only the Linear weight
    cfg.train.optimizer = "adam"
    with pytest.raises(config.ConfigError, match="adamw' or 'sgd"):
        train.build_optimizer(model, cfg)


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    cfg = config.load_config(None)
    save = lambda step: rundir.save_checkpoint(path, model, opt, sched, scaler, step, 1, cfg, None,  # noqa: E731
                                              [rundir.rng_state()])
    save(1)
    assert torch.load(path, weights_only=True)["step"] == 1

    def crash(obj, f):  # torch.save dies half-way through the new file
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(train.torch, "save", crash)
    with pytest.raises(OSError):
        save(2)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint is intact


def test_resume_config_check_lists_the_differing_keys():
    saved = config.config_to_dict(config.load_config(None))
    ok = config.config_to_dict(config.load_config(None, [
        "train.max_steps=5", "train.milestones=[3]", "run.device=cpu", "eval.max_images=2",
        "data.num_workers=0", "train.log_every=1"]))
    rundir.check_resume_config(saved, ok, "ckpt.pth")  # run/eval/train-length keys may change
    bad = config.config_to_dict(config.load_config(None, ["train.lr=0.5", "distill.image=false",
                                                          "run.seed=3"]))
    with pytest.raises(config.ConfigError) as e:
        rundir.check_resume_config(saved, bad, "ckpt.pth")
    assert all(k in str(e.value) for k in ("train.lr", "distill.image", "run.seed"))
    assert "train.max_steps" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# On the tiny world (conftest.tiny_world): real model, real data, real teacher knowledge.
# ------------------------------------------------------------------------------------------------

def _run(tiny_world, tmp_path, name, *extra) -> list[str]:
    return ["--config", str(config_path()), "--set", *tiny_world, f"run.out_dir={tmp_path}",
            f"run.name={name}", *extra]


def config_path():
    from conftest import REPO
    return REPO / "config.yaml"


def _log(run_dir, kind="train") -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_resume_continues_step_lr_data_and_weights(tiny_world, tmp_path):
    # A: 3 steps straight. B: 2 steps, stop, resume to 3 with a longer max_steps. 24 train images
    # at batch 2 -> step 2 is mid-epoch, so the resumed run must skip the consumed batches.
    train.main(_run(tiny_world, tmp_path, "a", "train.max_steps=3"))
    train.main(_run(tiny_world, tmp_path, "b", "train.max_steps=2"))
    train.main(_run(tiny_world, tmp_path, "b", "train.max_steps=3"))
    a = torch.load(tmp_path / "a" / "ckpt.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pth", weights_only=True)
    assert a["step"] == b["step"] == 3
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    # Same data order, same random streams, same optimizer moments -> identical weights.
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    log_a, log_b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in log_b] == [1, 2, 3]  # appended after the resume
    assert [r["lr"] for r in log_a] == [r["lr"] for r in log_b]
    assert [r["total"] for r in log_a] == pytest.approx([r["total"] for r in log_b], rel=1e-6)
    for run in ("a", "b"):  # the loss-curve picture of each finished run, a real PNG
        png = tmp_path / run / "loss_curves.png"
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100
            im.verify()
    # A finished, evaluated run is not redone.
    assert train.main(_run(tiny_world, tmp_path, "a", "train.max_steps=3"))["step"] == 3
    with pytest.raises(config.ConfigError, match="train.lr"):
        train.main(_run(tiny_world, tmp_path, "a", "train.max_steps=4", "train.lr=0.5"))


def test_results_warn_when_the_picture_fails_and_raise_on_bugs(tmp_path, monkeypatch):
    def broken(error):
        def plot(log_jsonl, png):
            raise error
        return plot

    monkeypatch.setattr(train.evaluate, "plot_loss_curves", broken(OSError("disk full")))
    with pytest.warns(RuntimeWarning, match="loss_curves.png not drawn.*disk full"):
        train.write_results(tmp_path, {"step": 1})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"step": 1}  # the result stays
    monkeypatch.setattr(train.evaluate, "plot_loss_curves", broken(KeyError("total")))
    with pytest.raises(KeyError):  # a bug is not a drawing failure
        train.write_results(tmp_path, {"step": 1})


def test_nonfinite_loss_stops_with_the_loss_dict(tiny_world, tmp_path, monkeypatch, capsys):
    real_weights = train.hdovd.loss_weights
    monkeypatch.setattr(train.hdovd, "loss_weights",
                        lambda cfg: {k: v * float("inf") for k, v in real_weights(cfg).items()})
    with pytest.raises(SystemExit) as e:
        train.main(_run(tiny_world, tmp_path, "nan", "train.max_steps=2"))
    assert "non-finite loss in step 1" in str(e.value.code)
    assert "loss_cls" in capsys.readouterr().err  # the loss dict was printed
    assert not (tmp_path / "nan" / "ckpt.pth").exists()  # nothing new was saved


def _unused_after_one_step(files: list[str], overrides: list[str], pseudo: int) -> list[str]:
    """Trainable parameters left without gradient by one training step on a synthetic batch."""
    cfg = config.load_config([REPO / f for f in files], ["model.fpn_channels=32", "adamixer.num_stages=2",
                                                          "adamixer.shuffle_channels=8", *overrides])
    d = 64
    torch.manual_seed(0)
    model = hdovd.build_hdovd(cfg, F.normalize(torch.randn(len(config.class_names(cfg)), d), dim=-1))
    unit = lambda *shape: F.normalize(torch.randn(*shape), dim=-1)  # noqa: E731
    target = {"boxes": torch.tensor([[10., 10., 50., 50.]]), "labels": torch.tensor([1]), "image_id": 0,
              "size": torch.tensor([128, 128]), "orig_size": torch.tensor([128, 128]), "scale": 1.0,
              "flipped": False,
              "knowledge": {"image_emb": unit(d), "gt_emb": unit(1, d),
                            "pseudo_boxes": torch.tensor([[60., 60., 100., 100.]])[:pseudo],
                            "pseudo_img_emb": unit(pseudo, d), "pseudo_txt_emb": unit(pseudo, d),
                            "pseudo_weight": torch.ones(pseudo)}}
    out = model.train()([torch.randn(3, 128, 128)] * 2, [target, target])
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


ADAMIXER = ["config.yaml", "configs/shapes_ov_adamixer.yaml"]


@pytest.mark.parametrize("files, overrides", [
    (["config.yaml"], []),
    (["config.yaml"], ["distill.instance=false", "distill.class_wise=false", "distill.image=false"]),
    (["config.yaml"], ["distill.image=false"]),
    (ADAMIXER, ["adamixer.pseudo_warmup_fraction=0"]),
    (ADAMIXER, ["train.max_steps=100"]),  # the first 8 steps are the pseudo-box warm-up
], ids=["frcnn", "frcnn-base-only", "frcnn-no-H3", "adamixer", "adamixer-warmup"])
def test_ddp_looks_for_unused_parameters_exactly_when_a_step_can_leave_some(files, overrides):
    cfg = config.load_config([REPO / f for f in files], overrides)
    unused = {p: _unused_after_one_step(files, overrides, p) for p in (1, 0)}  # with, without pseudo
    assert train.may_leave_parameters_unused(cfg) == any(unused.values()), unused
