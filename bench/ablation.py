"""The ablation ladder (shapes_ov/README.md §3; METHOD §9): which hierarchy buys what.

    python bench/ablation.py --config config.yaml [--seeds 3] [--rows oracle full]
                             [--jobs 2] [--threads 1] [--set key=value ...] [--out PREFIX]

Rows (each a training run of ``train.py`` with the config, ``--set`` values, then the row's switches):
    oracle     ``data.oracle``: base AND novel boxes, every class's text in the training classifier,
               no distillation (the upper bound)
    base-only  every hierarchy off: the CLIP text classifier alone (paper: 2.8 novel AP50)
    H1, H2, H3 one hierarchy on (H1 distill.instance, H2 distill.class_wise plus text_space where the
               config has it, H3 distill.image)
    H1+H2      the two region-level hierarchies
    full       all three, as the config has them (paper: 46.4)
Each row runs ``--seeds`` training seeds (``run.seed`` = 0, 1, ...) on ONE prepared world and
knowledge: ``train.prepare`` runs once here first (world, teacher, knowledge), so only training
seeds vary. Runs go seed by seed (every row's seed 0 in ``--rows`` order, then every row's seed 1,
...) to ``<run.out_dir>/ablation_<config stem>/<row>_s<seed>/``; a run whose ``metrics.json``
exists for the same resolved config is reused, so an interrupted ladder continues where it stopped.
``--jobs`` runs go side by side, each with ``--threads`` torch/OpenMP threads (one per core).

Writes ``<out>.json`` and ``<out>.md`` (default ``bench/results/ablation_<model.detector>``):
per row the number of finished seeds, the mean and sample std over them of AP50_novel, AP50_base,
AP50_all, AP_all, AP_novel, AP75_novel (percent) and wall seconds per run, the per-seed numbers,
and the ladder checks of issue 15 (oracle >= 90 novel AP50; base-only <= 0.2 x oracle; each single
hierarchy above base-only by more than 2 std of base-only, undecided (null) before base-only has 2
seeds, and, stricter, by more than 2 std of the difference, sqrt(std_row^2 + std_base^2), undecided
before both rows have 2; full >= every single, >= 0.6 x oracle and >= 5 below it). Both files are
rewritten after every finished run, so an interrupted ladder still leaves the rows it finished.
Wall seconds are of the whole ``train.py`` process (training + final evaluation) on a shared
machine: compare rows of one ladder, not machines.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import config  # noqa: E402

METRICS = ["AP50_novel", "AP50_base", "AP50_all", "AP_all", "AP_novel", "AP75_novel"]
# row -> hierarchies on (None: the config's own switches); "oracle" also sets data.oracle
ROWS = {"oracle": (), "base-only": (), "H1": ("H1",), "H2": ("H2",), "H3": ("H3",),
        "H1+H2": ("H1", "H2"), "full": None}


def row_overrides(row: str, cfg: config.Config) -> list[str]:
    """The ``--set`` values that turn ``cfg`` into the row."""
    on = ROWS[row]
    if on is None:
        return []
    switches = {"instance": "H1" in on, "class_wise": "H2" in on,
                "text_space": "H2" in on and cfg.distill.text_space, "image": "H3" in on}
    out = [f"distill.{k}={str(v).lower()}" for k, v in switches.items()]
    return out + (["data.oracle=true"] if row == "oracle" else [])


def run_dir(out_root: Path, row: str, seed: int) -> Path:
    return out_root / f"{row.replace('+', '_')}_s{seed}"


def finished(path: Path, cfg: config.Config) -> dict | None:
    """The run's metrics when it finished with exactly this resolved config, else None."""
    if not (path / "metrics.json").is_file() or not (path / "config.yaml").is_file():
        return None
    if yaml.safe_load((path / "config.yaml").read_text()) != config.config_to_dict(cfg):
        return None
    return json.loads((path / "metrics.json").read_text())


def launch(args, overrides: list[str], threads: int, log: Path) -> subprocess.Popen:
    """``train.py`` in its own process (own thread pool and memory), its output into ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="PASSIVE")  # spinning OpenMP threads cost 5-17x on busy cores
    cmd = [sys.executable, str(REPO / "train.py"), "--config", *map(str, args.config_files),
           "--set", *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:  # the child keeps its own handle
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ladder_checks(summary: dict) -> dict:
    """Issue 15's ladder shape, each check True/False (None when its rows were not run)."""
    def get(row, key="AP50_novel"):
        return summary[row][key]["mean"] if row in summary else None

    oracle, base, full = get("oracle"), get("base-only"), get("full")
    # the 2-std test needs a spread: undecided (None) until base-only has 2 seeds
    base_std = (summary["base-only"]["AP50_novel"]["std"]
                if summary.get("base-only", {}).get("seeds", 0) >= 2 else None)
    singles = {r: get(r) for r in ("H1", "H2", "H3") if r in summary}
    checks = {"oracle >= 90": None if oracle is None else oracle >= 90,
              "base-only <= 0.2 x oracle": None if None in (oracle, base) else base <= 0.2 * oracle,
              "full >= 0.6 x oracle": None if None in (oracle, full) else full >= 0.6 * oracle,
              "full <= oracle - 5": None if None in (oracle, full) else full <= oracle - 5}
    for r, v in singles.items():
        checks[f"{r} > base-only + 2 std"] = None if base_std is None else v > base + 2 * base_std
        # stricter: the gap against 2 std of a difference of two single runs (both rows' spreads)
        r_std = summary[r]["AP50_novel"]["std"] if summary[r]["seeds"] >= 2 else None
        checks[f"{r} - base-only > 2 std of the difference"] = (
            None if None in (base_std, r_std) else v - base > 2 * math.hypot(base_std, r_std))
        checks[f"full >= {r}"] = None if full is None else full >= v
    return checks


def markdown(result: dict) -> str:
    """The ladder as a Markdown table (mean ± std over seeds; the mean alone for one seed), then
    the checks."""
    head = ("| row | seeds | novel AP50 | base AP50 | all AP50 | AP (0.5:0.95) | novel AP "
            "| novel AP75 | wall s/run |")
    lines = [f"Ladder of `{result['config']}` (mean ± sample std over the finished seeds of "
             f"{result['seeds']}; {result['machine']}; commit {result['commit']}; "
             f"`{result['command']}`)", "", head, "|---|---|---|---|---|---|---|---|---|"]
    for row, s in result["rows"].items():
        cells = [f"{s[k]['mean']:.1f}" + (f" ± {s[k]['std']:.1f}" if s["seeds"] > 1 else "")
                 for k in METRICS]
        lines.append(f"| {row} | {s['seeds']} | " + " | ".join(cells) +
                     f" | {s['wall_s']['mean']:.0f} |")
    word = {True: "yes", False: "NO", None: "undecided"}
    checks = ", ".join(f"{k}: {word[v]}" for k, v in result["checks"].items())
    return "\n".join(lines + ["", f"Checks (issue 15): {checks}.", ""])


def summarize(args, cfg: config.Config, argv, results: dict) -> dict:
    """The result dict of the runs finished so far: rows with at least one finished seed."""
    summary = {}
    for row in args.rows:
        runs = [results[(row, s)] for s in range(args.seeds) if (row, s) in results]
        if not runs:
            continue
        summary[row] = {"seeds": len(runs)}
        summary[row] |= {k: dict(zip(("mean", "std"), mean_std([m[k] for m, _ in runs])))
                         for k in METRICS}
        summary[row]["wall_s"] = dict(zip(("mean", "std"), mean_std([w for _, w in runs])))
        summary[row]["per_seed"] = [{k: m[k] for k in METRICS} | {"wall_s": w,
                                    "per_class_AP50": m["per_class_AP50"]} for m, w in runs]
    command = "python bench/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True)
    return {"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
            "detector": cfg.model.detector, "command": command,
            "commit": git.stdout.strip() or "unknown",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
                       f"{args.threads} x {args.jobs} jobs",
            "rows": summary, "checks": ladder_checks(summary)}


def main(argv=None) -> dict:
    parser = config.add_config_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per row (default 3)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="rows to run, in this order (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (one per core)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--out", default=None, help="output prefix (default: "
                        "bench/results/ablation_<model.detector>)")
    args = parser.parse_args(argv)
    args.config_files = [Path(c).resolve() for c in args.config]  # train.py runs in REPO
    out = Path(args.out).resolve() if args.out else None
    with contextlib.chdir(REPO):  # relative data.root / run.out_dir: as in train.py's processes
        return run_ladder(args, argv, out)


def run_ladder(args, argv, out: Path | None) -> dict:
    """Prepare the world once, train the missing runs, write ``<out>.json`` / ``.md``."""
    cfg = config.load_config(args.config_files, args.overrides)
    out_root = Path(cfg.run.out_dir) / f"ablation_{args.config_files[-1].stem}"
    out = out or REPO / "bench" / "results" / f"ablation_{cfg.model.detector}"
    out.parent.mkdir(parents=True, exist_ok=True)

    # One world and one knowledge for every row: prepared here, before any run starts (the
    # oracle's view also writes its all-box file when the world lacks it).
    import train  # noqa: E402  (heavy: torch)
    prep = config.load_config(args.config_files, args.overrides + row_overrides("oracle", cfg)
                              if "oracle" in args.rows else args.overrides)
    train.prepare(prep)

    todo, results = [], {}
    for seed in range(args.seeds):  # seed by seed: an interrupted ladder has every row's seed 0
        for row in args.rows:
            path = run_dir(out_root, row, seed)
            overrides = (args.overrides + row_overrides(row, cfg) +
                         [f"run.seed={seed}", f"run.out_dir={out_root}", f"run.name={path.name}"])
            done = finished(path, config.load_config(args.config_files, overrides))
            if done is not None and (path / "wall_s.json").is_file():
                results[(row, seed)] = (done, json.loads((path / "wall_s.json").read_text()))
                print(f"ablation: {row} seed {seed}: reused {path}")
            else:
                todo.append((row, seed, path, overrides))

    def write() -> dict:
        result = summarize(args, cfg, argv, results)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        return result

    running = []
    while todo or running:
        while todo and len(running) < args.jobs:
            row, seed, path, overrides = todo.pop(0)
            print(f"ablation: {row} seed {seed}: training -> {path}", flush=True)
            proc = launch(args, overrides, args.threads, path.with_suffix(".log"))
            running.append((row, seed, path, time.time(), proc))
        time.sleep(2)
        for item in list(running):
            row, seed, path, start, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                tail = path.with_suffix(".log").read_text()[-3000:]
                raise SystemExit(f"ablation: {row} seed {seed} failed:\n{tail}")
            wall = round(time.time() - start, 1)
            (path / "wall_s.json").write_text(json.dumps(wall))
            metrics = json.loads((path / "metrics.json").read_text())
            results[(row, seed)] = (metrics, wall)
            write()  # after every run: an interrupted ladder keeps what it finished
            print(f"ablation: {row} seed {seed}: novel AP50 {metrics['AP50_novel']:.1f} "
                  f"({wall:.0f} s)", flush=True)

    result = write()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
