"""Light-weight Calibrator (Ye, Wu, Wang, Lin, Qin, Xu, Wang, CVPR 2020): adapt by calibrating the *data*.

The deployed source classifier F_s = C_s o M_s is trained on labelled source images and never changes again. A
small network G_c learns a bounded perturbation, G_c(x) = x + delta(x), so that F_s(G_c(x)) works on the target
domain while F_s(G_c(x_s)) keeps the source accuracy. G_c is trained adversarially against two 4-way domain
discriminators over the groups G1 = X_s, G2 = X_t, G3 = G_c(X_s), G4 = G_c(X_t).

Implemented:
  * Stage 1: the CyCADA `dtn` (32x32 RGB in [-1, 1], MNIST/USPS replicated to 3 channels), Adam lr 1e-4, batch
    128, per-task epochs and weight decay (official configs); `--source-ckpt PATH` caches it per stage-1 settings.
    From then on F_s's parameters are frozen; by default it also runs in eval mode (`--source-bn`, below).
  * The calibrator G_c: a narrow CycleGAN-style ResNet generator (7x7 conv, two stride-2 downsamplings, residual
    blocks, two transposed-conv upsamplings, 7x7 conv, tanh; InstanceNorm), plus the global skip x + delta.
    `--perturb official` (default): delta = clamp((tanh + 1) / 2, 0, L_inf), the official code's one-sided bound,
    and G_c(x) = clamp(x + delta, -1, 1); `--perturb symmetric`: delta = L_inf * tanh, |delta| <= L_inf.
  * D_feat (eq. 5): 4-way classifier on F_s's output (official: its softmax; `--feat-input features` uses M_s's
    512-d features): in -> 1000 -> 500 -> 4 with ReLU and dropout, as the official FeatureDiscriminator.
  * D_pixel (eq. 6): 4-way MLP (P*P*3 -> 128 -> 4) on one random P x P patch per batch (same place in every group),
    its pixels shuffled per image and per channel (the paper's two tricks against an overfitting D_pixel).
  * Calibrator loss (eq. 7): both discriminators should put G3 and G4 in G1. Official weights: target terms 1.0,
    source terms 0.1 (`--w-feat-target --w-feat-source --w-pix-target --w-pix-source`).
  * Stage 2 as the official yeshaokai/Calibrator-Domain-Adaptation calibrator/tools/train_calibrator_net.py: Adam
    for G_c and both discriminators with the config's betas (0.9, 0.999) and weight decay (5e-4 for M<->U, 0 for
    S->M), lr 1e-4, batch 128 per domain, constant lr (its StepLR is never stepped); every iteration the
    discriminators step first, then G_c on a fresh forward of G_c and F_s (new dropout masks; with `--source-bn
    train` F_s's BatchNorm statistics move again) and a new pixel shuffle. G_c and D_pixel start from N(0, 0.02)
    weights and zero biases (backbones.init_weights), D_feat from PyTorch's defaults.

Per-task defaults (the official code's configs/digits/*.yml; other tasks use the svhn-mnist row):
    task        src epochs  src wd  batch  epochs  lr    wd    width  blocks  L_inf  patch
    mnist-usps  300         5e-4    128    200     1e-4  5e-4  8      9       0.4    4
    usps-mnist  250         5e-4    128    50      1e-4  5e-4  4      9       0.9    8
    svhn-mnist  100         0       512    100     2e-4  0     8      8       0.8    8
  An epoch of stage 2 is min(#source, #target) train images / batch steps (the official loop zips the two loaders).

Evaluation and report: the *final* calibrator (no checkpoint selection) on the target and source *test* splits, F_s
alone and F_s o G_c (Figure 2's trade-off); parameters and multiply-adds of G_c and F_s (Table 3: 0.18M, 5.8% of
F_s for digits); a PNG grid of images, calibrated images, delta amplified and their spectra (Figure 6).

Deviations, each a flag or stated here:
  * `--source-bn eval` (default): F_s is truly frozen (eval mode), as the paper describes. The official code leaves
    F_s in train mode in stage 2: its BatchNorm statistics drift towards the target and calibrated batches (an
    implicit AdaBN), its dropout is on, and each group is normalised with its own batch statistics (four forwards):
    `--source-bn train` reproduces all three (summary.json then also reports F_s alone with the drifted statistics).
  * The official generator ends in Dropout(0.05) on the tanh output (a dropped pixel gets delta = min(0.5, L_inf)).
    Kept (`--calib-dropout`) but on delta, so that the L_inf bound is exact for the deployed, eval-mode calibrator (a
    dropped pixel gets no perturbation; in training |delta| can exceed L_inf by 5%).
  * D_pixel's patch: the official one draws a different non-overlapping tile per group, only among the first
    (resolution / P)^2 in row order, with one pixel permutation for all images; here any offset, the same place in
    all four groups, shuffled per image and per channel, as the paper describes.
  * No CycleGAN-stylised source (the paper's best rows): the calibrator alone; the release never published that part.

Paper (Table 1, calibrator alone): M->U 95.6, U->M 97.1, S->M 97.1 (with CycleGAN-stylised source: 97.1 / 98.3 /
97.5). Measured (RESULTS.md; final G_c, target test split): U->M at these defaults (CPU, seeds 0 / 1) 94.37 / 81.96
(F_s alone 68.6 / 63.4; seed 1 empties class 7); M->U (`--source-epochs 5`, 25 stage-2 epochs, seeds 0-2) 85.14 +-
6.85. On M->U it sometimes stays at F_s alone's level; RESULTS.md compares the stage 2 used until commit 50f9e9c.
"""

import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Flags, IndexSampler, Run, UsageError, accuracy, backbone_input, build_backbone, evaluate_domains,
                    load_source, load_task, to_float, train_source)

# Official configs (configs/digits/*.yml); tasks without one use svhn-mnist's.
TASK_DEFAULTS = {task: dict(zip(("source_epochs", "source_wd", "batch_size", "epochs", "lr", "weight_decay", "width",
                                  "blocks", "linf", "patch"), row)) for task, row in {
    "mnist-usps": (300, 5e-4, 128, 200, 1e-4, 5e-4, 8, 9, 0.4, 4),
    "usps-mnist": (250, 5e-4, 128, 50, 1e-4, 5e-4, 4, 9, 0.9, 8),
    "svhn-mnist": (100, 0.0, 512, 100, 2e-4, 0.0, 8, 8, 0.8, 8)}.items()}


def parse_args(argv=None):
    p = Flags(__doc__, task="mnist-usps", steps=None, steps_help="calibrator steps; overrides --epochs", log_every=100,
              eval_every=1000)
    g = p.add_argument_group("stage 1: source classifier F_s")
    g.add_argument("--backbone", default="dtn", choices=["dtn", "resnet18", "resnet50"],
                   help="F_s: the digit DTN (32x32 RGB), or a ResNet for larger images of a folder task")
    g.add_argument("--image-size", type=int, default=0, help="input size of a ResNet F_s (0: 224; a multiple of 4)")
    g.add_argument("--pretrained", action="store_true",
                   help="ResNet F_s: torchvision's ImageNet weights from the local torch cache (an error if absent)")
    g.add_argument("--source-ckpt", default=None,
                   help="F_s cache file: loaded if it exists (same source data/seed/stage-1 flags), else trained and saved")
    g.add_argument("--source-epochs", type=float, default=None, help="epochs over the source train split (task default)")
    g.add_argument("--source-lr", type=float, default=1e-4, help="Adam learning rate for F_s")
    g.add_argument("--source-wd", type=float, default=None, help="Adam weight decay for F_s (task default)")
    g = p.add_argument_group("stage 2: calibrator (defaults: the official digit configs, see the docstring)")
    g.add_argument("--epochs", type=float, default=None, help="calibrator epochs (task default)")
    g.add_argument("--batch-size", type=int, default=None, help="images per domain per step, both stages (task default)")
    g.add_argument("--lr", type=float, default=None, help="Adam lr of G_c and both discriminators (task default)")
    g.add_argument("--betas", default="0.9,0.999", help="Adam betas of stage 2 (official configs: 0.9,0.999)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="Adam weight decay of G_c and both discriminators in stage 2 (task default)")
    g.add_argument("--reuse-forward", action="store_true",
                   help="G_c's step reuses the discriminator step's forward pass (one forward fewer; the official "
                        "step runs G_c and F_s again, with new dropout masks)")
    g.add_argument("--init", default="official", choices=["official", "torch"],
                   help="official: N(0, 0.02) weights, zero biases for G_c and D_pixel; torch: PyTorch's defaults")
    g.add_argument("--width", type=int, default=None, help="calibrator base width ngf (task default)")
    g.add_argument("--blocks", type=int, default=None, help="calibrator residual blocks (task default)")
    g.add_argument("--linf", type=float, default=None, help="bound on the perturbation, in [-1, 1] pixel units")
    g.add_argument("--perturb", default="official", choices=["official", "symmetric"],
                   help="official: delta in [0, L_inf] via clamp((tanh+1)/2); symmetric: L_inf * tanh")
    g.add_argument("--calib-dropout", type=float, default=0.05, help="dropout on the perturbation (official: 0.05)")
    g.add_argument("--patch", type=int, default=None, help="pixel discriminator patch size P (task default)")
    g.add_argument("--pixel-hidden", type=int, default=128, help="pixel discriminator hidden units")
    g.add_argument("--feat-input", default="softmax", choices=["softmax", "features"],
                   help="D_feat input: F_s's softmax output (official) or M_s's 512-d features")
    g.add_argument("--w-feat-target", type=float, default=1.0, help="eq. 7 weight: D_feat on G_c(X_t)")
    g.add_argument("--w-feat-source", type=float, default=0.1, help="eq. 7 weight: D_feat on G_c(X_s)")
    g.add_argument("--w-pix-target", type=float, default=1.0, help="eq. 7 weight: D_pixel on G_c(X_t)")
    g.add_argument("--w-pix-source", type=float, default=0.1, help="eq. 7 weight: D_pixel on G_c(X_s)")
    g.add_argument("--source-bn", default="eval", choices=["eval", "train"],
                   help="F_s's mode in stage 2: eval (truly frozen) or train (official code: BN statistics drift)")
    g.add_argument("--grid-images", type=int, default=8, help="images per row of the PNG grid (0: no grid)")
    args = p.parse(argv, positive=("source_epochs", "source_lr", "epochs", "lr"),
                   at_least_one=("batch_size", "width", "pixel_hidden"),
                   non_negative=("source_wd", "weight_decay", "blocks", "grid_images", "w_feat_target",
                                 "w_feat_source", "w_pix_target", "w_pix_source"))
    official = TASK_DEFAULTS.get(args.task, TASK_DEFAULTS["svhn-mnist"])
    for k, v in official.items():  # derived defaults, resolved here so that args.json records the values used
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.adam_betas = tuple(float(b) for b in args.betas.split(","))
        assert len(args.adam_betas) == 2
    except (ValueError, AssertionError):
        raise UsageError(f"--betas '{args.betas}' must be two comma-separated numbers")
    if not 0 < args.linf <= 2:
        raise UsageError(f"--linf must be in (0, 2] (pixels live in [-1, 1]; got {args.linf})")
    if (args.image_size or args.pretrained) and args.backbone == "dtn":
        raise UsageError("--image-size and --pretrained go with --backbone resnet18 or resnet50")
    args.size = backbone_input(args.backbone, args.image_size)[1]
    if args.size < 32 or args.size % 4:
        raise UsageError(f"--image-size must be a multiple of 4 and >= 32 (got {args.size})")
    if not 1 <= args.patch <= args.size:
        raise UsageError(f"--patch must be between 1 and the image size, {args.size} (got {args.patch})")
    if not 0 <= args.calib_dropout < 1:
        raise UsageError(f"--calib-dropout must be in [0, 1) (got {args.calib_dropout})")
    if args.source_bn == "train" and args.batch_size < 2:
        raise UsageError("--source-bn train needs --batch-size >= 2 (BatchNorm statistics)")
    named = [name for name, differs in ((f"betas {args.betas}", args.adam_betas != (0.9, 0.999)),  # from the official
                                        (f"wd {args.weight_decay:g}", args.weight_decay != official["weight_decay"]),
                                        ("one forward", args.reuse_forward), ("torch init", args.init == "torch")) if differs]
    args.variant = "calibrator" + ("" if args.source_bn == "eval" else "+source-bn-train") + \
        (f" ({', '.join(named)})" if named else "")
    return args


# ALGO LOGIC: the method's own pieces
def resnet_block(ch):
    """CycleGAN residual block body (the skip is added in Calibrator.forward)."""
    return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(True),
                         nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))


class Calibrator(nn.Module):
    """G_c(x) = clamp(x + delta(x), -1, 1); delta from a narrow ResNet generator, bounded by L_inf."""

    def __init__(self, channels=3, width=8, blocks=9, linf=0.4, perturb="official", dropout=0.05):
        super().__init__()
        w = width
        self.down = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(channels, w, 7), nn.InstanceNorm2d(w), nn.ReLU(True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * w), nn.ReLU(True),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.InstanceNorm2d(4 * w), nn.ReLU(True))
        self.blocks = nn.ModuleList(resnet_block(4 * w) for _ in range(blocks))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(2 * w),
            nn.ReLU(True),
            nn.ConvTranspose2d(2 * w, w, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(w), nn.ReLU(True),
            nn.ReflectionPad2d(3), nn.Conv2d(w, channels, 7), nn.Tanh())
        self.drop = nn.Dropout(dropout)
        self.linf, self.perturb = linf, perturb

    def delta(self, x):
        h = self.down(x)
        for block in self.blocks:
            h = h + block(h)
        t = self.up(h)
        # official: one-sided, the calibrator can only add intensity, at most L_inf; symmetric: |delta| <= L_inf
        return self.drop(torch.clamp((t + 1) / 2, 0, self.linf) if self.perturb == "official" else self.linf * t)

    def forward(self, x):
        return torch.clamp(x + self.delta(x), -1.0, 1.0)


def init_weights(m):
    """Official initialisation (backbones.init_weights, applied to G_c and D_pixel): N(0, 0.02) weights, zero biases."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(m.bias)


def feature_discriminator(in_dim):
    """Official FeatureDiscriminator: in -> 1000 -> 500 -> 4 groups."""
    return nn.Sequential(nn.Linear(in_dim, 1000), nn.ReLU(True), nn.Linear(1000, 500), nn.ReLU(True), nn.Dropout(0.5),
                         nn.Linear(500, 4))


def pixel_discriminator(patch, channels, hidden):
    """Two FC layers on a flattened P x P x C patch -> 4 groups."""
    return nn.Sequential(nn.Linear(patch * patch * channels, hidden), nn.ReLU(True), nn.Linear(hidden, 4))


def shuffled_patch(x, top, left, size, generator=None):
    """The P x P patch at (top, left) of every image, its pixels permuted independently per image and per channel
    (keeps each channel's pixel multiset, destroys spatial structure). Returns [N, C * P * P]."""
    span = torch.arange(size, device=x.device)  # (indices, not a slice: under --cuda-graph top/left are device tensors)
    p = x.index_select(2, span + top).index_select(3, span + left).flatten(2)  # [N, C, P*P]
    perm = torch.rand(p.shape, device=x.device, generator=generator).argsort(-1)
    return p.gather(-1, perm).flatten(1)


def group_labels(n, device):
    """Class index of each group: G1 = X_s (0), G2 = X_t (1), G3 = G_c(X_s) (2), G4 = G_c(X_t) (3)."""
    return [torch.full((n,), i, dtype=torch.long, device=device) for i in range(4)]


def calibrator_loss(logits_feat, logits_pix, n, w):
    """Eq. 7: both discriminators should put the calibrated groups G3 = G_c(X_s) (rows :n) and G4 = G_c(X_t)
    (rows n:) in G1, the source. w: the weights of (feature, source), (feature, target), (pixel, source),
    (pixel, target)."""
    g1 = torch.zeros(n, dtype=torch.long, device=logits_feat.device)
    return (w[0] * F.cross_entropy(logits_feat[:n], g1) + w[1] * F.cross_entropy(logits_feat[n:], g1) +
            w[2] * F.cross_entropy(logits_pix[:n], g1) + w[3] * F.cross_entropy(logits_pix[n:], g1))


def discriminator_loss(d_feat, d_pix, f_real, f_cal, p_real, p_cal, y):
    """Eqs. 5-6: each discriminator's 4-way cross entropy over the groups, rows [G1; G2] real then [G3; G4] calibrated
    (detached: this step does not train G_c); y: every row's group."""
    return (F.cross_entropy(d_feat(torch.cat([f_real, f_cal.detach()])), y) +
            F.cross_entropy(d_pix(torch.cat([p_real, p_cal.detach()])), y))


def count_macs(model, x):
    """Multiply-accumulates per image of the conv, transposed-conv and linear layers in one forward pass of x."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            total[0] += out.numel() * mod.in_features
        elif isinstance(mod, nn.Conv2d):  # every output value: (C_in / groups) * kh * kw products
            total[0] += out.numel() * mod.weight[0].numel()
        else:  # ConvTranspose2d: every input value is spread over (C_out / groups) * kh * kw outputs
            total[0] += inp[0].numel() * mod.weight[0].numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    was_training = model.training
    with torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    for h in hs:
        h.remove()
    return total[0] // x.shape[0]


def log_spectrum(x):
    """log(1 + |FFT|) of each image's channel mean, centred, scaled to [0, 1] per image (Figure 6)."""
    mag = torch.fft.fftshift(torch.fft.fft2(x.mean(1)), dim=(-2, -1)).abs().log1p()
    lo, hi = mag.amin((-2, -1), keepdim=True), mag.amax((-2, -1), keepdim=True)
    return ((mag - lo) / (hi - lo + 1e-8)).unsqueeze(1).expand(-1, 3, -1, -1)


def save_grid(g_c, xs, xt, path):
    """Rows: source, G_c(source), delta_s (amplified), target, G_c(target), delta_t, |FFT| target, |FFT| G_c(target)."""
    from torchvision.utils import save_image

    g_c.eval()
    with torch.inference_mode():
        cs, ct = g_c(xs), g_c(xt)
    amp = lambda d: (d / (d.abs().amax((1, 2, 3), keepdim=True) + 1e-8) + 1) / 2  # noqa: E731  delta -> [0, 1]
    rows = [(xs + 1) / 2, (cs + 1) / 2, amp(cs - xs), (xt + 1) / 2, (ct + 1) / 2, amp(ct - xt), log_spectrum(xt),
            log_spectrum(ct)]
    save_image(torch.cat(rows).float().cpu(), path, nrow=len(xs), padding=1)


def source_stage(args, f_s, src, tgt, g, loaded, stage1, source_steps, run, ev):
    """Stage 1: F_s trained on the source labels (unless loaded), saved, frozen; returns its accuracy alone."""
    if not loaded:
        train_source(f_s, src.train_x, src.train_y, steps=source_steps, batch_size=args.batch_size, lr=args.source_lr,
                     weight_decay=args.source_wd, generator=g, input_range="-1,1", log_every=args.log_every * 5,
                     amp=args.amp, identity=stage1,
                     paths=[None if args.no_save_model else run.dir / "source.pt", args.source_ckpt])
    f_s.requires_grad_(False)
    alone = {"target_acc": accuracy(f_s, tgt.test_x, tgt.test_y, **ev),
             "source_acc": accuracy(f_s, src.test_x, src.test_y, **ev)}
    print(f"F_s alone: target {alone['target_acc']:.2f} source {alone['source_acc']:.2f}", flush=True)
    return alone


def stage2_networks(args, f_s, num_classes, device):
    """G_c, D_feat, D_pixel (official init but D_feat's), their Adams, and G_c's cost relative to F_s (Table 3)."""
    g_c = Calibrator(3, args.width, args.blocks, args.linf, args.perturb, args.calib_dropout).to(device)
    probe = torch.zeros(1, 3, args.size, args.size, device=device)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    cost = {"calibrator_params": n(g_c), "classifier_params": n(f_s),
            "calibrator_macs": count_macs(g_c, probe), "classifier_macs": count_macs(f_s, probe)}
    cost["param_ratio"] = cost["calibrator_params"] / cost["classifier_params"]
    cost["macs_ratio"] = cost["calibrator_macs"] / cost["classifier_macs"]
    print(f"calibrator {cost['calibrator_params']:,} params ({100 * cost['param_ratio']:.1f}% of F_s), "
          f"{cost['calibrator_macs'] / 1e6:.2f}M MACs/image ({100 * cost['macs_ratio']:.1f}% of F_s's "
          f"{cost['classifier_macs'] / 1e6:.2f}M)", flush=True)
    d_feat = feature_discriminator(num_classes if args.feat_input == "softmax" else f_s.feature_dim).to(device)
    d_pix = pixel_discriminator(args.patch, 3, args.pixel_hidden).to(device)
    if args.init == "official":
        g_c.apply(init_weights), d_pix.apply(init_weights)
    adam = dict(lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay,
                capturable=args.cuda_graph == "on")  # (capturable: --cuda-graph)
    opt_g = torch.optim.Adam(g_c.parameters(), **adam)
    opt_d = torch.optim.Adam(list(d_feat.parameters()) + list(d_pix.parameters()), **adam)
    return g_c, d_feat, d_pix, opt_g, opt_d, cost


def feature_groups(args, f_s, run):
    """D_feat's input: F_s's softmax (official) or M_s's features; F_s in train mode sees each group on its own."""
    def feat(x):
        f = f_s.features(x)
        return F.softmax(f_s.classifier(f), 1) if args.feat_input == "softmax" else f

    feat_c = run.compile(feat)
    return lambda x: torch.cat([feat_c(part) for part in x.split(args.batch_size)]) if args.source_bn == "train" \
        else feat_c(x)


def stage1_plan(args, src, tgt, f_s):
    """Steps per epoch, stage 1's length and identity (a cache is reused only for the same F_s), and if F_s loaded."""
    steps_per_epoch = max(1, min(len(src.train_x), len(tgt.train_x)) // args.batch_size)
    if args.steps is None:  # resolved from the dataset sizes; args.json records it
        args.steps = max(1, round(args.epochs * steps_per_epoch))
    source_steps = max(1, round(args.source_epochs * len(src.train_x) / args.batch_size))
    stage1 = dict(source=src.name, seed=args.seed, source_steps=source_steps, source_lr=args.source_lr,
                  source_wd=args.source_wd, batch_size=args.batch_size)
    own = Path(args.resume or "") / "source.pt"
    loaded = load_source(f_s, own if args.resume and own.exists() else args.source_ckpt, stage1)
    return steps_per_epoch, source_steps, stage1, loaded


def save_outputs(args, g_c, f_s, src, tgt, run, final, ev):
    """F_s alone after a BatchNorm drift (or None), the class shares; writes the final metrics, grid and model."""
    # --source-bn train: F_s's BatchNorm statistics moved, so F_s alone is no longer what it was
    drifted = {"target_acc": round(accuracy(f_s, tgt.test_x, tgt.test_y, **ev), 3),
               "source_acc": round(accuracy(f_s, src.test_x, src.test_y, **ev), 3)} if args.source_bn == "train" else None
    run.meter.write(step=args.steps, **final)
    shares = run.predictions(nn.Sequential(g_c, f_s), src, tgt, **ev)  # label-free: each class's share
    if args.grid_images:
        k, target_images = args.grid_images, tgt.test_x if len(tgt.test_x) else tgt.train_x  # a folder task: no test
        save_grid(g_c, to_float(src.test_x[:k]), to_float(target_images[:k]), run.dir / "calibration.png")
        run.meter.image("calibration", run.dir / "calibration.png", args.steps)
    run.save_model({"calibrator": g_c.state_dict(), "source_model": f_s.state_dict(), "args": vars(args)})
    return drifted, shares


def main(args):
    # TRY NOT TO MODIFY: seeding, device, data (uint8 tensors on the device)
    run = Run(args, "calibrator")
    device = run.device
    g = torch.Generator(device=device).manual_seed(args.seed)
    src, tgt = load_task(args, args.size, 3, device)
    f_s = build_backbone(args.backbone, len(src.classes), args.image_size, args.pretrained).to(device)
    steps_per_epoch, source_steps, stage1, loaded = stage1_plan(args, src, tgt, f_s)
    ev = dict(batch_size=args.eval_batch_size, amp=args.amp)
    run.folder(source_steps=source_steps, steps_per_epoch=steps_per_epoch, source=src.name, target=tgt.name)
    print(f"calibrator {args.task} | {src} -> {tgt} | {args.backbone} {sum(p.numel() for p in f_s.parameters()):,} "
          f"params | {device} | run folder {run.dir}", flush=True)

    # ---- stage 1: source classifier F_s, then frozen -----------------------------------------------------------
    alone = source_stage(args, f_s, src, tgt, g, loaded, stage1, source_steps, run, ev)

    # ---- stage 2: the calibrator and the two discriminators ----------------------------------------------------
    g_c, d_feat, d_pix, opt_g, opt_d, cost = stage2_networks(args, f_s, len(src.classes), device)
    feat_groups, g_fwd = feature_groups(args, f_s, run), run.compile(g_c)

    def evaluate(final=False):  # F_s o G_c; during training a curve only, never used for selection
        model = nn.Sequential(g_c, f_s)
        rec = run.keep_best(model, evaluate_domains(model, src, tgt, final, **ev))  # --keep-best: saved
        g_c.train(), f_s.train(args.source_bn == "train")  # accuracy() restored the Sequential's mode on both
        return rec

    w = args.w_feat_source, args.w_feat_target, args.w_pix_source, args.w_pix_target
    s_sampler, t_sampler = (IndexSampler(len(d.train_x), args.batch_size, device, g) for d in (src, tgt))
    y = torch.cat(group_labels(args.batch_size, device))  # the group of every row of [G1; G2; G3; G4], each step
    rng = random.Random(args.seed)  # patch locations (host side: no device sync)
    meter = run.start_meter()
    state = dict(g_c=g_c, d_feat=d_feat, d_pix=d_pix, f_s=f_s, opt_g=opt_g, opt_d=opt_d, s_sampler=s_sampler,
                 t_sampler=t_sampler, g=g, rng=rng, meter=meter)  # f_s: its BatchNorm statistics drift in train mode
    g_c.train(), d_feat.train(), d_pix.train(), f_s.train(args.source_bn == "train")

    def train_step(s_idx, t_idx, top, left):
        """One update of the discriminators, then one of the calibrator; (top, left): this step's patch location."""
        xs, xt = to_float(src.train_x[s_idx]), to_float(tgt.train_x[t_idx])
        n, x = len(xs), torch.cat([xs, xt])  # G1, G2
        with run.autocast():
            grad = torch.enable_grad() if args.reuse_forward else torch.no_grad()  # a graph only if the calibrator's
            with grad:  # step below reuses this forward (the official step runs its own)
                cal = g_fwd(x)  # G3 = G_c(X_s), G4 = G_c(X_t)
            with torch.no_grad():
                f_real = feat_groups(x)
            with grad:
                f_cal = feat_groups(cal)  # gradient flows through the frozen F_s into G_c
            p_real = shuffled_patch(x, top, left, args.patch, g)
            p_cal = shuffled_patch(cal, top, left, args.patch, g)
            loss_d = discriminator_loss(d_feat, d_pix, f_real, f_cal, p_real, p_cal, y)  # eqs. 5-6
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        with run.autocast():  # calibrator (eq. 7): D_feat and D_pixel should call G3 and G4 "source"
            if not args.reuse_forward:  # official: G_c and F_s run again (new dropout masks; in --source-bn train
                cal = g_fwd(x)  # F_s's BatchNorm statistics move again) and D_pixel sees a new shuffle
                f_cal = feat_groups(cal)
                p_cal = shuffled_patch(cal, top, left, args.patch, g)
            loss_g = calibrator_loss(d_feat(f_cal), d_pix(p_cal), n, w)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        return dict(loss_d=loss_d, loss_g=loss_g, max_delta=(cal.detach() - x).abs().amax())

    train_step = run.graphed(train_step, [g])  # --cuda-graph on: recorded once, then replayed
    for step in range(run.resume(state) + 1, args.steps + 1):
        # ALGO LOGIC
        s_idx, t_idx = s_sampler.next(), t_sampler.next()
        # one random patch location per step, the same for all four groups
        top, left = rng.randrange(args.size + 1 - args.patch), rng.randrange(args.size + 1 - args.patch)
        stats = train_step(s_idx, t_idx, top, left)

        # TRY NOT TO MODIFY: logging, the accuracy curve, checkpoints
        meter.add(**stats)
        meter.step(step, evaluate)
        run.checkpoint(step, state)

    # ---- final calibrator's accuracy (no checkpoint selection) ---------------------------------------------------
    final = evaluate(final=True)
    drifted, shares = save_outputs(args, g_c, f_s, src, tgt, run, final, ev)
    run.finish({
        "method": "calibrator", "task": args.task, "variant": args.variant, "seed": args.seed, "steps": args.steps,
        "backbone": args.backbone, "pretrained": args.pretrained,
        "epochs": round(args.steps / steps_per_epoch, 2), "source_steps": 0 if loaded else source_steps,
        "target_acc": round(final["target_test_acc"], 3), "source_acc": round(final["source_test_acc"], 3),
        "source_model_alone": {k: round(v, 3) for k, v in alone.items()},
        "source_model_alone_after_bn_drift": drifted, "class_shares": shares,
        "cost": {k: round(v, 5) if isinstance(v, float) else v for k, v in cost.items()}}, final, (src, tgt))


if __name__ == "__main__":
    Run.main(main, parse_args)
