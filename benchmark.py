r"""Run method scripts over tasks x seeds as subprocesses and (re)write RESULTS.md and results.json.

    python benchmark.py --methods dann --tasks mnist-usps usps-mnist mnist-mnistm --seeds 0 1 2 --jobs 2
    python benchmark.py --methods dann --tasks mnist-mnistm --seeds 0 1 2 --jobs 2 -- --lambda-max 0
    python benchmark.py --overhead --tasks mnist-mnistm --overhead-steps 300     # loop overhead vs bare networks
    python benchmark.py --speed --device cuda --methods dann gam calibrator i2i_adapt pixelda --tasks mnist-usps
    python benchmark.py --plan paper --launcher submitit --partition gpu --no-wait    # a SLURM job array
    python benchmark.py --collect runs/benchmark                                     # rows from finished run folders

`--plots` draws the README rows' pictures into `pictures/` (matplotlib, optional): each row's target accuracy over
the steps (mean and min-max band over seeds) beside the source accuracy and the method's own signals, and the image
grid of one of its runs for the image methods; RESULTS.md shows them.

Everything after `--` is passed to every run; `{task}` and `{seed}` in it are replaced by the run's task and seed
(e.g. gam.py's per-seed stage-1 cache: `-- --source-ckpt ckpt/gam_{task}_{seed}.pt`). Each (method, task, extra flags) is one row; re-running the same
row replaces it, other rows are kept (results.json is the store, RESULTS.md is rendered from it). Only measured
runs appear. Each run's stdout/stderr is kept under <out>/logs/.

Benchmarking
------------

```bash
python benchmark.py --methods dann --tasks mnist-usps usps-mnist mnist-mnistm --seeds 0 1 2 --jobs 2
python benchmark.py --methods dann --tasks mnist-mnistm --seeds 0 1 2 --jobs 2 -- --lambda-max 0   # source only
python benchmark.py --overhead --tasks mnist-mnistm mnist-usps      # script loop vs bare forward+backward
python benchmark.py --methods gam --tasks mnist-usps usps-mnist --jobs 2 -- --source-ckpt 'ckpt/gam_{task}_{seed}.pt'
python benchmark.py --plan paper --dry-run               # the paper-length grid: every row, 3 seeds (60 runs)
python benchmark.py --plan paper --device cuda --jobs 8 -- --cuda-graph on   # ... on one GPU, 8 runs at a time
python benchmark.py --speed --device cuda --methods dann gam calibrator i2i_adapt pixelda --tasks mnist-usps
python benchmark.py --plan paper --launcher submitit --partition gpu --no-wait -- --device cuda   # on SLURM, below
```

`{task}` and `{seed}` in the flags after `--` are replaced per run (here: one cached source network per task and
seed, shared by all the GAM variants).

It runs the scripts as subprocesses, collects each run's result (the JSON line its log ends with, the same as its
`summary.json`) and rewrites `RESULTS.md` and `results.json`
(one record per method, task and flags, with the per-seed accuracies, steps, seconds and commands).
A seed that the store already holds for a row is not run again, and a run that a stopped benchmark left with a
checkpoint is resumed, so a long grid can be split over several sittings. `--device cuda --jobs N` shares one GPU
between N runs with one CPU thread each. `--speed` times each script alone (training steps/s, evaluation left out;
on CUDA eager, `--amp`, `--compile`, `--compile reduce-overhead`, `--cuda-graph on` and that with `--amp`;
`--speed-modes` picks some of them) and records the device with it in a table of its own: the rate after the first
fifth of the steps (warm-up, a graph's recording and compilation left out), and over the whole run.

On a cluster
------------

`benchmark.py --launcher submitit` submits every run of a grid as one task of a SLURM job array, through
[submitit](https://github.com/facebookincubator/submitit). The paper grid (60 runs) on a GPU partition:

```bash
python benchmark.py --plan paper --launcher submitit --partition gpu --gpus-per-job 1 --cpus-per-job 4 \
    --mem-gb 16 --timeout-min 240 --array-parallelism 20 --snapshot --no-wait -- --device cuda
python benchmark.py --collect runs/benchmark     # any time later: rows from every run that has finished
```

What each flag becomes in the generated sbatch script (kept under `runs/benchmark/submitit/`):
`--partition` → `#SBATCH --partition`, `--gpus-per-job` → `--gpus-per-node`, `--cpus-per-job` → `--cpus-per-task`
(and the run's torch threads), `--mem-gb` → `--mem`, `--timeout-min` → `--time`, `--array-parallelism P` →
`--array=0-N%P`; submitit adds `--signal=USR2@90`. A grid larger than `--max-array` (1,000, under SLURM's usual
MaxArraySize) goes in several arrays. Each array task runs one script as a subprocess with `--ckpt-every 1000`; when
SLURM's warning signal comes before the time limit (or a preemption), the task stops the script and is requeued,
and the requeued task continues that run from its last checkpoint (`--resume`). A run whose folder already has its
`summary.json` is not run again. The run folders are the source of truth: `--collect OUT` builds `results.json` and
`RESULTS.md` from the `summary.json` files under OUT, so a half-finished grid shows what finished. `--snapshot` runs
the jobs on a copy of the scripts taken at submit time, so edits made afterwards change nothing; without
`--no-wait`, benchmark.py waits for the jobs and writes the rows itself. `--cluster local` runs the same jobs as
processes on this machine (the tests use it). Setup errors (no `sbatch`, a partition sbatch refuses, a log folder
that cannot be written, a `--timeout-min` under 3 that SLURM's warning would cut at once) stop with one line and exit
code 2, with nothing left submitted. A requeued task waits for SLURM's `cred_expire` (120 s by default) to start again.
"""

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

# One registry of methods: everything benchmark.py knows of a method is its entry here (adding a method is adding
# one). title: RESULTS.md's section line. paper: the paper's own numbers (target test accuracy, %) by (task, variant).
# notes: why a row has no paper number, by (task, variant) or task. plan: the "paper" grid's (tasks, flags) rows, at the
# paper's (or official code's) schedule, which is each script's default; stage-1 networks cached per task and seed.
# speed: --speed's extra flags (a short stage 1; GAM's timer counts adaptation steps only). grid, grid_rows: the image
# grid a run saves and what its rows show. headline: the README's rows, (task, the paper's variant, the labels that may
# stand for the default flags: the default first, then the declared closest, whose label says what differs).
SO_I2I = ["--lambda-z", "0", "--lambda-tr", "0", "--lambda-id-x", "0", "--lambda-id-y", "0", "--lambda-cyc", "0",
          "--lambda-trc", "0"]
GAM_FULL = {"mnist-usps": 95.7, "usps-mnist": 98.0}
REGISTRY = {
    "dann": dict(
        title="DANN: Ganin & Lempitsky, ICML 2015",
        paper={("mnist-mnistm", "dann"): 76.66, ("mnist-mnistm", "source-only"): 52.25,
               ("mnist-mnistm", "oracle"): 95.96, ("svhn-mnist", "dann"): 73.85, ("svhn-mnist", "source-only"): 54.90,
               ("svhn-mnist", "oracle"): 99.42, ("syndigits-svhn", "dann"): 91.09,
               ("syndigits-svhn", "source-only"): 86.74, ("syndigits-svhn", "oracle"): 92.20},
        notes={"mnist-usps": "not in the paper (TLlib's DANN+LeNet: 91.7, selected on target test)",
               "usps-mnist": "not in the paper (TLlib's DANN+LeNet: 95.2, selected on target test)",
               "mnist-svhn": "the paper's failure case, no number"},
        plan=[(["mnist-mnistm", "mnist-usps", "usps-mnist"], []), (["mnist-mnistm"], ["--lambda-max", "0"])],
        headline=[("mnist-usps", "dann", ["dann"]), ("usps-mnist", "dann", ["dann"]),
                  ("mnist-mnistm", "dann", ["dann"])]),
    "gam": dict(  # Table 1 (M->U, U->M, S->M)
        title="GAM: Huang, Huang & Krähenbühl, ECCV 2018",
        paper={**{(t, v): x for v, xs in (("source-only", (77.8, 70.7, 60.3)), ("adda", (90.2, 97.2, 72.0)),
                                           ("adda+drift", (90.5, 97.4, 73.5)), ("gam-no-drift", (95.6, 97.8, 73.6)),
                                           ("gam", (95.7, 98.0, 74.6)))
                  for t, x in zip(("mnist-usps", "usps-mnist", "svhn-mnist"), xs)}},
        notes={**{(t, "gaussian"): "not in the paper's digit table" for t in GAM_FULL},
               **{(t, v): n.format(GAM_FULL[t]) for t in GAM_FULL for v, n in (
                   ("gam (relu3 0.01, fc4 1, joint GANs)", "not in the paper (GAM full: {})"),
                   ("gam (joint GANs)", "not in the paper (GAM full, one GAN at a time: {})"),
                   ("gam (equal-shares GANs)", "one GAN at a time, fixed join (GAM full: {})"),
                   ("gam (fc4 1, relu3 0.1)", "logits' GAN first (GAM full, order not given: {})"),
                   ("gam (F^s without dropout)", "F^s as the official TF LeNet (GAM full: {})"))},
               ("usps-mnist", "gam (restart on an emptied class, at most 2)"):
                   "not in the paper: label-free restarts (GAM full: 98.0)",
               ("usps-mnist", "gam (paper recipe)"): "the paper's text: SGD 1e-4, 20k iterations, half drift (GAM full: 98.0)",
               ("mnist-usps", "gam (fc4 1)"): "not in the paper: the logits' GAN only (GAM full: 95.7, ADDA: 90.2)",
               ("usps-mnist", "gam (fc4 1)"): "not in the paper: the logits' GAN only (GAM full: 98.0, ADDA: 97.2)"},
        plan=[(["mnist-usps", "usps-mnist"], ["--source-ckpt", "runs/ckpt/gam_{task}_{seed}.pt"])],
        speed=["--source-steps", "100", "--disc-pretrain", "0"],
        headline=[(t, "gam", ["gam", "gam (alternating update) [earlier F^s files]"]) for t in ("mnist-usps", "usps-mnist")]),
    "calibrator": dict(  # Table 1, calibrator alone (no CycleGAN-stylised source). The paper calls F_s fixed; its
        # numbers come from the official code, which runs F_s in train mode (our calibrator+source-bn-train).
        title="Calibrator: Ye et al., CVPR 2020",
        paper={(t, v): x for t, x in (("mnist-usps", 95.6), ("usps-mnist", 97.1), ("svhn-mnist", 97.1))
               for v in ("calibrator", "calibrator+source-bn-train")},
        plan=[(["mnist-usps", "usps-mnist"], ["--source-ckpt", "runs/ckpt/cal_{task}_{seed}_official.pt"]),
              (["mnist-usps", "usps-mnist"], ["--source-ckpt", "runs/ckpt/cal_{task}_{seed}_official.pt",
                                              "--source-bn", "train"])],
        speed=["--source-epochs", "0.2"],
        grid="calibration.png",
        grid_rows="source, G_c(source), its perturbation (amplified), target, G_c(target), its perturbation, "
                  "|FFT| of target and of G_c(target)",
        headline=[("mnist-usps", "calibrator", ["calibrator (stage 1: 5 epochs)", "calibrator (betas 0.5,0.999, wd 0, one "
                                                "forward, torch init) (stage 1: 5 epochs)"]),
                  ("usps-mnist", "calibrator", ["calibrator", "calibrator (betas 0.5,0.999, wd 0, one forward, torch init)"])]),
    "i2i_adapt": dict(  # Table 2 (error % -> accuracy), M->U, U->M, S->M; best ablation = l_z + l_idY + l_trc
        title="I2I Adapt: Murez et al., CVPR 2018",
        paper={(t, v): x for v, xs in (("full", (98.5, 97.4, 89.6)), ("c+z+id_y+trc", (98.8, 97.6, 90.1)),
                                       ("source-only", (91.1, 67.0, 71.5)))
               for t, x in zip(("mnist-usps", "usps-mnist", "svhn-mnist"), xs)},
        notes={**{(t, "source-only (no augmentation)"): f"not in the paper (source only with augmentation: {x})"
                  for t, x in (("mnist-usps", 91.1), ("usps-mnist", 67.0))},
               **{(t, f"{v} (batch-norm encoder)"): f"BatchNorm encoder (paper, {name}: {x})"
                  for t, xs in (("mnist-usps", (98.5, 98.8, 91.1)), ("usps-mnist", (97.4, 97.6, 67.0)))
                  for (v, name), x in zip((("full", "full"), ("c+z+id_y+trc", "best ablation"),
                                           ("source-only", "source only")), xs)}},
        plan=[(["mnist-usps", "usps-mnist"], []),
              (["mnist-usps", "usps-mnist"], ["--lambda-tr", "0", "--lambda-id-x", "0", "--lambda-cyc", "0"]),
              (["mnist-usps", "usps-mnist"], SO_I2I)],
        grid="translations.png",
        grid_rows="source, source→target, source reconstruction, target, target→source, target reconstruction",
        headline=[("mnist-usps", "full", ["full"]), ("usps-mnist", "full", ["full"])]),
    "pixelda": dict(  # Tables 1-2, 500k steps
        title="PixelDA: Bousmalis et al., CVPR 2017",
        paper={("mnist-mnistm", "pixelda"): 98.2, ("mnist-mnistm", "source-only"): 63.6,
               ("mnist-usps", "pixelda"): 95.9, ("mnist-usps", "source-only"): 78.9},
        plan=[(["mnist-mnistm", "mnist-usps"], []),  # the official MNIST->MNIST-M weights on both tasks
              (["mnist-mnistm", "mnist-usps"], ["--source-only"])],
        grid="samples_final.png",
        grid_rows="source, G(source, z) for three noise draws z, target images",
        headline=[("mnist-usps", "pixelda", ["pixelda"]), ("mnist-mnistm", "pixelda", ["pixelda", "pixelda [code of 50f9e9c]"])]),
}
# The tables the code reads, derived from the registry.
METHODS = {m: e["title"] for m, e in REGISTRY.items()}
PAPER = {(m, t, v): x for m, e in REGISTRY.items() for (t, v), x in e["paper"].items()}
PAPER_NOTES = {(m, *(k if isinstance(k, tuple) else (k,))): n for m, e in REGISTRY.items()
               for k, n in e.get("notes", {}).items()}
PLANS = {"paper": [(m, tasks, flags) for m, e in REGISTRY.items() for tasks, flags in e["plan"]]}
SPEED_FLAGS = {m: e["speed"] for m, e in REGISTRY.items() if "speed" in e}
GRIDS = {m: e["grid"] for m, e in REGISTRY.items() if "grid" in e}
GRID_ROWS = {m: e["grid_rows"] for m, e in REGISTRY.items() if "grid_rows" in e}
HEADLINE = [(m, t, v, labels) for m, e in REGISTRY.items() for t, v, labels in e["headline"]]


def parse_args():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["dann"], help="method scripts (without .py)")
    p.add_argument("--tasks", nargs="+", default=["mnist-usps", "usps-mnist", "mnist-mnistm"], help="tasks")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores/jobs torch threads)")
    p.add_argument("--out", default="runs/benchmark", help="parent folder of the run folders and logs")
    p.add_argument("--results", default=str(HERE / "results.json"), help="results store")
    p.add_argument("--markdown", default=str(HERE / "RESULTS.md"), help="rendered table")
    p.add_argument("--readme", default=None, help="README whose results table (between its two marker comments) is "
                   "rewritten from the store (default: README.md next to benchmark.py when --results is the default)")
    p.add_argument("--plots", action="store_true", help="start nothing: draw the README rows' training curves (from "
                   "the store) and image grids (from their run folders under --out) into pictures/, then rewrite "
                   "RESULTS.md, which shows them (needs matplotlib: pip install matplotlib)")
    p.add_argument("--device", default=None, help="passed to every run (e.g. cuda: runs share the GPU, 1 thread each)")
    p.add_argument("--rerun", action="store_true", help="run seeds that the results store already holds for a row")
    p.add_argument("--plan", default=None, choices=list(PLANS), help="run a whole grid of rows instead of "
                   "--methods/--tasks/-- flags (paper: every verifiable paper row at the paper's schedule)")
    p.add_argument("--dry-run", action="store_true", help="print the runs that would be started, start none")
    p.add_argument("--overhead", action="store_true", help="measure training-loop overhead instead (dann only)")
    p.add_argument("--overhead-steps", type=int, default=300, help="steps for --overhead")
    p.add_argument("--speed", action="store_true", help="time each of --methods alone on the first of --tasks "
                   "instead: training steps/s under each of --speed-modes; recorded with the device")
    p.add_argument("--speed-modes", nargs="+", default=None, choices=list(SPEED_MODES), metavar="MODE",
                   help="for --speed: " + ", ".join(f"{k} ({' '.join(v) or 'no flag'})" for k, v in SPEED_MODES.items())
                   + "; default: eager on the CPU, all of them on CUDA (with --compile its compile time is included)")
    p.add_argument("--speed-steps", type=int, default=500, help="training steps per --speed run")
    p.add_argument("--collect", metavar="OUT", default=None, help="start nothing: (re)build the results store and "
                   "RESULTS.md from the finished runs under OUT (their run folders' summary.json)")
    p.add_argument("--fingerprint", action="store_true", help="start nothing: print each script's behaviour "
                   "fingerprint (a fixed tiny CPU run on fixture data, hashed) as one JSON line")
    p.add_argument("--save", action="store_true", help="with --fingerprint: store them in the results store as "
                   "today's (a change meant to move results does this in the same commit)")
    p.add_argument("--backfill", action="store_true", help="start nothing: give stored seeds without provenance the "
                   "commit that was HEAD when they ran and that commit's fingerprint, and split rows by fingerprint")
    p.add_argument("--launcher", default="local", choices=["local", "submitit"],
                   help="local: a pool of subprocesses on this machine (--jobs); submitit: one job per run, "
                        "submitted as SLURM job arrays through submitit (see the group below)")
    g = p.add_argument_group("--launcher submitit (each submitit flag becomes the #SBATCH line in brackets)")
    g.add_argument("--cluster", default="auto", choices=["auto", "slurm", "local"],
                   help="submitit's AutoExecutor: slurm where sbatch/srun exist (auto), or local (the same jobs as "
                        "processes on this machine, for tests)")
    g.add_argument("--partition", default=None, help="SLURM partition (--partition)")
    g.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per run (--gpus-per-node)")
    g.add_argument("--cpus-per-job", type=int, default=4, help="CPU cores per run (--cpus-per-task)")
    g.add_argument("--mem-gb", type=float, default=16, help="memory per run in GB (--mem)")
    g.add_argument("--timeout-min", type=int, default=240, help="time limit per job in minutes (--time); a run cut "
                   "by it is requeued and continues from its last checkpoint")
    g.add_argument("--array-parallelism", type=int, default=64, help="runs at once per array (--array=0-N%%P)")
    g.add_argument("--max-array", type=int, default=1000,
                   help="runs per job array (SLURM's MaxArraySize is often 1001); a larger grid is several arrays")
    g.add_argument("--ckpt-every", type=int, default=1000, help="each run's --ckpt-every (steps between checkpoints)")
    g.add_argument("--log-folder", default=None, help="submitit's job files and logs (default: <out>/submitit)")
    g.add_argument("--snapshot", action="store_true",
                   help="run the jobs on a copy of this repository taken at submit time (later edits change nothing)")
    g.add_argument("--no-wait", action="store_true",
                   help="submit, print the job ids and return; `--collect <out>` builds the rows later")
    args = p.parse_args(argv)
    if args.save and not args.fingerprint:
        print("error: --save goes with --fingerprint (it stores the fingerprints that run computes)", file=sys.stderr)
        sys.exit(2)
    args.extra = extra
    if args.readme is None and Path(args.results).resolve() == (HERE / "results.json"):
        args.readme = str(HERE / "README.md")
    return args


# (the two routes to fewer launches per step: torch.compile's reduce-overhead, torch's CUDA graphs of each compiled
# network's forward and backward, against --cuda-graph on, the whole step with the optimisers as one graph)
SPEED_MODES = {"eager": [], "amp": ["--amp"], "compile": ["--compile"],
               "compile-reduce-overhead": ["--compile", "reduce-overhead"], "cuda-graph": ["--cuda-graph", "on"],
               "cuda-graph-amp": ["--cuda-graph", "on", "--amp"]}
CUDA_ONLY_MODES = ("amp", "compile-reduce-overhead", "cuda-graph", "cuda-graph-amp")


def speed(methods, task, steps, device, out, modes=None):
    """Training steps/s of each script alone, under each of `modes` (SPEED_MODES names): yields (key, record) as each
    run ends, mode by mode (every script eager first), so a run that is cut short keeps what it measured."""
    import torch

    kind = "cuda" if device == "cuda" or (device in (None, "auto") and torch.cuda.is_available()) else "cpu"
    modes = modes or (list(SPEED_MODES) if kind == "cuda" else ["eager"])
    if kind != "cuda" and set(modes) & set(CUDA_ONLY_MODES):
        sys.exit(f"--speed-modes {' '.join(m for m in modes if m in CUDA_ONLY_MODES)}: CUDA only (this run is on the CPU)")
    name = torch.cuda.get_device_name(0) if kind == "cuda" else hardware().split(",")[0]
    threads = 1 if kind == "cuda" else max(1, os.cpu_count() or 1)
    for mode in (SPEED_MODES[k] for k in modes):
        for m in methods:
            flags = SPEED_FLAGS.get(m, []) + ["--steps", str(steps), "--eval-every", "0", "--log-every",
                                              str(max(1, steps // 5)), "--ckpt-every", "0", "--no-save-model",
                                              "--device", kind] + mode
            r = run_one(m, task, 0, flags, threads, out)
            if r is None:
                continue
            label = " ".join(mode) or "eager"
            rate = steady_rate(HERE / r["run_dir"] / "metrics.jsonl")
            print(f"{m} {task} {label}: {rate:.1f} steps/s after the first fifth ({r['train_steps_per_sec']:.1f} over "
                  f"the whole run) on {name}", flush=True)
            yield f"{m}__{task}__{label}__{name}", {
                "method": m, "task": task, "mode": label, "steps": steps, "steps_per_sec": rate,
                "steps_per_sec_whole_run": r["train_steps_per_sec"], "device": name, "threads": threads,
                "torch": torch.__version__, "command": r["command"]}


def steady_rate(metrics_path):
    """Training steps/s after the first logged window (warm-up, a graph's recording, compilation left out), from the
    cumulative rates a run logs: step / rate is the training time up to that record."""
    recs = [r for r in map(json.loads, Path(metrics_path).read_text().splitlines()) if "steps_per_sec" in r]
    (s1, r1), (s2, r2) = (recs[0]["step"], recs[0]["steps_per_sec"]), (recs[-1]["step"], recs[-1]["steps_per_sec"])
    return r2 if s2 == s1 else (s2 - s1) / (s2 / r2 - s1 / r1)


def hardware():
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def fill(flags, task, seed):
    """The {task} and {seed} placeholders of the extra flags."""
    return [f.replace("{task}", task).replace("{seed}", str(seed)) for f in flags]


# ------------------------------------------------------------------------------------------------------------------
# Behaviour fingerprints and provenance: which code made a number
# ------------------------------------------------------------------------------------------------------------------
# A fingerprint is the hash of a fixed, tiny, deterministic CPU run of a script (one thread, seed 0, fixture data in
# the real file formats): its final accuracies and every tensor of the model files it writes. Code whose behaviour is
# the same gives the same fingerprint (a refactor must leave it identical); a change meant to move results changes it
# and is regenerated in the same commit (`python benchmark.py --fingerprint --save`). results.json keeps today's
# under "fingerprints"; a row whose seeds ran with another fingerprint is earlier code.
FINGERPRINT_RUNS = {
    "dann": ["--task", "mnist-usps", "--steps", "24", "--batch-size", "16", "--eval-every", "12"],
    "gam": ["--task", "mnist-usps", "--source-steps", "30", "--steps", "16", "--disc-pretrain", "4", "--batch-size", "16",
            "--eval-every", "8", "--converge-window", "2", "--converge-tol", "10"],
    "calibrator": ["--task", "mnist-usps", "--source-epochs", "3", "--steps", "12", "--batch-size", "16", "--width", "2",
                   "--blocks", "1", "--eval-every", "6"],
    "i2i_adapt": ["--task", "usps-mnist", "--steps", "12", "--batch-size", "4", "--eval-every", "6"],
    "pixelda": ["--task", "mnist-usps", "--steps", "12", "--batch-size", "4", "--res-blocks", "1", "--grid-every", "6",
                "--lr-decay-steps", "5", "--eval-every", "6"],
}
FIXTURE_TRAIN, FIXTURE_TEST = 60, 30


def fixture_digits(n, size, channels, seed, shift=0):
    """n images whose content depends on the label (a bright bar at a label-dependent row) plus noise, and the labels.
    Each dataset has its own `shift` of the label -> row code, so a model trained on one domain's labels gets about 0%
    on another's (source-only, oracle and adapted runs tell apart on fixture data)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    for i, c in enumerate(y):
        r = 2 + (int(c) + shift) % 10 * (size - 4) // 10
        x[i, r:r + 2, 2:size - 2, :] = 250
    return x, y


def write_fixture_mnist(root, seed=0, n=(FIXTURE_TRAIN, FIXTURE_TEST)):
    """Tiny MNIST in torchvision's raw idx files (<root>/MNIST/raw); {split: (images, labels)}."""
    import struct

    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, k in (("train", "train", n[0]), ("test", "t10k", n[1])):
        x, y = fixture_digits(k, 28, 1, seed + (split == "test"))
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, k, 28, 28) + x[..., 0].tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, k) + y.astype("uint8").tobytes())
        out[split] = (x, y)
    return out


def write_fixture_usps(root, seed=10, n=(FIXTURE_TRAIN, FIXTURE_TEST)):
    """Tiny USPS in the LIBSVM .bz2 files torchvision reads (<root>/usps.bz2, usps.t.bz2); {split: (images, labels)}."""
    import bz2

    out = {}
    for split, fname, k in (("train", "usps.bz2", n[0]), ("test", "usps.t.bz2", n[1])):
        x, y = fixture_digits(k, 16, 1, seed + (split == "test"), shift=5)
        v = x[..., 0].reshape(k, 256).astype("float64") / 255 * 2 - 1
        lines = [f"{int(c) + 1}" + "".join(f" {j + 1}:{val:f}" for j, val in enumerate(row)) + " \n" for c, row in zip(y, v)]
        (Path(root) / fname).write_bytes(bz2.compress("".join(lines).encode()))
        out[split] = (x, y)
    return out


def has_tensor(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(has_tensor(v) for v in obj.values())
    return isinstance(obj, (list, tuple)) and any(has_tensor(v) for v in obj)


def tensor_digest(obj, h):
    """Feed every tensor of a (nested) checkpoint into the hash h with the keys that lead to it, keys sorted; what
    holds no tensor (the run's args, paths, a flag added to the parser) is left out."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if has_tensor(obj[k]):
                h.update(str(k).encode())
                tensor_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            if has_tensor(v):
                tensor_digest(v, h)


def fingerprint(method, code_dir=HERE):
    """The behaviour fingerprint of `method` as the scripts in code_dir behave (12 hex digits): the run of
    FINGERPRINT_RUNS on fixture data, hashed (final target and source accuracy, every tensor of its .pt files)."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_fixture_mnist(tmp / "data")
        write_fixture_usps(tmp / "data")
        env = dict(os.environ, UDA_DATA_DIR=str(tmp / "data"), UDA_CACHE_DIR=str(tmp / "cache"), OMP_NUM_THREADS="1",
                   PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, str(Path(code_dir) / f"{method}.py"), *FINGERPRINT_RUNS[method], "--seed", "0",
               "--threads", "1", "--device", "cpu", "--no-download", "--out", str(tmp / "runs")]
        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"fingerprint run of {method} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        h = hashlib.sha256(json.dumps([summary["target_acc"], summary["source_acc"]]).encode())
        (run,) = (tmp / "runs").iterdir()
        for f in sorted(run.glob("*.pt")):
            h.update(f.name.encode())
            tensor_digest(torch.load(f, map_location="cpu", weights_only=True), h)
        return h.hexdigest()[:12]


def code_hash(method, code_dir=HERE):
    """sha256 of the files a method's fingerprint can depend on: its script, common.py and benchmark.py (which holds
    FINGERPRINT_RUNS and the fixture data), 12 hex digits."""
    h = hashlib.sha256()
    for f in (f"{method}.py", "common.py", "benchmark.py"):
        h.update((Path(code_dir) / f).read_bytes())
    return h.hexdigest()[:12]


FINGERPRINT_CACHE = HERE / ".cache" / "fingerprints.json"


def cached_fingerprint(method):
    """fingerprint(method) of the code as it is now, remembered per code_hash and torch version in .cache/ (a run of
    a few seconds the first time)."""
    import torch

    key = f"{method}|{code_hash(method)}|{torch.__version__}"
    cache = json.loads(FINGERPRINT_CACHE.read_text()) if FINGERPRINT_CACHE.exists() else {}
    if key not in cache:
        cache[key] = fingerprint(method)
        FINGERPRINT_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = FINGERPRINT_CACHE.with_name(f"fingerprints.{os.getpid()}.tmp")
        fresh = json.loads(FINGERPRINT_CACHE.read_text()) if FINGERPRINT_CACHE.exists() else {}
        tmp.write_text(json.dumps({**fresh, **cache}, indent=1) + "\n")
        os.replace(tmp, FINGERPRINT_CACHE)
    return cache[key]


def git(*args):
    """A git command's stdout in this repository, or None (no git, not a checkout)."""
    try:
        p = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def provenance(method):
    """What made a run, recorded per seed: the commit, which of the method's files had uncommitted changes, the
    behaviour fingerprint of the code as it is, and (filled from the run's summary) torch, device and threads."""
    dirty = git("diff", "HEAD", "--name-only", "--", f"{method}.py", "common.py", "benchmark.py")  # (not status's
    return {"commit": git("rev-parse", "--short=12", "HEAD"),  # columns, which git()'s strip would cut into)
            "dirty": sorted(dirty.splitlines()) if dirty else [],
            "fingerprint": cached_fingerprint(method)}


def seed_provenance(prov, summary, threads):
    """A seed's provenance: the launch-time record (commit, dirty files, fingerprint) completed from its summary."""
    if prov is None:
        return None
    return dict(prov, torch=(summary.get("versions") or {}).get("torch"), device=summary.get("device"),
                threads=threads)


def today(store, method):
    """Today's fingerprint of a method, as results.json holds it (None before one was stored)."""
    return (store.get("fingerprints") or {}).get(method)


def is_current(row, store):
    """Did every seed of this row run with today's code (one fingerprint, the stored one of its method)?"""
    fp = row.get("fingerprint")
    return fp is not None and fp == today(store, row["method"])


# Summary fields kept per seed in results.json besides the accuracies (a script that has no such field stores None).
EXTRA_KEYS = ("source_val_err", "domain_err", "train_steps_per_sec", "epochs", "source_model_alone",
              "source_model_alone_after_bn_drift", "cost", "curve", "target_val_acc", "target_train_acc", "gan_joins",
              "gan_restarts", "class_shares", "selection", "evals", "signals", "run_dir",
              "cpu_seconds")
def common_constant(name):
    """A literal constant of common.py, read without importing it (benchmark.py runs without torch)."""
    import ast

    for node in ast.parse((HERE / "common.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


VALIDATORS = common_constant("VALIDATORS")  # the label-free scores, defined once (common.py)


def read_curve(run_dir):
    """[[step, target test accuracy], ...] from a run's metrics.jsonl: the logged curve points plus the final one."""
    if not run_dir or not (Path(run_dir) / "metrics.jsonl").exists():
        return None
    path = Path(run_dir) / "metrics.jsonl"
    curve = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for k in ("target_test_acc_curve", "target_test_acc"):
            if k in rec:
                curve.append([rec["step"], round(rec[k], 2)])
    return curve or None


def read_evals(run_dir):
    """[{step, target acc, validator scores}, ...]: every evaluation a run logged (for the validators' rank
    correlation with the target accuracy)."""
    if not run_dir or not (Path(run_dir) / "metrics.jsonl").exists():
        return None
    evals = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        acc = rec.get("target_test_acc", rec.get("target_test_acc_curve"))
        if acc is not None and any(v in rec for v in VALIDATORS):  # and the method's own signals (domain_err, ...)
            evals.append({"step": rec["step"], "acc": acc, **{v: rec.get(v) for v in VALIDATORS},
                          **{k: v for k, v in rec.items() if k not in ("step", "target_test_acc", "target_test_acc_curve")
                             and k not in VALIDATORS and isinstance(v, (int, float))}})
    return evals or None


def read_signals(run_dir, points=60):
    """The training log's running means (losses, lambda, lr, ...; not the speed) at most `points` times per run, for
    the pictures: [{step, name: value, ...}, ...]."""
    if not run_dir or not (Path(run_dir) / "metrics.jsonl").exists():
        return None
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    recs = [{k: v for k, v in r.items() if k != "steps_per_sec" and isinstance(v, (int, float))}
            for r in recs if "steps_per_sec" in r]
    if len(recs) > points:
        recs = [recs[round(i * (len(recs) - 1) / (points - 1))] for i in range(points)]
    return recs or None


def from_run(run_dir):
    """What a row keeps of a run beside its summary: the curve, the evaluations, the training signals, the folder."""
    run_dir = Path(run_dir) if run_dir else None
    return dict(curve=read_curve(run_dir), evals=read_evals(run_dir), signals=read_signals(run_dir),
                run_dir=str(run_dir.relative_to(HERE) if run_dir and run_dir.is_relative_to(HERE) else run_dir))


def spearman(x, y):
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def selection_table(rows):
    """Model selection without target labels: per row, the target test accuracy at the evaluation each validator
    picks (summary.json's `selection`), mean ± std over seeds, beside the final model and the oracle (which picks by
    the target test labels), and each validator's Spearman correlation with the target accuracy over all
    evaluations of all the row's runs."""
    out = []
    for r in rows:
        sels = [s for s in r.get("extra", {}).get("selection") or [] if s]
        if not sels:
            continue
        evals = [e for run in r["extra"].get("evals") or [] if run for e in run]
        cells = []
        for k in ("final",) + VALIDATORS + ("oracle",):
            accs = [s[k]["target_acc"] for s in sels if s.get(k) and s[k].get("target_acc") is not None]
            cell = mean_std(accs) if accs else "—"
            if k in VALIDATORS:
                pairs = [(e[k], e["acc"]) for e in evals if isinstance(e.get(k), (int, float))]
                rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
                cell += f" (ρ {rho:.2f})" if rho is not None else ""
            cells.append(cell)
        out.append(f"| {r['method']} | {r['task']} | {shown(r)} | {r['steps']} | {len(sels)} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["", "#### Model selection without target labels", "",
            "Target test accuracy of the checkpoint each label-free validator would pick among a run's evaluations",
            "(every `--eval-every` steps and the final model; `summary.json`'s `selection`), mean ± std over seeds; ρ:",
            "the validator's Spearman rank correlation with the target accuracy over all evaluations of the row's runs.",
            "`oracle` picks by the target test labels themselves: a bound, not a method.", "",
            "| method | task | variant | steps | seeds | final | source_val_acc | entropy | im | bnm | snd | oracle |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"] + out


def sweep_table(rows):
    """Selection across hyperparameters: rows of one method, task and schedule that differ only by the method's flags
    (a sweep) are pooled per seed, and each validator picks among all (flags, evaluation) pairs of that seed. Beside
    each pick's target test accuracy: the default flags' final model (the row whose flags change nothing, if any)
    and the oracle's pick (by the target test labels). Mean ± std over the seeds every setting has; a setting run on
    fewer seeds than the default flags (or, without them, the best-covered setting) stays out, so that a one-seed
    diagnostic does not shrink a sweep to its seed."""
    groups = {}
    for r in rows:
        if any(r.get("extra", {}).get("evals") or []):
            groups.setdefault((r["method"], r["task"], r["steps"]), []).append(r)
    out = []
    for (m, t, steps), group in sorted(groups.items()):
        default = next((r for r in group if sweep_setting(r.get("flags", "")) == "defaults"), None)
        ref = set((default or max(group, key=lambda r: len(r["seeds"])))["seeds"])
        group = [r for r in group if ref <= set(r["seeds"])]
        if len(group) < 2:
            continue
        seeds = sorted(set.intersection(*(set(r["seeds"]) for r in group)))
        picks = {k: [] for k in ("default",) + VALIDATORS + ("oracle",)}
        for seed in seeds:
            cands = []  # (evaluation, row) of every setting's run of this seed
            for r in group:
                run = r["extra"]["evals"][r["seeds"].index(seed)] or []
                cands += [(e, r) for e in run]
            if not cands:
                continue
            if default is not None:
                picks["default"].append(default["target_acc"][default["seeds"].index(seed)])
            picks["oracle"].append(max(e["acc"] for e, _ in cands))
            for v in VALIDATORS:
                scored = [(e[v], e["acc"]) for e, _ in cands if isinstance(e.get(v), (int, float)) and math.isfinite(e[v])]
                if scored:
                    picks[v].append(max(scored, key=lambda p: p[0])[1])
        if picks["oracle"]:
            cells = [mean_std(picks[k]) for k in picks]
            out.append(f"| {m} | {t} | {steps} | {len(group)} | {len(picks['oracle'])} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["", "#### Model selection across hyperparameters", "",
            "Rows of one task and schedule that differ only by the method's flags form a sweep. Per seed, each",
            "validator picks one (flags, evaluation) pair among all the settings' evaluations; the table gives the",
            "target test accuracy of that pick, mean ± std over seeds, beside the default flags' final model and the",
            "oracle's pick (by the target test labels: a bound, not a method).", "",
            "| method | task | steps | settings | seeds | default flags, final | source_val_acc | entropy | im | bnm | "
            "snd | oracle |", "|---|---|---|---|---|---|---|---|---|---|---|---|"] + out


def merge_seeds(row, new):
    """A stored row's per-seed results plus the new runs (a re-run seed replaces its old result), sorted by seed."""
    by_seed = {}
    for i, s in enumerate(row["seeds"]):
        r = {"seed": s, "target_acc": row["target_acc"][i], "source_acc": row["source_acc"][i],
             "seconds": row["seconds"][i], "command": row["commands"][i], "device": row["device"],
             "variant": row["variant"], "steps": row["steps"],
             "provenance": (row.get("provenance") or [None] * len(row["seeds"]))[i]}
        r.update({k: v[i] for k, v in row.get("extra", {}).items()})
        by_seed[s] = r
    by_seed.update({r["seed"]: r for r in new})
    return [by_seed[s] for s in sorted(by_seed)]


_CHILD = None  # the running script's process (Cell.checkpoint stops it)


def run_one(method, task, seed, extra, threads, out, cell=False, ckpt_every=None):
    """One run as a subprocess; its summary (plus the command and the accuracy curve), or None if it failed. A run of
    the same method, task, seed and flags that an earlier benchmark left stopped (its log names a run folder that
    still has a checkpoint.pt and no summary) is continued with --resume instead of started again. As a submitit
    cell, one that finished is not run again (its summary is returned) and the script runs in a session of its own
    (SLURM's warning signal is the cell's to handle). <out>/logs/<tag>.cell.json records
    the run (method, task, seed, flags as given) for --collect. ckpt_every: the script's --ckpt-every, which changes
    no result (not part of the row or its command)."""
    global _CHILD
    template = extra
    extra = fill(extra, task, seed)
    cmd = [sys.executable, str(HERE / f"{method}.py"), "--task", task, "--seed", str(seed), "--out", out]
    if "--threads" not in extra:
        cmd += ["--threads", str(threads)]
    cmd += extra
    shown = "python " + " ".join(shlex.quote(c) for c in [f"{method}.py"] + cmd[2:])
    if Path(out).is_absolute() and Path(out).is_relative_to(HERE):  # the command as typed in the repository
        shown = shown.replace(f"--out {shlex.quote(out)}", f"--out {shlex.quote(str(Path(out).relative_to(HERE)))}")
    if ckpt_every and "--ckpt-every" not in extra:
        cmd += ["--ckpt-every", str(ckpt_every)]
    logs = Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tag = f"{method}__{task}__{seed}__{hashlib.sha1(json.dumps(extra).encode()).hexdigest()[:8]}"
    done = finished_run(logs / f"{tag}.out") if cell else None
    if done is None:  # what code this run is about to run (a finished cell keeps the record it ran with)
        (logs / f"{tag}.cell.json").write_text(json.dumps(dict(method=method, task=task, seed=seed, extra=template,
                                                               threads=threads, command=shown,
                                                               provenance=provenance(method))) + "\n")
    if done is not None:
        print(f"finished before: {shown}", flush=True)
        return done
    stopped = stopped_run(logs / f"{tag}.out")
    if stopped is not None:
        print(f"resuming {stopped}: {shown}", flush=True)
        keep = [c for c in ("--device", "--threads") if c in cmd]  # the flags --resume may change
        cmd = cmd[:2] + ["--resume", str(stopped)] + [x for c in keep for x in cmd[cmd.index(c):cmd.index(c) + 2]]
    t0 = time.time()
    with open(logs / f"{tag}.out", "a" if stopped else "w") as fo, open(logs / f"{tag}.err", "w") as fe:
        _CHILD = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=HERE, start_new_session=cell)
        try:  # wait4: the child's own CPU time, which other work on the machine does not inflate (the wall clock)
            _, status, usage = os.wait4(_CHILD.pid, 0)
            rc = _CHILD.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by Cell.checkpoint (a cell stopped before SLURM's time limit)
            rc, usage = -1, None
    lines = (logs / f"{tag}.out").read_text().strip().splitlines()
    if rc != 0 or not lines or not lines[-1].startswith("{"):
        err = (logs / f"{tag}.err").read_text().strip().splitlines()
        print(f"FAILED ({rc}): {shown}\n  {err[-1] if err else ''}", flush=True)
        return None
    summary = json.loads(lines[-1])
    print(f"done in {time.time() - t0:.0f}s: {shown} -> target {summary['target_acc']} "
          f"source {summary['source_acc']}", flush=True)
    run_dir = summary.get("run_dir")
    prov = json.loads((logs / f"{tag}.cell.json").read_text()).get("provenance")
    return dict(summary, command=shown, cpu_seconds=round(usage.ru_utime + usage.ru_stime, 1) if usage else None,
                provenance=seed_provenance(prov, summary, threads), **from_run(HERE / run_dir if run_dir else None))


def logged_run(log):
    """The run folder a run's log names (its first line says where it writes), or None."""
    if log.exists():
        for line in log.read_text().splitlines()[:50]:
            if "| run folder " in line:
                return HERE / line.rsplit("| run folder ", 1)[1].strip()
    return None


def finished_run(log):
    """The summary (with the command and the curve) of the run a log names, if that run folder has its summary.json."""
    run = logged_run(log)
    if run is None or not (run / "summary.json").exists():
        return None
    cell = json.loads(log.with_suffix(".cell.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    return dict(summary, command=cell["command"],
                provenance=seed_provenance(cell.get("provenance"), summary, cell.get("threads")), **from_run(run))


class Cell:
    """One (method, task, seed, flags) run as one submitit job (one task of a SLURM job array). It runs the script as
    a subprocess (run_one) and returns its summary. On SLURM's warning signal before a time limit or a preemption,
    submitit calls checkpoint(): the script is stopped (its last --ckpt-every checkpoint is on disk) and the same cell
    is requeued, which continues that run with --resume. A cell whose run finished is not run again."""

    def __init__(self, method, task, seed, extra, threads, out, ckpt_every):
        self.args = (method, task, seed, extra, threads, out)
        self.ckpt_every = ckpt_every

    def __call__(self):
        return run_one(*self.args, cell=True, ckpt_every=self.ckpt_every)

    def checkpoint(self):
        if _CHILD is not None and _CHILD.returncode is None:  # (this runs in a signal handler that interrupted
            _CHILD.terminate()  # run_one's os.wait4: the child is reaped here with os.waitpid)
            for _ in range(600):
                try:
                    if os.waitpid(_CHILD.pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.1)
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def submit(args, jobs):
    """--launcher submitit: each job one Cell, submitted as SLURM job arrays of at most --max-array cells (or as local
    processes with --cluster local). Returns each job's summary (None if it failed), or None after printing the job
    ids with --no-wait. A bad setup stops with one line and exit code 2 before anything stays submitted."""
    def stop(msg):
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)

    try:
        import submitit
    except ImportError:
        stop("--launcher submitit needs the submitit package: pip install submitit")
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        stop("--cluster slurm: no sbatch on this machine's PATH (is SLURM installed here?)")
    folder = Path(args.log_folder or Path(args.out) / "submitit").resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".writable"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        stop(f"log folder {folder} is not writable ({e.strerror})")
    code = snapshot(folder) if args.snapshot else HERE
    out = str(Path(args.out).resolve())
    os.chdir(code)  # the jobs start here: they import this module (Cell) and run the scripts from this copy
    sys.path.insert(0, str(code))
    import benchmark as module  # Cell by reference (benchmark.Cell), not a copy of __main__'s

    executor = submitit.AutoExecutor(folder=folder, cluster=None if args.cluster == "auto" else args.cluster)
    local = executor.cluster != "slurm"
    # submitit asks for SLURM's warning signal 90 s before the time limit, and SLURM may send it up to 60 s earlier
    # (sbatch --signal): under 3 minutes, every run would be stopped and requeued as it starts
    if not local and args.timeout_min < 3:
        stop(f"--timeout-min {args.timeout_min}: SLURM may send its warning signal 150 s before the time limit, which "
             "would stop every run as it starts; give 3 minutes or more")
    gpus = args.gpus_per_job
    if local:  # a local "cluster" has what this machine has
        import torch

        gpus = min(gpus, torch.cuda.device_count())
    executor.update_parameters(timeout_min=args.timeout_min, gpus_per_node=gpus, cpus_per_task=args.cpus_per_job,
                               mem_gb=args.mem_gb, name="uda-benchmark", slurm_array_parallelism=args.array_parallelism,
                               **({"slurm_partition": args.partition} if args.partition else {}))
    cells = [module.Cell(m, t, s, extra, args.cpus_per_job, out, args.ckpt_every) for m, t, s, extra in jobs]
    submitted = []
    try:
        for i in range(0, len(cells), args.max_array):
            with contextlib.redirect_stderr(io.StringIO()), executor.batch():  # (sbatch's error: in stop's line)
                chunk = [executor.submit(c) for c in cells[i:i + args.max_array]]
            submitted += chunk
    except Exception as e:  # e.g. sbatch refused the partition: cancel what went in, so nothing runs half a grid
        for job in submitted:
            job.cancel(check=False)
        msg = [line for line in str(e).splitlines() if "error" in line.lower()] or str(e).splitlines() or [repr(e)]
        stop(f"submission failed, {len(submitted)} submitted jobs cancelled: {msg[0].strip()}")
    ids = sorted({str(j.job_id).split("_")[0] for j in submitted})
    print(f"submitted {len(submitted)} runs as {executor.cluster} job(s) {', '.join(ids)}; job files in {folder}",
          flush=True)
    if args.no_wait:
        print(f"when they are done: python benchmark.py --collect {args.out} (finished runs so far are collected too)",
              flush=True)
        return None
    results = []
    for job in submitted:
        try:
            results.append(job.result())
        except Exception as e:  # the job failed or was cancelled: reported, the others are kept
            print(f"FAILED job {job.job_id}: {str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)}",
                  flush=True)
            results.append(None)
    return results


def snapshot(folder):
    """A copy of this repository's scripts (the .py files beside this one) for --snapshot: jobs run on the code of
    submit time, whatever is edited afterwards."""
    dest = folder / f"code_{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for path in HERE.glob("*.py"):
        shutil.copy2(path, dest / path.name)
    return dest


def stopped_run(log):
    """The run folder named in a previous attempt's log, if that run stopped with a checkpoint and no summary."""
    run = logged_run(log)
    return run if run is not None and (run / "checkpoint.pt").exists() and not (run / "summary.json").exists() else None


def mean_std(values):
    if not values:
        return "—"
    m = statistics.mean(values)  # one seed has no spread: it says so rather than print ± 0.00
    return f"{m:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f} (1 seed)"


def shown(r, gpu=True):
    """A row's variant as the tables show it: rows that differ only by a protocol flag the variant name does not
    carry get it appended, so no two rows of a table read the same (gpu=False: without the "(GPU)" of rows whose
    runs' summary names a CUDA device, for the README's choice of row)."""
    toks = shlex.split(r.get("flags", ""))
    label = r["variant"]
    if "--source-epochs" in toks and r["method"] == "calibrator":
        label += f" (stage 1: {toks[toks.index('--source-epochs') + 1]} epochs)"
    if "--target-val" in toks:
        label += " (target val)"
    if gpu and r.get("device", "").startswith("cuda"):
        label += " (GPU)"
    return label + r.get("mark", "")


def marked(rows, store):
    """Copies of the rows for display: a row whose seeds did not all run with today's code (its method's stored
    fingerprint) reads "[earlier code]" wherever a table shows its variant."""
    return [r if is_current(r, store) or "[code of" in r["variant"] else dict(r, mark=" [earlier code]") for r in rows]


def waits_for(r):
    """What re-run an earlier-code row waits for."""
    where = " on a GPU" if r.get("device", "").startswith("cuda") else ""
    fps = sorted({(p or {}).get("fingerprint") or "unknown" for p in r.get("provenance") or [None]})
    return (f"{r['method']} {r['task']} {shown(r)}: earlier code (fingerprint {', '.join(fps)}); waits for a re-run "
            f"of its command at today's code{where}")


def sweep_setting(flags):
    """What makes a sweep row's setting: its flags without those of schedule_flags and without --steps (a sweep's rows
    share their schedule: sweep_table groups them by steps), so a shortened sweep's `--steps N` row is its default."""
    kept = schedule_flags(flags)
    toks = [] if kept == "defaults" else shlex.split(kept)
    if "--steps" in toks:
        del toks[toks.index("--steps"):toks.index("--steps") + 2]
    return " ".join(toks) or "defaults"


def schedule_flags(flags):
    """A row's flags without those that do not change the result (threads, logging, cache paths) and without the
    one the variant name already shows (--source-bn)."""
    toks, keep = shlex.split(flags), []
    while toks:
        t = toks.pop(0)
        if t in ("--threads", "--eval-every", "--log-every", "--source-ckpt", "--out", "--source-bn"):
            toks.pop(0)  # and its value
        else:
            keep.append(t)
    return " ".join(keep) or "defaults"


def tradeoff_table(rows):
    """Rows whose runs report the frozen source model alone (calibrator.py): the paper's Figure 2 trade-off (source
    and target accuracy without and with the calibrator) and its Table 3 cost (calibrator size relative to F_s)."""
    rows = [r for r in rows if any(r.get("extra", {}).get("source_model_alone") or [])]
    if not rows:
        return []
    out = ["", "#### Calibrator: accuracy trade-off and cost", "",
           "F_s alone is the frozen source classifier before stage 2 (same seed); F_s∘G_c is it behind the final",
           "calibrator. The source change is F_s∘G_c minus F_s alone on the source test split, per seed, then averaged.",
           "With `--source-bn train`, *F_s alone after drift* is F_s with the BatchNorm statistics stage 2 left in it.",
           "", "| task | variant | schedule flags | steps | seeds | F_s alone: target | F_s alone: source | "
           "F_s∘G_c: target | F_s∘G_c: source | source change | F_s alone after drift: target / source | "
           "G_c params (% of F_s) | G_c MACs/image (% of F_s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        alone, ex = r["extra"]["source_model_alone"], r["extra"]
        drift = [d for d in ex.get("source_model_alone_after_bn_drift") or [] if d]
        cost = next(c for c in ex["cost"] if c)
        delta = [s - a["source_acc"] for s, a in zip(r["source_acc"], alone)]
        drift_s = (f"{mean_std([d['target_acc'] for d in drift])} / {mean_std([d['source_acc'] for d in drift])}"
                   if drift else "—")
        out.append(f"| {r['task']} | {r['variant']} | {schedule_flags(r.get('flags', ''))} | {r['steps']} | "
                   f"{len(r['seeds'])} | {mean_std([a['target_acc'] for a in alone])} | {mean_std([a['source_acc'] for a in alone])} | "
                   f"{mean_std(r['target_acc'])} | {mean_std(r['source_acc'])} | {mean_std(delta)} | {drift_s} | "
                   f"{cost['calibrator_params']:,} ({100 * cost['param_ratio']:.2f}%) | "
                   f"{cost['calibrator_macs'] / 1e6:.2f}M ({100 * cost['macs_ratio']:.1f}%) |")
    return out


def curve_table(rows, points=12):
    """Target test accuracy during training (the scripts log it as a curve only; nothing is selected on it), mean
    over the seeds that logged the same steps, at most `points` points per row."""
    out = []
    for r in rows:
        curves = [c for c in r.get("extra", {}).get("curve") or [] if c]
        if not curves or len(curves[0]) < 2 or any([p[0] for p in c] != [p[0] for p in curves[0]] for c in curves):
            continue
        steps = [p[0] for p in curves[0]]
        keep = sorted({round(i * (len(steps) - 1) / (points - 1)) for i in range(points)}) if len(steps) > points \
            else range(len(steps))
        mean = [statistics.mean(c[i][1] for c in curves) for i in keep]
        out.append(f"| {r['method']} | {r['task']} | {shown(r)} | {len(curves)} | "
                   + " · ".join(f"{steps[i]}: {m:.1f}" for i, m in zip(keep, mean)) + " |")
    if not out:
        return []
    return ["", "#### Target accuracy during training", "",
            "Target test accuracy logged every `--eval-every` steps (a curve only: the reported number is always the",
            "final model's), mean over seeds, as `step: accuracy`.", "",
            "| method | task | variant | seeds | curve |", "|---|---|---|---|---|"] + out


PICTURES = HERE / "pictures"
README_BEGIN = "<!-- results table: written by benchmark.py from results.json -->"
README_END = "<!-- end of the results table -->"


def default_flags(r):
    """Did the row run at the script's default flags (nothing but threads, logging, cache paths and the device)?"""
    toks = shlex.split(schedule_flags(r.get("flags", "")).replace("defaults", ""))
    if "--device" in toks:
        del toks[toks.index("--device"):toks.index("--device") + 2]
    return not toks


def headline(store):
    """[(method, task, paper number, rows)] for the README's table. One rule picks the rows that stand for a (method,
    task) among those whose label HEADLINE lists: today's fingerprint first, then the default flags (a row whose
    flags change nothing) before the declared closest (HEADLINE's labels in order, and any schedule), then the most
    seeds, then the longest schedule. Rows equal on all of these are all shown
    (never one picked by the store's order); a GPU run's row counts like a CPU one."""
    out = []
    for m, t, paper_variant, labels in HEADLINE:
        cands = [r for r in store["rows"].values() if (r["method"], r["task"]) == (m, t) and shown(r, gpu=False) in labels]
        rank = lambda r: (is_current(r, store), default_flags(r), -labels.index(shown(r, gpu=False)),  # noqa: E731
                          len(r["seeds"]), r["steps"])
        best = max(map(rank, cands), default=None)
        out.append((m, t, PAPER.get((m, t, paper_variant)), [r for r in cands if rank(r) == best]))
    return out


def readme_table(store):
    lines = ["| method | task | paper | ours: target acc | seeds | steps | variant | command |",
             "|---|---|---|---|---|---|---|---|"]
    waiting = []
    for m, t, paper, rows in headline(store):
        paper = f"{paper:.1f}" if paper is not None else "—"
        if not rows:
            lines.append(f"| {m} | {t} | {paper} | not measured | | | | |")
        for r in marked(rows, store):
            lines.append(f"| {m} | {t} | {paper} | {mean_std(r['target_acc'])} | {len(r['seeds'])} | {r['steps']} | "
                         f"{shown(r)} | `{r['command']}` |")
            waiting += [waits_for(r)] if not is_current(r, store) else []
    if waiting:
        lines += ["", "Rows marked [earlier code] ran on code whose behaviour fingerprint is not today's:"]
        lines += [f"- {w}." for w in waiting]
    return lines


STATUS_BEGIN = "<!-- status: written by benchmark.py from results.json -->"
STATUS_END = "<!-- end of the status -->"
TASK_NAMES = {"mnist-usps": "M→U", "usps-mnist": "U→M", "mnist-mnistm": "MNIST→MNIST-M", "svhn-mnist": "S→M"}


def status_lines(store):
    """The README's "where it stands", from the same rows as its table: per method, each task's number against the
    paper's, the source-only row of the same schedule where one is stored (so a method that ends below its own
    baseline says so), and the marks of earlier code."""
    out, lines, waiting = [], headline(store), []
    for m in METHODS:
        parts = []
        for mm, t, paper, rows in lines:
            if mm != m:
                continue
            if not rows:
                parts.append(f"{TASK_NAMES.get(t, t)} not measured")
            for r in marked(rows, store):
                txt = (f"{TASK_NAMES.get(t, t)} {mean_std(r['target_acc'])}{' (GPU)' if r['device'].startswith('cuda') else ''}"
                       f"{r.get('mark', '')}")
                if paper is not None:
                    gap = statistics.mean(r["target_acc"]) - paper
                    txt += f" (paper {paper:.1f}: {abs(gap):.1f} {'above' if gap >= 0 else 'below'})"
                so = [o for o in store["rows"].values() if (o["method"], o["task"], o["steps"]) == (m, t, r["steps"])
                      and o["variant"].startswith("source-only") and "--target-val" not in o.get("flags", "")]
                if so:  # its mark: [earlier code], or the [code of ...] its variant names
                    base = max(so, key=lambda o: (is_current(o, store), len(o["seeds"])))
                    (o,) = marked([base], store)
                    code = o["variant"][o["variant"].index("[code of"):] if "[code of" in o["variant"] else o.get("mark", "").strip()
                    txt += f", source only {mean_std(o['target_acc'])} {code}".rstrip()
                    waiting += [waits_for(base)] if not is_current(base, store) else []
                    txt += ": below its own baseline" if statistics.mean(r["target_acc"]) < statistics.mean(o["target_acc"]) else ""
                parts.append(txt)
        if parts:
            out.append(f"- **{m}**: " + "; ".join(parts) + ".")
    return out + [f"- Baseline {w}." for w in waiting]


def replace_block(text, begin, end, lines):
    """text with the lines between the markers begin and end replaced; None if it lacks them."""
    if begin not in text or end not in text:
        return None
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1]


def write_readme(store, path):
    """Rewrite the table (between README_BEGIN and README_END) and the status list (between STATUS_BEGIN and
    STATUS_END) of the README from results.json; False if it has no table."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    new = replace_block(text, README_BEGIN, README_END, readme_table(store))
    if new is None:
        return False
    path.write_text(replace_block(new, STATUS_BEGIN, STATUS_END, status_lines(store)) or new)
    return True


def notes_of(store, section):
    """results.json's notes: {section: [paragraph, ...]} (section: a method, or "general"); a plain list is general."""
    notes = store.get("notes") or {}
    if isinstance(notes, list):
        notes = {"general": notes}
    return notes.get(section, [])


def picture_links(store, method, md_path, pictures):
    out = []
    for m, t, _, rows in headline(store):
        r = rows[0] if rows else None  # tied rows: the pictures are the first one's
        for name, what in ((f"{m}_{t}.png", "training curves"), (f"{m}_{t}_grid.png", "image grid")):
            if m == method and r is not None and (Path(pictures) / name).exists():
                rel = os.path.relpath(Path(pictures) / name, Path(md_path).parent)
                info = Path(pictures) / name.replace(".png", ".json")
                info = json.loads(info.read_text()) if info.exists() else {}
                caption = (f"{t}, {r['steps']} steps: target test accuracy (mean, min-max band over seeds); where the "
                           "runs logged them, the source accuracy and the method's own signals" if what == "training curves" else
                           f"{t}, the final model of a {info.get('variant', m)} run (seed {info.get('seed')}, "
                           f"{info.get('steps')} steps, target accuracy {info.get('target_acc')}); rows: {GRID_ROWS.get(m, '')}")
                out += [f"![{m} {t}: {what}]({rel})", "", f"*{caption}.*", ""]
    return out


def rows_part(rows, store):
    """One part of a method's section: the rows' table, their per-seed numbers (with the GAM protocol's target *train*
    accuracy where a run reports it) and the curve, trade-off and selection tables."""
    train = any(any(a is not None for a in r.get("extra", {}).get("target_train_acc") or []) for r in rows)
    out = ["| task | variant | steps | seeds | target acc | " + ("target train acc | " if train else "") +
           "source acc | paper | wall time / run | device | command |",
           "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if train else "")]
    for r in rows:
        paper = PAPER.get((r["method"], r["task"], r["variant"]))
        note = (PAPER_NOTES.get((r["method"], r["task"], r["variant"])) or PAPER_NOTES.get((r["method"], r["task"]), "—")
                if paper is None else f"{paper:.2f}")
        tr = [a for a in r.get("extra", {}).get("target_train_acc") or [] if a is not None]
        out.append(f"| {r['task']} | {shown(r)} | {r['steps']} | {len(r['seeds'])} | {mean_std(r['target_acc'])} | "
                   + (f"{mean_std(tr) if len(tr) == len(r['seeds']) else '—'} | " if train else "") +
                   f"{mean_std(r['source_acc'])} | {note} | {statistics.mean(r['seconds']) / 60:.1f} min | "
                   f"{r['device']} | `{r['command']}` |")
    out += ["", "Per-seed target accuracy:", ""]
    for r in rows:
        val = r.get("extra", {}).get("target_val_acc") or [None] * len(r["seeds"])  # --target-val: held-out target train
        tr = r.get("extra", {}).get("target_train_acc") or [None] * len(r["seeds"])
        per = ", ".join(f"seed {s}: {a:.2f}" + (f" (target val {v:.1f})" if v is not None else "")
                        + (f" (target train {t:.2f})" if t is not None else "")
                        for s, a, v, t in zip(r["seeds"], r["target_acc"], val, tr))
        out.append(f"- {r['task']} {shown(r)} ({r['steps']} steps): {per}")
    return out + tradeoff_table(rows) + curve_table(rows) + selection_table(rows) + sweep_table(rows)


def render(store, path, pictures=PICTURES):
    rows = sorted(store["rows"].values(), key=lambda r: (r["method"], r["task"], shown(r), r["steps"]))
    methods = list(METHODS) + sorted({r["method"] for r in rows} - set(METHODS))
    present = [m for m in methods if any(r["method"] == m for r in rows) or notes_of(store, m)]
    out = [
        "# Results",
        "",
        "Written by `benchmark.py` from `results.json`; every row is a measured run on this repository's code.",
        "Accuracy of the **final** model (no checkpoint selection), % on the target *test* split and the source *test*",
        "split, mean ± std over seeds (± is the sample standard deviation, n − 1). `paper` is the paper's own number",
        "for the same row (target accuracy). Each method's section shows first the rows at today's code (every seed ran",
        "with the script's behaviour fingerprint of today, `python benchmark.py --fingerprint`; per-seed commit,",
        "fingerprint, torch and device are in results.json's `provenance`), then earlier code and investigations.",
        "Sections: " + " · ".join(f"[{m}](#{m.replace('_', '')})" for m in present)
        + " · [protocol and hardware](#protocol-and-hardware)",
    ]
    heads = headline(store)
    for m in present:
        mine = marked([r for r in rows if r["method"] == m], store)
        now = [r for r in mine if is_current(r, store) and "--target-val" not in shlex.split(r.get("flags", ""))]
        rest = [r for r in mine if r not in now]
        out += ["", f"## {m}", "", f"*{METHODS.get(m, m)}.*", ""]
        out += picture_links(store, m, path, pictures)
        out += [f"### Today's code ({m}.py fingerprint `{today(store, m)}`)", ""]
        out += rows_part(now, store) if now else ["No row has run at today's code yet.", ""]
        waiting = [r for _, _, _, hs in heads for r in marked(hs, store) if r["method"] == m
                   and not is_current(r, store)]
        if waiting:
            out += ["", "Waiting for a re-run (the README shows these marked):", ""] + [f"- {waits_for(r)}." for r in waiting]
        out += ["", "### Earlier code and investigations", "",
                "Rows that ran on code whose fingerprint is not today's ([earlier code], or a `[code of ...]` they name), "
                "rows run with `--target-val` (settings chosen on labelled target images; never a headline), and the "
                "investigations' notes.", ""]
        out += rows_part(rest, store) if rest else []
        if notes_of(store, m):
            out += ["", "#### Notes", ""] + [f"- {note}" for note in notes_of(store, m)]
    out += ["", "## Protocol and hardware", "", f"Hardware: {store.get('hardware', '?')}.", ""]
    out += [f"- {note}" for note in notes_of(store, "general")] + ([""] if notes_of(store, "general") else [])
    if store.get("overhead"):
        out += ["## Training-loop overhead", "",
                "Steps/s of the full script's training loop (sampling by index on the device, normalisation, schedules,",
                "logging) against a bare forward+backward+SGD step of the same networks on the same batch shapes with",
                "pre-made random tensors, in one process, same threads, alternating, medians of the repeats. The ratio",
                "is bare steps/s over script steps/s: the script's time per step relative to the bare networks'.", "",
                "| task | backbone | threads | steps | script steps/s | bare steps/s | overhead ratio |", "|---|---|---|---|---|---|---|"]
        for o in store["overhead"].values():
            out.append(f"| {o['task']} | {o['backbone']} | {o['threads']} | {o['steps']} | {o['script']:.2f} | "
                       f"{o['bare']:.2f} | {o['ratio']:.3f} |")
        out.append("")
    if store.get("speed"):
        out += ["## Training speed", "",
                "Training steps/s of each script alone (`benchmark.py --speed`: the script's own timer, evaluation",
                "left out), one seed, eager and with the optional `--amp`, `--compile [reduce-overhead]` and",
                "`--cuda-graph on`. steps/s: after the first fifth of the steps (warm-up, a graph's recording,",
                "compilation left out); whole run: all of them.", "",
                "| method | task | mode | device | threads | steps | steps/s | whole run | torch | command |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for o in sorted(store["speed"].values(), key=lambda o: (o["device"], o["method"], o["mode"])):
            out.append(f"| {o['method']} | {o['task']} | {o['mode']} | {o['device']} | {o['threads']} | {o['steps']} | "
                       f"{o['steps_per_sec']:.1f} | {o['steps_per_sec_whole_run']:.1f} | {o['torch']} | "
                       f"`{o['command']}` |")
        out.append("")
    Path(path).write_text("\n".join(out))


def plots(store, out, pictures=PICTURES):
    """Draw the README rows' pictures into `pictures`: per row its target test accuracy over the steps (mean and
    min-max band over seeds) beside the source accuracy and the method's own signals; for the image methods, the
    grid one of the row's runs saved. Needs matplotlib (optional: only this uses it). Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    Path(pictures).mkdir(parents=True, exist_ok=True)
    written = []

    def band(series):  # [[(step, value), ...] per seed] -> steps, mean, min, max on the first seed's steps
        series = [s for s in series if s]
        steps = np.array([p[0] for p in series[0]], dtype=float)
        ys = np.stack([np.interp(steps, [p[0] for p in s], [p[1] for p in s]) for s in series])
        return steps, ys.mean(0), ys.min(0), ys.max(0), len(series)

    for m, t, paper, rows in headline(store):
        r = rows[0] if rows else None
        curves = [c for c in (r or {}).get("extra", {}).get("curve") or [] if c and len(c) > 1]
        if not curves:
            continue
        ex = r["extra"]
        evals = [e for e in ex.get("evals") or [] if e]
        signals = [s for s in ex.get("signals") or [] if s]
        panels = 1 + bool(evals) + bool(signals)
        fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.1), squeeze=False)
        ax = axes[0][0]
        steps, mean, lo, hi, n = band(curves)
        ax.fill_between(steps, lo, hi, alpha=0.25, label=f"min-max over {n} seeds" if n > 1 else None)
        ax.plot(steps, mean, label="target test acc" + (" (mean)" if n > 1 else ""))
        if paper is not None:
            ax.axhline(paper, color="k", ls="--", lw=0.8, label=f"paper {paper:.1f}")
        ax.set(xlabel="step", ylabel="%", title=f"{m} {t}: target")
        ax.legend(fontsize=7)
        k = 1
        if evals:
            ax = axes[0][k]
            k += 1
            for key, label in (("source_test_acc", "source test acc"), ("source_val_acc", "source val acc")):
                if all(any(key in e for e in run) for run in evals):
                    steps, mean, lo, hi, n = band([[(e["step"], e[key]) for e in run if key in e] for run in evals])
                    ax.fill_between(steps, lo, hi, alpha=0.25)
                    ax.plot(steps, mean, label=label)
                    break
            own = sorted({key for run in evals for e in run for key in e} - {"step", "acc", "source_test_acc",
                                                                           "source_val_acc", *VALIDATORS})
            for key in own:
                if all(any(key in e for e in run) for run in evals):
                    steps, mean, _, _, _ = band([[(e["step"], e[key]) for e in run if key in e] for run in evals])
                    ax.plot(steps, mean, label=key)
            ax.set(xlabel="step", ylabel="%", title="source accuracy and own evaluation signals")
            ax.legend(fontsize=7)
        if signals:
            ax = axes[0][k]
            keys = sorted({key for run in signals for rec in run for key in rec} - {"step"})
            for key in keys:
                if all(any(key in rec for rec in run) for run in signals):
                    steps, mean, _, _, _ = band([[(rec["step"], rec[key]) for rec in run if key in rec] for run in signals])
                    ax.plot(steps, mean, label=key, lw=1)
            ax.set(xlabel="step", title="training signals (running means)")
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = Path(pictures) / f"{m}_{t}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)
    for m, t, _, rows in headline(store):
        r = rows[0] if rows else None
        if m not in GRIDS or r is None:
            continue
        src = grid_source(r, out)
        if src is not None:
            from PIL import Image
            with Image.open(src) as img:
                img = img.convert("RGB")
                if img.width > 900:
                    img = img.resize((900, round(img.height * 900 / img.width)))
                img.save(Path(pictures) / f"{m}_{t}_grid.png", optimize=True)
            sm = json.loads((src.parent / "summary.json").read_text())
            (Path(pictures) / f"{m}_{t}_grid.json").write_text(json.dumps(
                {k: sm.get(k) for k in ("variant", "seed", "steps", "target_acc")}) + "\n")
            written.append(Path(pictures) / f"{m}_{t}_grid.png")
    return written


def grid_source(row, out):
    """The image grid of one of a row's runs: its stored run folder, else a run folder under `out` whose summary is
    one of the row's runs (same method, task, variant, steps, seed and target accuracy), else the newest finished run
    of the same method, task and variant at another schedule, else of another variant (the caption says which)."""
    name = GRIDS[row["method"]]
    for d in row.get("extra", {}).get("run_dir") or []:
        if d and (HERE / d / name).exists():
            return HERE / d / name
    runs = {(s, round(a, 2)) for s, a in zip(row["seeds"], row["target_acc"])}
    for summary in sorted(Path(out).glob(f"{row['method']}__{row['task']}__*/summary.json")):
        sm = json.loads(summary.read_text())
        if (sm.get("variant") == row["variant"] and sm.get("steps") == row["steps"]
                and (sm.get("seed"), round(sm.get("target_acc", -1), 2)) in runs and (summary.parent / name).exists()):
            return summary.parent / name
    newest = sorted(Path(out).glob(f"{row['method']}__{row['task']}__*/summary.json"), reverse=True)
    for same_variant in (True, False):  # then any variant of the method: the caption names the run's
        for summary in newest:
            if ((json.loads(summary.read_text()).get("variant") == row["variant"]) >= same_variant
                    and (summary.parent / name).exists()):
                return summary.parent / name
    return None


def load_store(path):
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {"rows": {}, "overhead": {}}


def save_store(store, path):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(store, indent=1) + "\n")
    os.replace(tmp, path)


def overhead(task, steps, threads, reps=3):
    """Steps/s of dann.main's training loop vs. a bare forward+backward+SGD step of the same networks on the same
    batch shapes (pre-made random tensors), in this one process, same threads; the two alternate `reps` times and
    the medians are compared."""

    import torch

    sys.path.insert(0, str(HERE))
    import common
    import dann

    torch.set_num_threads(threads)
    args = dann.parse_args(["--task", task, "--steps", str(steps), "--eval-every", "0", "--no-save-model",
                            "--log-every", str(steps), "--out", "runs/overhead", "--threads", str(threads)])
    torch.manual_seed(0)
    model = common.build_backbone(args.backbone)
    disc = dann.domain_classifier(model.feature_dim, args.hidden)
    opt = torch.optim.SGD(list(model.parameters()) + list(disc.parameters()), lr=0.01, momentum=0.9)
    half = args.batch_size // 2
    xs, xt = (torch.rand(half, model.in_channels, model.size, model.size) * 2 - 1 for _ in range(2))
    y, d = torch.randint(0, 10, (half,)), torch.zeros(half, dtype=torch.long)

    def bare_step():  # dann.py's own loss of eq. 9 (dann_loss), without the script around it
        loss = dann.dann_loss(model.features, model.classifier, disc, xs, y, d, xt, 0.5)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(20):  # warm-up, as the script's own first steps are
        bare_step()
    script, bare = [], []
    for _ in range(reps):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            dann.main(args)
        script.append(json.loads(buf.getvalue().strip().splitlines()[-1])["train_steps_per_sec"])
        t0 = time.time()
        for _ in range(steps):
            bare_step()
        bare.append(steps / (time.time() - t0))
    s, b = statistics.median(script), statistics.median(bare)
    return {"task": task, "backbone": args.backbone, "threads": threads, "steps": steps, "reps": reps,
            "script": s, "bare": b, "ratio": b / s, "script_all": script, "bare_all": bare}


def publish(store, args):
    """RESULTS.md, and the README's table when there is a README to keep in step with the store."""
    render(store, args.markdown)
    if args.readme:
        write_readme(store, args.readme)


def main():
    args = parse_args()
    store = load_store(args.results)
    if args.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plots needs matplotlib: pip install matplotlib", file=sys.stderr)
            sys.exit(2)
        for f in plots(store, args.out):
            print(f"wrote {f} ({f.stat().st_size // 1024} KB)", flush=True)
        publish(store, args)
        return
    if args.fingerprint:
        fps = {m: fingerprint(m) for m in FINGERPRINT_RUNS}
        print(json.dumps(fps), flush=True)
        if args.save:
            import torch

            store["fingerprints"], store["fingerprint_torch"] = fps, torch.__version__
            save_store(store, args.results)
            publish(store, args)
        return
    if args.backfill:
        backfill(store)
        save_store(store, args.results)
        publish(store, args)
        return
    if args.collect:  # the run folders are the source of truth: rows from whatever finished, on any machine
        done = collect(args.collect)
        add_rows(store, done)
        save_store(store, args.results)
        publish(store, args)
        print(f"{len(done)} finished runs under {args.collect} -> {args.results}, {args.markdown}", flush=True)
        return
    store["hardware"] = hardware()
    threads = max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    if args.speed:
        for key, record in speed(args.methods, args.tasks[0], args.speed_steps, args.device, args.out,
                                 args.speed_modes):
            store.setdefault("speed", {})[key] = record
            save_store(store, args.results)
            publish(store, args)
        return
    if args.overhead:
        for task in args.tasks:
            o = overhead(task, args.overhead_steps, threads)
            print(json.dumps(o), flush=True)
            store.setdefault("overhead", {})[f"{task}__{threads}"] = o
        save_store(store, args.results)
        publish(store, args)
        return
    rows = PLANS[args.plan] if args.plan else [(m, args.tasks, []) for m in args.methods]
    rows = [(m, tasks, flags + args.extra + (["--device", args.device] if args.device else [])) for m, tasks, flags in rows]
    if args.device == "cuda":  # many runs share one GPU: each is bound by its Python thread, so one CPU thread each
        threads = 1
    for m, _, _ in rows:
        if not (HERE / f"{m}.py").exists():
            sys.exit(f"error: no script {m}.py next to benchmark.py")
    jobs = []
    for m, tasks, extra in rows:
        for t in tasks:
            row = store["rows"].get(row_key(m, t, extra), {})  # seeds held at the code as it is now
            now = cached_fingerprint(m) if row else None
            done = [s for s, pr in zip(row.get("seeds", []), row.get("provenance") or []) if (pr or {}).get("fingerprint") == now]
            jobs += [(m, t, s, extra) for s in args.seeds if args.rerun or s not in done]
            if not args.rerun and set(done) & set(args.seeds):
                print(f"skipping seeds {sorted(set(done) & set(args.seeds))} of {m} {t} {' '.join(extra)}: in "
                      f"{args.results} already (--rerun runs them again)", flush=True)
    if args.dry_run:
        for m, t, s, extra in jobs:
            print(f"python {m}.py --task {t} --seed {s} " + " ".join(shlex.quote(e) for e in fill(extra, t, s)))
        print(f"{len(jobs)} runs", flush=True)
        return
    if not jobs:  # (nothing is submitted, re-rendered or re-saved)
        print(f"nothing to run: every seed asked for is in {args.results} at today's code", flush=True)
        return
    if args.launcher == "submitit":
        results = submit(args, jobs)
        if results is None:  # --no-wait
            return
        threads = args.cpus_per_job
    else:
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            results = list(pool.map(lambda j: run_one(*j[:3], j[3], threads, args.out), jobs))
    store = load_store(args.results)  # again: another benchmark may have saved rows while these runs were going
    store["hardware"] = hardware()
    add_rows(store, [(j + (threads,), r) for j, r in zip(jobs, results)])
    save_store(store, args.results)
    publish(store, args)
    failed = sum(r is None for r in results)
    if failed:
        sys.exit(f"error: {failed} of {len(results)} runs failed; see {args.out}/logs")


def add_rows(store, done):
    """Store one row per (method, task, flags) from finished runs, done = [((method, task, seed, flags, threads),
    summary or None)]; a stored row with the same flags, steps and fingerprint keeps its other seeds (a re-run seed is
    replaced). A row pools only seeds of one fingerprint: stored seeds of other code (or another schedule) are set
    aside in a row of their own, which the tables mark as earlier code."""
    groups = {}
    for (m, t, s, extra, threads), r in done:
        if r is not None:
            groups.setdefault((m, t, tuple(extra), threads, seed_fingerprint(r)), []).append(r)
            if seed_fingerprint(r) and not today(store, m):  # a new store: the code that ran is today's
                store.setdefault("fingerprints", {})[m] = seed_fingerprint(r)
    # today's code last, so that it is the group that keeps the row's own key
    for (m, t, extra, threads, fp), rs in sorted(groups.items(), key=lambda g: g[0][4] == today(store, g[0][0])):
        extra = list(extra)
        rs.sort(key=lambda r: r["seed"])
        key = row_key(m, t, extra)
        old = store["rows"].get(key)
        if old is not None and (old["steps"] != rs[0]["steps"] or old.get("fingerprint") != fp):
            store["rows"][aside_key(store, key, old)] = store["rows"].pop(key)
        elif old is not None:  # same flags, schedule and code, other seeds measured before: merge
            rs = merge_seeds(old, rs)
        store["rows"][key] = make_row(m, t, key, extra, threads, rs)
        print(f"{m} {t} {rs[0].get('variant', '')}: target {mean_std(store['rows'][key]['target_acc'])} "
              f"source {mean_std(store['rows'][key]['source_acc'])}", flush=True)


def seed_fingerprint(r):
    return (r.get("provenance") or {}).get("fingerprint")


def aside_key(store, key, row):
    """Where a row of earlier code (or of another schedule) goes when today's seeds take its key."""
    base = f"{key}|@{row.get('fingerprint') or 'earlier'}" + ("" if row.get("fingerprint") else f"-{row['steps']}")
    new, i = base, 2
    while new in store["rows"]:
        new, i = f"{base}-{i}", i + 1
    return new


def make_row(m, t, key, extra, threads, rs):
    """A results row from per-seed results rs (sorted by seed): the pooled numbers, the exact command, and per seed
    the provenance; `fingerprint` is the seeds' one fingerprint (None where unknown or mixed), `device` theirs."""
    seeds = " ".join(str(r["seed"]) for r in rs)
    cmd = f"for s in {seeds}; do python {m}.py --task {t} --seed $s"
    cmd += f" --threads {threads}" if "--threads" not in extra else ""
    cmd += "".join(" " + (e if "${s}" in e else shlex.quote(e)) for e in fill(extra, t, "${s}")) + "; done"
    fps = {seed_fingerprint(r) for r in rs}
    devices = sorted({r["device"] for r in rs})
    return {
        "method": m, "task": t, "variant": rs[0].get("variant", ""), "flags": key.split("|", 2)[2],
        "steps": rs[0]["steps"], "seeds": [r["seed"] for r in rs], "target_acc": [r["target_acc"] for r in rs],
        "source_acc": [r["source_acc"] for r in rs], "seconds": [r["seconds"] for r in rs],
        "device": " + ".join(devices), "command": cmd, "commands": [r["command"] for r in rs],
        "fingerprint": fps.pop() if len(fps) == 1 else None, "provenance": [r.get("provenance") for r in rs],
        "extra": {k: [r.get(k) for r in rs] for k in EXTRA_KEYS},
    }


def collect(out):
    """((method, task, seed, flags, threads), summary) of every finished run under `out` (its logs' cell records
    and the run folders they name): the run folders are the source of truth, whichever launcher started them."""
    done = []
    for path in sorted(Path(out, "logs").glob("*.cell.json")):
        cell = json.loads(path.read_text())
        r = finished_run(path.with_name(path.name.replace(".cell.json", ".out")))
        if r is not None:
            done.append(((cell["method"], cell["task"], cell["seed"], cell["extra"], cell["threads"]), r))
    return done


def run_started(run_dir):
    """When a run started, from its folder's name (<method>__<task>__<seed>__YYYYMMDD-HHMMSS, UTC), or None."""
    import datetime
    import re

    m = re.search(r"__(\d{8}-\d{6})", str(run_dir or ""))
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=datetime.timezone.utc).timestamp()


def fingerprint_at(method, commit, cache):
    """The fingerprint of `method` as the code of `commit` behaves (its script and common.py, run with today's
    FINGERPRINT_RUNS on today's fixture data); None where that code does not run them."""
    import tempfile

    if (method, commit) not in cache:
        with tempfile.TemporaryDirectory() as tmp:
            files = subprocess.run(["git", "archive", commit, f"{method}.py", "common.py"], cwd=HERE,
                                   capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=files, check=True)
            try:
                cache[method, commit] = fingerprint(method, code_dir=tmp)
            except RuntimeError as e:
                print(f"{method} at {commit}: {e}", flush=True)
                cache[method, commit] = None
        print(f"{method} at {commit}: {cache[method, commit]}", flush=True)
    return cache[method, commit]


def subset_row(row, idx):
    """The row restricted to the seeds at positions idx (its pooled command names only those seeds)."""
    import re

    new = dict(row)
    for k in ("seeds", "target_acc", "source_acc", "seconds", "commands", "provenance"):
        new[k] = [row[k][i] for i in idx]
    new["extra"] = {k: [v[i] for i in idx] for k, v in row.get("extra", {}).items()}
    new["command"] = re.sub(r"^for s in [\d ]+;", f"for s in {' '.join(str(s) for s in new['seeds'])};", row["command"])
    fps = {(p or {}).get("fingerprint") for p in new["provenance"]}
    new["fingerprint"] = fps.pop() if len(fps) == 1 else None
    return new


def backfill(store):
    """Provenance for stored seeds that ran before it was recorded: the commit that was HEAD when the seed's run
    started (its run folder's time against `git log --first-parent`) and the fingerprint of that commit's code,
    marked "backfilled" (uncommitted changes of that time are unknown: "dirty" is null). A seed without a run folder
    gets commit and fingerprint null: earlier code until re-run. Rows whose seeds then differ in fingerprint are
    split: each fingerprint its own row."""
    log = sorted((int(t), h) for h, t in (line.split() for line in
                                           (git("log", "--first-parent", "--format=%h %ct") or "").splitlines()))
    cache = {}
    for key in list(store["rows"]):
        row = store["rows"][key]
        n = len(row["seeds"])
        prov = list(row.get("provenance") or [None] * n)
        for i in range(n):
            if prov[i] is not None:
                continue
            t = run_started((row.get("extra", {}).get("run_dir") or [None] * n)[i])
            heads = [h for ct, h in log if ct <= t] if t is not None else []
            cmd = shlex.split(row["commands"][i]) if row.get("commands") else []
            threads = int(cmd[cmd.index("--threads") + 1]) if "--threads" in cmd else None
            prov[i] = {"commit": heads[-1] if heads else None, "dirty": None,
                       "fingerprint": fingerprint_at(row["method"], heads[-1], cache) if heads else None,
                       "torch": None, "device": row["device"], "threads": threads, "backfilled": True}
        row["provenance"] = prov
        fps = [p["fingerprint"] for p in prov]
        row["fingerprint"] = fps[0] if len(set(fps)) == 1 else None
        if len(set(fps)) > 1:  # one row per fingerprint: today's (else the most seeds) keeps the key
            groups = {}
            for i, fp in enumerate(fps):
                groups.setdefault(fp, []).append(i)
            keep = today(store, row["method"]) if today(store, row["method"]) in groups else \
                max(groups, key=lambda fp: len(groups[fp]))
            for fp, idx in groups.items():
                part = subset_row(row, idx)
                store["rows"][key if fp == keep else aside_key(store, key, part)] = part


def row_key(method, task, extra):
    """One results row per method, task and flags (with their {task}/{seed} placeholders)."""
    return f"{method}|{task}|{' '.join(shlex.quote(e) for e in extra)}"


if __name__ == "__main__":
    main()
