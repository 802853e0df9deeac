"""The precision policy (devices.resolve_amp): every autocast key takes true, false or "auto", and
"auto" means bf16 only where the hardware runs it natively. The probe is faked both ways, so both
branches run on any CPU; one test checks what the real probe says on this one."""
import json

import pytest
import torch

import config
import devices
import train

AMP_KEYS = ("clip_pretrain.amp", "teacher.amp", "teacher.proposals.amp", "train.amp")
CPU = torch.device("cpu")


@pytest.fixture(params=[True, False], ids=["bf16-native", "no-native-bf16"])
def native(request, monkeypatch):
    """Fake oneDNN's bf16 probe (the one devices.bf16_is_native asks on CPU)."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: request.param)
    return request.param


def test_auto_is_the_default_of_every_autocast_key():
    cfg = config.Config()
    for key in AMP_KEYS:
        section, leaf = key.rsplit(".", 1)
        node = cfg
        for part in section.split("."):
            node = getattr(node, part)
        assert getattr(node, leaf) == "auto", key
    shipped = config.load_config("config.yaml")
    assert shipped.train.amp == shipped.teacher.amp == shipped.clip_pretrain.amp == "auto"


def test_auto_follows_the_probe_and_true_false_force_it(native):
    assert devices.bf16_is_native(CPU) is native
    assert devices.resolve_amp("auto", CPU) is native
    assert devices.resolve_amp(True, CPU) is True and devices.resolve_amp(False, CPU) is False
    cfg = config.load_config("config.yaml")
    report = devices.precision_report(cfg, CPU)
    expected = "bfloat16" if native else "float32"
    assert report == {"bf16_native": native, "clip_pretrain": expected, "teacher": expected,
                      "teacher.proposals": expected, "train": expected}
    assert train.amp_setting(cfg.train, CPU) == (native, torch.bfloat16)
    line = devices.precision_line(cfg, CPU)
    assert ("does not run" in line) is (not native) and f"train {expected}" in line


def test_forced_settings_ignore_the_probe(native):
    on = config.load_config("config.yaml", [f"{k}=true" for k in AMP_KEYS])
    off = config.load_config("config.yaml", [f"{k}=false" for k in AMP_KEYS])
    assert set(devices.precision_report(on, CPU).values()) - {native} == {"bfloat16"}
    assert set(devices.precision_report(off, CPU).values()) - {native} == {"float32"}
    assert train.amp_setting(on.train, CPU) == (True, torch.bfloat16)  # config.yaml: bfloat16
    # float16 autocast is CUDA-only here: forced on a CPU it stays off
    fp16 = config.load_config("config.yaml", ["train.amp=true", "train.amp_dtype=float16"])
    assert train.amp_setting(fp16.train, CPU) == (False, torch.float16)


@pytest.mark.parametrize("value", ["1", "yes_please", "bf16", "[true]"])
def test_bad_values_name_the_key_and_the_choices(value):
    with pytest.raises(config.ConfigError, match=r"'teacher\.amp' expects true/false or 'auto'"):
        config.load_config(None, [f"teacher.amp={value}"])


def test_the_config_round_trips_with_auto():
    cfg = config.load_config("config.yaml", ["train.amp=false"])
    back = config.config_from_dict(config.config_to_dict(cfg))
    assert back.train.amp is False and back.teacher.amp == "auto"


def test_the_real_probe_agrees_with_a_bf16_matmul():
    """Not faked: where oneDNN says bf16 is native, a bf16 matmul is not slower than ~1/4 of fp32
    (emulated bf16 measured 50x slower); where it says no, "auto" gives fp32. Counted in
    multiply-adds, so it cannot fail for a busy machine unless bf16 is emulated."""
    if not devices.bf16_is_native(CPU):
        assert devices.resolve_amp("auto", CPU) is False
        return
    import time
    a = torch.randn(512, 512)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x
        times = []
        for _ in range(5):
            t = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - t)
        best[dtype] = min(times)
    assert best[torch.bfloat16] < 4 * best[torch.float32], best


def test_a_run_records_what_auto_became(tiny_world, tmp_path, native, one_thread):
    """train.py's log.jsonl opens with a "run" line holding the resolved precision."""
    train.main(["--config", "config.yaml", "--set", *tiny_world, f"run.out_dir={tmp_path}",
                "run.name=precision", "train.max_steps=1", "train.amp=false",
                "eval.max_images=2"])
    first = json.loads((tmp_path / "precision" / "log.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "run" and first["step"] == 0
    assert first["precision"]["bf16_native"] is native and first["precision"]["train"] == "float32"
