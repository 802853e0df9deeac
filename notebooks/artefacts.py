"""What the notebooks look at: the default Shapes-OV run when it exists, else a tiny one built here.

Every notebook starts with ``art = artefacts.get()``. Two kinds of artefacts:

* ``default``: the world, teacher and knowledge that ``config.yaml`` builds (``data/shapes_ov/``) and
  the trained run ``runs/shapes_ov_frcnn/`` (README quick start, ~15 min on 2 cores), plus the
  base-only run ``runs/shapes_ov_baseline/`` when it exists (README "Results").
* ``tiny``: the same pipeline at toy size, built on first use by the project's own command
  ``python train.py --config config.yaml --set <TINY>`` (which builds the world, pre-trains the
  teacher and extracts the knowledge first) and once more with the three hierarchies off:
  320 train / 64 val images, a teacher pre-trained for 400 steps, a proposal network for 150,
  detectors for 150. It lives in ``data/notebooks_tiny/`` and ``runs/notebooks_tiny_*`` and is
  rebuilt when a value of its resolved config changes (delete those folders to force it). Its
  numbers are far from the default's; it shows the mechanics, not the results.

``get()`` picks ``default`` when its world, knowledge and trained run (``metrics.json``) exist,
else ``tiny``; the environment variable ``HDOVD_ARTEFACTS=default|tiny`` forces one (CI runs
the notebooks on ``tiny``, tests/test_notebooks.py). ``python notebooks/artefacts.py [tiny]``
builds or checks the artefacts from the command line.

Paths in the configs are relative to the repository root, as for train.py, so importing this
module puts the root on ``sys.path`` and makes it the working directory (notebooks/ stays
importable: ``import draw`` after it still works).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
os.chdir(REPO)

import config  # noqa: E402  (needs the repository root on sys.path)
import data  # noqa: E402
import evaluate  # noqa: E402

BASELINE = ["distill.instance=false", "distill.class_wise=false", "distill.image=false"]  # README

TINY_ROOT = "data/notebooks_tiny"
TINY = [  # --set overrides of config.yaml: the default pipeline at toy size (module docstring)
    f"data.root={TINY_ROOT}", f"teacher.clip_model={TINY_ROOT}/teacher/clip.pt",
    "world.num_train=320", "world.num_val=64",
    "clip_pretrain.num_scenes=1600", "clip_pretrain.max_steps=400",
    "teacher.calibration_images=320", "teacher.proposals.max_steps=150",
    "train.max_steps=150", "train.warmup_steps=40", "train.milestones=[100, 135]",
    "train.ckpt_every=0", "train.log_every=10",
]
RUNS = {  # label -> (default run name, tiny run name, extra overrides)
    "HD-OVD": ("shapes_ov_frcnn", "notebooks_tiny_hdovd", []),
    "base-only": ("shapes_ov_baseline", "notebooks_tiny_baseline", BASELINE),
}


@dataclass
class Artefacts:
    """One set of artefacts: ``kind`` ("default" or "tiny"), the resolved config of the HD-OVD run
    (world, teacher, knowledge, model) and the checkpoint of each run that exists, by label."""
    kind: str
    cfg: config.Config
    checkpoints: dict[str, Path]

    def describe(self) -> str:
        d, w = self.cfg.data, self.cfg.world
        runs = ", ".join(f"{k}: {p.parent}" for k, p in self.checkpoints.items())
        return (f"{self.kind} artefacts: world {d.root} ({w.num_train} train / {w.num_val} val "
                f"images), teacher {self.cfg.teacher.clip_model}; runs {runs}")

    def load(self, label: str = "HD-OVD", device: str = "cpu"):
        """(model in eval mode, its config, checkpoint dict) of a run: evaluate.load_checkpoint."""
        return evaluate.load_checkpoint(self.checkpoints[label], device=device)

    def metrics(self, label: str) -> dict:
        """The run's metrics.json (evaluate.py's AP50 novel / base / all, per class, percent)."""
        return json.loads((self.checkpoints[label].parent / "metrics.json").read_text())


def _config(overrides: list[str]) -> config.Config:
    return config.load_config(REPO / "config.yaml", overrides)


def _finished(cfg: config.Config) -> bool:
    return (Path(cfg.run.out_dir) / cfg.run.name / "metrics.json").is_file()


def default_artefacts() -> Artefacts | None:
    """The default artefacts when the world, its knowledge and the trained HD-OVD run exist."""
    from knowledge import extract
    from shapes_ov import world

    cfg = _config([])
    try:
        built = world.world_is_built(cfg) and extract.knowledge_is_built(cfg) and _finished(cfg)
    except ValueError:  # a world built from another config
        return None
    if not built:
        return None
    if not _run_loads(cfg):
        print(f"artefacts: {Path(cfg.run.out_dir) / cfg.run.name} was trained with config keys this "
              f"code no longer has; retrain it to use the default artefacts")
        return None
    runs = {label: _config([f"run.name={name}", *extra]) for label, (name, _, extra) in RUNS.items()}
    ckpts = {label: Path(c.run.out_dir) / c.run.name / "ckpt.pth" for label, c in runs.items()
             if _finished(c) and _run_loads(c)}
    return Artefacts("default", evaluate.load_checkpoint(ckpts["HD-OVD"])[1], ckpts)


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _changed(built: dict, wanted: dict) -> list[str]:
    """Config keys whose value differs. Keys added or removed since the build are not counted: a
    new key's default keeps the old behaviour, and every config change would otherwise rebuild."""
    a, b = _flatten(built), _flatten(wanted)
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k])


def _run_loads(cfg: config.Config) -> bool:
    """The finished run's saved config still reads under the current config schema."""
    try:
        config.load_config(Path(cfg.run.out_dir) / cfg.run.name / "config.yaml")
        return True
    except config.ConfigError:
        return False


def tiny_artefacts(log=print) -> Artefacts:
    """The tiny artefacts, built on first use (a few minutes on 2 cores) through train.py."""
    fingerprint = Path(TINY_ROOT) / "notebooks_tiny.json"  # the resolved configs it was built from
    runs = {label: TINY + [f"run.name={tiny}", *extra] for label, (_, tiny, extra) in RUNS.items()}
    wanted = {label: config.config_to_dict(_config(o)) for label, o in runs.items()}
    Path("data").mkdir(exist_ok=True)
    with open(Path("data") / ".notebooks_tiny.lock", "w") as lock:  # one builder at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = json.loads(fingerprint.read_text()) if fingerprint.is_file() else None
        if built is None or _changed(built, wanted):
            if built is not None:
                keys = sorted({k.split(".", 1)[1] for k in _changed(built, wanted)})  # minus the run label
                log(f"tiny artefacts built with other values of {', '.join(keys)}: rebuilding")
            for label, overrides in runs.items():  # our own cache, from another config: start over
                shutil.rmtree(Path("runs") / _config(overrides).run.name, ignore_errors=True)
            shutil.rmtree(TINY_ROOT, ignore_errors=True)
            fingerprint.parent.mkdir(parents=True)
        # atomic: a kill never leaves half a fingerprint; an interrupted build resumes (train.py)
        data.write_atomic(fingerprint, lambda tmp: tmp.write_text(json.dumps(wanted)))
        for label, overrides in runs.items():
            cfg = _config(overrides)
            if _finished(cfg) and _run_loads(cfg):
                continue
            shutil.rmtree(Path(cfg.run.out_dir) / cfg.run.name, ignore_errors=True)  # retrain it
            log_path = Path(TINY_ROOT) / f"build_{cfg.run.name}.log"
            cmd = [sys.executable, "train.py", "--config", "config.yaml", "--set", *overrides]
            log(f"building the tiny artefacts: {label} run (log: {log_path}) ...")
            start = time.time()
            with open(log_path, "w") as out:
                done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
                raise RuntimeError(f"`{' '.join(cmd)}` failed; last lines of {log_path}:\n{tail}")
            log(f"  done in {time.time() - start:.0f} s")
    ckpts = {label: Path(c.run.out_dir) / c.run.name / "ckpt.pth"
             for label, c in ((label, _config(o)) for label, o in runs.items())}
    return Artefacts("tiny", evaluate.load_checkpoint(ckpts["HD-OVD"])[1], ckpts)


def get(kind: str | None = None) -> Artefacts:
    """``kind`` "default", "tiny" or None (= $HDOVD_ARTEFACTS, else default when it exists)."""
    kind = kind or os.environ.get("HDOVD_ARTEFACTS", "auto")
    if kind not in ("auto", "default", "tiny"):
        raise ValueError(f"HDOVD_ARTEFACTS={kind!r}: use default, tiny or auto")
    if kind in ("auto", "default"):
        art = default_artefacts()
        if art is not None:
            return art
        if kind == "default":
            raise FileNotFoundError("the default artefacts are missing: run `torchrun "
                                    "--nproc_per_node=1 train.py --config config.yaml` first")
    return tiny_artefacts()


if __name__ == "__main__":
    start = time.time()
    print(get(sys.argv[1] if len(sys.argv) > 1 else None).describe())
    print(f"ready in {time.time() - start:.0f} s")
