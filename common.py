"""Shared plumbing for the single-file UDA scripts: digit datasets, backbones, run utilities.

Only things that are *not* a method live here. Read top to bottom:

1. Datasets  - real on-disk formats (torchvision layouts, the original MNIST-M release), decoded once into
               uint8 tensors [N, C, H, W] + int64 labels, resized/converted once for a task, cached on disk.
2. Batching  - index samplers on the device, normalisation to [-1, 1], device-side random affine augmentation.
3. Backbones - lenet, dtn, dann_mnist, dann_svhn: `features` and `classifier` kept apart, named activations.
4. Run utils - the shared flags and their checks, seeding, device, evaluation, run folder, atomic writes, the
               training-loop meter, resumable checkpoints, stage 1 of the two-stage methods, the final summary.

Data root: `--data-dir`, else the environment variable UDA_DATA_DIR, else ./data.
Decoded tensors are cached in `--cache-dir`, else UDA_CACHE_DIR, else ~/.cache/uda-digits (never inside the
data root, which may be read-only).
"""

import gzip
import hashlib
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


# ---- 4a. the flags every script shares (one definition: names, help texts and defaults cannot drift) --------------


def add_shared_args(p, *, task, steps, steps_help, log_every, eval_every, input_range=None):
    """Add the `run` and `data` groups that every script has. The arguments are the per-script defaults (the method's
    own default task and schedule); `input_range` adds --input-range for the scripts whose networks can take either
    pixel range. Returns the data group, for a script's own data flags."""
    g = p.add_argument_group("run")
    g.add_argument("--task", default=task, help=f"source-target pair: {', '.join(TASKS)}")
    g.add_argument("--seed", type=int, default=0, help="random seed (weights, batches, every random draw)")
    g.add_argument("--steps", type=int, default=steps, help=steps_help)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast in training and evaluation (CUDA only)")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks' forward passes")
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
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=default_data_dir(), help="dataset root (env UDA_DATA_DIR, else ./data)")
    g.add_argument("--cache-dir", default=None, help="decoded-tensor cache (env UDA_CACHE_DIR, else ~/.cache/uda-digits)")
    g.add_argument("--no-download", action="store_true", help="never fetch data: fail if it is not on disk")
    g.add_argument("--eval-batch-size", type=int, default=4096, help="batch size for evaluation")
    if input_range is not None:
        g.add_argument("--input-range", default=input_range, choices=INPUT_RANGES, help="pixel range the networks see")
    return g


RESUME_MAY_CHANGE = ("device", "threads", "data_dir", "cache_dir", "no_download", "resume")


def parse(p, argv=None):
    """Parse the flags; with --resume, the stopped run's own flags (its args.json) replace them, except the few that
    describe the machine rather than the run (RESUME_MAY_CHANGE)."""
    args = p.parse_args(argv)
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


def check_args(args, positive=(), at_least_one=(), non_negative=()):
    """UsageError for the first flag out of its range. The shared flags are always checked; a script names its own
    (attribute names). None (an unresolved 'task default') is skipped. Runs before any data is read or folder made."""
    at_least_one = ("steps", "log_every", "eval_batch_size") + tuple(at_least_one)
    non_negative = ("eval_every", "threads", "ckpt_every") + tuple(non_negative)
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (at_least_one, lambda v: v >= 1, ">= 1"),
                            (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            v = getattr(args, name)
            if v is not None and not ok(v):  # `not ok` also catches NaN
                raise UsageError(f"{flag(name)} must be {what} (got {v})")
    if args.task not in TASKS:
        raise UsageError(f"unknown task '{args.task}'; choose from {', '.join(TASKS)}")
    if not args.resume and not _writable(args.out):
        raise UsageError(f"--out {args.out}: that folder cannot be written here; pass --out to a writable folder")


# ---- 4b. seeding, device, evaluation ----------------------------------------------------------------------------


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


def maybe_compile(fn, enabled):
    """With --compile: a module is compiled in place (Module.compile: its state dict keeps its plain keys, so saved
    models load into an uncompiled network), a function through torch.compile. Without it: fn itself."""
    if not enabled:
        return fn
    if isinstance(fn, nn.Module):
        fn.compile()
        return fn
    return torch.compile(fn)


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
    steps calls `evaluate()` (its time is not counted as training time) and records what it returns.

        step 1200/20000 | loss_y 0.31 loss_d 0.69 | lam 0.52 | 41.2 steps/s | ETA 7m36s
    """

    def __init__(self, run_dir, total, log_every, eval_every=0, prefix=""):
        self.total, self.log_every, self.eval_every, self.prefix = total, log_every, eval_every, prefix
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self.sums, self.n, self.train_seconds, self.records = {}, 0, 0.0, 0
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
                f.write(json.dumps(record) + "\n")
            self.records += 1

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
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if hasattr(obj, "getstate"):  # random.Random
        return obj.getstate()
    return obj.state_dict()


def _set_state(obj, state):
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif hasattr(obj, "setstate"):
        obj.setstate(state)
    else:
        obj.load_state_dict(state)


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
    diff = {k: (saved["stage1"].get(k), v) for k, v in identity.items() if saved["stage1"].get(k) != v}
    if diff:
        raise UsageError(f"--source-ckpt {ckpt} was trained differently (saved vs this run: {diff}); "
                         "use another path or delete it")
    net.load_state_dict(got)
    print(f"source network loaded from {ckpt} (stage 1 skipped)", flush=True)
    return True


def train_source(net, x, y, *, steps, batch_size, lr, weight_decay, generator, input_range, log_every, amp):
    """Stage 1: Adam on cross entropy over labelled source images (uint8, on the device), batches drawn by index."""
    device = x.device
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    sampler = IndexSampler(len(x), batch_size, device, generator)
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


def save_source(net, identity, paths):
    """Write the stage-1 file (state dict + how it was trained) to every path given (run folder, --source-ckpt)."""
    for path in paths:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"model": net.state_dict(), "stage1": identity}, path)


# ---- 4f. the end of a run ----------------------------------------------------------------------------------------


def versions():
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


def finish(run_dir, summary, meter, t_start, device):
    """Complete the summary (training steps/s, seconds, device, run folder, versions), write summary.json atomically,
    print it as the last stdout line, and remove the resume checkpoint, which the final model files supersede."""
    summary = dict(summary, train_steps_per_sec=meter.steps_per_sec if meter else None,
                   seconds=round(time.time() - t_start, 1), device=str(device), run_dir=str(run_dir), versions=versions())
    atomic_write_json(summary, Path(run_dir) / "summary.json")
    (Path(run_dir) / "checkpoint.pt").unlink(missing_ok=True)
    print(json.dumps(summary), flush=True)


def main_guard(main, parse_args):
    """`python script.py ...`: a missing dataset or an impossible flag ends with one line that says what to do."""
    try:
        main(parse_args())
    except (DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
