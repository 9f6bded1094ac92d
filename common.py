"""Shared plumbing for the single-file UDA scripts: digit datasets, backbones, run utilities.

Only things that are *not* a method live here. Read top to bottom:

1. Datasets  - real on-disk formats (torchvision layouts, the original MNIST-M release), decoded once into
               uint8 tensors [N, C, H, W] + int64 labels, resized/converted once for a task, cached on disk.
2. Batching  - index samplers on the device, normalisation to [-1, 1], device-side random affine augmentation.
3. Backbones - lenet, dtn, dann_mnist, dann_svhn: `features` and `classifier` kept apart, named activations.
4. Run utils - seeding, device, evaluation, run folder, atomic writes, progress line, final summary.

Data root: `--data-dir`, else the environment variable UDA_DATA_DIR, else ./data.
Decoded tensors are cached in `--cache-dir`, else UDA_CACHE_DIR, else ~/.cache/uda-digits (never inside the
data root, which may be read-only).
"""

import hashlib
import io
import json
import math
import os
import platform
import sys
import tarfile
import tempfile
import time
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


class UsageError(ValueError):
    """An impossible flag combination or an unknown name. The message says what to do."""


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


def _read_mnist(root, split, download, cache_dir):
    """torchvision.datasets.MNIST. If the raw folder only has the .gz archives, torchvision extracts them in a private
    temporary folder in the cache (links to the archives), never in the data root, which may be shared or read-only."""
    from torchvision.datasets import MNIST

    raw = Path(root) / "MNIST" / "raw"
    names = [os.path.splitext(f)[0] for f, _ in MNIST.resources]
    if all((raw / n).exists() for n in names):
        ds = MNIST(root, train=split == "train", download=False)
    elif all((raw / f).exists() for f, _ in MNIST.resources):  # archives only: extraction, no network
        for f, md5 in MNIST.resources:
            if md5sum(raw / f) != md5:
                raise DataError(f"{raw / f} is corrupt (md5 is not {md5}): delete it and fetch it again")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="mnist-extract-") as tmp:  # private: parallel runs
            shadow = Path(tmp) / "MNIST" / "raw"
            shadow.mkdir(parents=True)
            for f, _ in MNIST.resources:
                (shadow / f).symlink_to((raw / f).resolve())
            ds = MNIST(tmp, train=split == "train", download=True)  # md5-checked, extracted, nothing fetched
            return ds.data.unsqueeze(1).contiguous(), ds.targets.long()
    elif download:
        if not _writable(root):
            raise DataError(f"MNIST is not in {raw} and {root} is read-only; pass --data-dir to a writable folder")
        try:
            MNIST(root, train=split == "train", download=True)
        except Exception as e:
            raise DataError(f"could not download MNIST ({type(e).__name__}: {e}); put the four idx .gz files in {raw}")
        ds = MNIST(root, train=split == "train", download=False)
    else:
        raise DataError(f"MNIST not found in {raw}; drop --no-download to fetch it, or put the four idx .gz files there")
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


def _fetch(url, root, fname, md5, what):
    """Download url to root/fname (md5-checked, as torchvision does); a clear DataError when that is impossible."""
    from torchvision.datasets.utils import download_url

    if not _writable(root):
        raise DataError(f"{what} is not in {root} and that folder is read-only: pass --data-dir to a writable folder, "
                        f"or put {fname} there by hand")
    try:
        download_url(url, str(root), fname, md5=md5)
    except Exception as e:  # network errors come in many types
        raise DataError(f"could not download {what} from {url} ({type(e).__name__}: {e}); put {fname} in {root} by hand")


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
    from torchvision.datasets.utils import download_file_from_google_drive, download_url

    errors = []
    for url in MNISTM_URLS:
        try:
            download_url(url, str(dest), MNISTM_ARCHIVE, md5=MNISTM_MD5)
            return dest / MNISTM_ARCHIVE
        except Exception as e:
            errors.append(f"{url}: {e}")
    try:
        download_file_from_google_drive(MNISTM_GDRIVE_ID, str(dest), MNISTM_ARCHIVE, md5=MNISTM_MD5)
        return dest / MNISTM_ARCHIVE
    except Exception as e:
        errors.append(f"google drive {MNISTM_GDRIVE_ID}: {e}")
    raise DataError("could not download MNIST-M (" + "; ".join(errors) + f"); put {MNISTM_ARCHIVE} in the data dir")


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


def load_split(name, split, size, channels, data_dir=None, cache_dir=None, download=True):
    """One dataset split as (uint8 [N, channels, size, size], int64 [N]) on the CPU; decoded once, then cached."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    root = Path(data_dir or default_data_dir()).expanduser()
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    cached = _cache_path(name, split, size, channels, root, cache)
    if cached is not None and cached.exists():
        try:
            d = torch.load(cached)
            return d["x"], d["y"]
        except Exception:  # a damaged cache file is decoded again
            _warn(f"cache file {cached} is unreadable; decoding the dataset again")
    cache.mkdir(parents=True, exist_ok=True)
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
        raise DataError(f"could not read {name} {split} from {root}: {type(e).__name__}: {e}. "
                        f"The file is probably truncated or corrupt: delete it and fetch it again") from e
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"{name} {split} in {root} has {len(x)} images and {len(y)} labels; the files are inconsistent")
    if name == "mnistm" and len(x) != MNISTM_SIZES[split]:
        _warn(f"MNIST-M {split} has {len(x)} images, the original release has {MNISTM_SIZES[split]}")
    x = resize_and_convert(x, size, channels)
    cached = _cache_path(name, split, size, channels, root, cache)  # the files may have just been downloaded
    if cached is not None:
        atomic_torch_save({"x": x, "y": y}, cached)
    print(f"decoded {name} {split}: {tuple(x.shape)} in {time.time() - t0:.1f}s (cached in {cache})", flush=True)
    return x, y


class Domain:
    """One domain's train and test splits as device tensors (uint8 images, int64 labels)."""

    def __init__(self, name, split_data, device):
        self.name = name
        (self.train_x, self.train_y), (self.test_x, self.test_y) = [(x.to(device), y.to(device)) for x, y in split_data]

    def __repr__(self):
        return f"{self.name}(train={len(self.train_x)}, test={len(self.test_x)}, image={tuple(self.train_x.shape[1:])})"


def load_task(task, size, channels, device, data_dir=None, cache_dir=None, download=True):
    """(source Domain, target Domain) for a task name such as 'mnist-usps'."""
    if task not in TASKS:
        raise UsageError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    return tuple(
        Domain(name, [load_split(name, s, size, channels, data_dir, cache_dir, download) for s in ("train", "test")], device)
        for name in TASKS[task])


# ----------------------------------------------------------------------------------------------------------------
# 2. Batching on the device
# ----------------------------------------------------------------------------------------------------------------


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
# 3. Backbones
# ----------------------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """features: image -> feature vector; classifier: feature vector -> 10 logits. Every layer is named, so
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


def lenet():
    """ADDA/CyCADA LeNet, 28x28x1: conv5-20, pool, ReLU, conv5-50, Dropout2d, pool, ReLU, fc500, ReLU, Dropout | fc10."""
    return Backbone("lenet", 1, 28, OrderedDict(
        conv1=nn.Conv2d(1, 20, 5), pool1=nn.MaxPool2d(2), relu1=nn.ReLU(),
        conv2=nn.Conv2d(20, 50, 5), drop2=nn.Dropout2d(0.5), pool2=nn.MaxPool2d(2), relu2=nn.ReLU(),
        flatten=nn.Flatten(), fc3=nn.Linear(800, 500), relu3=nn.ReLU(), drop3=nn.Dropout(0.5),
    ), OrderedDict(fc4=nn.Linear(500, 10)))


def dtn():
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
    return Backbone("dtn", 3, 32, layers, OrderedDict(fc5=nn.Linear(512, 10)))


def dann_mnist():
    """DANN paper, MNIST->MNIST-M, 32x32x3: conv5-32, ReLU, pool 2/2, conv5-48, ReLU, pool 2/2 (1200-d features) |
    fc100, ReLU, fc100, ReLU, fc10."""
    return Backbone("dann_mnist", 3, 32, OrderedDict(
        conv1=nn.Conv2d(3, 32, 5), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 48, 5), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2), flatten=nn.Flatten(),
    ), OrderedDict(fc3=nn.Linear(48 * 5 * 5, 100), relu3=nn.ReLU(), fc4=nn.Linear(100, 100), relu4=nn.ReLU(),
                   fc5=nn.Linear(100, 10)))


def dann_svhn():
    """DANN paper, SVHN->MNIST and SynDigits->SVHN, 32x32x3: conv5-64, ReLU, maxpool 3/2, conv5-64, ReLU,
    maxpool 3/2, conv5-128, ReLU (SAME padding as the TF re-implementation; 8192-d features) |
    fc3072, ReLU, fc2048, ReLU, fc10."""
    return Backbone("dann_svhn", 3, 32, OrderedDict(
        conv1=nn.Conv2d(3, 64, 5, padding=2), relu1=nn.ReLU(), pool1=nn.MaxPool2d(3, 2, padding=1),
        conv2=nn.Conv2d(64, 64, 5, padding=2), relu2=nn.ReLU(), pool2=nn.MaxPool2d(3, 2, padding=1),
        conv3=nn.Conv2d(64, 128, 5, padding=2), relu3=nn.ReLU(), flatten=nn.Flatten(),
    ), OrderedDict(fc4=nn.Linear(128 * 8 * 8, 3072), relu4=nn.ReLU(), fc5=nn.Linear(3072, 2048), relu5=nn.ReLU(),
                   fc6=nn.Linear(2048, 10)))


BACKBONES = {"lenet": lenet, "dtn": dtn, "dann_mnist": dann_mnist, "dann_svhn": dann_svhn}


def build_backbone(name):
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone '{name}'; choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]()


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# 4. Run utilities
# ----------------------------------------------------------------------------------------------------------------


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
    """Threads, seeding, device and the --amp check shared by every script. Returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    if args.amp and device.type != "cuda":
        raise UsageError("--amp (bf16 autocast) is only supported on CUDA; drop --amp or use --device cuda")
    seed_everything(args.seed, args.deterministic)
    return device


def autocast(device, enabled):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()


@torch.inference_mode()
def predict(model, x_uint8, batch_size=4096, amp=False, input_range="-1,1"):
    """Predicted labels for uint8 images, in big batches, with the model in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    preds = []
    with autocast(x_uint8.device, amp):
        for chunk in x_uint8.split(batch_size):
            preds.append(model(to_float(chunk, input_range)).argmax(1))
    model.train(was_training)
    return torch.cat(preds)


def accuracy(model, x_uint8, y, batch_size=4096, amp=False, input_range="-1,1"):
    """Top-1 accuracy in percent (a Python float: one host sync)."""
    return (predict(model, x_uint8, batch_size, amp, input_range) == y).float().mean().item() * 100.0


def make_run_dir(out, method, task, seed):
    """runs/<method>__<task>__<seed>__<time>/ (a suffix is added if the name is taken)."""
    base = Path(out) / f"{method}__{task}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    path.mkdir(parents=True)
    return path


def _atomic(path, write):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: readers never see half a file."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path):
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl."""

    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def write(self, **record):
        self.f.write(json.dumps(record) + "\n")

    def close(self):
        self.f.close()


class Progress:
    """'step 1200/20000 | loss_y 0.31 ... | 41.2 steps/s | ETA 7m36s' lines; the rate counts training time only."""

    def __init__(self, total):
        self.total = total

    def line(self, step, train_seconds, **values):
        rate = step / max(train_seconds, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        vals = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        return f"step {step}/{self.total} | {vals} | {rate:.1f} steps/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s"


def versions():
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


def finish(run_dir, summary):
    """Write summary.json atomically and print it as the last stdout line."""
    atomic_write_json(summary, Path(run_dir) / "summary.json")
    print(json.dumps(summary), flush=True)
