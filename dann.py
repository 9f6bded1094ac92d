"""DANN: Unsupervised Domain Adaptation by Backpropagation (Ganin & Lempitsky, ICML 2015).

A feature extractor G_f feeds a label predictor G_y and, through a gradient reversal layer R_lambda, a domain
classifier G_d. One SGD step on L_y + L_d with R_lambda in between is one step of the saddle-point problem (eq. 9):
G_d learns to tell source from target, G_f learns to fool it (its gradient from L_d is multiplied by -lambda).

Implemented:
  * R_lambda(x) = x forward, -lambda * grad backward (eqs. 7-8);              `GradReverse`
  * E = sum_i L_y(source) - lambda * sum_i L_d(source and target) (eq. 9);     training loop
  * lambda_p = 2 / (1 + exp(-gamma p)) - 1, gamma = 10 (eq. 14), p = step / steps going 0 -> 1;
  * mu_p = mu_0 / (1 + alpha p)^beta, mu_0 = 0.01, alpha = 10, beta = 0.75 (the paper's annealing, given in its
    supplementary material); SGD with momentum 0.9; batch 128 = 64 source + 64 target;
  * domain classifier x -> 1024 -> 1024 -> 2, and x -> 100 -> 2 for the MNIST network (Sec. 4, "CNN architectures");
  * no learning-rate annealing on MNIST <-> SVHN, as the paper says for that pair (Sec. 4.1);
  * baselines in this file: `--lambda-max 0` is the paper's source-only model (no domain branch at all),
    `--oracle` is its train-on-target upper bound, `--target-labels-per-class 10` its semi-supervised setting
    (the labelled target images join the labelled pool, and the domain classifier still calls them target).
    The baselines draw the same 64 labelled images per step as DANN and use the same optimiser and schedule;
  * the paper's unsupervised model-selection signals (Sec. 4, "Choosing meta-parameters"): source validation
    error and domain-classifier error, logged to metrics.jsonl at every evaluation.

Evaluation protocol: all of the target *train* split is the unlabeled adaptation data; accuracy of the *final*
model is reported on the target *test* split and the source *test* split. No checkpoint is selected on target
labels (target test accuracy is logged during training for the learning curve only).

Backbones (common.py): `dann_mnist` (32x32 RGB, MNIST replicated to 3 channels) for mnist-mnistm; `dann_svhn` for
svhn-mnist, syndigits-svhn and mnist-svhn; the paper does not report MNIST <-> USPS, so mnist-usps / usps-mnist use
the ADDA/CyCADA `lenet` (28x28 gray) that the later literature uses for that pair, with the paper's own optimiser,
schedules and x -> 1024 -> 1024 -> 2 domain classifier.

Deviations from the paper, each a flag:
  * Preprocessing: images are scaled to [-1, 1] (`--input-range`) instead of per-dataset mean subtraction (one
    convention for all scripts; a near-constant shift that the first-layer biases absorb).
  * `--steps` (default 20000): the paper does not state its number of iterations. p = step / steps is the
    fraction of training done before each step (0 at the first, 1 - 1/steps at the last).
  * The paper retrains the last layer with a linear SVM for its table (it reports that this leaves the target
    accuracy "approximately the same"); we report the network's own softmax predictions.
  * `--source-val N` holds out N source training images for the source-validation signal; by default (0) the
    signal is computed on the source test split (labelled *source* data only: target labels are never used).

Commands and numbers (final model, target test accuracy %, 3 seeds, 20k steps, CPU; details in RESULTS.md):
    python dann.py --task mnist-mnistm                    # DANN         77.85 +- 1.41   (paper 76.66)
    python dann.py --task mnist-mnistm --lambda-max 0     # source only  58.82 +- 2.43   (paper 52.25)
    python dann.py --task mnist-usps                      # DANN         90.38 +- 1.13   (not in the paper)
    python dann.py --task usps-mnist                      # DANN         95.80 +- 0.14   (not in the paper)
    python dann.py --task mnist-mnistm --oracle           # train on target (upper bound; paper 95.96)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Flags, IndexSampler, Run, UsageError, accuracy, backbone_input, build_backbone, evaluate_domains,
                    load_task, predict, to_float)

# per-task paper defaults (see the docstring): backbone, domain-classifier hidden sizes, learning-rate schedule
TASK_DEFAULTS = {
    "mnist-mnistm": dict(backbone="dann_mnist", domain_hidden="100", lr_schedule="anneal"),
    "svhn-mnist": dict(backbone="dann_svhn", domain_hidden="1024,1024", lr_schedule="constant"),
    "mnist-svhn": dict(backbone="dann_svhn", domain_hidden="1024,1024", lr_schedule="constant"),
    "syndigits-svhn": dict(backbone="dann_svhn", domain_hidden="1024,1024", lr_schedule="anneal"),
    "mnist-usps": dict(backbone="lenet", domain_hidden="1024,1024", lr_schedule="anneal"),
    "usps-mnist": dict(backbone="lenet", domain_hidden="1024,1024", lr_schedule="anneal"),
    "folder": dict(backbone="dann_mnist", domain_hidden="1024,1024", lr_schedule="anneal"),  # your own images
}


def parse_args(argv=None):
    p = Flags(__doc__, task="mnist-mnistm", steps=20000, steps_help="training steps; p = step/steps drives both schedules",
          log_every=500, eval_every=2000, input_range="-1,1")
    g = p.add_argument_group("method (defaults: the paper's digit setting)")
    g.add_argument("--backbone", default="auto",
                   help="auto (per task, see docstring; folder tasks: dann_mnist), lenet, dtn, dann_mnist, dann_svhn, "
                        "resnet18, resnet50")
    g.add_argument("--image-size", type=int, default=0, help="input size of a ResNet backbone (0: 224)")
    g.add_argument("--pretrained", action="store_true",
                   help="ResNet: torchvision's ImageNet weights from the local torch cache (an error if absent)")
    g.add_argument("--batch-size", type=int, default=128, help="images per step: half source, half target")
    g.add_argument("--lr", type=float, default=0.01, help="mu_0 of the annealing mu_p = mu_0 / (1 + alpha p)^beta")
    g.add_argument("--lr-alpha", type=float, default=10.0, help="alpha of the learning-rate annealing")
    g.add_argument("--lr-beta", type=float, default=0.75, help="beta of the learning-rate annealing")
    g.add_argument("--lr-schedule", default="auto", choices=["auto", "anneal", "constant"],
                   help="auto: anneal, but constant for MNIST<->SVHN as in the paper")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (the paper states none)")
    g.add_argument("--gamma", type=float, default=10.0, help="gamma of lambda_p = 2/(1+exp(-gamma p)) - 1 (eq. 14)")
    g.add_argument("--lambda-max", type=float, default=1.0, help="lambda_p is scaled by this; 0 = source-only baseline")
    g.add_argument("--domain-hidden", default="auto", help="domain classifier hidden sizes, e.g. 1024,1024 (auto: per task)")
    g.add_argument("--oracle", action="store_true", help="train on labelled target train instead (upper bound)")
    g.add_argument("--target-labels-per-class", type=int, default=0,
                   help="semi-supervised: add N labelled target train images per class to the label loss (paper: 10)")
    g.add_argument("--source-val", type=int, default=0,
                   help="hold out N source train images for the source-validation signal (0: use source test)")
    args = p.parse(argv, positive=("lr",), non_negative=("lr_alpha", "lr_beta", "momentum", "weight_decay", "gamma",
                                                         "lambda_max", "target_labels_per_class", "source_val"))
    if args.batch_size < 2 or args.batch_size % 2:
        raise UsageError("--batch-size must be an even number >= 2 (half source, half target)")
    if args.target_labels_per_class and (args.oracle or args.lambda_max == 0):
        raise UsageError("--target-labels-per-class is semi-supervised DANN: it goes with neither --oracle (all "
                         "target labels) nor --lambda-max 0 (source only)")
    if args.oracle and args.source_val:
        raise UsageError("--source-val holds out source images; --oracle does not train on the source")
    # derived defaults, resolved here so that args.json records the values used
    for k in ("backbone", "domain_hidden", "lr_schedule"):
        if getattr(args, k) == "auto":
            setattr(args, k, TASK_DEFAULTS[args.task][k])
    backbone_input(args.backbone)  # a UsageError for an unknown one
    if (args.image_size or args.pretrained) and not args.backbone.startswith("resnet"):
        raise UsageError("--image-size and --pretrained go with --backbone resnet18 or resnet50")
    if args.image_size and args.image_size < 32:
        raise UsageError(f"--image-size must be >= 32 (got {args.image_size})")
    if args.task == "folder" and (args.oracle or args.target_labels_per_class):
        raise UsageError("--oracle and --target-labels-per-class need target labels, which a folder task does not read")
    try:
        args.hidden = tuple(int(h) for h in args.domain_hidden.split(",") if h.strip())
    except ValueError:
        raise UsageError(f"--domain-hidden '{args.domain_hidden}' is not a comma-separated list of sizes")
    args.variant = ("oracle" if args.oracle  # the paper's train-on-target upper bound: no domain branch
                    else "source-only" if args.lambda_max == 0  # the paper's lower bound: no domain branch
                    else f"semi-supervised-{args.target_labels_per_class}" if args.target_labels_per_class else "dann")
    return args


# ALGO LOGIC: the method's own pieces
class GradReverse(torch.autograd.Function):
    """R_lambda: identity forward (eq. 7), gradient multiplied by -lambda backward (eq. 8)."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def domain_classifier(in_dim, hidden):
    """G_d: x -> hidden... -> 2 with ReLUs (Sec. 4: x -> 1024 -> 1024 -> 2, or x -> 100 -> 2 for MNIST)."""
    layers, d = [], in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, 2))


def adaptation_factor(p, gamma):
    """lambda_p = 2 / (1 + exp(-gamma p)) - 1 (eq. 14): 0 at p = 0, -> 1 as p -> 1."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def learning_rate(p, lr0, alpha, beta):
    """mu_p = mu_0 / (1 + alpha p)^beta."""
    return lr0 / (1.0 + alpha * p) ** beta


def add_target_labels(pool_x, pool_y, pool_d, tgt_x, tgt_y, per_class, n_classes, generator):
    """The semi-supervised setting: per_class labelled target images of each class join the labelled pool (x, y,
    domain label), with the *target's* domain label 1 for G_d (the source's pool rows carry 0)."""
    perm = torch.randperm(len(tgt_y), device=tgt_y.device, generator=generator)
    chosen = torch.cat([perm[tgt_y[perm] == c][:per_class] for c in range(n_classes)])
    return (torch.cat([pool_x, tgt_x[chosen]]), torch.cat([pool_y, tgt_y[chosen]]),
            torch.cat([pool_d, torch.ones(len(chosen), dtype=torch.long, device=pool_d.device)]))


def dann_loss(features, classifier, disc, xs, ys, ds, xt, lam):
    """E of eq. 9 through the gradient reversal layer, for one batch: L_y on the labelled images xs (labels ys), L_d
    on G_d(R_lambda(G_f(.))) of xs (domain labels ds: 0 source, 1 a labelled target image) and of the unlabelled
    target images xt (domain 1). G_f receives grad(L_y) - lambda grad(L_d); G_d and G_y their own gradients.
    Returns (loss, L_y, L_d, G_d's accuracy)."""
    f = features(torch.cat([xs, xt]))
    loss_y = F.cross_entropy(classifier(f[:len(xs)]), ys)  # L_y on labelled images only
    d_logits = disc(GradReverse.apply(f, lam))  # G_d(R_lambda(G_f(x)))
    dl = torch.cat([ds, torch.ones(len(xt), dtype=torch.long, device=ds.device)])
    loss_d = F.cross_entropy(d_logits, dl)
    return loss_y + loss_d, loss_y, loss_d, (d_logits.argmax(1) == dl).float().mean()


def main(args):
    # TRY NOT TO MODIFY: seeding, device, data (uint8 tensors on the device), run folder
    run = Run(args, "dann")
    device = run.device
    g = torch.Generator(device=device).manual_seed(args.seed)
    channels, size = backbone_input(args.backbone, args.image_size)
    src, tgt = load_task(args, size, channels, device)
    model = build_backbone(args.backbone, len(src.classes), args.image_size, args.pretrained)
    adapt = args.variant not in ("oracle", "source-only")  # train the domain classifier through the GRL
    # labelled pool (x, y, domain label): source train, or target train for the oracle
    pool_x, pool_y = (tgt.train_x, tgt.train_y) if args.oracle else (src.train_x, src.train_y)
    val_x, val_y = src.test_x, src.test_y
    if args.source_val:
        if args.source_val >= len(pool_x):
            raise UsageError(f"--source-val {args.source_val} must be smaller than the source train set ({len(pool_x)})")
        perm = torch.randperm(len(pool_x), device=device, generator=g)
        val_x, val_y = pool_x[perm[:args.source_val]], pool_y[perm[:args.source_val]]
        pool_x, pool_y = pool_x[perm[args.source_val:]], pool_y[perm[args.source_val:]]
    pool_d = torch.zeros(len(pool_x), dtype=torch.long, device=device)
    if args.target_labels_per_class:  # the semi-supervised setting: a few labelled target images join the pool
        counts = torch.bincount(tgt.train_y, minlength=len(tgt.classes))
        if counts.min().item() < args.target_labels_per_class:
            raise UsageError(f"--target-labels-per-class {args.target_labels_per_class} exceeds the smallest target "
                             f"class ({counts.min().item()} images)")
        pool_x, pool_y, pool_d = add_target_labels(pool_x, pool_y, pool_d, tgt.train_x, tgt.train_y,
                                                   args.target_labels_per_class, len(tgt.classes), g)
    half = args.batch_size // 2
    labelled = IndexSampler(len(pool_x), half, device, g)
    unlabelled = IndexSampler(len(tgt.train_x), half, device, g)
    run.folder(source=src.name, target=tgt.name)

    # ALGO LOGIC: networks and optimiser
    model = model.to(device)
    disc = domain_classifier(model.feature_dim, args.hidden).to(device)
    params = list(model.parameters()) + (list(disc.parameters()) if adapt else [])
    graph = args.cuda_graph == "on"  # a recorded step reads the annealed learning rate from a device tensor (fused SGD)
    opt = torch.optim.SGD(params, lr=torch.tensor(args.lr, device=device) if graph else args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, **({"fused": True} if graph else {}))
    features, classifier, disc_fn = (run.compile(m) for m in (model.features, model.classifier, disc))
    domain_net = nn.Sequential(model.features, disc)  # G_d(G_f(x)), the same modules, for evaluation only
    ev = dict(batch_size=args.eval_batch_size, amp=args.amp, input_range=args.input_range)

    def evaluate(final=False):
        """Source validation error and domain-classifier error (the paper's unsupervised selection signals), and
        the target test accuracy (reported for the final model; during training a curve only, never for selection)."""
        rec = {"source_val_err": 100 - accuracy(model, val_x, val_y, **ev),
               **run.keep_best(model, evaluate_domains(model, src, tgt, final, **ev))}  # --keep-best: saved
        if adapt:  # source images should be called 0 and target images 1; no labels of either are used
            xt = (tgt.test_x if len(tgt.test_x) else tgt.train_x)[:2000]  # a folder task may have no test images
            wrong = (predict(domain_net, val_x[:2000], **ev) != 0).sum() + (predict(domain_net, xt, **ev) != 1).sum()
            rec["domain_err"] = wrong.item() / (len(val_x[:2000]) + len(xt)) * 100
        return rec

    print(f"dann {args.task} ({args.variant}) | {src} -> {tgt} | {args.backbone} "
          f"{sum(p.numel() for p in model.parameters()):,} params, domain classifier {list(args.hidden)} | {device} | "
          f"run folder {run.dir}", flush=True)

    # ---- training: one flat loop -------------------------------------------------------------------------------
    meter = run.start_meter()
    state = dict(model=model, disc=disc, opt=opt, labelled=labelled, unlabelled=unlabelled, g=g, meter=meter)

    def train_step(idx, t_idx=None, lam=0.0):
        """One SGD step on E (eq. 9): idx indexes the labelled pool, t_idx the unlabelled target images."""
        xs, ys = to_float(pool_x[idx], args.input_range), pool_y[idx]
        with run.autocast():
            if adapt:  # eq. 9 through the GRL
                loss, loss_y, loss_d, dom_acc = dann_loss(features, classifier, disc_fn, xs, ys, pool_d[idx],
                                                          to_float(tgt.train_x[t_idx], args.input_range), lam)
                stats = dict(loss_y=loss_y, loss_d=loss_d, dom_acc=dom_acc)
            else:  # source-only / oracle: the paper's baselines have no domain branch
                loss = loss_y = F.cross_entropy(classifier(features(xs)), ys)
                stats = dict(loss_y=loss_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return stats

    train_step = run.graphed(train_step)  # --cuda-graph on: recorded once, then replayed
    for step in range(run.resume(state), args.steps):
        # ALGO LOGIC
        p = step / args.steps
        lam = args.lambda_max * adaptation_factor(p, args.gamma)
        lr = learning_rate(p, args.lr, args.lr_alpha, args.lr_beta) if args.lr_schedule == "anneal" else args.lr
        for group in opt.param_groups:  # (--cuda-graph on: the recorded step reads it from its device tensor)
            group["lr"] = group["lr"].fill_(lr) if graph else lr
        stats = train_step(labelled.next(), unlabelled.next(), lam) if adapt else train_step(labelled.next())

        # TRY NOT TO MODIFY: logging, the accuracy curve, checkpoints (host syncs only when logging)
        meter.add(**stats)
        meter.step(step + 1, evaluate, lam=lam, lr=lr)
        run.checkpoint(step + 1, state)

    # ---- final evaluation of the final model (no checkpoint selection) ------------------------------------------
    final = evaluate(final=True)
    meter.write(step=args.steps, **final)
    shares = run.predictions(model, src, tgt, **ev)  # label-free: each class's share
    run.save_model({"backbone": args.backbone, "model": model.state_dict(), "domain_classifier": disc.state_dict(),
                    "args": vars(args)})
    run.finish({
        "method": "dann", "task": args.task, "variant": args.variant, "seed": args.seed, "steps": args.steps,
        "backbone": args.backbone, "pretrained": args.pretrained, "target_acc": round(final["target_test_acc"], 3),
        "source_acc": round(final["source_test_acc"], 3), "source_val_err": round(final["source_val_err"], 3),
        "domain_err": round(final["domain_err"], 3) if adapt else None, "class_shares": shares}, final, (src, tgt))


if __name__ == "__main__":
    Run.main(main, parse_args)
