"""I2I Adapt: Image to Image Translation for Domain Adaptation (Murez, Kolouri, Kriegman, Ramamoorthi, Kim, CVPR 2018).

One encoder f maps both domains into a latent space Z (f_x and f_y share weights); a classifier h reads labels
from Z; per-domain decoders g_x, g_y map Z back to images (their first layers are shared). Six losses regularise Z
(eq. 7): Q = l_c Q_c + l_z Q_z + l_tr Q_tr + l_id Q_id + l_cyc Q_cyc + l_trc Q_trc. Subsets of the lambdas recover
earlier methods (Table 1), and every row of Table 2's ablation is a choice of flags.

Implemented (Sec. 3 and 4; there is no official code, the paper is the authority):
  * Q_c (eq. 1): cross entropy of h(f(x)) on labelled source images.
  * Q_id (eq. 2): L1 reconstruction g_x(f(x)) ~ x (weight --lambda-id-x) and g_y(f(y)) ~ y (--lambda-id-y).
  * Q_z (eq. 3): a feature critic d_z on Z; only *target* features get the encoder's adversarial gradient (Sec. 4).
  * Q_tr (eq. 4): image critics d_x, d_y on the translations g_x(f(y)) and g_y(f(x)).
  * Q_cyc (eq. 5): L1 cycle consistency x -> y -> x and y -> x -> y.
  * Q_trc (eq. 6): h(f(g_y(f(x)))) should be x's label; the translation is detached, so only f_y and h learn from
    it, never g_y ("so the translator cannot hide class information in the translated images", Sec. 4).
  * Critics trained alternately with the generator side by the Improved Wasserstein method (WGAN-GP, penalty 10);
    Adam lr 2e-4, betas (0.5, 0.999) everywhere; random translation + rotation augmentation of both domains.
  * Digit defaults (Sec. 4.1): l_c 1.0, l_z 0.05, l_id 0.1 (both domains), l_tr 0.02, l_cyc 0.1, l_trc 0.1.
    A lambda of 0 switches its term off, and networks no term needs are not built (and cost nothing).
  * Networks (Sec. 4.1: "a modified LeNet" encoder, decoders of three transposed convs, image discriminators of
    three convs, a feature discriminator of three FC layers): encoder conv5-32/64/128, each ReLU + max-pool 2,
    Z = 128 x 4 x 4; h = FC 500 + ReLU + dropout + FC 10; decoders ConvT 128->64->32 (shared) -> 1 (per domain), BN
    + ReLU, tanh; image critics conv4 s2 64, conv4 s2 128, conv8 -> 1, LeakyReLU 0.2; d_z FC 2048->500->500->1.
    Images 32x32 gray in [-1, 1] (MNIST/USPS bilinearly upsampled, SVHN converted to gray).

Table 2's rows by flags (the paper's numbers are error %; accuracy = 100 - error):
    source only + augmentation   --lambda-z 0 --lambda-tr 0 --lambda-id-x 0 --lambda-id-y 0 --lambda-cyc 0 --lambda-trc 0
    l_z only (ADDA-like)         --lambda-tr 0 --lambda-id-x 0 --lambda-id-y 0 --lambda-cyc 0 --lambda-trc 0
    l_idY (DRCN-like)            --lambda-z 0 --lambda-tr 0 --lambda-id-x 0 --lambda-cyc 0 --lambda-trc 0
    l_idY + l_trc                --lambda-z 0 --lambda-tr 0 --lambda-id-x 0 --lambda-cyc 0
    l_z + l_idY                  --lambda-tr 0 --lambda-id-x 0 --lambda-cyc 0 --lambda-trc 0
    l_z + l_idY + l_trc (best)   --lambda-tr 0 --lambda-id-x 0 --lambda-cyc 0
    all but l_cyc                --lambda-cyc 0
    full model                   (defaults)
  Table 1's special cases: l_c + l_z is gradient reversal / ADDA-style feature alignment; l_c + l_idY is DRCN;
  l_c + l_tr is Gen-to-Adapt-like; l_tr + l_cyc (with l_c 0) is CycleGAN.

Evaluation: accuracy of the *final* h(f(.)) on the target *test* split and the source *test* split; no checkpoint
selection (target accuracy is logged every --eval-every steps as a curve only). A PNG grid per run: source,
source->target, target, target->source, and both reconstructions.

Decisions where the paper is silent, each a flag or stated here: batch 64 per domain, 20k steps, one critic step per
generator step (`--critic-steps`), gradient-penalty weight 10, augmentation +-10% translation and +-10 degrees
rotation. The encoder normalises each image on its own (`--encoder-norm layer`: GroupNorm with one group after each
conv; the last one without a learned scale). Some normalisation is needed: without a normalised latent the
Wasserstein feature critic drives the encoder to inflate Z (in a 60-step check the feature norm grew from 5 to
13,600 and Q_c stopped falling). Per-image normalisation pins the latent's scale without any statistics of a domain,
so the source-only baseline reads target images with the same encoder the method uses. Chosen without target labels
(seed 0, 1000 steps, source only; IM of the final model on the target train images, M->U / U->M): layer 1.86 / 1.70,
instance 1.95 / 1.60, batch 1.00 / 0.84 (batch also empties 4 / 6 classes); the paper names none; instance ties
layer (mean IM 1.78 each; entropy and SND lean to layer), so the default stays layer. BatchNorm's running statistics
are the source's, and the un-adapted encoder reads the other domain through them badly; feeding target batches
through it in train mode would mix the statistics, an implicit AdaBN-style adaptation, which is why the source-only
row (l_c alone) never feeds a target image to the encoder, whatever the normalisation.
Paper numbers (Table 2, accuracy): full 98.5 / 97.4 / 89.6; best ablation (l_z + l_idY + l_trc) 98.8 / 97.6 / 90.1;
source only with augmentation 91.1 / 67.0 / 71.5 for M->U / U->M / S->M. Measured numbers: RESULTS.md. Our source
only is above the paper's on U->M (73.9 +- 4.8 at 1,000 steps; 74.1 +- 7.0 over 6 seeds at 3,000), by about one
seed's spread (63.9 to 81.8 at 3,000 steps; the paper's 67.0 lies inside the 95 % t-interval of that 6-seed
mean, 66.7 to 81.5); the augmentation gives some 4 points of it (69.6 +- 4.1 at 1,000 steps without it,
`--aug-translate 0 --aug-rotate 0`). The paper gives neither its augmentation's ranges nor a spread over seeds.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Flags, IndexSampler, Run, UsageError, evaluate_domains, load_task, random_affine, to_float

LAMBDAS = ("c", "z", "tr", "id_x", "id_y", "cyc", "trc")


def parse_args(argv=None):
    p = Flags(__doc__, task="mnist-usps", steps=20000, steps_help="generator-side iterations (the paper does not say)",
              log_every=200, eval_every=2000)
    g = p.add_argument_group("losses, eq. 7 (defaults: Sec. 4.1's digit setting; 0 switches a term off)")
    g.add_argument("--lambda-c", type=float, default=1.0, help="Q_c: source classification")
    g.add_argument("--lambda-z", type=float, default=0.05, help="Q_z: latent-space critic (target features only)")
    g.add_argument("--lambda-tr", type=float, default=0.02, help="Q_tr: translation critics d_x, d_y")
    g.add_argument("--lambda-id-x", type=float, default=0.1, help="Q_id: L1 reconstruction of source images")
    g.add_argument("--lambda-id-y", type=float, default=0.1, help="Q_id: L1 reconstruction of target images")
    g.add_argument("--lambda-cyc", type=float, default=0.1, help="Q_cyc: L1 cycle consistency, both directions")
    g.add_argument("--lambda-trc", type=float, default=0.1, help="Q_trc: classify source->target translations")
    g = p.add_argument_group("networks")
    g.add_argument("--encoder-norm", default="layer", choices=["layer", "instance", "batch"],
                   help="normalisation in the encoder f: per image (layer, instance) or per batch (see the docstring)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="images per domain per step")
    g.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of every network")
    g.add_argument("--betas", default="0.5,0.999", help="Adam betas")
    g.add_argument("--critic-steps", type=int, default=1, help="critic updates per generator-side update")
    g.add_argument("--gp-weight", type=float, default=10.0, help="WGAN-GP gradient-penalty weight")
    g.add_argument("--aug-translate", type=float, default=0.1, help="random translation, fraction of the side (0: off)")
    g.add_argument("--aug-rotate", type=float, default=10.0, help="random rotation, degrees (0: off)")
    args = p.parse(argv, positive=("lr",), at_least_one=("critic_steps",),
                   non_negative=("gp_weight", "aug_translate", "aug_rotate") + tuple(f"lambda_{k}" for k in LAMBDAS))
    if args.batch_size < 2:
        raise UsageError("--batch-size must be >= 2 (the decoders' BatchNorm statistics)")
    args.lam = {k: getattr(args, f"lambda_{k}") for k in LAMBDAS}
    if args.lam["c"] == 0 and args.lam["trc"] == 0:
        raise UsageError("--lambda-c 0 and --lambda-trc 0 leave the classifier h untrained; switch one on")
    try:
        args.adam_betas = tuple(float(b) for b in args.betas.split(","))
        assert len(args.adam_betas) == 2
    except (ValueError, AssertionError):
        raise UsageError(f"--betas '{args.betas}' must be two comma-separated numbers")
    on = [k for k in LAMBDAS if args.lam[k] > 0]
    args.variant = "full" if len(on) == len(LAMBDAS) else ("source-only" if on == ["c"] else "+".join(on))
    if args.encoder_norm != "layer":
        args.variant += f" ({args.encoder_norm}-norm encoder)"
    if (args.aug_translate, args.aug_rotate) == (0, 0):
        args.variant += " (no augmentation)"
    elif (args.aug_translate, args.aug_rotate) != (0.1, 10.0):
        args.variant += f" (augmentation {args.aug_translate:g}, {args.aug_rotate:g} deg)"
    return args


# ALGO LOGIC: the method's own pieces
def encoder(norm="layer"):
    """f = f_x = f_y: a modified LeNet, 1x32x32 -> Z = 128x4x4: three conv5-norm-ReLU-maxpool blocks; the last
    normalisation has no learned scale, so the latent's scale is pinned (see the docstring: without it the feature
    critic lets the encoder inflate Z without bound). norm: 'batch' (BatchNorm: batch statistics in training,
    running averages in evaluation), 'layer' (each image normalised over all its channels and positions) or
    'instance' (each image and channel on its own): the last two use no statistics of a domain."""
    def norm_layer(ch, affine):
        if norm == "batch":
            return nn.BatchNorm2d(ch, affine=affine)
        return nn.GroupNorm(1 if norm == "layer" else ch, ch, affine=affine)

    layers = []
    for cin, cout in ((1, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(cin, cout, 5, padding=2), norm_layer(cout, cout != 128), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


def classifier(num_classes=10):
    """h: Z -> class logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 500), nn.ReLU(), nn.Dropout(0.5), nn.Linear(500, num_classes))


def decoder_shared():
    """The first two transposed convs, shared by g_x and g_y: Z (4x4) -> 32x16x16."""
    return nn.Sequential(nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU())


def decoder_head():
    """The last transposed conv of one domain's decoder: 32x16x16 -> 1x32x32 in [-1, 1]."""
    return nn.Sequential(nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Tanh())


def image_critic():
    """d_x / d_y: three convs, no normalisation (WGAN-GP), one score per image."""
    return nn.Sequential(nn.Conv2d(1, 64, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(128, 1, 8), nn.Flatten())


def feature_critic():
    """d_z: three FC layers on Z."""
    return nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 500), nn.LeakyReLU(0.2), nn.Linear(500, 500),
                         nn.LeakyReLU(0.2), nn.Linear(500, 1))


def build_networks(lam, num_classes=10, encoder_norm="layer"):
    """Only the networks some switched-on loss needs. lam: {name: weight}."""
    x2y = lam["tr"] > 0 or lam["cyc"] > 0 or lam["trc"] > 0  # needs g_y(f(x))
    y2x = lam["tr"] > 0 or lam["cyc"] > 0  # needs g_x(f(y))
    nets = nn.ModuleDict({"enc": encoder(encoder_norm), "cls": classifier(num_classes)})
    need_gx, need_gy = lam["id_x"] > 0 or y2x, lam["id_y"] > 0 or x2y
    if need_gx or need_gy:
        nets["dec"] = decoder_shared()
    if need_gx:
        nets["dec_x"] = decoder_head()
    if need_gy:
        nets["dec_y"] = decoder_head()
    if lam["z"] > 0:
        nets["d_z"] = feature_critic()
    if lam["tr"] > 0:
        nets["d_x"], nets["d_y"] = image_critic(), image_critic()
    return nets


def gradient_penalty(critic, real, fake, generator=None):
    """WGAN-GP (Gulrajani et al. 2017): E[(||grad_u critic(u)||_2 - 1)^2] at random interpolates u of real and fake."""
    eps = torch.rand(len(real), *[1] * (real.dim() - 1), device=real.device, generator=generator)
    u = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(u).sum(), u, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def critic_loss(nets, xs, xt, gp_weight, generator=None):
    """Wasserstein critic losses (real scored high, fake low) + gradient penalties; generator side detached.
    d_z: source features are 'real', target features 'fake'; d_x: source images vs target->source translations;
    d_y: target images vs source->target translations."""
    loss = torch.zeros((), device=xs.device)
    with torch.no_grad():
        z_s, z_t = nets["enc"](xs), nets["enc"](xt)
        if "d_x" in nets:
            h_s, h_t = nets["dec"](z_s), nets["dec"](z_t)
            fake_x, fake_y = nets["dec_x"](h_t), nets["dec_y"](h_s)
    pairs = []
    if "d_z" in nets:
        pairs.append((nets["d_z"], z_s, z_t))
    if "d_x" in nets:
        pairs += [(nets["d_x"], xs, fake_x), (nets["d_y"], xt, fake_y)]
    for critic, real, fake in pairs:
        loss = loss + critic(fake).mean() - critic(real).mean() + gp_weight * gradient_penalty(critic, real, fake, generator)
    return loss


def generator_losses(nets, xs, ys, xt, lam):
    """The encoder/decoder/classifier side of eq. 7: {term: unweighted loss}; a term whose lambda is 0 is not
    computed. Routing (Sec. 4): Q_z reaches the encoder through target features only; Q_trc's translation is
    detached, so it trains f_y and h but never g_y (nor f_x through the translation). Target images go through the
    encoder only if a term uses them: with l_c alone (source only) f never sees one, not even its BatchNorm."""
    z_s = nets["enc"](xs)
    z_t = nets["enc"](xt) if (lam["z"] > 0 or lam["id_y"] > 0 or lam["tr"] > 0 or lam["cyc"] > 0) else None
    out = {}
    if lam["c"] > 0:  # eq. 1
        out["c"] = F.cross_entropy(nets["cls"](z_s), ys)
    if lam["z"] > 0:  # eq. 3, target side only: target features should score like source ones
        out["z"] = -nets["d_z"](z_t).mean()
    h_s = nets["dec"](z_s) if "dec" in nets else None
    h_t = nets["dec"](z_t) if "dec" in nets and z_t is not None else None
    if lam["id_x"] > 0:  # eq. 2
        out["id_x"] = (nets["dec_x"](h_s) - xs).abs().mean()
    if lam["id_y"] > 0:
        out["id_y"] = (nets["dec_y"](h_t) - xt).abs().mean()
    x2y = nets["dec_y"](h_s) if (lam["tr"] > 0 or lam["cyc"] > 0 or lam["trc"] > 0) else None  # g_y(f(x))
    y2x = nets["dec_x"](h_t) if (lam["tr"] > 0 or lam["cyc"] > 0) else None  # g_x(f(y))
    if lam["tr"] > 0:  # eq. 4: translations should score like real images of their new domain
        out["tr"] = -nets["d_y"](x2y).mean() - nets["d_x"](y2x).mean()
    if lam["cyc"] > 0:  # eq. 5
        x_back = nets["dec_x"](nets["dec"](nets["enc"](x2y)))
        y_back = nets["dec_y"](nets["dec"](nets["enc"](y2x)))
        out["cyc"] = (x_back - xs).abs().mean() + (y_back - xt).abs().mean()
    if lam["trc"] > 0:  # eq. 6 on the detached translation
        out["trc"] = F.cross_entropy(nets["cls"](nets["enc"](x2y.detach())), ys)
    return out


def save_grid(nets, xs, xt, path):
    """Rows: source, source->target, source reconstruction, target, target->source, target reconstruction."""
    from torchvision.utils import save_image

    was = nets.training
    nets.eval()
    rows = []
    with torch.inference_mode():
        for x, other, own in ((xs, "dec_y", "dec_x"), (xt, "dec_x", "dec_y")):
            rows.append(x)
            if "dec" in nets:
                h = nets["dec"](nets["enc"](x))
                rows += [nets[k](h) if k in nets else torch.full_like(x, -1) for k in (other, own)]
    nets.train(was)
    save_image((torch.cat(rows).float().cpu() + 1) / 2, path, nrow=len(xs), padding=1)


def main(args):
    # TRY NOT TO MODIFY: seeding, device, data (uint8 tensors on the device), run folder
    run = Run(args, "i2i_adapt")
    device = run.device
    g = torch.Generator(device=device).manual_seed(args.seed)
    src, tgt = load_task(args, 32, 1, device)  # 32x32 gray
    run_dir = run.folder(source=src.name, target=tgt.name)

    # ALGO LOGIC: the networks some switched-on loss needs, two optimisers (generator side, critics)
    lam = args.lam
    nets = build_networks(lam, len(src.classes), args.encoder_norm).to(device)
    critics = [k for k in ("d_z", "d_x", "d_y") if k in nets]
    gen_params = [p for k, m in nets.items() if k not in critics for p in m.parameters()]
    adam = dict(lr=args.lr, betas=args.adam_betas, capturable=args.cuda_graph == "on")  # (capturable: --cuda-graph)
    opt_g = torch.optim.Adam(gen_params, **adam)
    opt_d = torch.optim.Adam([p for k in critics for p in nets[k].parameters()], **adam) if critics else None
    run.compile(nets["enc"])
    model = nn.Sequential(nets["enc"], nets["cls"])  # h(f(.)): what is evaluated
    ev = dict(batch_size=args.eval_batch_size, amp=args.amp)
    sizes = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    print(f"i2i_adapt {args.task} ({args.variant}) | {src} -> {tgt} | networks {sizes} | {device} | run folder {run_dir}",
          flush=True)

    def augment(x_uint8):
        x = to_float(x_uint8)
        if args.aug_translate > 0 or args.aug_rotate > 0:
            x = random_affine(x, args.aug_translate, args.aug_rotate, g)
        return x

    def evaluate(final=False):  # during training a curve only: never used for selection
        rec = run.keep_best(model, evaluate_domains(model, src, tgt, final, **ev))  # --keep-best: saved
        nets.train()  # accuracy() put the Sequential's modules back in its own mode
        return rec

    # ---- training -----------------------------------------------------------------------------------------------
    s_sampler = IndexSampler(len(src.train_x), args.batch_size, device, g)
    t_sampler = IndexSampler(len(tgt.train_x), args.batch_size, device, g)
    meter = run.start_meter()
    state = dict(nets=nets, opt_g=opt_g, **({"opt_d": opt_d} if opt_d else {}), s_sampler=s_sampler,
                 t_sampler=t_sampler, g=g, meter=meter)
    nets.train()

    def critic_step(xs, xt):
        """One update of the critics d_z, d_x, d_y (eqs. 3-4, WGAN-GP); the generator side is detached."""
        with run.autocast():
            loss_d = critic_loss(nets, xs, xt, args.gp_weight, g)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        return loss_d

    def generator_step(xs, ys, xt):
        """One update of the encoder, decoders and classifier on eq. 7."""
        with run.autocast():
            terms = generator_losses(nets, xs, ys, xt, lam)
            loss = sum(lam[k] * v for k, v in terms.items())  # eq. 7
        opt_g.zero_grad(set_to_none=True)
        loss.backward(inputs=gen_params)  # (the critics' gradients are not kept: their next step starts from zero)
        opt_g.step()
        return terms

    critic_step = run.graphed(critic_step, [g])  # --cuda-graph on: recorded once, replayed
    generator_step = run.graphed(generator_step)
    for step in range(run.resume(state) + 1, args.steps + 1):
        # ALGO LOGIC (the augmentation draws stay outside the recorded steps, in the order of the random stream)
        for _ in range(args.critic_steps if critics else 0):  # critics first (alternating optimisation)
            loss_d = critic_step(augment(src.train_x[s_sampler.next()]), augment(tgt.train_x[t_sampler.next()]))
        idx = s_sampler.next()
        # xt is drawn even for source only (where the encoder never sees it), so every variant shares one random stream
        xs, ys, xt = augment(src.train_x[idx]), src.train_y[idx], augment(tgt.train_x[t_sampler.next()])
        terms = generator_step(xs, ys, xt)

        # TRY NOT TO MODIFY: logging, the accuracy curve, checkpoints
        meter.add(**{f"Q_{k}": v for k, v in terms.items()}, **({"Q_critic": loss_d} if critics else {}))
        meter.step(step, evaluate)
        run.checkpoint(step, state)

    # ---- final model's accuracy (no checkpoint selection) --------------------------------------------------------
    final = evaluate(final=True)
    meter.write(step=args.steps, **final)
    shares = run.predictions(model, src, tgt, **ev)  # label-free: each class's share
    target_images = tgt.test_x if len(tgt.test_x) else tgt.train_x  # a folder task may have no test images
    save_grid(nets, to_float(src.test_x[:8]), to_float(target_images[:8]), run_dir / "translations.png")
    meter.image("translations", run_dir / "translations.png", args.steps)
    run.save_model({"nets": nets.state_dict(), "args": vars(args)})
    run.finish({
        "method": "i2i_adapt", "task": args.task, "variant": args.variant, "seed": args.seed, "steps": args.steps,
        "target_acc": round(final["target_test_acc"], 3), "source_acc": round(final["source_test_acc"], 3),
        "lambdas": lam, "networks": sizes, "class_shares": shares}, final, (src, tgt))


if __name__ == "__main__":
    Run.main(main, parse_args)
