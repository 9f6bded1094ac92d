"""GAM: Domain Transfer Through Deep Activation Matching (Huang, Huang, Kraehenbuehl, ECCV 2018).

A source network F^s (ADDA LeNet) is trained on labelled source images and frozen. The target network F^t starts
as a copy and is adapted without target labels so that its activations on target images match F^s's on source
images in distribution at several layers (eq. 1), while its weights stay close to F^s's (weight drift).

Implemented:
  * Stage 1: Adam lr 1e-3, batch 128, 10k steps (official code). `--source-ckpt PATH` caches F^s per source data,
    seed and stage-1 flags; loaded or trained, stage 2 is the same (stage 1 draws from copies of the random streams).
  * Gaussian i.i.d. matching (Sec. 4.1, eq. 2; the GAN stage starts from it), layer by layer upward: per output
    channel alpha = sigma^s / sigma^t, beta = mu^s - alpha mu^t, folded into weight and bias (layers below first).
  * General activation matching (Sec. 4.2, eq. 3): one discriminator per matched layer (ADDA's 500-500-2 MLP),
    standard GAN loss, inverted labels for F^t, weight drift sum over tensors of mean((W^ref - W^t)^2).
    `--gan-update official` (default), as RsEnts/DAM_release digits_classification/tools/train_adda.py: each
    discriminator sees [source; target] once per iteration, both cross entropies average all 2B rows, and the
    discriminators and F^t are updated together from that one forward. `alternating` (the earlier default): the
    discriminators step, then F^t on the updated ones over the target rows only (= official with --drift 0.5).
  * One GAN at a time (Sec. 5, for digits), `--gan-schedule converged` (default): in --gan-layers order, the next
    GAN joins once the discriminator loss's 500-iteration window mean is within 5 % of the window before (the
    paper says neither the order nor how it judged convergence; fixed before any run, never tuned on target
    labels), at the latest after an equal share of the iterations. `equal-shares`; `joint` (the released code).
  * `--restart-emptied N` (not in the paper; off): when the first GAN has converged and a label-free check
    (common.class_shares) names a class predicted on under a third of its source-label share of the target train
    images, the GAN stage starts again at full length, at most N times; bit for bit the same if no class empties.
  * ADDA = `--gan-layers fc4 --gan-weights 1 --no-gaussian-init --drift 0`. Table 2: `--{source,target}-subset`.
  * `--recipe official` (default; the released digits code, its README: 95 / 98 / 74 for M->U / U->M / S->M): Adam
    lr 2e-4, beta1 0.5, 10k iterations, drift 1; `paper`: SGD lr 1e-4, momentum 0.9, 20k iterations, drift 0.5.
  * Evaluation: the final F^t (never selected on target labels) on the target and source *test* splits; summary.json
    adds `target_train_acc` (ADDA's, the official protocol: target *train* split), F^s's and Gaussian-only accuracy.

Deviations, each with its reason:
  * Inputs 28x28 gray in [0, 1] (`--input-range`), as the official code; SVHN is converted to gray and resized.
  * Our LeNet (ADDA/CyCADA PyTorch) has dropout, in stage 1 only; `--no-source-dropout` matches the official TF LeNet.
  * The drift reference is F^t's initialisation (F^s after Gaussian matching), so that the drift term does not pull
    the Gaussian-matched scales back; `--drift-ref source` uses F^s's weights as in eq. 1.
  * Two Adam objects (F^t, discriminators) where the release shares one: each parameter's moments are its own
    either way; only the shared bias-correction counter differs (no effect after a few hundred iterations).
  * No stage-1 L2 by default (the official tools/train.py, get_total_loss: 2.5e-5); `--source-l2 2.5e-5
    --no-source-dropout` trains the official F^s: U->M seeds 0 / 2 / 5 end at 90.80 / 90.62 / 93.63 (class 7 emptied
    or half), ours 90.77 / 98.10 / 97.96.

Paper (Table 1, M->U / U->M / S->M): no adaptation 77.8 / 70.7 / 60.3; ADDA 90.2 / 97.2 / 72.0; GAM 95.7 +- 0.5 /
98.0 +- 0.5 / 74.6 +- 1.1. Ours (RESULTS.md; final F^t, target test split), `python gam.py --task usps-mnist --seed S
--gan-schedule converged --source-ckpt FILE`, seeds 0-5 (GPU): 96.19 +- 3.11 (four seeds 97.8-98.1; seed 0 reads most
7s as 9s, 90.3); `--gan-update alternating` 96.34 +- 2.86: a tie. M->U seeds 0-2: 93.90 +- 0.86, alternating
94.25 +- 0.78. On the official protocol's target *train* split: 95.61 +- 3.35 / 95.93 +- 0.77. CPU, earlier F^s files:
alternating 95.34 +- 4.26 (seeds 0-5), 96.81 +- 3.03 with `--restart-emptied 2`, ADDA 91.84 +- 6.42.
"""

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Flags, IndexSampler, Run, UsageError, accuracy, build_backbone, class_shares, evaluate_domains,
                    load_source, load_task, to_float, train_source)

RECIPES = {"official": dict(optimizer="adam", lr=2e-4, steps=10000, drift=1.0),
           "paper": dict(optimizer="sgd", lr=1e-4, steps=20000, drift=0.5)}
PAPER_GANS = (["relu3", "fc4"], [0.1, 1.0])  # Sec. 5: the last two layers, the penultimate one scaled by 0.1


def parse_args(argv=None):
    p = Flags(__doc__, task="mnist-usps", steps=None, steps_help="adaptation iterations (default: the recipe's)",
              log_every=500, eval_every=2000, input_range="0,1")
    for d in ("source", "target"):
        p.data.add_argument(f"--{d}-subset", default="full", choices=["full", "odd", "even"],
                          help=f"Table 2: remove half of the odd/even digits from the {d} train split")
    g = p.add_argument_group("stage 1: source network F^s")
    g.add_argument("--source-ckpt", default=None,
                   help="F^s cache file: loaded if it exists (same source data/seed/stage-1 flags), else trained and saved")
    g.add_argument("--source-steps", type=int, default=10000, help="source training steps (official: 10k)")
    g.add_argument("--source-lr", type=float, default=1e-3, help="Adam learning rate for F^s (official: 1e-3)")
    g.add_argument("--batch-size", type=int, default=128, help="batch size per domain, both stages")
    g.add_argument("--no-source-dropout", action="store_true", help="F^s without dropout, as the official TF LeNet")
    g.add_argument("--source-l2", type=float, default=0.0, help="L2 on F^s's weights, not biases (official: 2.5e-5)")
    g = p.add_argument_group("stage 2: activation matching (defaults: the paper's digit setting)")
    g.add_argument("--mode", default="gam", choices=["source-only", "gaussian", "gam"],
                   help="stop after stage 1, after Gaussian matching, or run the full GAN matching")
    g.add_argument("--no-gaussian-init", action="store_true", help="start the GAN stage from F^s itself (ADDA)")
    g.add_argument("--recipe", default="official", choices=list(RECIPES), help="see the docstring")
    g.add_argument("--optimizer", default=None, choices=["adam", "sgd"], help="default: the recipe's")
    g.add_argument("--lr", type=float, default=None, help="learning rate of F^t and the discriminators (recipe's)")
    g.add_argument("--drift", type=float, default=None, help="weight of the weight-drift term (recipe's; 0: none)")
    g.add_argument("--drift-ref", default="init", choices=["init", "source"], help="weights the drift term pulls to")
    g.add_argument("--gan-layers", default="relu3,fc4", help="LeNet layers matched by GANs (relu3: 500-d hidden)")
    g.add_argument("--gan-weights", default="0.1,1.0", help="loss weight per matched layer")
    g.add_argument("--gan-schedule", default="converged", choices=["converged", "equal-shares", "joint"],
                   help="converged (the paper's): the next GAN joins once the discriminator loss has flattened "
                        "(--converge-*), at the latest after an equal share; equal-shares; joint (the released code)")
    g.add_argument("--converge-window", type=int, default=500, help="converged: discriminator-loss window (iterations)")
    g.add_argument("--converge-tol", type=float, default=0.05, help="converged: max relative change of the window mean")
    g.add_argument("--restart-emptied", type=int, default=0,
                   help="not in the paper (0: off; converged schedule only): at most this many restarts of the GAN "
                        "stage, when the label-free class check finds an emptied class once the first GAN converged")
    g.add_argument("--gan-update", default="official", choices=["official", "alternating"],
                   help="official (train_adda.py): discriminators and F^t updated together from one forward over "
                        "[source; target]; alternating: discriminators first, then F^t on the updated ones")
    g.add_argument("--disc-pretrain", type=int, default=500, help="discriminator-only iterations before adaptation")
    g.add_argument("--stats-samples", type=int, default=10000, help="images per domain for Gaussian statistics")
    args = p.parse(argv, positive=("lr", "source_lr", "converge_tol"),
                   at_least_one=("source_steps", "batch_size", "stats_samples", "converge_window"),
                   non_negative=("drift", "disc_pretrain", "restart_emptied", "source_l2"))
    vars(args).update({k: v for k, v in RECIPES[args.recipe].items() if getattr(args, k) is None})  # in args.json
    args.layers = [s.strip() for s in args.gan_layers.split(",") if s.strip()]
    try:
        args.weights = [float(w) for w in args.gan_weights.split(",")]
    except ValueError:
        raise UsageError(f"--gan-weights '{args.gan_weights}' is not a comma-separated list of numbers")
    if len(args.weights) != len(args.layers) or not args.layers:
        raise UsageError(f"--gan-layers ({len(args.layers)}) and --gan-weights ({len(args.weights)}) need one weight "
                         "per layer")
    lenet = build_backbone("lenet")
    known = [n for n, _ in list(lenet.features.named_children()) + list(lenet.classifier.named_children())]
    if any(layer not in known for layer in args.layers):
        raise UsageError(f"--gan-layers must name LeNet layers: {', '.join(known)}")
    if args.task == "folder" and (args.source_subset != "full" or args.target_subset != "full"):
        raise UsageError("--source-subset and --target-subset halve digit classes: they work with the digit tasks only")
    if args.restart_emptied and (args.gan_schedule != "converged" or len(args.layers) < 2):
        raise UsageError("--restart-emptied checks the classes when the first GAN has converged: it needs "
                         "--gan-schedule converged and two or more --gan-layers")
    if args.mode == "gaussian" and args.no_gaussian_init:
        raise UsageError("--mode gaussian is the Gaussian matching itself; drop --no-gaussian-init")
    args.gaussian_init = args.mode == "gaussian" or not args.no_gaussian_init
    named = []  # what differs from the paper's setting, in the variant's name
    if args.mode != "gam":
        args.variant = args.mode
    elif args.layers == ["fc4"] and not args.gaussian_init:
        args.variant = "adda+drift" if args.drift > 0 else "adda"
    else:
        args.variant = ("gam" if args.drift > 0 else "gam-no-drift") + ("" if args.gaussian_init else "-no-gaussian-init")
        named += [f"{k} {w:g}" for k, w in zip(args.layers, args.weights) if (args.layers, args.weights) != PAPER_GANS]
        named += [f"{args.gan_schedule} GANs"] if args.gan_schedule != "converged" and len(args.layers) > 1 else []
        named += [f"restart on an emptied class, at most {args.restart_emptied}"] if args.restart_emptied else []
        named += [f"{args.recipe} recipe"] if args.recipe != "official" else []
    named += ["alternating update"] if args.mode == "gam" and args.gan_update != "official" else []
    named += ["F^s without dropout"] if args.no_source_dropout else []  # stage 1's, in every variant
    named += [f"F^s with L2 {args.source_l2:g}"] if args.source_l2 else []
    args.variant += f" ({', '.join(named)})" if named else ""
    return args


# ALGO LOGIC: the method's own pieces
def subset(x, y, which, generator):
    """Table 2: 'odd' removes half of the odd digits, 'even' half of the even digits, 'full' keeps all."""
    if which == "full":
        return x, y
    keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
    for c in range(1 if which == "odd" else 0, 10, 2):
        idx = (y == c).nonzero().squeeze(1)
        keep[idx[torch.randperm(len(idx), device=y.device, generator=generator)[: len(idx) // 2]]] = False
    return x[keep], y[keep]


def channel_stats(acts):
    """Per-channel mean and std; conv maps count every spatial location as a sample (Sec. 4)."""
    a = acts.transpose(0, 1).reshape(acts.shape[1], -1) if acts.dim() == 4 else acts.t()
    return a.mean(1), a.std(1)


@torch.no_grad()
def layer_outputs(net, x_uint8, layer, input_range, batch_size=4096):
    """Output of one named layer of `net` (eval mode) for uint8 images, concatenated over batches."""
    net.eval()
    return torch.cat([net.activations(to_float(c, input_range))[layer] for c in x_uint8.split(batch_size)])


@torch.no_grad()
def gaussian_match(f_t, f_s, x_s, x_t, input_range, eps=1e-5):
    """Eq. 2, from the input upward: fold each channel's alpha, beta into its conv/fc layer; {layer: (alpha, beta)}."""
    matched = {}
    for name, layer in list(f_t.features.named_children()) + list(f_t.classifier.named_children()):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        mu_s, sd_s = channel_stats(layer_outputs(f_s, x_s, name, input_range))
        mu_t, sd_t = channel_stats(layer_outputs(f_t, x_t, name, input_range))
        alpha = sd_s / (sd_t + eps)
        beta = mu_s - alpha * mu_t
        layer.weight.mul_(alpha.view(-1, *[1] * (layer.weight.dim() - 1)))
        layer.bias.mul_(alpha).add_(beta)
        matched[name] = (alpha, beta)
    return matched


def discriminator(in_dim):
    """ADDA's adversary: in -> 500 -> 500 -> 2 with ReLU."""
    return nn.Sequential(nn.Linear(in_dim, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 2))


def weight_drift(net, ref):
    """Sum over parameter tensors of mean((W_ref - W_t)^2) (the official code's form of ||theta^s - theta^t||^2)."""
    return sum(((p - r) ** 2).mean() for p, r in zip(net.parameters(), ref))


def domain_labels(acts, value):
    return torch.full((len(acts),), value, dtype=torch.long, device=acts.device)


def discriminator_step(discs, opt_d, a_s, a_t, weights):
    """--gan-update alternating, the discriminators: source activations class 0, target (detached) class 1."""
    loss = sum(w * (F.cross_entropy(discs[k](a_s[k].flatten(1)), domain_labels(a_s[k], 0)) +
                    F.cross_entropy(discs[k](a_t[k].detach().flatten(1)), domain_labels(a_t[k], 1)))
               for k, w in weights.items())
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return loss.detach()


def target_step(f_t, discs, opt_t, a_t, weights, ref, drift_w):
    """--gan-update alternating, F^t: the GAN loss with inverted labels (target called source) + drift_w * drift."""
    loss_gan = sum(w * F.cross_entropy(discs[k](a_t[k].flatten(1)), domain_labels(a_t[k], 0)) for k, w in weights.items())
    loss_drift = weight_drift(f_t, ref)
    opt_t.zero_grad(set_to_none=True)
    (loss_gan + drift_w * loss_drift).backward()
    opt_t.step()
    return loss_gan.detach(), loss_drift.detach()


def adversarial_step(f_t, discs, opt_d, opt_t, a_s, a_t, weights, ref, drift_w, train_t):
    """--gan-update official: D's loss and F^t's (inverted labels + drift) from one forward; F^t steps if train_t."""
    logits = {k: discs[k](torch.cat([a_s[k], a_t[k]]).flatten(1)) for k in weights}
    y = torch.cat([domain_labels(a[next(iter(weights))], label) for a, label in ((a_s, 0), (a_t, 1))])
    loss_d = sum(w * F.cross_entropy(logits[k], y) for k, w in weights.items())
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward(inputs=[p for k in weights for p in discs[k].parameters()], retain_graph=train_t)  # D's only
    loss_gan = loss_drift = torch.zeros((), device=y.device)
    if train_t:
        loss_gan = sum(w * F.cross_entropy(logits[k], 1 - y) for k, w in weights.items())
        loss_drift = weight_drift(f_t, ref)
        opt_t.zero_grad(set_to_none=True)
        (loss_gan + drift_w * loss_drift).backward(inputs=list(f_t.parameters()))  # F^t's gradient only
        opt_t.step()
    opt_d.step()
    return loss_d.detach(), loss_gan.detach(), loss_drift.detach()


def flattened(sched, step, loss_d, window, tol):
    """--gan-schedule converged: True when the newest GAN's loss_d window mean is within tol of the window before."""
    sched["sum"] = sched["sum"] + loss_d
    if (step + 1 - sched["since"]) % window:
        return False
    prev, sched["prev"], sched["sum"] = sched["prev"], float(sched["sum"]) / window, 0.0  # one host sync per window
    return prev > 0 and abs(sched["prev"] - prev) <= tol * prev


def make_optimizer(params, kind, lr, capturable=False):  # capturable: --cuda-graph on records the update too
    return (torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999), capturable=capturable) if kind == "adam"
            else torch.optim.SGD(params, lr=lr, momentum=0.9))


def main(args):
    # TRY NOT TO MODIFY: seeding, device, data (uint8 tensors on the device)
    run = Run(args, "gam")
    device = run.device
    g = torch.Generator(device=device).manual_seed(args.seed)
    src, tgt = load_task(args, 28, 1, device)  # LeNet's input: 28x28 gray
    f_s = build_backbone("lenet", len(src.classes)).to(device)
    for m in (m for m in f_s.modules() if args.no_source_dropout and isinstance(m, (nn.Dropout, nn.Dropout2d))):
        m.p = 0.0  # the official TF LeNet has no dropout; ours keeps the layers, at rate 0
    src_x, src_y = subset(src.train_x, src.train_y, args.source_subset, g)
    tgt_x, _ = subset(tgt.train_x, tgt.train_y, args.target_subset, g)  # target labels: only to form the subset
    ev = dict(batch_size=args.eval_batch_size, amp=args.amp, input_range=args.input_range)
    domains = (("target", tgt), ("source", src))  # F^s's and the Gaussian-matched F^t's test accuracies
    stage1 = dict(source=src.name, seed=args.seed, source_subset=args.source_subset, source_steps=args.source_steps,
                  source_lr=args.source_lr, batch_size=args.batch_size, input_range=args.input_range,
                  **({"dropout": False} if args.no_source_dropout else {}),  # (files from before the flags match)
                  **({"l2": args.source_l2} if args.source_l2 else {}))
    own = Path(args.resume or "") / "source.pt"  # a resumed run's own stage 1
    loaded = load_source(f_s, own if args.resume and own.exists() else args.source_ckpt, stage1)
    run_dir = run.folder(source=src.name, target=tgt.name)
    print(f"gam {args.task} ({args.variant}) | {src} -> {tgt} | lenet {sum(p.numel() for p in f_s.parameters()):,} "
          f"params | {device} | run folder {run_dir}", flush=True)

    # ---- stage 1: source network F^s ---------------------------------------------------------------------------
    if not loaded:
        train_source(f_s, src_x, src_y, steps=args.source_steps, batch_size=args.batch_size, lr=args.source_lr,
                     weight_decay=args.source_l2, generator=g, input_range=args.input_range, log_every=args.log_every,
                     amp=args.amp, decay_biases=False, identity=stage1,
                     paths=[None if args.no_save_model else run_dir / "source.pt", args.source_ckpt])
    f_s.eval().requires_grad_(False)  # frozen from here on
    no_adapt = {f"{d}_acc": accuracy(f_s, dom.test_x, dom.test_y, **ev) for d, dom in domains}
    print(f"F^s (no adaptation): target {no_adapt['target_acc']:.2f} source {no_adapt['source_acc']:.2f}", flush=True)

    # ---- stage 2a: Gaussian i.i.d. matching (eq. 2) --------------------------------------------------------------
    f_t = copy.deepcopy(f_s).requires_grad_(True)
    gaussian = None
    if args.mode != "source-only" and args.gaussian_init:
        gaussian_match(f_t, f_s, src_x[:args.stats_samples], tgt_x[:args.stats_samples], args.input_range)
        gaussian = {f"{d}_acc": accuracy(f_t, dom.test_x, dom.test_y, **ev) for d, dom in domains}
        print(f"Gaussian matching: target {gaussian['target_acc']:.2f} source {gaussian['source_acc']:.2f}", flush=True)

    # ---- stage 2b: general activation matching with one GAN per layer (eq. 3) -----------------------------------
    meter, sched = None, None
    if args.mode == "gam":
        f_t.eval()  # no dropout in the matched activations
        ref = [p.detach().clone() for p in (f_t if args.drift_ref == "init" else f_s).parameters()]
        dims = {k: v[0].numel() for k, v in f_t.activations(to_float(src_x[:1], args.input_range)).items()}  # one image
        discs = nn.ModuleDict({layer: discriminator(dims[layer]) for layer in args.layers}).to(device)
        opt_d = make_optimizer(discs.parameters(), args.optimizer, args.lr, args.cuda_graph == "on")
        opt_t = make_optimizer(f_t.parameters(), args.optimizer, args.lr, args.cuda_graph == "on")
        start = copy.deepcopy([f_t.state_dict(), opt_d.state_dict(), opt_t.state_dict()])  # for --restart-emptied
        acts_t = run.compile(f_t.activations)
        s_sampler, t_sampler = (IndexSampler(len(x), args.batch_size, device, g) for x in (src_x, tgt_x))

        def restart(it):  # --restart-emptied: the whole GAN stage again from iteration `it` on, with its full length:
            for obj, saved in zip((f_t, opt_d, opt_t), start):  # F^t from its Gaussian-matched start, fresh optimisers
                obj.load_state_dict(saved)
            for layer in (m for m in discs.modules() if isinstance(m, nn.Linear)):  # fresh discriminators
                layer.reset_parameters()
            train_step.reset()  # the optimisers' state is new: a recorded step would update the old one
            sched.update(active=1, since=0, sum=0.0, prev=-1.0, joins=[0], offset=it,
                         restarts=sched["restarts"] + [it - args.disc_pretrain])
            meter.total = args.steps + it
            print(f"restart {len(sched['restarts'])} of the GAN stage after {it - args.disc_pretrain} iterations",
                  flush=True)

        def train_step(s_idx, t_idx):
            """One update of the active discriminators, then (from step 0 on) of F^t; key: `active`, step >= 0."""
            with torch.no_grad():
                a_s = f_s.activations(to_float(src_x[s_idx], args.input_range))  # source net, source data
            a_t = acts_t(to_float(tgt_x[t_idx], args.input_range))  # target net, target data
            if args.gan_update == "official":
                losses = adversarial_step(f_t, discs, opt_d, opt_t, a_s, a_t, active, ref, args.drift, step >= 0)
            else:
                zero = torch.zeros((), device=device)
                losses = (discriminator_step(discs, opt_d, a_s, a_t, active),
                          *(target_step(f_t, discs, opt_t, a_t, active, ref, args.drift) if step >= 0 else (zero,) * 2))
            return dict(zip(("loss_d", "loss_gan", "drift"), losses))
        train_step = run.graphed(train_step)  # --cuda-graph on: recorded once per key
        meter = run.start_meter()
        # GANs training, the newest's start and loss window, the joins; restarts, the kept attempt's first iteration
        sched = dict(active=1, since=0, sum=0.0, prev=-1.0, joins=[0], restarts=[], offset=0)
        state = dict(f_t=f_t, discs=discs, opt_d=opt_d, opt_t=opt_t, s_sampler=s_sampler, t_sampler=t_sampler, g=g,
                     meter=meter, sched=sched)
        it = run.resume(state)
        meter.total = args.steps + sched["offset"]
        while it < args.disc_pretrain + args.steps + sched["offset"]:
            # ALGO LOGIC
            step = it - args.disc_pretrain - sched["offset"]  # < 0 while the discriminators are pre-trained
            share = 1 + step * len(args.layers) // args.steps  # equal shares of the iterations (converged: the latest)
            if step >= 0 and args.gan_schedule != "joint" and share > sched["active"]:
                sched.update(active=share, since=step, sum=0.0, prev=-1.0, joins=sched["joins"] + [step])
            n_active = len(args.layers) if args.gan_schedule == "joint" or step < 0 else sched["active"]
            active = dict(zip(args.layers[:n_active], args.weights[:n_active]))  # {layer: GAN loss weight}
            stats = train_step(s_sampler.next(), t_sampler.next(), key=(n_active, step >= 0))
            if (step >= 0 and args.gan_schedule == "converged" and n_active < len(args.layers)
                    and flattened(sched, step, stats["loss_d"], args.converge_window, args.converge_tol)):
                if (n_active == 1 and len(sched["restarts"]) < args.restart_emptied
                        and class_shares(f_t, src, tgt, **ev)[0]["emptied_classes"]):
                    restart(it + 1)  # the first GAN sent a class's target images to another class
                else:  # the next GAN joins
                    sched.update(active=n_active + 1, since=step + 1, sum=0.0, prev=-1.0,
                                 joins=sched["joins"] + [step + 1])
            # TRY NOT TO MODIFY: logging, the accuracy curve, checkpoints
            meter.add(**stats)
            it += 1
            if it > args.disc_pretrain:  # adaptation iterations so far (restarted attempts included); a curve only
                meter.step(it - args.disc_pretrain, lambda: run.keep_best(f_t, evaluate_domains(f_t, src, tgt, **ev)),
                           gans=n_active)  # (--keep-best: saved when that score improves)
            run.checkpoint(it, state, args.disc_pretrain + args.steps + sched["offset"])

    # ---- final model's accuracy (no checkpoint selection) --------------------------------------------------------
    final = run.keep_best(f_t, evaluate_domains(f_t, src, tgt, final=True, **ev))
    train_acc = accuracy(f_t, tgt.train_x, tgt.train_y, **ev) if args.task != "folder" else float("nan")
    steps = args.steps if args.mode == "gam" else 0
    meter = run.start_meter(0, 1, 0) if meter is None else meter
    meter.write(step=steps + (sched["offset"] if sched else 0), **final)  # restarted attempts included
    shares = run.predictions(f_t, src, tgt, **ev)  # label-free: each class's share
    run.save_model({"model": f_t.state_dict(), "args": vars(args)})
    run.finish({
        "method": "gam", "task": args.task, "variant": args.variant, "seed": args.seed, "steps": steps,
        "source_steps": 0 if loaded else args.source_steps, "target_acc": round(final["target_test_acc"], 3),
        "source_acc": round(final["source_test_acc"], 3), "target_train_acc": round(train_acc, 3),
        "class_shares": shares, "gan_joins": sched["joins"] if sched and args.gan_schedule != "joint" else None,
        "gan_restarts": sched["restarts"] if sched and args.restart_emptied else None,  # --restart-emptied's
        "no_adaptation": {k: round(v, 3) for k, v in no_adapt.items()},
        "gaussian_only": {k: round(v, 3) for k, v in gaussian.items()} if gaussian else None},
        final, (src, tgt), timed=args.mode == "gam")


if __name__ == "__main__":
    Run.main(main, parse_args)
