r"""Shared plumbing for the single-file UDA scripts: digit datasets, backbones, run utilities.

Only things that are *not* a method live here. Read top to bottom:

1. Data       - real on-disk formats (torchvision layouts, the original MNIST-M release), decoded once into
               uint8 tensors [N, C, H, W] + int64 labels, resized/converted once for a task, cached on disk; your own
               image folders; index samplers on the device, normalisation, device-side random affine augmentation.
2. Backbones  - lenet, dtn, dann_mnist, dann_svhn, ResNets: `features` and `classifier` kept apart.
3. Evaluation - accuracy in big batches, the label-free validators, the class-share check: numbers, no files.
4. Running    - the shared flags (Flags) and their checks, seeding and device, the run folder, the training-loop
               meter, resumable checkpoints, stage 1 of the two-stage methods, the summary; `Run` holds them for a
               script, which imports at most a dozen names from here.
5. CUDA graphs - `--cuda-graph`: a recorded training step (GraphedStep).

Data root: `--data-dir`, else the environment variable UDA_DATA_DIR, else ./data.
Decoded tensors are cached in `--cache-dir`, else UDA_CACHE_DIR, else ~/.cache/uda-digits (never inside the
data root, which may be read-only).

Reference: what the scripts share
=================================

A first run
-----------

`python dann.py --task mnist-usps` downloads MNIST and USPS into `./data` (about 15 MB), decodes
them once into a cache, then trains for the paper-style 20,000 steps. Measured: 19 steps/s on the 2-core AMD EPYC
of RESULTS.md's speed table (about 18 minutes; a machine with more cores is faster). While it trains, a line every 500 steps reads
`step 1500/20000 | loss_y 0.1203 loss_d 0.6112 dom_acc 0.7105 lam 0.3581 lr 0.006574 | 41.2 steps/s | ETA 7m28s` (numbers illustrative): the label
loss, the domain classifier's loss and accuracy (near 0.5 means the features fool it), the adaptation weight λ and
the learning rate of the paper's schedules, the training speed (evaluation excluded) and the time left. The last line
printed is the result as JSON; the same is in `runs/dann__mnist-usps__0__<time>/summary.json` (`target_acc`: USPS
test accuracy of the final model). **Offline**, put the files where the error message says, under `./data` (or
`--data-dir`, or `UDA_DATA_DIR`): `MNIST/raw/train-images-idx3-ubyte.gz`, `MNIST/raw/train-labels-idx1-ubyte.gz`,
`MNIST/raw/t10k-images-idx3-ubyte.gz`, `MNIST/raw/t10k-labels-idx1-ubyte.gz`, `usps.bz2` and `usps.t.bz2`; with
`--no-download` nothing is fetched and a missing file is named.

Tasks
-----

`--task` names a source → target pair. The target *train* split is the unlabeled adaptation data; accuracy is
reported on the target *test* split (and the source *test* split) for the **final** model.

| task | source (train / test) | target (train / test) | dann.py backbone |
|---|---|---|---|
| `mnist-mnistm` | MNIST 60,000 / 10,000 | MNIST-M 59,001 / 9,001 | `dann_mnist`, 32×32 RGB |
| `svhn-mnist` | SVHN 73,257 / 26,032 | MNIST | `dann_svhn`, 32×32 RGB |
| `syndigits-svhn` | SynDigits | SVHN | `dann_svhn`, 32×32 RGB |
| `mnist-svhn` | MNIST | SVHN | `dann_svhn` (the DANN paper's failure case) |
| `mnist-usps` | MNIST | USPS 7,291 / 2,007 | `lenet`, 28×28 gray |
| `usps-mnist` | USPS | MNIST | `lenet`, 28×28 gray |

Images are resized once to the backbone's input (bilinear), gray images are replicated to 3 channels for RGB
backbones and RGB images converted to gray for gray ones; pixels are scaled to [-1, 1] on the device ([0, 1] in
gam.py, as its official code; `--input-range` in dann.py and gam.py).

Data
----

The data root is `--data-dir`, else the environment variable **`UDA_DATA_DIR`**, else `./data`. Files are in the
layouts torchvision and the original releases use:

| dataset | files under the data root | when missing |
|---|---|---|
| MNIST | `MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` | downloaded by torchvision (md5-checked) |
| USPS | `usps.bz2`, `usps.t.bz2` (LIBSVM) | downloaded by torchvision (md5-checked) |
| SVHN | `train_32x32.mat`, `test_32x32.mat` | downloaded from ufldl.stanford.edu with torchvision's md5s |
| MNIST-M | `mnist_m/mnist_m_{train,test}/*.png` + `mnist_m/mnist_m_{train,test}_labels.txt`, or `mnist_m.tar.gz` holding them | `mnist_m.tar.gz` downloaded (Cornell box mirror, then Ganin's Google Drive file), md5 `859df31c91afe82e80e5012ba928f279` |
| SynDigits | `synth_train_32x32.mat`, `synth_test_32x32.mat` (SVHN's .mat schema) | no stable URL: get `SynthDigits.zip` from Ganin's page and put the two files in the data root |

`--no-download` never touches the network and fails with a message saying which file is missing. A file that
is truncated or corrupt fails with a message saying so. An SVHN `.mat` already on disk whose md5 is not the
official one is read with a warning (so you can use a re-saved copy). Every such error is one line starting with
`error:` and the script exits with status 2, before any run folder is made.

Each split is decoded once into a uint8 tensor `[N, C, H, W]`, converted for the task and cached in
`--cache-dir`, else **`UDA_CACHE_DIR`**, else `~/.cache/uda-digits` (keyed by the source files' path, size and
mtime; the files get the usual permissions, so a cache can be shared; a damaged or mis-shaped cache file is decoded
again; a cache folder you cannot write is used read-only, with a warning). Reading never writes into the data root:
MNIST `.gz` archives are decompressed in a temporary folder and `mnist_m.tar.gz` is read in place. Only a *download*
of a missing file writes there, and only if the folder is writable: each file is downloaded into a temporary folder,
md5-checked and then moved in, so a failed download leaves nothing behind (a missing MNIST-M archive goes into the
cache when the data root is read-only). So a shared, read-only data folder works as it is:

```bash
export UDA_DATA_DIR=/path/to/datasets
python dann.py --task mnist-mnistm
```

Your own data: folder tasks
---------------------------

Every script also adapts from a labelled folder of images to an unlabelled one. `--source-dir` (and
`--target-dir`, optionally `--target-test-dir` and `--source-test-dir`) replace `--task`:

```
source/                 target/                    target_test/            (optional, for an accuracy)
  cat/001.jpg ...         anything.png               cat/...
  dog/...                 any/sub/folder/x.jpg       dog/...
```

- **Source** (and source test, target test): torchvision's ImageFolder layout, one sub-folder per class; the classes
  are the sorted sub-folder names, at least two; the target test folder needs the same class names.
- **Target**: any layout; sub-folder names are never read as labels. The run writes `predictions.csv` (file,
  predicted class, confidence) for these images. Without `--target-test-dir` there is no target accuracy (the summary
  says so); without `--source-test-dir` the source accuracy is measured on the source training images.
- Images are read in the order of their file names, converted to the backbone's channels (gray or RGB; palettes and
  alpha are converted), centre-cropped to a square and resized to its input, decoded once and cached (keyed by the
  files' names, sizes and dates). Files that are not images, or do not decode, are skipped and counted in a warning.
  An empty folder, a single class, images at the top of a labelled folder, or test classes that differ from the
  source's each stop the run with one line, before anything is written.
- What each method expects: `dann.py` runs any backbone, `dann_mnist` (32×32 RGB) by default for folders, or a ResNet
  for larger images (`--backbone resnet18 --image-size 128`, with `--pretrained` for torchvision's ImageNet weights
  from the local torch cache: an error if they are not there, never a silent random initialisation). `calibrator.py`
  takes `--backbone dtn|resnet18|resnet50` for its source classifier. `gam.py` works on 28×28 gray (LeNet),
  `i2i_adapt.py` on 32×32 gray, `pixelda.py` on 32×32 RGB: they are digit-sized methods, so give them small images.
  How many images is enough: the digit tasks use 7,000–73,000 per domain; a few hundred per class in the source and
  a few thousand target images are a sensible minimum for the adversarial methods, which otherwise overfit their
  discriminators.

A worked example with real data: write MNIST → USPS as PNG folders, then adapt as you would with your own.

```bash
python -c "import common; common.export_digits('mnist-usps', 'digits_png')"   # mnist/{train,test}/<digit>/*.png, usps/train/*.png (unlabelled), usps/test/<digit>/*.png
python dann.py --source-dir digits_png/mnist/train --source-test-dir digits_png/mnist/test \
               --target-dir digits_png/usps/train --target-test-dir digits_png/usps/test --backbone lenet
```

Because numbered file names keep their order, this run sees the same images in the same order as
`python dann.py --task mnist-usps` and gives the same numbers for the same seed (a test checks it).

Two-stage methods: caching the source network
---------------------------------------------

`gam.py` and `calibrator.py` first train a source network (stage 1) and then adapt (stage 2). With
`--source-ckpt PATH` stage 1 is cached: if PATH exists it is loaded, otherwise stage 1 runs and saves it there.
The file records how it was trained (source dataset, seed, steps, learning rate, ...); a run with other stage-1
settings refuses it instead of silently reusing it. So every variant of one seed adapts the same source network,
and a cached stage 1 changes no number: stage 1 draws from copies of the random streams, so stage 2 gets the same
draws whether the run trained the network or loaded it:

```bash
for v in "--mode source-only" "--mode gaussian" "" "--gan-layers fc4 --gan-weights 1 --no-gaussian-init --drift 0"; do
  python gam.py --task usps-mnist --seed 0 --source-ckpt ckpt/gam_usps-mnist_0.pt $v
done
```

A stage-1 flag such as gam.py's `--no-source-dropout` (F^s without dropout, as the official TF LeNet) trains
another source network, so it needs its own file (e.g. `ckpt/gam_usps-mnist_0_nodrop.pt`); the default file is refused.

Reading a run folder
--------------------

Every run writes `runs/<method>__<task>__<seed>__<time>/` (`--out` sets the parent; a name taken at the same second
gets a suffix):

| file | content |
|---|---|
| `args.json` | every flag with the value actually used: derived defaults (backbone, domain classifier, schedule, recipe, the official per-task config) are resolved before it is written, plus the variant |
| `metrics.jsonl` | one JSON object per line: the running means of the training losses, λ, lr and steps/s every `--log-every` steps; at every `--eval-every` a `target_test_acc_curve` (never used for selection), `source_test_acc` and the method's own signals (DANN: source validation error, domain-classifier error), and the label-free validators (below); the last line holds the final model's `target_test_acc` and `source_test_acc` |
| `summary.json` | the final model's `target_acc` and `source_acc` (%), steps, seconds, training steps/s, device, versions; `class_shares`: `target_pred_share`, the share (%) of the target training images predicted as each class, beside `source_label_share`, each class's share of the source labels, and `emptied_classes`, the classes predicted under a third as often as they are labelled in the source. This check needs no target label: adversarial alignment can map one class's target images onto another (a GAM U→M run that reads most MNIST 7s as 9s gives 7 1.6 % of the predictions), and the run then names the class on stdout. A hint, not a verdict: the target's own class balance can differ. `selection`: the evaluation each validator would pick (below) |
| `model.pt` | final weights (plain state dicts, also with `--compile`; `--no-save-model` skips it): dann.py the network and its domain classifier; gam.py F^t (F^s is `source.pt`, written when the run trains it); calibrator.py the calibrator and F_s (not its discriminators); pixelda.py and i2i_adapt.py every network |
| `source.pt` | two-stage methods: the stage-1 source network, when this run trained it |
| `model_best.pt` | with `--keep-best VALIDATOR`: the evaluated classifier's state dict at the evaluation where that score was best so far (`model_best.json`: the score and what was logged there) |
| `checkpoint.pt` | while training, every `--ckpt-every` steps (default 5000): what `--resume` needs; removed when the run ends |
| `predictions.csv` | folder tasks: file, predicted class, confidence for every target image |
| `calibration.png`, `translations.png`, `samples_*.png` | calibrator, I2I and PixelDA image grids |

The last line printed on stdout is the same JSON object as `summary.json`. Files are written to a temporary name and
renamed, so a reader never sees half a file.

**Stopping and resuming.** A run stopped by Ctrl-C, a crash or a lost machine leaves no summary. Continue it with
`python pixelda.py --resume runs/pixelda__mnist-mnistm__0__<time>`: it reads the run's own `args.json` (only
`--device`, `--threads`, `--data-dir`, `--cache-dir` and `--no-download` may change), restores the last checkpoint
(networks, optimisers, learning-rate schedules, batch samplers, every random generator, the logged window) and
trims `metrics.jsonl` back to it. On the CPU the resumed run ends with exactly the model and accuracy of a run that
was never stopped (a test checks it for all five scripts).

**Choosing a checkpoint without target labels.** The reported number is always the final model's. For tuning on
your own unlabelled data, every evaluation also logs five label-free scores of the classifier the method reports
(DANN's network, GAM's F^t, the calibrated F_s, PixelDA's T, I2I's h∘f), all "higher is better" (definitions as
in pytorch-adapt; ranked by Musgrave, Belongie & Lim, arXiv 2208.07360): `source_val_acc` (held-out labelled source
images: the source test split), and on a fixed subset of 2,000 target *training* images `entropy` (−mean entropy
of the predictions), `im` (information maximisation: entropy of the mean prediction minus the mean entropy), `bnm`
(nuclear norm of the softmax matrix / N) and `snd` (soft neighbourhood density, τ = 0.05). `summary.json`'s
`selection` gives, for the final model and for each score, the step it picks and the target test accuracy there,
beside the `oracle` (the best target test accuracy, which reads the test labels: a bound, not a method).
`--keep-best im` saves the model each time `im` improves. SND ranks a model whose predictions are all alike
(uniform or collapsed) highest by construction. How far each pick lands from the oracle, per method, is measured in
RESULTS.md's "Model selection" table as rows are run; until a method's rows are there, no score is known to be safe.

Speed
-----

No DataLoader: data sits on the device as uint8, batches are drawn by index from a fresh permutation per epoch,
normalisation and augmentation run on the device, and the loop only syncs with the host when it logs (a small
`Meter` in `common.py` sums the losses on the device). Evaluation runs in batches of 4096 under
`torch.inference_mode()`. In every script `--amp` runs the training forward passes and the evaluation under bf16
autocast (CUDA only), `--compile` compiles every network's forward pass in place (`Module.compile`, so `model.pt`
keeps plain keys; `--compile reduce-overhead` or another of torch.compile's modes passes that mode on), and
`--deterministic` and `--threads` are there too.

**`--cuda-graph on`** (CUDA only; not with `--compile` or `--deterministic`). These networks are so small that on a GPU an eager step costs its hundreds of
kernel launches, not its arithmetic: the GPU sits mostly idle. With `--cuda-graph on` each script records its
training step (forward, backward and the optimisers' updates) once as a CUDA graph, after three eager steps, and
replays it: one launch per step. The step is written once, as a function in the script, and reads as the paper's
equations either way; `common.GraphedStep` does the recording. What a recorded step needs, and how the scripts give
it: the batch indices and numbers that change per step (DANN's λ and learning rate, the calibrator's patch
position) are inputs, copied into fixed buffers; Adam is `capturable`, DANN's SGD `fused` with a tensor learning
rate; a change of structure (GAM's next GAN, PixelDA's learning-rate staircase) records a new graph. The optimisers'
capturable / fused kernels round differently from the default ones, so a GPU run with and without graphs agrees to
rounding, not bit for bit. `--cuda-graph check` runs the same path on any device without a graph and raises where a
recording would go wrong (a host sync such as `.item()`, a boolean mask, a Python value or a tensor made outside
the step that changes between steps); the tests run it for every script on the CPU and check that it trains
exactly the model of the plain loop. `--compile reduce-overhead` is torch's other route to the same end (its own
CUDA graphs of each compiled network's forward and backward, with the optimisers' updates left as they are); it
is timed beside `--cuda-graph on`. Neither speed-up is measured yet (no GPU was at hand when they were written):
`benchmark.py --speed --device cuda` measures both and `python -m pytest -q test_all.py -k cuda_graph` on a GPU
machine compares the recorded and the eager loop of every script.
"""

import argparse
import gzip
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# 1. Datasets
# ----------------------------------------------------------------------------------------------------------------

DATA_ENV, CACHE_ENV = "UDA_DATA_DIR", "UDA_CACHE_DIR"
CACHE_VERSION = 1  # bump when decoding or resizing changes, so old cache files are not used

# task name -> (source dataset, target dataset)
TASKS = {
    "mnist-usps": ("mnist", "usps"),
    "usps-mnist": ("usps", "mnist"),
    "svhn-mnist": ("svhn", "mnist"),
    "mnist-mnistm": ("mnist", "mnistm"),
    "syndigits-svhn": ("syndigits", "svhn"),
    "mnist-svhn": ("mnist", "svhn"),  # the DANN paper's documented failure case
}
DATASETS = ("mnist", "usps", "svhn", "mnistm", "syndigits")

SVHN_FILES = {  # torchvision.datasets.SVHN.split_list: url, file name, md5
    "train": ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}
SYNDIGITS_FILES = {"train": "synth_train_32x32.mat", "test": "synth_test_32x32.mat"}
# MNIST-M, Ganin & Lempitsky's release (mnist_m/mnist_m_{train,test}/*.png + *_labels.txt). Mirrors tried in order;
# the md5 is the one of the original archive (also used by pytorch-adapt and tensorflow-datasets).
MNISTM_ARCHIVE = "mnist_m.tar.gz"
MNISTM_MD5 = "859df31c91afe82e80e5012ba928f279"
MNISTM_URLS = ("https://cornell.box.com/shared/static/jado7quprg6hzzdubvwzh9umr75damwi",)
MNISTM_GDRIVE_ID = "0B_tExHiYS-0veklUZHFYT19KYjg"
MNISTM_SIZES = {"train": 59001, "test": 9001}


class DataError(RuntimeError):
    """A dataset is missing, corrupt or cannot be fetched. The message says what to do."""


def default_data_dir():
    return os.environ.get(DATA_ENV) or "./data"


def default_cache_dir():
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "uda-digits")


def md5sum(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _writable(folder):
    """Writable by the permission bits, not just by os.access (root may write anywhere; we do not want that)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _mnist_files(split):
    """(images, labels) archive names and md5s of one MNIST split, as torchvision lists them."""
    from torchvision.datasets import MNIST

    prefix = "train" if split == "train" else "t10k"
    return [(f, md5) for f, md5 in MNIST.resources if f.startswith(prefix)]


def _read_mnist(root, split, download, cache_dir):
    """MNIST's idx files under root/MNIST/raw, plain or as the original .gz archives (md5-checked, decompressed in a
    private temporary folder, never in the data root, which may be shared or read-only). A missing archive is
    downloaded (with --no-download: an error naming it) into a temporary folder first, so a failed download
    leaves nothing behind."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = Path(root) / "MNIST" / "raw"
    files = _mnist_files(split)
    missing = [f for f, _ in files if not (raw / f).exists() and not (raw / f[:-3]).exists()]
    if missing and not download:
        raise DataError(f"MNIST file(s) missing: {', '.join(str(raw / f) for f in missing)}; drop --no-download to "
                        f"fetch them, or put the idx .gz files there")
    if missing:
        if not _writable(root):
            raise DataError(f"MNIST is not in {raw} and {root} is read-only; pass --data-dir to a writable folder")
        for f, md5 in files:
            if f in missing:
                _fetch([m + f for m in MNIST.mirrors], raw, f, md5, "MNIST")
    with tempfile.TemporaryDirectory(dir=_scratch(cache_dir), prefix="mnist-extract-") as tmp:  # private: parallel runs
        paths = []
        for f, md5 in files:
            if (raw / f[:-3]).exists():
                paths.append(raw / f[:-3])
                continue
            if md5sum(raw / f) != md5:
                raise DataError(f"{raw / f} is corrupt (md5 is not {md5}): delete it and fetch it again")
            with gzip.open(raw / f, "rb") as src, open(Path(tmp) / f[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
            paths.append(Path(tmp) / f[:-3])
        x, y = read_image_file(str(paths[0])), read_label_file(str(paths[1]))
    return x.unsqueeze(1).contiguous(), y.long()


def _scratch(cache_dir):
    """A folder for temporary files: the cache if it is writable, else the system's temporary folder."""
    return str(cache_dir) if _writable(cache_dir) and Path(cache_dir).is_dir() else None


def _fetch(urls, root, fname, md5, what):
    """Download the first of `urls` that works to root/fname, md5-checked as torchvision does. The file is written
    to a temporary folder and moved into place only when complete, so a failed download leaves nothing behind."""
    from torchvision.datasets.utils import download_url

    urls = [urls] if isinstance(urls, str) else list(urls)
    if not _writable(root):
        raise DataError(f"{what} is not in {root} and that folder is read-only: pass --data-dir to a writable folder, "
                        f"or put {fname} there by hand")
    errors = []
    for url in urls:
        with tempfile.TemporaryDirectory(prefix="uda-download-") as tmp:
            try:
                download_url(url, tmp, fname, md5=md5)
            except Exception as e:  # network errors come in many types
                errors.append(f"{url}: {_one_line(e)}")
                continue
            Path(root).mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(tmp) / fname), str(Path(root) / fname))
            return Path(root) / fname
    raise DataError(f"could not download {what} ({'; '.join(errors)}); put {fname} in {root} by hand")


def _one_line(e):
    """An exception as one short line (library messages can span many)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _read_usps(root, split, download):
    from torchvision.datasets import USPS

    url, fname, md5 = USPS.split_list[split]
    if not (Path(root) / fname).exists():
        if not download:
            raise DataError(f"USPS not found: {Path(root) / fname}; drop --no-download to fetch it from {url}")
        _fetch(url, root, fname, md5, f"USPS {split}")
    ds = USPS(root, train=split == "train", download=False)
    return torch.from_numpy(ds.data).unsqueeze(1).contiguous(), torch.tensor(ds.targets, dtype=torch.long)


def _read_digit_mat(path):
    """SVHN-schema .mat (X: [32, 32, 3, N] uint8, y: [N, 1] with 10 meaning digit 0), as torchvision reads it."""
    import scipy.io as sio

    mat = sio.loadmat(str(path))
    x = np.transpose(mat["X"], (3, 2, 0, 1))
    y = mat["y"].astype(np.int64).reshape(-1)
    y[y == 10] = 0
    if x.ndim != 4 or x.shape[1] != 3 or len(x) != len(y) or y.min() < 0 or y.max() > 9:
        raise ValueError(f"unexpected contents: X {x.shape}, y {y.shape}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y)


def _read_svhn(root, split, download):
    """Files and download exactly as torchvision.datasets.SVHN (root/{split}_32x32.mat, md5-checked on download).
    A file already on disk with another md5 is read with a warning, so that a re-saved or tiny test .mat works."""
    url, fname, md5 = SVHN_FILES[split]
    path = Path(root) / fname
    if not path.exists():
        if not download:
            raise DataError(f"SVHN not found: {path}; drop --no-download to fetch it from {url}")
        _fetch(url, root, fname, md5, f"SVHN {split}")
    elif md5sum(path) != md5:
        _warn(f"{path} does not have the official SVHN md5 {md5}; reading it anyway")
    return _read_digit_mat(path)


def _read_syndigits(root, split):
    path = Path(root) / SYNDIGITS_FILES[split]
    if not path.exists():
        raise DataError(
            f"SynDigits not found: {path}. It has no stable public URL: get SynthDigits.zip from Ganin's page "
            f"(http://yaroslav.ganin.net/) and put synth_train_32x32.mat and synth_test_32x32.mat in {root}")
    return _read_digit_mat(path)


def _mnistm_decode(pngs, labels_txt):
    """pngs: dict name -> bytes; labels_txt: text of lines 'NNNNNNNN.png <digit>'."""
    from PIL import Image

    xs, ys = [], []
    for line in labels_txt.splitlines():
        if not line.strip():
            continue
        name, label = line.split()
        img = Image.open(io.BytesIO(pngs[name])).convert("RGB")
        xs.append(np.asarray(img, dtype=np.uint8))
        ys.append(int(label))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ys, dtype=torch.long)


def _download_mnistm(dest):
    from torchvision.datasets.utils import download_file_from_google_drive

    try:
        return _fetch(MNISTM_URLS, dest, MNISTM_ARCHIVE, MNISTM_MD5, "MNIST-M")
    except DataError as e:
        first = str(e)
    with tempfile.TemporaryDirectory(prefix="uda-download-") as tmp:
        try:
            download_file_from_google_drive(MNISTM_GDRIVE_ID, tmp, MNISTM_ARCHIVE, md5=MNISTM_MD5)
        except Exception as e:
            raise DataError(f"{first}; google drive {MNISTM_GDRIVE_ID}: {_one_line(e)}")
        shutil.move(str(Path(tmp) / MNISTM_ARCHIVE), str(Path(dest) / MNISTM_ARCHIVE))
    return Path(dest) / MNISTM_ARCHIVE


def _read_mnistm(root, split, download, cache_dir):
    """Original release layout: root/mnist_m/mnist_m_{split}/*.png + root/mnist_m/mnist_m_{split}_labels.txt, or the
    archive root/mnist_m.tar.gz that holds them (read in place, never extracted into the data root)."""
    folder = Path(root) / "mnist_m"
    labels = folder / f"mnist_m_{split}_labels.txt"
    if labels.exists():
        text = labels.read_text()
        pngs = {n.split()[0]: (folder / f"mnist_m_{split}" / n.split()[0]).read_bytes() for n in text.splitlines() if n.strip()}
        return _mnistm_decode(pngs, text)
    archive = Path(root) / MNISTM_ARCHIVE
    if not archive.exists():
        archive = Path(cache_dir) / MNISTM_ARCHIVE
    if not archive.exists():
        if not download:
            raise DataError(
                f"MNIST-M not found: neither {folder} nor {Path(root) / MNISTM_ARCHIVE}; drop --no-download to fetch "
                f"it, or put Ganin's {MNISTM_ARCHIVE} (or its mnist_m/ folder) in {root}")
        dest = Path(root) if _writable(root) else Path(cache_dir)
        dest.mkdir(parents=True, exist_ok=True)
        archive = _download_mnistm(dest)
    prefix = f"mnist_m/mnist_m_{split}/"
    pngs, text = {}, None
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            name = m.name[2:] if m.name.startswith("./") else m.name
            if name == f"mnist_m/mnist_m_{split}_labels.txt":
                text = tar.extractfile(m).read().decode()
            elif name.startswith(prefix):
                pngs[name[len(prefix):]] = tar.extractfile(m).read()
    if text is None:
        raise ValueError(f"mnist_m/mnist_m_{split}_labels.txt is not in the archive")
    return _mnistm_decode(pngs, text)


def _source_files(name, root, split, cache):
    """Files whose identity (path, size, mtime) keys the cache."""
    r = Path(root)
    cands = {
        "mnist": [r / "MNIST" / "raw"],
        "usps": [r / ("usps.bz2" if split == "train" else "usps.t.bz2")],
        "svhn": [r / SVHN_FILES[split][1]],
        "mnistm": [r / "mnist_m" / f"mnist_m_{split}_labels.txt", r / MNISTM_ARCHIVE, Path(cache) / MNISTM_ARCHIVE],
        "syndigits": [r / SYNDIGITS_FILES[split]],
    }[name]
    out = []
    for p in cands:
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.is_file())
        elif p.exists():
            out.append(p)
    return out


def _cache_path(name, split, size, channels, root, cache):
    """Cache file keyed by the source files' identity (path, size, mtime) and the conversion; None if no files."""
    files = _source_files(name, root, split, cache)
    ident = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    if not ident:
        return None
    key = hashlib.sha1(json.dumps([CACHE_VERSION, name, split, size, channels, ident]).encode()).hexdigest()[:16]
    return cache / f"{name}-{split}-{channels}x{size}-{key}.pt"


def resize_and_convert(x, size, channels):
    """uint8 [N, C, H, W] -> uint8 [N, channels, size, size]. Bilinear (antialiased when shrinking); gray->RGB by
    replication, RGB->gray with ITU-R 601 weights (as ADDA's rgb2gray)."""
    out = []
    for chunk in x.split(8192):
        c = chunk.float()
        if c.shape[1] == 3 and channels == 1:
            c = (c * torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if c.shape[-1] != size or c.shape[-2] != size:
            c = F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=c.shape[-1] > size)
        if c.shape[1] == 1 and channels == 3:
            c = c.expand(-1, 3, -1, -1)
        out.append(c.round().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out).contiguous()


def _read_cache(path, size, channels):
    """A cached split, or None when the file is unreadable or not what this conversion writes (it is decoded again)."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        x, y = d["x"], d["y"]
        ok = (x.dtype == torch.uint8 and x.dim() == 4 and tuple(x.shape[1:]) == (channels, size, size)
              and y.dtype == torch.int64 and y.shape == (len(x),) and len(x) > 0)
    except Exception:  # damaged, truncated, not a dict, ...
        ok = False
    if not ok:
        _warn(f"cache file {path} is unreadable or holds the wrong shapes; decoding the dataset again")
        return None
    return x, y


def load_split(name, split, size, channels, data_dir=None, cache_dir=None, download=True):
    """One dataset split as (uint8 [N, channels, size, size], int64 [N]) on the CPU; decoded once, then cached. A cache
    folder that cannot be written is used read-only (with a warning): the split is then decoded at every run."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    root = Path(data_dir or default_data_dir()).expanduser()
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    cached = _cache_path(name, split, size, channels, root, cache)
    if cached is not None and cached.exists():
        hit = _read_cache(cached, size, channels)
        if hit is not None:
            return hit
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    can_cache = cache.is_dir() and _writable(cache)
    t0 = time.time()
    try:
        if name == "mnist":
            x, y = _read_mnist(root, split, download, cache)
        elif name == "usps":
            x, y = _read_usps(root, split, download)
        elif name == "svhn":
            x, y = _read_svhn(root, split, download)
        elif name == "mnistm":
            x, y = _read_mnistm(root, split, download, cache)
        else:
            x, y = _read_syndigits(root, split)
    except DataError:
        raise
    except Exception as e:  # truncated archive, bad .mat, broken PNG, wrong md5 on download, ...
        raise DataError(f"could not read {name} {split} from {root} ({_one_line(e)}): "
                        f"the file is probably truncated or corrupt; delete it and fetch it again") from e
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"{name} {split} in {root} has {len(x)} images and {len(y)} labels; the files are inconsistent")
    if name == "mnistm" and len(x) != MNISTM_SIZES[split]:
        _warn(f"MNIST-M {split} has {len(x)} images, the original release has {MNISTM_SIZES[split]}")
    x = resize_and_convert(x, size, channels)
    cached = _cache_path(name, split, size, channels, root, cache)  # the files may have just been downloaded
    where = "not cached"
    if cached is not None and can_cache:
        try:
            atomic_torch_save({"x": x, "y": y}, cached)
            where = f"cached in {cache}"
        except OSError as e:
            _warn(f"could not write the cache file {cached} ({_one_line(e)}); continuing without it")
    elif cached is not None:
        _warn(f"the cache folder {cache} is not writable: {name} {split} is decoded at every run "
              f"(pass --cache-dir or set {CACHE_ENV} to a writable folder)")
    print(f"decoded {name} {split}: {tuple(x.shape)} in {time.time() - t0:.1f}s ({where})", flush=True)
    return x, y


# ---- 1b. folder tasks: your own images ----------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _listing(folder):
    """(image files, other files) below `folder` (hidden files and folders ignored), images in the order of their file
    names, then of their paths: numbered files keep their order whatever class folder they are in."""
    folder = Path(folder)
    files = [f for f in folder.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(folder).parts)]
    images = sorted((f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS), key=lambda f: (f.name, str(f)))
    return images, [f for f in files if f.suffix.lower() not in IMAGE_EXTENSIONS]


def _decode(path, size, channels):
    """One image file -> uint8 [channels, size, size]: converted to gray (L) or RGB, centre-cropped to a square and
    resized like the digit splits (resize_and_convert)."""
    from PIL import Image

    with Image.open(path) as img:
        a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    x = torch.from_numpy(a.copy()).view(a.shape[0], a.shape[1], -1).permute(2, 0, 1)
    h, w = x.shape[1:]
    s = min(h, w)
    x = x[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return resize_and_convert(x[None], size, channels)[0]


def load_folder(folder, size, channels, cache_dir, labelled, what):
    """A folder of images as (uint8 [N, channels, size, size], int64 labels, relative file names, class names).
    labelled: torchvision's ImageFolder layout, one sub-folder per class, classes in sorted order; otherwise any
    layout, and sub-folder names are never read (labels -1). Files that are not images, or that do not decode, are
    skipped with a warning that counts them. Decoded once and cached, keyed by every file's name, size and mtime."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{what} {folder} is not a folder")
    images, others = _listing(folder)
    rel = [str(f.relative_to(folder)) for f in images]
    if labelled:
        top = [r for r in rel if len(Path(r).parts) < 2]
        if top:
            raise DataError(f"{what} {folder} must hold one sub-folder of images per class (torchvision's ImageFolder "
                            f"layout), but has images at its top level (e.g. {top[0]})")
    classes = sorted({Path(r).parts[0] for r in rel}) if labelled else []
    ident = [(r, f.stat().st_size, f.stat().st_mtime_ns) for r, f in zip(rel, images)]
    key = hashlib.sha1(json.dumps([CACHE_VERSION, "folder", str(folder.resolve()), labelled, size, channels,
                                   ident]).encode()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    cached = cache / f"folder-{folder.name}-{channels}x{size}-{key}.pt"
    if cached.exists():
        try:
            d = torch.load(cached, map_location="cpu", weights_only=True)
            if d["x"].dtype == torch.uint8 and tuple(d["x"].shape[1:]) == (channels, size, size) and len(d["files"]) == len(d["x"]):
                return d["x"], d["y"], d["files"], d["classes"]
        except Exception:
            pass
        _warn(f"cache file {cached} is unreadable or holds the wrong shapes; decoding {folder} again")
    t0 = time.time()
    xs, keep, bad = [], [], []
    for i, f in enumerate(images):
        try:
            xs.append(_decode(f, size, channels))
            keep.append(i)
        except Exception:
            bad.append(rel[i])
    if others or bad:
        _warn(f"{what} {folder}: skipped {len(others) + len(bad)} file(s): {len(others)} not images by their extension"
              + (f" (e.g. {others[0].relative_to(folder)})" if others else "") + f", {len(bad)} unreadable"
              + (f" (e.g. {bad[0]})" if bad else ""))
    if not xs:
        raise DataError(f"{what} {folder} has no readable images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    rel = [rel[i] for i in keep]
    y = torch.tensor([classes.index(Path(r).parts[0]) for r in rel] if labelled else [-1] * len(rel), dtype=torch.long)
    if labelled and len(set(y.tolist())) < 2:
        raise DataError(f"{what} {folder} has images of {len(set(y.tolist()))} class: classification needs at least two "
                        "class sub-folders with images")
    classes = [c for c in classes if any(Path(r).parts[0] == c for r in rel)] if labelled else []
    if labelled:  # classes left without readable images drop out of the class list
        y = torch.tensor([classes.index(Path(r).parts[0]) for r in rel], dtype=torch.long)
    x = torch.stack(xs)
    if _writable(cache) and (cache.is_dir() or not cache.exists()):
        try:
            cache.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"x": x, "y": y, "files": rel, "classes": classes}, cached)
        except OSError as e:
            _warn(f"could not write the cache file {cached} ({_one_line(e)}); continuing without it")
    print(f"decoded {what} {folder}: {tuple(x.shape)}{f', {len(classes)} classes' if labelled else ''} in "
          f"{time.time() - t0:.1f}s", flush=True)
    return x, y, rel, classes


NATIVE = {"mnist": (28, 1), "usps": (16, 1), "svhn": (32, 3), "syndigits": (32, 3), "mnistm": (32, 3)}  # size, channels


def export_digits(task, out_dir, data_dir=None, cache_dir=None):
    """Write a digit task as image folders, the layout of a folder task (a worked example of your own data):
    out/<source>/{train,test}/<class>/<index>.png, out/<target>/train/<index>.png (unlabelled: no class folders) and
    out/<target>/test/<class>/<index>.png, each image at its dataset's own size. Then
        python dann.py --source-dir out/mnist/train --source-test-dir out/mnist/test --target-dir out/usps/train \\
                       --target-test-dir out/usps/test --backbone lenet
    trains on the same images in the same order as `python dann.py --task mnist-usps` (numbered file names keep it)."""
    from PIL import Image

    if task not in TASKS:
        raise UsageError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    for role, name in zip(("source", "target"), TASKS[task]):
        for split in ("train", "test"):
            x, y = load_split(name, split, *NATIVE[name], data_dir, cache_dir)
            base = Path(out_dir) / name / split
            for i, (img, label) in enumerate(zip(x, y.tolist())):
                folder = base if (role, split) == ("target", "train") else base / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                a = img.permute(1, 2, 0).numpy()
                Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(folder / f"{i:05d}.png")
            print(f"wrote {len(x)} images to {base}", flush=True)


class Domain:
    """One domain's splits as device tensors (uint8 images, int64 labels; -1 where there are none). `classes`: the
    class names; `files`: the train images' relative paths (folder tasks); `test_split`: what the test tensors hold
    ('test', or 'train' when a folder task has no test folder for the source); `val_x`/`val_y`: --target-val."""

    def __init__(self, name, train, test, device, classes, files=None, test_split="test"):
        self.name, self.classes, self.files, self.test_split = name, list(classes), files, test_split
        (self.train_x, self.train_y), (self.test_x, self.test_y) = [(x.to(device), y.to(device)) for x, y in (train, test)]
        self.val_x = self.val_y = None

    def __repr__(self):
        val = f", val={len(self.val_x)}" if self.val_x is not None else ""
        return f"{self.name}(train={len(self.train_x)}, test={len(self.test_x)}{val}, image={tuple(self.train_x.shape[1:])})"


def load_task(args, size, channels, device):
    """(source Domain, target Domain) for args.task (a digit task such as 'mnist-usps'), or for the folders of a folder
    task (--source-dir, --target-dir, --target-test-dir, --source-test-dir); then --target-val's hold-out."""
    if args.task == "folder":
        cache = args.cache_dir
        sx, sy, sfiles, classes = load_folder(args.source_dir, size, channels, cache, True, "--source-dir")
        if args.source_test_dir:
            vx, vy, _, vclasses = load_folder(args.source_test_dir, size, channels, cache, True, "--source-test-dir")
            if vclasses != classes:
                raise DataError(f"--source-test-dir classes {vclasses} are not --source-dir's {classes}")
            src = Domain(Path(args.source_dir).name, (sx, sy), (vx, vy), device, classes, sfiles)
        else:  # no source test images: source accuracy is measured on the training images (the summary says so)
            src = Domain(Path(args.source_dir).name, (sx, sy), (sx, sy), device, classes, sfiles, test_split="train")
        tx, ty, tfiles, _ = load_folder(args.target_dir, size, channels, cache, False, "--target-dir")
        if args.target_test_dir:
            ex, ey, _, eclasses = load_folder(args.target_test_dir, size, channels, cache, True, "--target-test-dir")
            if eclasses != classes:
                raise DataError(f"--target-test-dir classes {eclasses} are not --source-dir's {classes}: "
                                "the target test folder needs the source's class sub-folders, with the same names")
        else:  # no target labels at all: no target accuracy (the summary says so); predictions are still written
            ex, ey = tx[:0], ty[:0]
        tgt = Domain(Path(args.target_dir).name, (tx, ty), (ex, ey), device, classes, tfiles,
                     test_split="test" if args.target_test_dir else "none")
    else:
        if args.task not in TASKS:
            raise UsageError(f"unknown task '{args.task}'; choose from {', '.join(TASKS)}")
        src, tgt = (Domain(name, *[load_split(name, s, size, channels, args.data_dir, args.cache_dir, not args.no_download)
                                   for s in ("train", "test")], device, [str(c) for c in range(10)])
                    for name in TASKS[args.task])
    if getattr(args, "target_val", 0):
        if args.target_val >= len(tgt.train_x):
            raise UsageError(f"--target-val {args.target_val} must be smaller than the target train split "
                             f"({len(tgt.train_x)} images)")
        # a fixed draw (not the run's seed): every run and seed is validated on the same images
        perm = torch.randperm(len(tgt.train_x), generator=torch.Generator().manual_seed(0)).to(tgt.train_x.device)
        val, rest = perm[:args.target_val], perm[args.target_val:].sort().values
        tgt.val_x, tgt.val_y = tgt.train_x[val], tgt.train_y[val]
        tgt.train_x, tgt.train_y = tgt.train_x[rest], tgt.train_y[rest]
    return src, tgt


# ---- 1c. batching on the device -----------------------------------------------------------------------------------


class IndexSampler:
    """Endless batches of indices into a tensor of n items: a fresh permutation per epoch, every index exactly once
    per epoch (batches straddle epoch boundaries, nothing is dropped). Lives on the device: no host sync."""

    def __init__(self, n, batch_size, device, generator):
        self.n, self.batch_size, self.device, self.g = n, batch_size, device, generator
        self.perm, self.pos = self._new_perm(), 0

    def _new_perm(self):
        return torch.randperm(self.n, device=self.device, generator=self.g)

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()

    def next(self):
        parts, need = [], self.batch_size
        while need > 0:
            if self.pos == self.n:
                self.perm, self.pos = self._new_perm(), 0
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self):  # the generator is shared between samplers: its state is saved on its own
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state):
        if len(state["perm"]) != self.n:
            raise ValueError(f"sampler over {len(state['perm'])} items, this run has {self.n}")
        self.perm, self.pos = state["perm"].to(self.device), state["pos"]


INPUT_RANGES = ("-1,1", "0,1")


def to_float(x_uint8, input_range="-1,1"):
    """uint8 [0, 255] -> float in [-1, 1] (default: mean 0.5 / std 0.5, as most digit UDA code) or [0, 1]."""
    if input_range == "-1,1":
        return x_uint8.float().mul_(2.0 / 255.0).sub_(1.0)
    return x_uint8.float().mul_(1.0 / 255.0)


def random_affine(x, max_translate=0.1, max_rotate_deg=10.0, generator=None):
    """Random translation (fraction of the image side) and rotation per image, on the device via affine_grid.
    x: float [N, C, H, W] in [-1, 1]; out-of-image pixels copy the border."""
    n = x.shape[0]
    u = torch.rand(n, 3, device=x.device, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(max_rotate_deg)
    tx, ty = u[:, 1] * max_translate * 2, u[:, 2] * max_translate * 2  # affine_grid spans [-1, 1]: side = 2
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------
# 2. Backbones
# ----------------------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """features: image -> feature vector; classifier: feature vector -> class logits. Every layer is named, so
    `activations(x)` returns each layer's output by name (GAM matches intermediate activations)."""

    def __init__(self, name, in_channels, size, features, classifier):
        super().__init__()
        self.name, self.in_channels, self.size = name, in_channels, size
        self.features, self.classifier = nn.Sequential(features), nn.Sequential(classifier)
        with torch.no_grad():
            self.feature_dim = self.features.eval()(torch.zeros(2, in_channels, size, size)).shape[1]
        self.features.train()

    def forward(self, x):
        return self.classifier(self.features(x))

    def activations(self, x):
        acts = OrderedDict()
        for seq in (self.features, self.classifier):
            for name, layer in seq.named_children():
                x = layer(x)
                acts[name] = x
        return acts


def lenet(num_classes=10):
    """ADDA/CyCADA LeNet, 28x28x1: conv5-20, pool, ReLU, conv5-50, Dropout2d, pool, ReLU, fc500, ReLU, Dropout | fc10."""
    return Backbone("lenet", 1, 28, OrderedDict(
        conv1=nn.Conv2d(1, 20, 5), pool1=nn.MaxPool2d(2), relu1=nn.ReLU(),
        conv2=nn.Conv2d(20, 50, 5), drop2=nn.Dropout2d(0.5), pool2=nn.MaxPool2d(2), relu2=nn.ReLU(),
        flatten=nn.Flatten(), fc3=nn.Linear(800, 500), relu3=nn.ReLU(), drop3=nn.Dropout(0.5),
    ), OrderedDict(fc4=nn.Linear(500, num_classes)))


def dtn(num_classes=10):
    """CyCADA/Calibrator DTN, 32x32x3: three conv5 stride-2 (64/128/256) + BN + Dropout2d(0.1/0.3/0.5) + ReLU,
    fc512 + BN + ReLU + Dropout | fc10 (about 3.1M parameters)."""
    layers = OrderedDict()
    for i, (cin, cout, p) in enumerate([(3, 64, 0.1), (64, 128, 0.3), (128, 256, 0.5)], 1):
        layers[f"conv{i}"] = nn.Conv2d(cin, cout, 5, stride=2, padding=2)
        layers[f"bn{i}"] = nn.BatchNorm2d(cout)
        layers[f"drop{i}"] = nn.Dropout2d(p)
        layers[f"relu{i}"] = nn.ReLU()
    layers.update(flatten=nn.Flatten(), fc4=nn.Linear(256 * 4 * 4, 512), bn4=nn.BatchNorm1d(512), relu4=nn.ReLU(),
                  drop4=nn.Dropout(0.5))
    return Backbone("dtn", 3, 32, layers, OrderedDict(fc5=nn.Linear(512, num_classes)))


def dann_mnist(num_classes=10):
    """DANN paper, MNIST->MNIST-M, 32x32x3: conv5-32, ReLU, pool 2/2, conv5-48, ReLU, pool 2/2 (1200-d features) |
    fc100, ReLU, fc100, ReLU, fc10."""
    return Backbone("dann_mnist", 3, 32, OrderedDict(
        conv1=nn.Conv2d(3, 32, 5), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 48, 5), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2), flatten=nn.Flatten(),
    ), OrderedDict(fc3=nn.Linear(48 * 5 * 5, 100), relu3=nn.ReLU(), fc4=nn.Linear(100, 100), relu4=nn.ReLU(),
                   fc5=nn.Linear(100, num_classes)))


def dann_svhn(num_classes=10):
    """DANN paper, SVHN->MNIST and SynDigits->SVHN, 32x32x3: conv5-64, ReLU, maxpool 3/2, conv5-64, ReLU,
    maxpool 3/2, conv5-128, ReLU (SAME padding as the TF re-implementation; 8192-d features) |
    fc3072, ReLU, fc2048, ReLU, fc10."""
    return Backbone("dann_svhn", 3, 32, OrderedDict(
        conv1=nn.Conv2d(3, 64, 5, padding=2), relu1=nn.ReLU(), pool1=nn.MaxPool2d(3, 2, padding=1),
        conv2=nn.Conv2d(64, 64, 5, padding=2), relu2=nn.ReLU(), pool2=nn.MaxPool2d(3, 2, padding=1),
        conv3=nn.Conv2d(64, 128, 5, padding=2), relu3=nn.ReLU(), flatten=nn.Flatten(),
    ), OrderedDict(fc4=nn.Linear(128 * 8 * 8, 3072), relu4=nn.ReLU(), fc5=nn.Linear(3072, 2048), relu5=nn.ReLU(),
                   fc6=nn.Linear(2048, num_classes)))


class ImageNetNormalize(nn.Module):
    """[-1, 1] pixels (the scripts' convention) -> ImageNet's mean/std normalisation, as torchvision's weights expect."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return ((x + 1) / 2 - self.mean) / self.std


def pretrained_weights_path(name):
    """Where torchvision keeps the ImageNet weights of resnet18 / resnet50 (the torch hub cache)."""
    import torchvision

    weights = {"resnet18": torchvision.models.ResNet18_Weights, "resnet50": torchvision.models.ResNet50_Weights}[name]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.IMAGENET1K_V1.url)


def resnet(name, num_classes=10, image_size=224, pretrained=False):
    """torchvision's ResNet-18/50 (RGB, any size >= 32), split into features (ImageNet normalisation, convs, global
    average pool: 512 / 2048-d) and a new fc classifier. `pretrained` loads torchvision's ImageNet weights from the
    local torch hub cache, and fails if they are not there (never a silent random initialisation)."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if pretrained:
        path = pretrained_weights_path(name)
        if not path.exists():
            raise DataError(f"--pretrained: the ImageNet weights of {name} are not in the torch cache ({path}); fetch "
                            f"them once with `python -c \"import torchvision; torchvision.models.{name}(weights="
                            f"'IMAGENET1K_V1')\"` where there is internet, or drop --pretrained (random initialisation)")
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise DataError(f"--pretrained: {path} is not {name}'s ImageNet state dict ({_one_line(e)}); delete it")
    features = OrderedDict(normalize=ImageNetNormalize(), conv1=net.conv1, bn1=net.bn1, relu=net.relu,
                           maxpool=net.maxpool, layer1=net.layer1, layer2=net.layer2, layer3=net.layer3,
                           layer4=net.layer4, avgpool=net.avgpool, flatten=nn.Flatten())
    return Backbone(name, 3, image_size, features, OrderedDict(fc=nn.Linear(net.fc.in_features, num_classes)))


DIGIT_BACKBONES = {"lenet": (lenet, 1, 28), "dtn": (dtn, 3, 32), "dann_mnist": (dann_mnist, 3, 32),
                   "dann_svhn": (dann_svhn, 3, 32)}  # name -> (factory, input channels, input size)
BACKBONES = tuple(DIGIT_BACKBONES) + ("resnet18", "resnet50")


def backbone_input(name, image_size=0):
    """(channels, size) of a backbone's input; for a ResNet, `image_size` (0: 224)."""
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone '{name}'; choose from {', '.join(BACKBONES)}")
    if name in DIGIT_BACKBONES:
        return DIGIT_BACKBONES[name][1:]
    return 3, image_size or 224


def build_backbone(name, num_classes=10, image_size=0, pretrained=False):
    channels, size = backbone_input(name, image_size)
    if name in DIGIT_BACKBONES:
        if pretrained:
            raise UsageError(f"--pretrained: there are no pretrained weights for {name}; use resnet18 or resnet50")
        return DIGIT_BACKBONES[name][0](num_classes)
    return resnet(name, num_classes, size, pretrained)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# 3. Evaluation and label-free validators
# ----------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def logits(model, x_uint8, batch_size=4096, amp=False, input_range="-1,1"):
    """The model's outputs (float32) for uint8 images, in big batches, in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    out = []
    with autocast(x_uint8.device, amp):
        for chunk in x_uint8.split(batch_size):
            out.append(model(to_float(chunk, input_range)).float())
    model.train(was_training)
    return torch.cat(out)


def predict(model, x_uint8, batch_size=4096, amp=False, input_range="-1,1"):
    """Predicted labels for uint8 images (see logits)."""
    return logits(model, x_uint8, batch_size, amp, input_range).argmax(1)


def accuracy(model, x_uint8, y, batch_size=4096, amp=False, input_range="-1,1"):
    """Top-1 accuracy in percent (a Python float: one host sync); NaN for no images (a folder task without labels)."""
    if len(y) == 0:
        return float("nan")
    return (predict(model, x_uint8, batch_size, amp, input_range) == y).float().mean().item() * 100.0


# Label-free model selection: every score "higher is better", none reads a target label.
VALIDATORS = ("source_val_acc", "entropy", "im", "bnm", "snd")
SELECTION_IMAGES = 2000  # target training images the scores are computed on (a fixed subset, the same every run)


def validator_scores(target_logits, source_val_acc=float("nan"), tau=0.05):
    """Label-free scores of a model from its outputs (as ranked by Musgrave, Belongie & Lim, arXiv 2208.07360).
    source_val_acc: accuracy on held-out labelled source images (given). From the target logits (N x C), with
    P = softmax and H the entropy: entropy = -mean_i H(p_i); im = H(mean_i p_i) - mean_i H(p_i) (information
    maximisation: confident and class-balanced); bnm = ||P||_* / N (nuclear norm, Cui et al., CVPR 2020); snd = soft
    neighbourhood density (Saito et al., ICCV 2021): rows of P L2-normalised, S = P P^T / tau with the diagonal
    masked, row softmax, mean row entropy."""
    p = F.softmax(target_logits.float(), 1)
    ent = lambda q: -torch.special.xlogy(q, q).sum(-1)  # noqa: E731  (0 log 0 = 0)
    h = ent(p).mean()
    q = F.normalize(p, dim=1)
    s = (q @ q.t() / tau).fill_diagonal_(float("-inf"))
    return {"source_val_acc": float(source_val_acc), "entropy": float(-h), "im": float(ent(p.mean(0)) - h),
            "bnm": float(torch.linalg.matrix_norm(p, "nuc") / len(p)), "snd": float(ent(F.softmax(s, 1)).mean())}


def evaluate_domains(model, src, tgt, final=False, source_model=None, **ev):
    """Target test and source test accuracy of `model` (and the --target-val accuracy): during training a curve
    ('target_test_acc_curve', never used for selection), at the end the final model's ('target_test_acc').
    `source_model`, if given, is the model the method applies to source images (PixelDA's private source tower).
    Beside them the label-free validators (validator_scores) on SELECTION_IMAGES target *training* images, and
    source_val_acc = the source test accuracy (held-out labelled source images). Returns numbers, writes nothing
    (Run.keep_best saves the model a validator prefers)."""
    rec = {"target_test_acc" if final else "target_test_acc_curve": accuracy(model, tgt.test_x, tgt.test_y, **ev),
           "source_test_acc": accuracy(source_model or model, src.test_x, src.test_y, **ev)}
    if tgt.val_x is not None:
        rec["target_val_acc"] = accuracy(model, tgt.val_x, tgt.val_y, **ev)
    if len(tgt.train_x) > 1:
        pick = torch.randperm(len(tgt.train_x), generator=torch.Generator().manual_seed(0))[:SELECTION_IMAGES]
        rec.update(validator_scores(logits(model, tgt.train_x[pick.to(tgt.train_x.device)], **ev),
                                    rec["source_test_acc"]))
    return rec


def selection(run_dir):
    """The summary's `selection` block, from metrics.jsonl's evaluations (every --eval-every and the final one):
    for `final` and for each validator the step it picks (argmax of its score; NaN never picked, the earliest of
    equal scores) and the target test accuracy there; `oracle` picks by that accuracy itself, which reads the
    target test labels: for reference only."""
    path = Path(run_dir) / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    recs = [dict(r, acc=r.get("target_test_acc", r.get("target_test_acc_curve"))) for r in recs
            if "target_test_acc" in r or "target_test_acc_curve" in r]
    if not recs:
        return None
    pick = lambda r, score=None: {"step": r["step"], "target_acc": r["acc"],  # noqa: E731
                                  **({"score": round(r[score], 5)} if score else {})}
    out = {"final": pick(recs[-1])}
    for v in VALIDATORS:
        cands = [r for r in recs if isinstance(r.get(v), (int, float)) and math.isfinite(r[v])]
        out[v] = pick(max(cands, key=lambda r: r[v]), v) if cands else None
    labelled = [r for r in recs if isinstance(r["acc"], (int, float))]
    out["oracle"] = dict(pick(max(labelled, key=lambda r: r["acc"])), uses_target_test_labels=True) if labelled else None
    return out


@torch.inference_mode()
def class_shares(model, src, tgt, batch_size=4096, amp=False, input_range="-1,1"):
    """The model on the target training images, a check that needs no target label. Returns (shares, the predicted
    class of each image, its confidence); shares, for the summary: the share of those images predicted as each class
    beside each class's share of the source labels, and the classes whose predicted share is under a third of their
    source share. Adversarial alignment can map all of one class's target images onto another class (GAM U->M: a
    run that reads most MNIST 7s as 9s gives 7 1.6 % of the predictions against 8.8 % of the USPS labels). A hint,
    not a verdict: the target's own class balance can differ (0 is 16.4 % of USPS, 9.9 % of MNIST). Writes nothing
    (Run.predictions reports it)."""
    was_training = model.training
    model.eval()
    probs = []
    with autocast(tgt.train_x.device, amp):
        for chunk in tgt.train_x.split(batch_size):
            probs.append(F.softmax(model(to_float(chunk, input_range)).float(), 1))
    model.train(was_training)
    conf, pred = torch.cat(probs).max(1)
    k = len(src.classes)
    pred_share = (torch.bincount(pred, minlength=k).double() / max(1, len(pred)) * 100).tolist()
    source_share = (torch.bincount(src.train_y, minlength=k).double() / max(1, len(src.train_y)) * 100).tolist()
    emptied = [c for c, p, s in zip(src.classes, pred_share, source_share) if p < s / 3]
    return ({"target_pred_share": [round(v, 2) for v in pred_share],
             "source_label_share": [round(v, 2) for v in source_share], "emptied_classes": emptied}, pred, conf)


# ----------------------------------------------------------------------------------------------------------------
# 4. Running: flags, seeding and device, run folder and logging, checkpoints, stage 1, the end of a run
# ----------------------------------------------------------------------------------------------------------------


# ---- 4a. the flags every script shares (one definition: names, help texts and defaults cannot drift) --------------


class UsageError(ValueError):
    """An impossible flag combination or an unknown name. The message says what to do."""


def add_shared_args(p, *, task, steps, steps_help, log_every, eval_every, input_range=None):
    """Add the `run` and `data` groups that every script has. The arguments are the per-script defaults (the method's
    own default task and schedule); `input_range` adds --input-range for the scripts whose networks can take either
    pixel range. Returns the data group, for a script's own data flags."""
    g = p.add_argument_group("run")
    g.add_argument("--task", default=task, help=f"source-target pair: {', '.join(TASKS)} (or --source-dir ...)")
    g.add_argument("--seed", type=int, default=0, help="random seed (weights, batches, every random draw)")
    g.add_argument("--steps", type=int, default=steps, help=steps_help)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast in training and evaluation (CUDA only)")
    g.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the networks' forward passes, in torch.compile's MODE (default when only "
                        "--compile is given; reduce-overhead adds torch's own CUDA graphs of each compiled network's "
                        "forward and backward passes, not of the optimisers)")
    g.add_argument("--cuda-graph", default="off", choices=GRAPH_MODES,
                   help="on: record the training step once as a CUDA graph and replay it (CUDA only; these small "
                        "networks are bound by kernel launches); check: the recorded path's checks on any device, "
                        "without a graph (slow; for testing)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    g.add_argument("--out", default="runs", help="parent folder of the run folder")
    g.add_argument("--log-every", type=int, default=log_every, help="progress line + metrics.jsonl record every N steps")
    g.add_argument("--eval-every", type=int, default=eval_every,
                   help="log the target test accuracy curve every N steps (never used for selection; 0: only at the end)")
    g.add_argument("--ckpt-every", type=int, default=5000,
                   help="save a resumable checkpoint.pt in the run folder every N steps (0: never)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a stopped run from its last checkpoint, with its own flags (only --device, "
                        "--threads, --data-dir, --cache-dir and --no-download may change)")
    g.add_argument("--no-save-model", action="store_true", help="do not write the model files")
    g.add_argument("--keep-best", default=None, metavar="VALIDATOR",
                   help="also save model_best.pt whenever this label-free score improves at an evaluation: "
                        "source_val_acc, entropy, im, bnm or snd (summary.json's `selection` says what each picks)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write metrics.jsonl's scalars and the image grids as TensorBoard events in the run folder "
                        "(`tensorboard --logdir runs`; needs `pip install tensorboard`)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=default_data_dir(), help="dataset root (env UDA_DATA_DIR, else ./data)")
    g.add_argument("--cache-dir", default=None, help="decoded-tensor cache (env UDA_CACHE_DIR, else ~/.cache/uda-digits)")
    g.add_argument("--no-download", action="store_true", help="never fetch data: fail if it is not on disk")
    g.add_argument("--eval-batch-size", type=int, default=4096, help="batch size for evaluation")
    g.add_argument("--source-dir", default=None, help="your own data instead of --task: labelled source images, one "
                   "sub-folder per class (torchvision's ImageFolder layout)")
    g.add_argument("--target-dir", default=None, help="with --source-dir: the unlabelled target images, any layout "
                   "(sub-folder names are never read as labels); predictions.csv holds the final model's predictions")
    g.add_argument("--target-test-dir", default=None, help="with --source-dir: labelled target test images, one "
                   "sub-folder per class with the source's class names (without it no target accuracy is reported)")
    g.add_argument("--source-test-dir", default=None, help="with --source-dir: labelled source test images (without "
                   "it the source accuracy is measured on the source training images)")
    g.add_argument("--target-val", type=int, default=0, help="hold out N labelled images of the target *train* split "
                   "(never the test split; a fixed draw, the same for every seed): they leave the adaptation data and "
                   "give a target_val_acc curve, for choosing hyperparameters between runs (digit tasks only)")
    if input_range is not None:
        g.add_argument("--input-range", default=input_range, choices=INPUT_RANGES, help="pixel range the networks see")
    return g


RESUME_MAY_CHANGE = ("device", "threads", "data_dir", "cache_dir", "no_download", "resume", "tensorboard")


def parse(p, argv=None):
    """Parse the flags; with --resume, the stopped run's own flags (its args.json) replace them, except the few that
    describe the machine rather than the run (RESUME_MAY_CHANGE)."""
    argv, joined = list(sys.argv[1:] if argv is None else argv), []
    while argv:  # argparse would take the value "-1,1" for a flag: join it to its option
        a = argv.pop(0)
        joined.append(f"{a}={argv.pop(0)}" if a == "--input-range" and argv and argv[0] in INPUT_RANGES else a)
    args = p.parse_args(joined)
    if args.keep_best is not None and args.keep_best not in VALIDATORS:
        raise UsageError(f"--keep-best '{args.keep_best}' is not a validator: choose from {', '.join(VALIDATORS)}")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if args.resume:
        run_dir = Path(args.resume)
        if (run_dir / "summary.json").exists():
            raise UsageError(f"--resume {run_dir}: that run has finished (summary.json exists)")
        for need, what in (("args.json", "is not a run folder"), ("checkpoint.pt", "has no checkpoint to resume from")):
            if not (run_dir / need).is_file():
                raise UsageError(f"--resume {run_dir} {what} (no {need}); runs save one every --ckpt-every steps")
        try:
            saved = json.loads((run_dir / "args.json").read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--resume {run_dir}: args.json is unreadable ({_one_line(e)})")
        known = vars(p.parse_args([]))
        for k, v in saved.items():
            if k in known and k not in RESUME_MAY_CHANGE:
                setattr(args, k, v)
    return args


def flag(name):
    return "--" + name.replace("_", "-")


class Flags(argparse.ArgumentParser):
    """A script's command line: the `run` and `data` flags every script shares (add_shared_args, with the script's
    defaults), then the script's own groups (`add_argument_group`); `parse` reads them (parse) and checks the ranges
    (check_args)."""

    def __init__(self, doc, **defaults):
        super().__init__(description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        self.data = add_shared_args(self, **defaults)  # the data group, for a script's own data flags

    def parse(self, argv=None, **ranges):
        args = parse(self, argv)
        check_args(args, **ranges)
        return args


def check_args(args, positive=(), at_least_one=(), non_negative=()):
    """UsageError for the first flag out of its range. The shared flags are always checked; a script names its own
    (attribute names). None (an unresolved 'task default') is skipped. Runs before any data is read or folder made."""
    at_least_one = ("steps", "log_every", "eval_batch_size") + tuple(at_least_one)
    non_negative = ("eval_every", "threads", "ckpt_every", "target_val") + tuple(non_negative)
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (at_least_one, lambda v: v >= 1, ">= 1"),
                            (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            v = getattr(args, name)
            if v is not None and not ok(v):  # `not ok` also catches NaN
                raise UsageError(f"{flag(name)} must be {what} (got {v})")
    folders = [f for f in ("source_dir", "target_dir", "target_test_dir", "source_test_dir") if getattr(args, f)]
    if args.source_dir or args.task == "folder":  # a folder task replaces --task
        if not (args.source_dir and args.target_dir):
            raise UsageError("a folder task needs both --source-dir (labelled, one sub-folder per class) and --target-dir")
        for f in folders:
            if not Path(getattr(args, f)).expanduser().is_dir():
                raise UsageError(f"{flag(f)} {getattr(args, f)} is not a folder")
        if args.target_val:
            raise UsageError("--target-val needs labelled target training images: it works with the digit tasks only")
        args.task = "folder"
    elif folders:
        raise UsageError(f"{flag(folders[0])} goes with --source-dir (a folder task)")
    elif args.task not in TASKS:
        raise UsageError(f"unknown task '{args.task}'; choose from {', '.join(TASKS)}, or your own folders with "
                         "--source-dir and --target-dir")
    if not args.resume and not _writable(args.out):
        raise UsageError(f"--out {args.out}: that folder cannot be written here; pass --out to a writable folder")


# ---- 4b. seeding, device, autocast, --compile ---------------------------------------------------------------------


def seed_everything(seed, deterministic=False):
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UsageError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device '{name}'; choose auto, cpu, cuda or mps")
    return torch.device(name)


def setup_torch(args):
    """Threads, seeding, device and the --amp / --cuda-graph checks shared by every script. Returns the device."""
    if args.cuda_graph != "off" and args.compile:
        raise UsageError("--cuda-graph and --compile are two ways to cut the launch overhead: use one of them")
    if args.cuda_graph == "on" and args.deterministic:  # (not every deterministic kernel is known to be recordable)
        raise UsageError("--cuda-graph on and --deterministic are not checked together: drop one of them")
    if args.cuda_graph == "on":  # what the recorded steps use that older torch releases lack
        lacks = [n for n, ok in (("CUDAGraph.register_generator_state",
                                  hasattr(torch.cuda.CUDAGraph, "register_generator_state")),
                                 ("SGD(fused=True)", "fused" in inspect.signature(torch.optim.SGD).parameters)) if not ok]
        if lacks:
            raise UsageError(f"--cuda-graph on needs a newer torch than {torch.__version__} (it lacks "
                             f"{', '.join(lacks)}): upgrade torch, or drop --cuda-graph")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    if args.amp and device.type != "cuda":
        raise UsageError("--amp (bf16 autocast) is only supported on CUDA; drop --amp or use --device cuda")
    if args.cuda_graph == "on" and device.type != "cuda":
        raise UsageError("--cuda-graph on records CUDA graphs: it needs --device cuda (--cuda-graph check runs its "
                         "checks on any device)")
    seed_everything(args.seed, args.deterministic)
    return device


def autocast(device, enabled):
    # (no cast cache: a recorded step must cast the weights it has just updated, and the cache saves little here)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False) \
        if enabled and device.type == "cuda" else nullcontext()


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def maybe_compile(fn, mode):
    """With --compile [MODE]: a module is compiled in place (Module.compile: its state dict keeps its plain keys, so
    saved models load into an uncompiled network), a function through torch.compile. Without it: fn itself. (A run
    resumed from before --compile took a mode has True here: the default mode.)"""
    if not mode:
        return fn
    kwargs = {} if mode in (True, "default") else {"mode": mode}
    if isinstance(fn, nn.Module):
        fn.compile(**kwargs)
        return fn
    return torch.compile(fn, **kwargs)


# ---- 4c. run folder, atomic writes, the training-loop meter ------------------------------------------------------


def make_run_dir(args, method):
    """runs/<method>__<task>__<seed>__<time>/, created race-free (mkdir without exist_ok; a taken name gets a suffix);
    with --resume, the stopped run's own folder."""
    if args.resume:
        return Path(args.resume)
    base = Path(args.out) / f"{method}__{args.task}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for k in range(1000):
            path = base if k == 0 else Path(f"{base}-{k}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot create the run folder ({_one_line(e)}); pass --out to a writable folder")
    raise UsageError(f"--out {args.out}: 1000 run folders named {base.name} already exist")


def write_args(run_dir, args, **resolved):
    """args.json: every flag with the value actually used (derived defaults already resolved) plus `resolved`."""
    if not args.resume:  # a resumed run keeps the record it started with
        atomic_write_json(dict(vars(args), **resolved), Path(run_dir) / "args.json")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path, write):
    """Write to a temporary file in the same folder, then rename: readers never see half a file. The file gets the
    normal permissions of a new file (0666 minus the umask), not mkstemp's private 0600, so a shared cache works."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path):
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


class Meter:
    """The training loop's bookkeeping in two lines per step: `add` sums device scalars on the device (no host sync),
    `step` prints a progress line and appends a metrics.jsonl record every `log_every` steps, and every `eval_every`
    steps calls `evaluate()` (its time is not counted as training time) and records what it returns. With
    `tensorboard`, every record's numbers (and `image`'s grids) also go to TensorBoard events in the run folder.

        step 1200/20000 | loss_y 0.3102 loss_d 0.6913 lam 0.2911 lr 0.007031 | 41.2 steps/s | ETA 7m36s
    """

    def __init__(self, run_dir, total, log_every, eval_every=0, prefix="", tensorboard=False):
        self.total, self.log_every, self.eval_every, self.prefix = total, log_every, eval_every, prefix
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self.sums, self.n, self.train_seconds, self.records = {}, 0, 0.0, 0
        self.tb = None
        if tensorboard and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: parse() checked it is there
            self.tb = SummaryWriter(str(run_dir))
        self.t0 = time.time()

    def add(self, **scalars):
        for k, v in scalars.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n += 1

    def step(self, step, evaluate=None, **values):
        """values: host-side numbers for the record (a schedule's lambda, the learning rate, ...)."""
        if step % self.log_every == 0 or step == self.total:
            self.train_seconds += time.time() - self.t0
            means = dict(zip(self.sums, (torch.stack(list(self.sums.values())) / self.n).tolist())) if self.sums else {}
            rate = step / max(self.train_seconds, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in {**means, **values}.items())
            print(f"{self.prefix}step {step}/{self.total} | {shown} | {rate:.1f} steps/s | "
                  f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            self.write(step=step, **means, **values, steps_per_sec=rate)
            self.sums, self.n, self.t0 = {}, 0, time.time()
        if evaluate is not None and self.eval_every and step % self.eval_every == 0 and step != self.total:
            self.train_seconds += time.time() - self.t0
            rec = evaluate()
            print("  eval | " + " ".join(f"{k} {v:.2f}" for k, v in rec.items()), flush=True)
            self.write(step=step, **rec)
            self.t0 = time.time()

    def write(self, **record):
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(_no_nan(record)) + "\n")
            self.records += 1
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def image(self, tag, png_path, step):
        """A saved image grid (PNG) as a TensorBoard image, with --tensorboard."""
        if self.tb is not None:
            from PIL import Image
            with Image.open(png_path) as im:
                img = np.asarray(im.convert("RGB"))
            self.tb.add_image(tag, img, step, dataformats="HWC")
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()

    @property
    def steps_per_sec(self):
        return round(self.total / max(self.train_seconds, 1e-9), 2)

    def state_dict(self):
        return {"sums": dict(self.sums), "n": self.n, "train_seconds": self.train_seconds, "records": self.records}

    def load_state_dict(self, state):
        """Restore the window and the clock; metrics.jsonl keeps the records written up to the checkpoint."""
        self.sums, self.n, self.train_seconds, self.records = dict(state["sums"]), state["n"], state["train_seconds"], \
            state["records"]
        if self.path is not None and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)[:self.records]
            self.path.write_text("".join(lines))
        self.t0 = time.time()


# ---- 4d. resumable checkpoints -----------------------------------------------------------------------------------


def _state(obj):
    if isinstance(obj, dict):  # a loop's own small bookkeeping (numbers, lists, tensors)
        return dict(obj)
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if hasattr(obj, "getstate"):  # random.Random
        return obj.getstate()
    return obj.state_dict()


def _set_state(obj, state):
    if isinstance(obj, dict):
        obj.clear()
        obj.update(state)
    elif isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif hasattr(obj, "setstate"):
        obj.setstate(state)
    else:
        obj.load_state_dict(state)
        if isinstance(obj, torch.optim.Optimizer):  # a tensor learning rate (--cuda-graph on) was loaded on the CPU
            for group in obj.param_groups:
                if torch.is_tensor(group["lr"]) and group["params"]:
                    group["lr"] = group["lr"].to(group["params"][0].device)


def save_checkpoint(run_dir, step, every, total, state):
    """Every `every` steps (not at the end: the run then writes its model), atomically, run_dir/checkpoint.pt with
    the state of every object in `state` (networks, optimisers, schedulers, samplers, generators, the meter) and
    torch's global random states, so a resumed run continues exactly where this one was."""
    if not every or step % every or step == total:
        return
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    atomic_torch_save({"step": step, "state": {k: _state(v) for k, v in state.items()}, "rng": rng},
                      Path(run_dir) / "checkpoint.pt")


def load_checkpoint(args, run_dir, state):
    """0 for a new run; with --resume, restore `state` from run_dir/checkpoint.pt and return its step."""
    if not args.resume:
        return 0
    path = Path(run_dir) / "checkpoint.pt"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for k, obj in state.items():
            _set_state(obj, ckpt["state"][k])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except Exception as e:
        raise DataError(f"--resume: {path} does not match this run ({_one_line(e)}); start a new run instead")
    print(f"resumed from {path} at step {ckpt['step']}", flush=True)
    return ckpt["step"]


# ---- 4e. stage 1 of the two-stage methods: the source classifier, trained or loaded ------------------------------


def load_source(net, ckpt, identity):
    """Load a cached stage-1 source network into `net` if the file `ckpt` exists; True if loaded. `identity` records
    how stage 1 is trained (source data, seed, steps, ...): a file trained differently is refused, not reused. Runs
    before the run folder is made, so a bad file is a one-line error and leaves nothing behind."""
    if not ckpt or not Path(ckpt).exists():
        return False
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"could not load --source-ckpt {ckpt} ({_one_line(e)}); delete it to retrain")
    if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict) and isinstance(saved.get("stage1"), dict)):
        raise DataError(f"--source-ckpt {ckpt} is not a stage-1 file written by these scripts; delete it to retrain")
    expected = net.state_dict()
    got = saved["model"]
    bad = [k for k in expected if not (isinstance(got.get(k), torch.Tensor) and got[k].shape == expected[k].shape)]
    if bad or set(got) != set(expected):
        raise DataError(f"--source-ckpt {ckpt} holds another network (e.g. '{(bad or sorted(set(got) ^ set(expected)))[0]}' "
                        f"differs from this run's {net.name}); delete it to retrain")
    # both ways: a key only one side records (a non-default stage-1 flag) is a difference too
    diff = {k: (saved["stage1"].get(k), identity.get(k)) for k in {**saved["stage1"], **identity}
            if saved["stage1"].get(k) != identity.get(k)}
    if diff:
        raise UsageError(f"--source-ckpt {ckpt} was trained differently (saved vs this run: {diff}); "
                         "use another path or delete it")
    net.load_state_dict(got)
    print(f"source network loaded from {ckpt} (stage 1 skipped)", flush=True)
    return True


def train_source(net, x, y, *, steps, batch_size, lr, weight_decay, generator, input_range, log_every, amp,
                 decay_biases=True, identity=None, paths=()):
    """Stage 1: Adam on cross entropy over labelled source images (uint8, on the device), batches drawn by index.
    weight_decay: Adam's (L2 in the gradient), on every parameter, or only on the weights (not biases, 1-d tensors)
    with decay_biases=False, as a slim l2_regularizer on the weights.

    It draws from copies of the random streams (`generator`'s and torch's global one, which dropout uses) and leaves
    the caller's as it found them: stage 2 then draws the same numbers whether this run trained the network or
    loaded it from --source-ckpt, so a cached stage 1 never changes a seed's result. Then the stage-1 file (state
    dict + `identity`, how it was trained) is written to every path given (the run folder's source.pt, --source-ckpt)."""
    device = x.device
    own = torch.Generator(device=generator.device)
    own.set_state(generator.get_state())
    devices = [] if device.type == "cpu" else [device.index or 0]
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        decayed = lambda p: decay_biases or p.dim() > 1  # noqa: E731
        opt = torch.optim.Adam([{"params": [p for p in net.parameters() if decayed(p)], "weight_decay": weight_decay},
                                {"params": [p for p in net.parameters() if not decayed(p)], "weight_decay": 0.0}], lr=lr)
        sampler = IndexSampler(len(x), batch_size, device, own)
        meter = Meter(None, steps, log_every, prefix="source ")
        net.train()
        for step in range(1, steps + 1):
            idx = sampler.next()
            with autocast(device, amp):
                loss = F.cross_entropy(net(to_float(x[idx], input_range)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            meter.add(loss_y=loss)
            meter.step(step)
    for path in paths:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"model": net.state_dict(), "stage1": identity}, path)


# ---- 4f. the end of a run ----------------------------------------------------------------------------------------


def versions():
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


def _no_nan(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    return obj


def device_name(device):
    """'cpu', or the GPU's name too ('cuda (NVIDIA H200)'): the summary's device, RESULTS.md's device column."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def finish(run_dir, summary, meter, t_start, device, final=None, domains=None):
    """Complete the summary (the --target-val accuracy, what the accuracies were measured on for a folder task,
    training steps/s, seconds, device, run folder, versions), write summary.json atomically, print it as the last
    stdout line, and remove the resume checkpoint, which the final model files supersede. NaN (no labels) -> null."""
    if final and "target_val_acc" in final:
        summary["target_val_acc"] = round(final["target_val_acc"], 3)
    if domains and domains[1].files is not None:
        src, tgt = domains
        summary["data"] = {"source": src.name, "target": tgt.name, "classes": src.classes,
                           "source_acc_on": "source test folder" if src.test_split == "test" else
                           "the source training images (no --source-test-dir)",
                           "target_acc_on": "target test folder" if tgt.test_split == "test" else
                           "nothing: no --target-test-dir, so no target accuracy (see predictions.csv)"}
    summary["selection"] = selection(run_dir)
    summary = dict(_no_nan(summary), train_steps_per_sec=meter.steps_per_sec if meter else None,
                   seconds=round(time.time() - t_start, 1), device=device_name(device), run_dir=str(run_dir),
                   versions=versions())
    atomic_write_json(summary, Path(run_dir) / "summary.json")
    (Path(run_dir) / "checkpoint.pt").unlink(missing_ok=True)
    if meter is not None:
        meter.close()
    print(json.dumps(summary), flush=True)


class Run:
    """One run's machinery on one object, so that a script's method does not depend on it: threads, seeding and
    device (setup_torch), then the run folder with args.json (`folder`), autocast, --compile and --cuda-graph,
    the meter, resume and checkpoints, the model files, the model a label-free score prefers (--keep-best), the
    target predictions' report and the summary (`finish`). Each is a thin wrapper of a function above."""

    def __init__(self, args, method):
        self.t_start = time.time()
        self.args, self.method = args, method
        self.device = setup_torch(args)
        self.dir = self.meter = None

    def folder(self, **resolved):
        """Make the run folder (or take the resumed one) and write args.json (with `resolved`)."""
        self.dir = make_run_dir(self.args, self.method)
        write_args(self.dir, self.args, **resolved)
        return self.dir

    def autocast(self):
        return autocast(self.device, self.args.amp)

    def compile(self, fn):
        return maybe_compile(fn, self.args.compile)

    def graphed(self, step, generators=()):
        return GraphedStep(step, self.args.cuda_graph, self.device, generators)

    def start_meter(self, total=None, log_every=None, eval_every=None):
        a = self.args
        self.meter = Meter(self.dir, a.steps if total is None else total, log_every or a.log_every,
                           a.eval_every if eval_every is None else eval_every, tensorboard=a.tensorboard)
        return self.meter

    def resume(self, state):
        """0 for a new run; with --resume, `state` restored from the checkpoint, and its step."""
        return load_checkpoint(self.args, self.dir, state)

    def checkpoint(self, step, state, total=None):
        save_checkpoint(self.dir, step, self.args.ckpt_every, self.args.steps if total is None else total, state)

    def save_model(self, obj, name="model.pt"):
        """A model file in the run folder (unless --no-save-model)."""
        if not self.args.no_save_model:
            atomic_torch_save(obj, self.dir / name)

    def keep_best(self, model, rec):
        """--keep-best VALIDATOR: save model_best.pt whenever that score of `rec` (an evaluation's numbers) beats the
        best so far (kept in model_best.json, so a resumed run continues the comparison). Returns rec."""
        name = self.args.keep_best
        if name and math.isfinite(rec.get(name, float("nan"))):
            path, best = self.dir / "model_best.pt", self.dir / "model_best.json"
            if not best.exists() or rec[name] > json.loads(best.read_text())["score"]:
                atomic_torch_save({"model": model.state_dict(), "validator": name, "score": rec[name]}, path)
                atomic_write_json(_no_nan({"validator": name, "score": rec[name], **rec}), best)
        return rec

    def predictions(self, model, src, tgt, **ev):
        """The final model's class shares (class_shares) for the summary: a class that seems emptied is named on
        stdout, and a folder task's predictions go to predictions.csv (file, predicted class, confidence)."""
        shares, pred, conf = class_shares(model, src, tgt, **ev)
        for c in shares["emptied_classes"]:
            i = src.classes.index(c)
            print(f"check: class {c} gets {shares['target_pred_share'][i]:.1f} % of the target predictions against "
                  f"{shares['source_label_share'][i]:.1f} % of the source labels (its target images may have been "
                  "mapped onto another class)", flush=True)
        if tgt.files:
            import csv

            with open(self.dir / "predictions.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file", "predicted_class", "confidence"])
                for name, c, p in zip(tgt.files, pred.tolist(), conf.tolist()):
                    w.writerow([name, tgt.classes[c], f"{p:.4f}"])
        return shares

    def finish(self, summary, final=None, domains=None, timed=True):
        """The summary (finish); timed=False: a run without a training loop reports no steps/s."""
        finish(self.dir, summary, self.meter if timed else None, self.t_start, self.device, final, domains)

    @staticmethod
    def main(main, parse_args):
        """`python script.py ...` (main_guard)."""
        main_guard(main, parse_args)


def main_guard(main, parse_args):
    """`python script.py ...`: a missing dataset or an impossible flag ends with one line that says what to do."""
    try:
        main(parse_args())
    except (DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# 5. --cuda-graph: a recorded training step, one launch instead of hundreds
# ----------------------------------------------------------------------------------------------------------------

GRAPH_MODES = ("off", "on", "check")
# ops that make the host wait for the device, or whose output shape depends on the data: a graph cannot record them
_GRAPH_UNSAFE = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
                 "aten::masked_select", "aten::_unique", "aten::unique", "aten::repeat_interleave")


class GraphUnsafe(RuntimeError):
    """A step does something a recorded CUDA graph would not repeat faithfully (raised by --cuda-graph check)."""


class GraphedStep:
    """One training step `fn(*inputs) -> dict of tensors`: run as written (--cuda-graph off), or recorded once as a CUDA
    graph and replayed (on). The digit networks are so small that an eager step is bound by its hundreds of kernel
    launches, not by the GPU; a replay is one launch. `check` runs the recorded path's bookkeeping on any device (the
    same fixed buffers, no graph) and raises GraphUnsafe where a recording would go wrong; the tests run it on the CPU.

    What a recorded step may do, and how the scripts keep to it:
      * inputs: tensors (batch indices, images) are copied into fixed buffers and numbers (a schedule's value, a patch
        position) put into 0-d device tensors before each call: a graph reads fixed addresses and bakes a Python
        number in. A step whose structure changes now and then (GAM's number of GANs, PixelDA's staircase learning
        rate) passes `key=`: a new key records a new graph;
      * no host sync (`.item()`, `float(t)`, a data-dependent shape) and no Python branch on a changing value inside;
      * random draws use the default generator or one passed in `generators` (registered with the graph);
      * the optimisers step inside the graph: Adam(capturable=True), SGD fused with a tensor learning rate where the
        rate changes; `zero_grad(set_to_none=True)` before each backward;
      * the returned tensors are overwritten by the next replay (Meter.add copies them).
    The first `warmup` calls of a key run eagerly on a side stream (optimiser state, cuDNN's choices), the next one
    records the graph and replays it: every call is one real training step. `reset()` after the optimisers' state was
    replaced (a loaded state dict holds new tensors that a recorded graph would not see)."""

    def __init__(self, fn, mode, device, generators=(), warmup=3):
        self.fn, self.mode, self.device, self.generators, self.warmup = fn, mode, device, tuple(generators), warmup
        self.key, self.side = None, torch.cuda.Stream() if mode == "on" else None
        self.reset()

    def reset(self):
        self.calls, self.graph, self.static, self.out, self.trace = 0, None, None, None, None

    def __call__(self, *inputs, key=None):
        if self.mode == "off":
            return self.fn(*inputs)
        if key != self.key or self.static is None:
            self.reset()  # a new structure: warm up and record again (the old graph's memory is freed)
            self.key = key
            self.static = [x.clone() if torch.is_tensor(x) else torch.tensor(x, device=self.device) for x in inputs]
        if len(inputs) != len(self.static):
            raise GraphUnsafe(f"a recorded step takes {len(self.static)} inputs, got {len(inputs)}")
        for buf, x in zip(self.static, inputs):
            if torch.is_tensor(x) and x.shape != buf.shape:
                raise GraphUnsafe(f"a recorded step's input changed shape ({tuple(buf.shape)} -> {tuple(x.shape)})")
            buf.copy_(x) if torch.is_tensor(x) else buf.fill_(x)
        self.calls += 1
        if self.mode == "check":
            return self._checked()
        if self.calls <= self.warmup:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side), warnings.catch_warnings():  # (capturable Adam warns when not recorded)
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                out = self.fn(*self.static)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            for g in self.generators:
                self.graph.register_generator_state(g)
            # recorded on the warm-up's stream; records the kernels without running them: the replay below runs them
            with torch.cuda.graph(self.graph, stream=self.side):
                self.out = self.fn(*self.static)
            print(f"--cuda-graph: {self.fn.__name__} recorded after {self.warmup} eager calls"
                  + (f" (key {self.key})" if self.key is not None else ""), flush=True)
        self.graph.replay()
        return self.out

    def _checked(self):
        """fn under a dispatch mode that records each op with its non-tensor arguments and the addresses of the
        tensors it reads that were not made inside the step. A sync raises at once; a record that differs from the
        first call's means a Python value or a tensor made outside has changed, which a replay would not see. The
        optimisers' own steps are not traced: torch documents capturable=True / fused=True as safe to record."""
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class Trace(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops, self.made, self.paused = [], set(), 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if self.paused or func.namespace == "profiler":  # (the optimisers' record_function marks)
                    return out
                name = func._schema.name
                indices = args[1] if name == "aten::index" and len(args) > 1 else ()
                if name in _GRAPH_UNSAFE or any(t is not None and t.dtype == torch.bool for t in indices):
                    raise GraphUnsafe(f"{func} in the step: a host sync or a data-dependent shape, which a CUDA graph "
                                      "cannot record (keep .item(), float(t) and boolean masks out of the step)")
                outside, values = [], []
                for a in tree_leaves((args, kwargs)):
                    if torch.is_tensor(a):
                        if a.untyped_storage().data_ptr() not in self.made:
                            outside.append(a.untyped_storage().data_ptr())
                    else:  # (a generator is re-wrapped on each call: its device names it)
                        values.append(f"generator on {a.device}" if isinstance(a, torch.Generator) else repr(a))
                self.made.update(o.untyped_storage().data_ptr() for o in tree_leaves(out) if torch.is_tensor(o))
                self.ops.append((str(func), tuple(outside), tuple(values)))
                return out

        trace = Trace()
        pause = lambda *_: setattr(trace, "paused", trace.paused + 1)  # noqa: E731
        resume = lambda *_: setattr(trace, "paused", trace.paused - 1)  # noqa: E731
        hooks = (register_optimizer_step_pre_hook(pause), register_optimizer_step_post_hook(resume))
        try:
            with trace:
                out = self.fn(*self.static)
        finally:
            for h in hooks:
                h.remove()
        if self.trace is None:
            self.trace = trace.ops
        elif trace.ops != self.trace:
            i = next((i for i, (a, b) in enumerate(zip(trace.ops, self.trace)) if a != b),
                     min(len(trace.ops), len(self.trace)))
            now, then = (ops[i] if i < len(ops) else "(none)" for ops in (trace.ops, self.trace))
            raise GraphUnsafe(f"the step's op {i} differs from the recorded one: {now} vs {then}. A Python value or a "
                              "tensor made outside the step changed between steps; a replay would repeat the old one "
                              "(pass it as an input, or as key= if it changes the step's structure)")
        return out
