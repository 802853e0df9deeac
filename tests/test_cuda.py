"""The CUDA path of both students (marker ``cuda``; every test skips without CUDA).

bench/gpu_check.py runs them on a GPU machine: ``pytest -m cuda tests/test_cuda.py``.

The models are the OV-COCO configs' (ResNet-50 + FPN 256 from a random torchvision-format file with
frozen statistics, both students' official heads), on 2 hand-made 128 x 160 images with GT and
pseudo boxes and random CLIP knowledge (D = 512, ViT-B/32's width).

* fp32 parity: one model built on CPU, a deep copy moved to CUDA, the same batch; TF32 off for
  the test (cuDNN allows it by default). Sampling is made order-free: the RPN and RoI samplers
  take every candidate (``rpn_batch_size``, ``roi_batch_size`` above their count) and no top-k cut
  before NMS, so the device's random stream and sort order of ties do not pick the RoIs.
  Tolerances: every loss ``|cuda - cpu| <= 1e-3 |cpu| + 1e-4``; the whole gradient (all
  parameters concatenated) relative L2 error <= 5e-3; each parameter whose gradient norm is at
  least 1e-3 of the largest: relative L2 error <= 5e-2.
* fp16 AMP: autocast float16 with ``torch.amp.GradScaler`` as train.py uses it (init scale 2^16:
  early steps whose gradients overflow are skipped and halve the scale): within 24 tries a step is
  taken, the losses are finite, every parameter stays finite and some moved, and the total of the
  first try is within 10 % of fp32's on the same weights and batch.
* bf16: one autocast bfloat16 step (no scaler), the same checks.
* checkpoint: after one fp32 step on CUDA, a train.py-style dict (model, optimizer, scaler, CUDA
  RNG) saved there loads with ``map_location="cpu", weights_only=True``: every tensor on CPU and
  equal to the CUDA one, the model loads strictly into a fresh CPU model and the optimizer state
  into its optimizer, and its CPU losses equal the CUDA model's within the parity tolerance.
  (bench/gpu_check.py also loads train.py's own CUDA checkpoints on CPU.)
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import config
import hdovd
from conftest import REPO

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STUDENTS = {"faster_rcnn": "ov_coco_faster_rcnn_r50.yaml", "adamixer": "ov_coco_adamixer_r50.yaml"}
DIM, SIZE = 512, (128, 160)  # CLIP width (ViT-B/32), image (h, w)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """torchvision's resnet50() init with BatchNorm statistics measured on noise (frozen ones then
    keep activations in fp16 range), in torchvision's file format."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(2, 3, 128, 128))
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(net.state_dict(), path)
    return path


def build(student: str, weights_file) -> tuple:
    """(CPU model in train mode, loss weights) of the student's OV-COCO config, sampling order-free."""
    overrides = [f"model.backbone_weights={weights_file}", "data.min_size=128", "data.max_size=160",
                 "model.rpn_batch_size=100000", "model.rpn_pre_nms_train=100000",
                 "model.rpn_post_nms_train=100000", "model.roi_batch_size=100000",
                 "adamixer.num_queries=30", "adamixer.pre_nms_top_k=100000",
                 "model.pseudo_min_side_px=16", "train.max_steps=12"]  # AdaMixer pseudo warm-up: 1 step
    cfg = config.load_config(REPO / "configs" / STUDENTS[student], overrides)
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(len(config.class_names(cfg)), DIM, generator=g), dim=1)
    torch.manual_seed(0)
    model = hdovd.build_hdovd(cfg, text).train()
    if hasattr(model, "train_steps"):
        model.train_steps.fill_(5)  # AdaMixer: past its pseudo warm-up (distillation on)
    return model, hdovd.loss_weights(cfg)


def make_batch(device):
    """2 images, 3 GT base boxes and 5 pseudo boxes each, random CLIP knowledge."""
    g = torch.Generator().manual_seed(0)
    h, w = SIZE
    images, targets = [], []
    for _ in range(2):
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = 24 + torch.rand(8, 2, generator=g) * 48
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], dim=1)
        unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
        know = {"image_emb": unit(DIM), "gt_emb": unit(3, DIM), "pseudo_boxes": boxes[3:],
                "pseudo_img_emb": unit(5, DIM), "pseudo_txt_emb": unit(5, DIM),
                "pseudo_weight": 0.5 + 0.5 * torch.rand(5, generator=g)}
        images.append(torch.randn(3, h, w, generator=g).to(device))
        targets.append({"boxes": boxes[:3].to(device),
                        "labels": torch.randint(0, 48, (3,), generator=g).to(device),
                        "knowledge": {k: v.to(device) for k, v in know.items()}})
    return images, targets


def losses_and_total(model, weights, batch, dtype=None):
    device = batch[0][0].device
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(*batch)
    losses = {k: v.float() for k, v in out.items() if k.startswith("loss_")}
    return losses, sum(weights[k] * v for k, v in losses.items())


@pytest.fixture()
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def assert_close_losses(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        x, y = float(a[k].detach()), float(b[k].detach())
        assert abs(x - y) <= 1e-3 * abs(x) + 1e-4, f"{k}: cpu {x} vs cuda {y}"


@pytest.mark.parametrize("student", list(STUDENTS))
def test_fp32_parity_cpu_vs_cuda(student, resnet50_file, no_tf32):
    cpu_model, weights = build(student, resnet50_file)
    cuda_model = copy.deepcopy(cpu_model).cuda()
    results = {}
    for name, model, device in (("cpu", cpu_model, "cpu"), ("cuda", cuda_model, "cuda")):
        torch.manual_seed(0)
        losses, total = losses_and_total(model, weights, make_batch(device))
        total.backward()
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = losses, grads
    (cpu_losses, cpu_grads), (cuda_losses, cuda_grads) = results["cpu"], results["cuda"]
    assert_close_losses(cpu_losses, cuda_losses)
    assert cpu_grads.keys() == cuda_grads.keys() and cpu_grads
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    rel = ((flat(cpu_grads) - flat(cuda_grads)).norm() / flat(cpu_grads).norm()).item()
    assert rel <= 5e-3, f"whole-gradient relative error {rel:.2e}"
    largest = max(v.norm() for v in cpu_grads.values())
    worst = max((((cpu_grads[n] - cuda_grads[n]).norm() / v.norm()).item(), n)
                for n, v in cpu_grads.items() if v.norm() >= 1e-3 * largest)
    assert worst[0] <= 5e-2, f"parameter {worst[1]}: gradient relative error {worst[0]:.2e}"


def amp_step(student, resnet50_file, dtype):
    """Train steps under autocast ``dtype`` (None: fp32) until one is taken (float16: the
    GradScaler skips steps with overflowing gradients); returns (model, optimizer, scaler, tries)."""
    model, weights = build(student, resnet50_file)
    model = model.cuda()
    batch = make_batch("cuda")
    with torch.no_grad():  # on a copy: a forward fills the distillation queues
        _, fp32_total = losses_and_total(copy.deepcopy(model), weights, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    first = None
    for tries in range(1, 25):
        losses, total = losses_and_total(model, weights, batch, dtype)
        values = {k: float(v.detach()) for k, v in losses.items()}
        assert all(map(math.isfinite, values.values())), values
        first = float(total.detach()) if first is None else first
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.step(opt)
        scaler.update()
        if not scaler.is_enabled() or scaler.get_scale() >= scale:  # not skipped for inf/nan
            break
    else:
        pytest.fail(f"{dtype}: every one of 24 steps had non-finite gradients")
    moved = any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert moved, "no parameter changed in the step"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"non-finite parameters after the step: {bad[:5]}"
    assert abs(first - float(fp32_total)) <= 0.1 * abs(float(fp32_total)), (first, float(fp32_total))
    return model, opt, scaler, tries


@pytest.mark.parametrize("student", list(STUDENTS))
def test_fp16_amp_step_with_grad_scaler(student, resnet50_file):
    _, _, scaler, tries = amp_step(student, resnet50_file, torch.float16)
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0, tries


@pytest.mark.parametrize("student", list(STUDENTS))
def test_bf16_step(student, resnet50_file):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    amp_step(student, resnet50_file, torch.bfloat16)


@pytest.mark.parametrize("student", list(STUDENTS))
def test_checkpoint_saved_on_cuda_loads_on_cpu(student, resnet50_file, tmp_path, no_tf32):
    model, opt, scaler, _ = amp_step(student, resnet50_file, None)  # one fp32 step on CUDA
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(), "step": 1,
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}}, path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cuda_state = model.state_dict()
    for k, v in ckpt["model"].items():
        assert v.device.type == "cpu" and torch.equal(v, cuda_state[k].cpu()), k
    cpu_model, weights = build(student, resnet50_file)
    cpu_model.load_state_dict(ckpt["model"])  # strict
    cpu_opt = torch.optim.SGD([p for p in cpu_model.parameters() if p.requires_grad], lr=1e-3,
                              momentum=0.9)
    cpu_opt.load_state_dict(ckpt["optimizer"])
    assert all(s["momentum_buffer"].device.type == "cpu" for s in cpu_opt.state.values())
    with torch.no_grad():
        torch.manual_seed(0)
        cpu_losses, _ = losses_and_total(cpu_model, weights, make_batch("cpu"))
        torch.manual_seed(0)
        cuda_losses, _ = losses_and_total(model, weights, make_batch("cuda"))
    assert_close_losses(cpu_losses, cuda_losses)
