"""PixelDA: Unsupervised Pixel-Level Domain Adaptation with GANs (Bousmalis, Silberman, Dohan, Erhan, Krishnan, CVPR 2017).

A generator G(x_s, z) renders labelled source images in the style of the target domain; a discriminator D tells
rendered images from real target images; a task classifier T learns the labels from source images and from the
rendered ones, and is then applied to target images. Adaptation happens in pixel space: T is an ordinary
classifier and G's output can be looked at.

Implemented as the TensorFlow release (tensorflow/models, research/domain_adaptation/pixel_domain_adaptation:
hparams.py, pixelda_model.py, pixelda_losses.py, pixelda_task_towers.py, pixelda_train.py), defaults from its
MNIST->MNIST-M command:
  * G: z ~ U[-1, 1]^10 projected by FC + BN + ReLU to one image-sized channel, concatenated to x_s; conv3x3-64 +
    ReLU; 6 residual blocks (conv3x3-64-BN-ReLU-conv3x3-64-BN + skip); conv1x1 to the target's channels; tanh.
  * D: conv3x3-64 stride 1 (no BN), then stride-2 conv3x3 blocks doubling the width (128, 256, 512 at 32x32) with
    BN; LeakyReLU 0.2; during training, dropout 0.1 and Gaussian noise (sigma 0.2) on every hidden layer; one logit.
  * T: the release's `mnist` tower (conv5-32, pool, conv5-48, pool with SAME padding: 3,072 features; fc100, fc100,
    fc10). Source images go through a private first conv, G's images and target images through T's own
    (`--no-private-conv`: one T for all). The source test split is scored with the source images' tower.
  * Batch norm as slim's: a shift but no scale, eps 1e-3, decay 0.9. Weights ~ N(0, 0.02), zero biases.
  * Losses (pixelda_losses.py): D's step minimises 0.1356 (`--domain-weight`) x its GAN loss (target 1, G(x_s, z)
    0) plus T's cross entropy on x_s and on G(x_s, z) (weights 1, 1); G's step minimises 0.0113 (`--style-weight`)
    x the non-saturating GAN loss plus 0.0101 (`--task-in-g-weight`) x T's cross entropy on its images. The
    release's content-similarity loss is off in that command (weight 0); `--content-weight` turns on a masked
    pairwise MSE between G(x_s, z) and x_s over the digit's stroke (`--mask-threshold`; -2: every pixel).
  * Optimisation: Adam lr 1e-3, beta1 0.5, batch 32 per domain; one D+T step, then one G step on a fresh source
    batch and z (two train ops, each with its own batch). Both ops advance the release's global step, so its 500k
    steps (16M examples / 32) are 250k D+G iterations, and its x0.95 decay every 20k steps comes every 10k
    iterations (`--steps`, `--lr-decay-steps` count iterations). Each gradient tensor is clipped to norm 5.
  * `--source-only`: T trained on source images alone with the same optimiser (the paper's lower bound).

Evaluation: the *final* T's accuracy on the target *test* split and the source *test* split (no checkpoint selection;
the target accuracy is logged every `--eval-every` steps as a curve only). PNG grids (x_s; G(x_s, z) for several z;
real target images) are written every `--grid-every` steps and at the end. The logged `t_acc_on_fake` is T's
accuracy on G's images (source labels only): near chance means G has dropped the class.

Deviations, each a flag or stated here:
  * Images are 32x32 with 3 channels for every task (MNIST / USPS replicated), pixels in [-1, 1]. G's last conv has
    the target's channels: 1 for a gray target (USPS, MNIST), replicated like the data (a 3-channel G for a gray
    target renders coloured digits that no target image has).
  * The release declares weight decay 1e-5 for G and T but never adds it to the loss (slim's create_train_op does
    not collect it): `--weight-decay` defaults to 0, as it trains there.
  * D's Gaussian noise is off in eval mode (the release adds it at test time too; D is not used then).

Paper numbers (target accuracy): MNIST->MNIST-M 98.2 (source-only 63.6), MNIST->USPS 95.9 (source-only 78.9).
Measured numbers: RESULTS.md. On MNIST->USPS (seeds 0-2) the private first conv ends at 42.95 / 33.28 / 15.05 after
400 CPU steps (peaks 71.1 / 53.2 / 63.9) and at 56.40 / 19.43 / 49.83 after 1000 GPU steps; a shared one
(`--no-private-conv`) at 77.4 / 58.6 / 57.2 and 64.18 / 55.21 / 33.28: both fall after step 100-200.
MNIST->MNIST-M at 1000 CPU steps: 78.34 +- 2.08, still rising (86.15 +- 1.57 with the weights until 50f9e9c).
Until commit 50f9e9c this file put 0.1356 on G's GAN loss and 0.0113 on a masked PMSE (adversarial-to-task 13:1,
not the release's 1:1), used the DANN tower, one batch and z for both steps, weight decay 1e-5 and one clipping
norm per network (RESULTS.md marks those rows with that commit; M->U then collapsed).
"""

import argparse
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Backbone, Flags, IndexSampler, Run, UsageError, evaluate_domains, load_task, to_float

# The loss weights of the official MNIST->MNIST-M run (the release's README; its content loss is off, weight 0);
# others are named in the variant.
OFFICIAL_WEIGHTS = {"domain_weight": 0.135603587834, "style_weight": 0.0113173311334, "content_weight": 0.0,
                    "task_in_g_weight": 0.0100959947002}


def parse_args(argv=None):
    p = Flags(__doc__, task="mnist-mnistm", steps=250_000,
              steps_help="D+G iterations (official: 16M examples / 32 = 500k global steps, two per iteration)",
              log_every=200, eval_every=2000)
    g = p.add_argument_group("method (defaults: the official MNIST->MNIST-M hyperparameters)")
    g.add_argument("--source-only", action="store_true", help="train T on source images only (no G, no D)")
    g.add_argument("--batch-size", type=int, default=32, help="images per domain per step")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of G, D and T")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    g.add_argument("--lr-decay", type=float, default=0.95, help="lr multiplier every --lr-decay-steps (staircase)")
    g.add_argument("--lr-decay-steps", type=int, default=10_000,
                   help="iterations between lr decays (official: 20k global steps = 10k D+G iterations)")
    g.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip per parameter tensor (0: none)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="weight decay of G and T (official: 1e-5 declared, never added to the loss)")
    g.add_argument("--domain-weight", type=float, default=OFFICIAL_WEIGHTS["domain_weight"],
                   help="weight of D's GAN loss (official domain_loss_weight)")
    g.add_argument("--style-weight", type=float, default=OFFICIAL_WEIGHTS["style_weight"],
                   help="weight of G's GAN loss (official style_transfer_loss_weight)")
    g.add_argument("--content-weight", type=float, default=OFFICIAL_WEIGHTS["content_weight"],
                   help="weight of the masked PMSE in G (official: 0, off)")
    g.add_argument("--task-in-g-weight", type=float, default=OFFICIAL_WEIGHTS["task_in_g_weight"],
                   help="weight of T's loss in G's step")
    g.add_argument("--noise-dim", type=int, default=10, help="dimension of z ~ U[-1, 1]")
    g.add_argument("--res-blocks", type=int, default=6, help="residual blocks in G")
    g.add_argument("--d-noise", type=float, default=0.2, help="std of D's Gaussian noise on hidden layers (training)")
    g.add_argument("--d-dropout", type=float, default=0.1, help="D's dropout on hidden layers (training)")
    g.add_argument("--mask-threshold", type=float, default=0.0, help="foreground: source pixels above this ([-1, 1])")
    g.add_argument("--private-conv", action=argparse.BooleanOptionalAction, default=True,
                   help="T: a private first conv for source images (official); --no-private-conv: one T for all")
    g.add_argument("--grid-every", type=int, default=5000, help="write a PNG grid every N steps (0: only at the end)")
    args = p.parse(argv, positive=("lr", "lr_decay"), at_least_one=("lr_decay_steps", "noise_dim"),
                   non_negative=("clip", "weight_decay", "domain_weight", "style_weight", "content_weight",
                                 "task_in_g_weight", "res_blocks", "d_noise", "grid_every"))
    if args.batch_size < 2:
        raise UsageError("--batch-size must be >= 2 (BatchNorm statistics)")
    if not 0 <= args.beta1 < 1 or not 0 <= args.d_dropout < 1:
        raise UsageError("--beta1 and --d-dropout must be in [0, 1)")
    args.private_conv = args.private_conv and not args.source_only  # source-only: one T, no translated images
    weights = [f"{k.replace('_weight', '').replace('task_in_g', 'task-in-G')} {getattr(args, k):g}"
               for k, v in OFFICIAL_WEIGHTS.items() if getattr(args, k) != v]
    if args.mask_threshold != 0.0 and args.content_weight:  # the content loss over another set of pixels
        weights.append("PMSE on every pixel" if args.mask_threshold < -1 else f"mask > {args.mask_threshold:g}")
    weights += [] if args.private_conv else ["shared first conv"]
    args.variant = "source-only" if args.source_only else "pixelda" + (f" ({', '.join(weights)})" if weights else "")
    return args


# ALGO LOGIC: the method's own pieces
def batch_norm(ch, dims=2):
    """slim's batch norm as the release configures it: a shift (beta), no scale (gamma stays 1), eps 1e-3, decay 0.9."""
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(ch, eps=1e-3, momentum=0.1)
    bn.weight.requires_grad_(False)
    return bn


def task_tower(num_classes=10):
    """The release's `mnist` task tower: conv5-32 (SAME), ReLU, pool 2/2, conv5-48 (SAME), ReLU, pool 2/2 (8x8x48 =
    3,072 features) | fc100, ReLU, fc100, ReLU, fc10; no batch norm, no dropout. Its first conv is the one for G's
    images and target images; `--private-conv` gives source images their own."""
    return Backbone("pixelda_mnist", 3, 32, OrderedDict(
        conv1=nn.Conv2d(3, 32, 5, padding=2), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 48, 5, padding=2), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2), flatten=nn.Flatten(),
    ), OrderedDict(fc3=nn.Linear(48 * 8 * 8, 100), relu3=nn.ReLU(), fc4=nn.Linear(100, 100), relu4=nn.ReLU(),
                   fc5=nn.Linear(100, num_classes)))


def init_weights(m):
    """N(0, 0.02) weights, zero biases (official initialisation)."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """G(x_s, z): noise channel + source image -> conv3x3-64 + ReLU -> residual blocks -> conv1x1 -> tanh."""

    def __init__(self, in_ch=3, out_ch=3, size=32, noise_dim=10, blocks=6):
        super().__init__()
        self.size, self.noise_dim = size, noise_dim
        self.project = nn.Sequential(nn.Linear(noise_dim, size * size), batch_norm(size * size, 1), nn.ReLU())
        self.stem = nn.Sequential(nn.Conv2d(in_ch + 1, 64, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1), batch_norm(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), batch_norm(64)) for _ in range(blocks))
        self.head = nn.Sequential(nn.Conv2d(64, out_ch, 1), nn.Tanh())

    def forward(self, x, z):
        h = self.stem(torch.cat([x, self.project(z).view(-1, 1, self.size, self.size)], 1))
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class Discriminator(nn.Module):
    """conv3x3-64 (stride 1, no BN) and stride-2 conv3x3 blocks with BN, LeakyReLU 0.2, down to 4x4; one logit.
    In training mode every hidden layer gets dropout and additive Gaussian noise (off in eval mode)."""

    def __init__(self, in_ch=3, size=32, noise=0.2, dropout=0.1):
        super().__init__()
        layers, ch = [nn.Conv2d(in_ch, 64, 3, padding=1)], 64
        while size > 4:
            layers += [nn.Sequential(nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1), batch_norm(2 * ch))]
            ch, size = 2 * ch, size // 2
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(ch * size * size, 1)
        self.noise, self.drop = noise, nn.Dropout(dropout)

    def forward(self, x):
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
            if self.training:
                x = self.drop(x) + self.noise * torch.randn_like(x)
        return self.fc(x.flatten(1)).squeeze(1)


def masked_pmse(a, b, mask):
    """Masked pairwise mean squared error per image, averaged over the batch: with d = a - b over the masked
    pixels (all channels), mean(d^2) - mean(d)^2 (= the mean over masked pairs (i, j) of ((a_i - a_j) - (b_i -
    b_j))^2 / 2). Zero when the masked images match, unchanged when a constant is added to either image.
    mask: [N, 1, H, W] of 0/1, broadcast over channels."""
    m = mask.expand_as(a).float()
    k = m.sum((1, 2, 3)).clamp_min(1.0)
    d = (a - b) * m
    return (d.pow(2).sum((1, 2, 3)) / k - (d.sum((1, 2, 3)) / k).pow(2)).mean()


def discriminator_loss(d_net, xt, fake):
    """D's GAN loss: real target images are labelled 1, G's renderings 0 (detached: this step does not train G)."""
    return (F.binary_cross_entropy_with_logits(d_net(xt), torch.ones(len(xt), device=xt.device)) +
            F.binary_cross_entropy_with_logits(d_net(fake.detach()), torch.zeros(len(fake), device=fake.device)))


def generator_gan_loss(d_net, fake):
    """G's (non-saturating) GAN loss: its renderings should be called real target images, label 1."""
    return F.binary_cross_entropy_with_logits(d_net(fake), torch.ones(len(fake), device=fake.device))


def task_loss(t_net, s_net, xs, fake, ys):
    """T's loss: cross entropy on G's renderings (detached: this step does not train G) and, through T's source tower
    s_net, on the source images; both carry the source labels. Returns (loss, T's logits on the renderings)."""
    logits_fake = t_net(fake.detach())
    return F.cross_entropy(s_net(xs), ys) + F.cross_entropy(logits_fake, ys), logits_fake


def generator_loss(d_net, t_net, fake, xs, ys, mask_threshold, w_style, w_content, w_task):
    """G's loss: fool D (w_style), keep the foreground's shape (w_content: masked PMSE over the source pixels brighter
    than mask_threshold) and the class for T (w_task). Returns (loss, weighted GAN term, PMSE, T's cross entropy)."""
    loss_g = w_style * generator_gan_loss(d_net, fake)
    loss_c = masked_pmse(fake, xs, xs.mean(1, keepdim=True) > mask_threshold)
    loss_gt = F.cross_entropy(t_net(fake), ys)
    return loss_g + w_content * loss_c + w_task * loss_gt, loss_g, loss_c, loss_gt


def clip_and_step(opt, params, clip):
    """Clip each parameter tensor's gradient to norm `clip` (slim's clip_gradient_norms, per tensor), then step."""
    if clip > 0:
        for p in params:
            if p.grad is not None:
                nn.utils.clip_grad_norm_(p, clip)
    opt.step()


def save_grid(g_net, xs, xt, noise_dim, path, n_z=3, generator=None):
    """Rows: x_s; G(x_s, z) for n_z noise vectors; real target images."""
    from torchvision.utils import save_image

    was_training = g_net.training
    g_net.eval()
    rows = [xs]
    with torch.inference_mode():
        for _ in range(n_z):
            z = torch.rand(len(xs), noise_dim, device=xs.device, generator=generator) * 2 - 1
            rows.append(g_net(xs, z).expand_as(xs))  # a 1-channel G's output replicated, as gray data is
    rows.append(xt)
    g_net.train(was_training)
    save_image((torch.cat(rows).float().cpu() + 1) / 2, path, nrow=len(xs), padding=1)


def main(args):
    # TRY NOT TO MODIFY: seeding, device, data (uint8 tensors on the device), run folder
    run = Run(args, "pixelda")
    device = run.device
    g = torch.Generator(device=device).manual_seed(args.seed)
    src, tgt = load_task(args, 32, 3, device)  # T, G and D work on 32x32 RGB
    t_net = task_tower(len(src.classes))
    run_dir = run.folder(source=src.name, target=tgt.name)

    # ALGO LOGIC: G, D, T (official initialisation), Adam with a staircase decay for each
    ch, size = t_net.in_channels, t_net.size
    # a gray target (USPS, MNIST: replicated to 3 channels on loading) gets a 1-channel G, replicated the same way
    gray_target = bool((tgt.train_x[:, 1:] == tgt.train_x[:, :1]).all())
    g_net = Generator(ch, 1 if gray_target else ch, size, args.noise_dim, args.res_blocks)
    d_net = Discriminator(ch, size, args.d_noise, args.d_dropout)
    for net in (g_net, d_net, t_net):
        net.apply(init_weights)
    t_net, g_net, d_net = t_net.to(device), g_net.to(device), d_net.to(device)
    # source images' conv1 (official initialisation too)
    private = nn.Conv2d(ch, 32, 5, padding=2).to(device).apply(init_weights) if args.private_conv else None
    # T as applied to source images: their private first conv (if any), then T's shared layers (the same modules)
    s_net = nn.Sequential(private, *list(t_net.features)[1:], t_net.classifier) if private is not None else t_net
    t_params = list(t_net.parameters()) + (list(private.parameters()) if private is not None else [])
    adam = dict(lr=args.lr, betas=(args.beta1, 0.999), capturable=args.cuda_graph == "on")  # (capturable: --cuda-graph)
    opt_t = torch.optim.Adam(t_params, weight_decay=args.weight_decay, **adam)
    opt_d = torch.optim.Adam(d_net.parameters(), **adam)
    opt_g = torch.optim.Adam(g_net.parameters(), weight_decay=args.weight_decay, **adam)
    d_params, g_params = list(d_net.parameters()), [p for p in g_net.parameters() if p.requires_grad]
    opts = (opt_t,) if args.source_only else (opt_t, opt_d, opt_g)
    scheds = [torch.optim.lr_scheduler.StepLR(o, args.lr_decay_steps, args.lr_decay) for o in opts]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"pixelda {args.task} ({args.variant}) | {src} -> {tgt} | T {n(t_net):,} G {n(g_net):,} D {n(d_net):,} "
          f"params | {device} | run folder {run_dir}", flush=True)
    for net in (g_net, d_net, t_net):
        run.compile(net)
    ev = dict(batch_size=args.eval_batch_size, amp=args.amp)

    def evaluate():  # a curve only: never used for selection
        return run.keep_best(t_net, evaluate_domains(t_net, src, tgt, source_model=s_net, **ev))  # --keep-best

    # ---- training -----------------------------------------------------------------------------------------------
    s_sampler = IndexSampler(len(src.train_x), args.batch_size, device, g)
    t_sampler = IndexSampler(len(tgt.train_x), args.batch_size, device, g)
    grid_xs, grid_xt = to_float(src.test_x[:8]), to_float((tgt.test_x if len(tgt.test_x) else tgt.train_x)[:8])
    grid_g = torch.Generator(device=device).manual_seed(args.seed)  # the grids' own z: they never move training's
    meter = run.start_meter()
    state = dict(t_net=t_net, g_net=g_net, d_net=d_net, **({"private": private} if private is not None else {}),
                 **{f"opt{i}": o for i, o in enumerate(opts)}, **{f"sched{i}": s for i, s in enumerate(scheds)},
                 s_sampler=s_sampler, t_sampler=t_sampler, g=g, grid_g=grid_g, meter=meter)
    t_net.train(), g_net.train(), d_net.train()

    def train_step(idx, t_idx=None, g_idx=None):
        """One step of D and T, then one of G; idx, t_idx: the source and target images of the D step, g_idx: the
        source images of the G step (the release draws a fresh batch and z for each of its two train ops)."""
        xs, ys = to_float(src.train_x[idx]), src.train_y[idx]
        if args.source_only:
            with run.autocast():
                loss_t = F.cross_entropy(t_net(xs), ys)
            opt_t.zero_grad(set_to_none=True)
            loss_t.backward()
            clip_and_step(opt_t, t_params, args.clip)
            return dict(loss_t=loss_t)
        xt = to_float(tgt.train_x[t_idx])
        z = torch.rand(args.batch_size, args.noise_dim, device=device, generator=g) * 2 - 1
        with run.autocast():
            fake = g_net(xs, z).expand_as(xs)  # a gray target's 1-channel output, replicated like the data
            # D and T step: D tells target (1) from G(x_s, z) (0); T learns from x_s and G(x_s, z)
            loss_d = args.domain_weight * discriminator_loss(d_net, xt, fake)
            loss_t, logits_fake = task_loss(t_net, s_net, xs, fake, ys)
        opt_d.zero_grad(set_to_none=True)
        opt_t.zero_grad(set_to_none=True)
        (loss_d + loss_t).backward()
        clip_and_step(opt_d, d_params, args.clip)
        clip_and_step(opt_t, t_params, args.clip)

        # G step, on a fresh source batch and z
        xs_g, ys_g = to_float(src.train_x[g_idx]), src.train_y[g_idx]
        z = torch.rand(args.batch_size, args.noise_dim, device=device, generator=g) * 2 - 1
        with run.autocast():
            fake_g = g_net(xs_g, z).expand_as(xs_g)
            loss, loss_g, loss_c, _ = generator_loss(d_net, t_net, fake_g, xs_g, ys_g, args.mask_threshold,
                                                     args.style_weight, args.content_weight, args.task_in_g_weight)
        opt_g.zero_grad(set_to_none=True)
        loss.backward(inputs=g_params)
        clip_and_step(opt_g, g_params, args.clip)
        return dict(loss_t=loss_t, loss_d=loss_d, loss_g=loss_g, pmse=loss_c,
                    t_acc_on_fake=(logits_fake.argmax(1) == ys).float().mean())

    train_step = run.graphed(train_step, [g])  # --cuda-graph on: recorded once, then replayed
    for step in range(run.resume(state) + 1, args.steps + 1):
        # ALGO LOGIC
        lr = opts[0].param_groups[0]["lr"]  # (a recorded step holds its learning rate: the staircase records anew)
        stats = train_step(s_sampler.next(), key=lr) if args.source_only else \
            train_step(s_sampler.next(), t_sampler.next(), s_sampler.next(), key=lr)
        for s in scheds:
            s.step()

        # TRY NOT TO MODIFY: logging, the accuracy curve, grids, checkpoints
        meter.add(**stats)
        meter.step(step, evaluate, lr=opts[0].param_groups[0]["lr"])
        if not args.source_only and args.grid_every and step % args.grid_every == 0:
            save_grid(g_net, grid_xs, grid_xt, args.noise_dim, run_dir / f"samples_{step:07d}.png", generator=grid_g)
            meter.image("samples", run_dir / f"samples_{step:07d}.png", step)
        run.checkpoint(step, state)

    # ---- final model's accuracy (no checkpoint selection) --------------------------------------------------------
    final = run.keep_best(t_net, evaluate_domains(t_net, src, tgt, final=True, source_model=s_net, **ev))
    meter.write(step=args.steps, **final)
    shares = run.predictions(t_net, src, tgt, **ev)  # label-free: each class's share
    if not args.source_only:
        save_grid(g_net, grid_xs, grid_xt, args.noise_dim, run_dir / "samples_final.png", generator=grid_g)
        meter.image("samples", run_dir / "samples_final.png", args.steps)
    run.save_model({"task_net": t_net.state_dict(), "generator": g_net.state_dict(), "discriminator": d_net.state_dict(),
                    "private_conv": private.state_dict() if private is not None else None, "args": vars(args)})
    run.finish({
        "method": "pixelda", "task": args.task, "variant": args.variant, "seed": args.seed, "steps": args.steps,
        "target_acc": round(final["target_test_acc"], 3), "source_acc": round(final["source_test_acc"], 3),
        "class_shares": shares}, final, (src, tgt))


if __name__ == "__main__":
    Run.main(main, parse_args)
