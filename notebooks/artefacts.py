"""What the notebooks look at: the default Shapes-OV run when it exists, else a tiny one built here.

Every notebook starts with ``art = artefacts.get()`` (04_adamixer: ``artefacts.get(student="adamixer")``).
Two kinds of artefacts:

* ``default``: the world, teacher and knowledge that ``config.yaml`` builds (``data/shapes_ov/``) and
  the trained run ``runs/shapes_ov_frcnn/`` (README quick start, ~15 min on 2 cores), plus the
  base-only run ``runs/shapes_ov_baseline/`` when it exists (README "Results").
* ``tiny``: the same pipeline at toy size, built on first use by the project's own command
  ``python train.py --config config.yaml --set <TINY>`` (which builds the world, pre-trains the
  teacher and extracts the knowledge first) and once more with the three hierarchies off:
  320 train / 64 val images, a teacher pre-trained for 300 steps, a proposal network for 100,
  detectors for 100. It lives in ``data/notebooks_tiny/`` and ``runs/notebooks_tiny_*`` and is
  rebuilt when a value of its resolved config changes (delete those folders to force it). Its
  numbers are far from the default's; it shows the mechanics, not the results.

The AdaMixer student (``student="adamixer"``) has its own run on the same world: ``default`` is
``runs/shapes_ov_adamixer/`` (``torchrun --nproc_per_node=1 train.py --config config.yaml
configs/shapes_ov_adamixer.yaml``), ``tiny`` is ``runs/notebooks_tiny_adamixer`` trained for 80 steps
through train.py with that config on the tiny world (about 2 minutes on 2 quiet cores).
The tiny runs share one fingerprint: a changed value of the world's sections (data, world,
clip_pretrain, teacher) rebuilds everything, any other changed value retrains only its run.

``get()`` picks ``default`` when its world, knowledge and trained run (``metrics.json``) exist,
else ``tiny``; the environment variable ``HDOVD_ARTEFACTS=default|tiny`` forces one (CI runs
the notebooks on ``tiny``, tests/test_notebooks.py). ``python notebooks/artefacts.py [tiny]``
builds or checks the artefacts of both students from the command line.

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
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
os.chdir(REPO)

import config  # noqa: E402  (needs the repository root on sys.path)
import rundir  # noqa: E402
import evaluate  # noqa: E402

BASELINE = ["distill.instance=false", "distill.class_wise=false", "distill.image=false"]  # README

TINY_ROOT = "data/notebooks_tiny"
# Sized so that the CI of a CPU without native bf16 (fp32 everywhere) stays within 20 minutes (LOG.md
# 2026-12-06: these artefacts were 743 s of its 21 min at 400 / 150 / 150 / 120 steps).
TINY_WORLD = [  # --set overrides: the default world, teacher and knowledge at toy size (module docstring)
    f"data.root={TINY_ROOT}", f"teacher.clip_model={TINY_ROOT}/teacher/clip.pt",
    "world.num_train=320", "world.num_val=64",
    "clip_pretrain.num_scenes=1600", "clip_pretrain.max_steps=300",
    "teacher.calibration_images=320", "teacher.proposals.max_steps=100",
]
TINY = TINY_WORLD + [  # ... and the Faster R-CNN runs of config.yaml at toy size
    "train.max_steps=100", "train.warmup_steps=30", "train.milestones=[67, 92]",
    "train.ckpt_every=0", "train.log_every=10",
]
TINY_ADAMIXER = TINY_WORLD + [  # ... and the AdaMixer run: schedule at the config's proportions
    "train.max_steps=80", "train.warmup_steps=10", "train.milestones=[53, 73]",
    "train.ckpt_every=0", "train.eval_every=0", "train.log_every=10",
]


class Run(NamedTuple):
    """One trained run the notebooks read, as train.py builds it."""
    config_files: tuple      # train.py --config (later files override earlier ones)
    default_name: str        # run.name of the default run
    tiny_name: str           # run.name of the tiny run
    tiny: list[str]          # --set overrides of the tiny run (toy size)
    extra: tuple = ()        # --set overrides of both (e.g. the hierarchies off)


RUNS = {  # label -> Run; the first is the main run (its config is Artefacts.cfg)
    "HD-OVD": Run(("config.yaml",), "shapes_ov_frcnn", "notebooks_tiny_hdovd", TINY),
    "base-only": Run(("config.yaml",), "shapes_ov_baseline", "notebooks_tiny_baseline", TINY, tuple(BASELINE)),
}
ADAMIXER_RUNS = {
    "AdaMixer": Run(("config.yaml", "configs/shapes_ov_adamixer.yaml"), "shapes_ov_adamixer", "notebooks_tiny_adamixer",
                    TINY_ADAMIXER),
}
STUDENTS = {"faster_rcnn": RUNS, "adamixer": ADAMIXER_RUNS}  # get(student=...)
SHARED = ("data.", "world.", "clip_pretrain.", "teacher.")  # what the world and knowledge are built from


@dataclass
class Artefacts:
    """One set of artefacts: ``kind`` ("default" or "tiny"), the resolved config of the main run
    (world, teacher, knowledge, model) and the checkpoint of each run that exists, by label."""
    kind: str
    cfg: config.Config
    checkpoints: dict[str, Path]

    def describe(self) -> str:
        d, w = self.cfg.data, self.cfg.world
        runs = ", ".join(f"{k}: {p.parent}" for k, p in self.checkpoints.items())
        return (f"{self.kind} artefacts: world {d.root} ({w.num_train} train / {w.num_val} val "
                f"images), teacher {self.cfg.teacher.clip_model}; runs {runs}")

    def load(self, label: str | None = None, device: str = "cpu"):
        """(model in eval mode, its config, checkpoint dict) of a run (default: the main run):
        evaluate.load_checkpoint."""
        return evaluate.load_checkpoint(self.checkpoints[label or next(iter(self.checkpoints))],
                                        device=device)

    def metrics(self, label: str) -> dict:
        """The run's metrics.json (evaluate.py's AP50 novel / base / all, per class, percent)."""
        return json.loads((self.checkpoints[label].parent / "metrics.json").read_text())


def _config(overrides: list[str], config_files=("config.yaml",)) -> config.Config:
    return config.load_config([REPO / f for f in config_files], overrides)


def _finished(cfg: config.Config) -> bool:
    return (Path(cfg.run.out_dir) / cfg.run.name / "metrics.json").is_file()


def default_artefacts(runs: dict = RUNS) -> Artefacts | None:
    """The default artefacts when the world, its knowledge and the main (first) run of ``runs``
    exist; the other runs are added when they are finished too."""
    from knowledge import extract
    from shapes_ov import world

    main = _config([], next(iter(runs.values())).config_files)
    try:
        built = world.world_is_built(main) and extract.knowledge_is_built(main) and _finished(main)
    except ValueError:  # a world built from another config
        return None
    if not built:
        return None
    if not _run_loads(main):
        print(f"artefacts: {Path(main.run.out_dir) / main.run.name} was trained with config keys this "
              f"code no longer has; retrain it to use the default artefacts")
        return None
    cfgs = {label: _config([f"run.name={r.default_name}", *r.extra], r.config_files)
            for label, r in runs.items()}
    ckpts = {label: Path(c.run.out_dir) / c.run.name / "ckpt.pth" for label, c in cfgs.items()
             if _finished(c) and _run_loads(c)}
    return Artefacts("default", evaluate.load_checkpoint(next(iter(ckpts.values())))[1], ckpts)


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


def _run_dir(cfg_dict: dict) -> Path:
    return Path(cfg_dict["run"]["out_dir"]) / cfg_dict["run"]["name"]


def tiny_artefacts(runs: dict = RUNS, log=print) -> Artefacts:
    """The tiny artefacts of ``runs``, built on first use through train.py (the first run also
    builds the tiny world, teacher and knowledge: a few minutes on 2 cores)."""
    fingerprint = Path(TINY_ROOT) / "notebooks_tiny.json"  # the resolved config of every tiny run built
    overrides = {label: (r.config_files, [*r.tiny, f"run.name={r.tiny_name}", *r.extra])
                 for label, r in runs.items()}
    wanted = {label: config.config_to_dict(_config(o, file)) for label, (file, o) in overrides.items()}
    Path("data").mkdir(exist_ok=True)
    with open(Path("data") / ".notebooks_tiny.lock", "w") as lock:  # one builder at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = json.loads(fingerprint.read_text()) if fingerprint.is_file() else None
        changed = {label: _changed(built[label], wanted[label]) for label in wanted
                   if built is not None and label in built}
        shared = sorted({k for keys in changed.values() for k in keys if k.startswith(SHARED)})
        if built is None or shared:  # no fingerprint (a folder of unknown origin) or another world
            if shared:
                log(f"tiny artefacts built with other values of {', '.join(shared)}: rebuilding")
            for c in [*(built or {}).values(), *wanted.values()]:  # our own cache: start over
                shutil.rmtree(_run_dir(c), ignore_errors=True)
            shutil.rmtree(TINY_ROOT, ignore_errors=True)
            built = {}
        for label, keys in changed.items():
            if keys and not shared:  # the same world: retrain that run only
                log(f"tiny {label} run built with other values of {', '.join(keys)}: retraining it")
                shutil.rmtree(_run_dir(wanted[label]), ignore_errors=True)
        fingerprint.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a kill never leaves half a fingerprint; an interrupted build resumes (train.py)
        rundir.write_atomic(fingerprint, lambda tmp: tmp.write_text(json.dumps({**built, **wanted})))
        for label, (file, o) in overrides.items():
            cfg = _config(o, file)
            if _finished(cfg) and _run_loads(cfg):
                continue
            shutil.rmtree(Path(cfg.run.out_dir) / cfg.run.name, ignore_errors=True)  # retrain it
            log_path = Path(TINY_ROOT) / f"build_{cfg.run.name}.log"
            cmd = [sys.executable, "train.py", "--config", *file, "--set", *o]
            log(f"building the tiny artefacts: {label} run (log: {log_path}) ...")
            start = time.time()
            with open(log_path, "w") as out:
                done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
                raise RuntimeError(f"`{' '.join(cmd)}` failed; last lines of {log_path}:\n{tail}")
            log(f"  done in {time.time() - start:.0f} s")
    ckpts = {label: Path(c.run.out_dir) / c.run.name / "ckpt.pth"
             for label, c in ((label, _config(o, file)) for label, (file, o) in overrides.items())}
    return Artefacts("tiny", evaluate.load_checkpoint(next(iter(ckpts.values())))[1], ckpts)


def get(kind: str | None = None, student: str = "faster_rcnn") -> Artefacts:
    """``kind`` "default", "tiny" or None (= $HDOVD_ARTEFACTS, else default when it exists);
    ``student`` "faster_rcnn" (runs HD-OVD and base-only) or "adamixer" (run AdaMixer)."""
    kind = kind or os.environ.get("HDOVD_ARTEFACTS", "auto")
    if kind not in ("auto", "default", "tiny"):
        raise ValueError(f"HDOVD_ARTEFACTS={kind!r}: use default, tiny or auto")
    if student not in STUDENTS:
        raise ValueError(f"student={student!r}: use one of {sorted(STUDENTS)}")
    runs = STUDENTS[student]
    if kind in ("auto", "default"):
        art = default_artefacts(runs)
        if art is not None:
            return art
        if kind == "default":
            files = " ".join(next(iter(runs.values())).config_files)
            raise FileNotFoundError(f"the default artefacts are missing: run `torchrun "
                                    f"--nproc_per_node=1 train.py --config {files}` first")
    return tiny_artefacts(runs)


if __name__ == "__main__":
    start = time.time()
    for student in STUDENTS:  # Faster R-CNN first: its first run builds the tiny world
        print(get(sys.argv[1] if len(sys.argv) > 1 else None, student).describe())
    print(f"ready in {time.time() - start:.0f} s")
