"""CMEDL: cross-modality educed distillation (Jiang, Rimner, Deasy, Veeraraghavan, "Unpaired
cross-modality educed distillation (CMEDL) for medical image segmentation", IEEE TMI 2022,
doi 10.1109/TMI.2021.3132291).

Labelled images of the student's modality A (e.g. CT) and unlabelled images of the teacher's
modality B (e.g. MRI) from other patients (unpaired). Everything trains concurrently, from scratch:

* a CycleGAN translator: generators ``G_AB`` (A -> pseudo-B) and ``G_BA``, PatchGAN discriminators
  ``D_B`` and ``D_A``, least-squares adversarial loss and cycle consistency (weight 10);
* a teacher segmenter on pseudo-B images ``G_AB(x_A)``, supervised by A's labels;
* the student segmenter on the A images, supervised by A's labels, plus a feature *hint*: the L2
  (mean squared) distance between student and teacher features of the last decoder layers, found by
  forward hooks by module name. The teacher's features are detached in the hint (it pulls the
  student towards the teacher, not the reverse).

Optimisation is manual with three optimisers: generators, discriminators, segmenters (student and
teacher); ``trainer.max_steps`` counts training batches, as for the other methods. The generators and
segmenters minimise ``adv + cycle (+ identity) + seg_student + teacher_weight * seg_teacher +
hint_weight * hint`` (discriminator parameters frozen while it is computed), the discriminators
``gan_d`` on real vs detached fake images; one backward pass of the sum gives each its gradients
(so it also runs under DDP), then all three optimisers step. The teacher's segmentation loss
also trains ``G_AB`` unless ``translator_seg=False`` (the paper trains end to end; not pinned down).
Only the student is used at inference (``self.net``; validation, test and predict are the student's).

Not public, so configurable and documented: loss weights, hint layers, whether the teacher's loss
reaches the translator. Without a translator (``g_ab=None``) the teacher sees the student's own
images: the "equal teacher" setting of the paper when both are of one modality.

Logged terms: ``train/seg_dice``, ``train/seg_ce`` (student), ``train/teacher_dice``,
``train/teacher_ce``, ``train/hint``, ``train/gan_g``, ``train/cycle``, ``train/identity``,
``train/gan_d``; ``val/teacher_dice`` (the teacher on translated validation images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import do_nothing_closure
from omegaconf import DictConfig
from torch import Tensor, nn

from lightning_distill.data.datamodules import SubjectDataset
from lightning_distill.io import atomic_write
from lightning_distill.methods.translator import build_generator, lsgan_loss, patch_discriminator
from lightning_distill.metrics import CaseMeans, per_case_dice
from lightning_distill.modules import SegmentationModule, weighted_sum
from lightning_distill.networks import InputHook, build_net
from lightning_distill.visuals import new_figure

HEAD_INPUT = "segmentation_head:input"


def default_hint_layers(net: nn.Module) -> List[str]:
    """The last two decoder layers of an smp network: ``decoder.blocks[-2:]`` (U-Net, Linknet, ...),
    otherwise the penultimate feature map (the input of ``segmentation_head``)."""
    blocks = getattr(getattr(net, "decoder", None), "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) >= 2:
        return [f"decoder.blocks.{len(blocks) - 2}", f"decoder.blocks.{len(blocks) - 1}"]
    return [HEAD_INPUT]


def hint_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Mean over layers of the mean squared difference between student and (detached) teacher features.

    Args:
        student, teacher: one ``(B, C_l, *S_l)`` feature map per hint layer, pairwise of one shape.

    Raises:
        ValueError: different numbers of layers or shapes (the teacher must share the student's architecture).
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hint loss needs one teacher feature per student feature, got {len(student)} and {len(teacher)}")
    terms = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"hint features differ in shape: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        terms.append(F.mse_loss(s.float(), t.detach().float()))
    return torch.stack(terms).mean()


class _Hooks:
    """Features of several layers of one network, by module name (``name`` = output, ``name:input`` = input)."""

    def __init__(self, net: nn.Module, names: Sequence[str]):
        self.hooks = []
        for n in names:
            module, _, which = n.partition(":")
            if which not in ("", "input", "output"):
                raise ValueError(f"hint layer {n!r}: use 'module.name', 'module.name:input' or 'module.name:output'")
            self.hooks.append(InputHook(net, module, which=which or "output"))

    def pop(self) -> List[Tensor]:
        return [h.pop() for h in self.hooks]


def _requires_grad(modules: Sequence[Optional[nn.Module]], flag: bool) -> None:
    for m in modules:
        if m is not None:
            for p in m.parameters():
                p.requires_grad_(flag)


class CMEDLModule(SegmentationModule):
    """Concurrent CMEDL training of translator, teacher and student (manual optimisation).

    Args:
        net: the student segmenter (modality A); the only network used at inference.
        class_names: the K class names.
        teacher: the teacher segmenter (modality B), same architecture as the student.
        g_ab, g_ba: generators A -> B and B -> A (``None`` for both: no translation, the teacher sees A).
        d_a, d_b: PatchGAN discriminators of domains A and B (``None`` without translation).
        hint_layers: module names of the hint features (outputs; ``name:input`` for a module's input);
            default :func:`default_hint_layers`.
        hint_weight: weight of the hint term (0: no distillation, the student trains as the baseline).
        teacher_weight: weight of the teacher's segmentation loss.
        adv_weight, cycle_weight, identity_weight: translator loss weights (CycleGAN: 1, 10, 0.5 x 10).
        translator_seg: the teacher's segmentation loss also trains ``G_AB``.
        gan_lr, gan_betas: Adam settings of generators and discriminators (CycleGAN: 2e-4, (0.5, 0.999)).
        **kwargs: :class:`~lightning_distill.modules.SegmentationModule` arguments (``lr``,
            ``weight_decay`` and ``scheduler`` are the segmenters').
    """

    def __init__(self, net: nn.Module, class_names: Sequence[str], teacher: nn.Module,
                 g_ab: Optional[nn.Module] = None, g_ba: Optional[nn.Module] = None,
                 d_a: Optional[nn.Module] = None, d_b: Optional[nn.Module] = None,
                 hint_layers: Optional[Sequence[str]] = None, hint_weight: float = 1.0, teacher_weight: float = 1.0,
                 adv_weight: float = 1.0, cycle_weight: float = 10.0, identity_weight: float = 0.0,
                 translator_seg: bool = True, gan_lr: float = 2e-4, gan_betas: Sequence[float] = (0.5, 0.999), **kwargs):
        translator = [g_ab, g_ba, d_a, d_b]
        if any(m is None for m in translator) and any(m is not None for m in translator):
            raise ValueError("CMEDL needs all four translator networks (g_ab, g_ba, d_a, d_b) or none of them")
        super().__init__(net, class_names, **kwargs)
        self.automatic_optimization = False
        self.teacher = teacher
        self.g_ab, self.g_ba, self.d_a, self.d_b = g_ab, g_ba, d_a, d_b
        self.translate = g_ab is not None
        self.hint_layers = list(hint_layers) if hint_layers else default_hint_layers(net)
        self._student_hooks = _Hooks(net, self.hint_layers)
        self._teacher_hooks = _Hooks(teacher, self.hint_layers)
        self.val_teacher_dice = CaseMeans(1)  # each validation case once, also under DDP

    # ------------------------------------------------------------------ pieces
    def to_teacher_domain(self, x_a: Tensor) -> Tensor:
        """Pseudo-B images ``G_AB(x_A)`` (``x_A`` itself without a translator)."""
        return self.g_ab(x_a) if self.translate else x_a

    def compute_terms(self, batch: Dict) -> Dict[str, Tensor]:
        """Every loss term of one training batch (no backward): the generator/segmenter terms, the
        discriminator term ``gan_d`` (on detached fakes), the student logits and the pseudo-B images."""
        x_a, y = batch["image"], batch["label"]
        terms: Dict[str, Tensor] = {}
        _requires_grad([self.d_a, self.d_b], False)  # the generators' adversarial terms must not train D
        try:
            if self.translate:
                x_b = batch["image_b"]
                fake_b = self.g_ab(x_a)
                fake_a = self.g_ba(x_b)
                terms["gan_g"] = lsgan_loss(self.d_b(fake_b), True) + lsgan_loss(self.d_a(fake_a), True)
                terms["cycle"] = F.l1_loss(self.g_ba(fake_b), x_a) + F.l1_loss(self.g_ab(fake_a), x_b)
                if self.hparams.identity_weight:
                    terms["identity"] = F.l1_loss(self.g_ab(x_b), x_b) + F.l1_loss(self.g_ba(x_a), x_a)
                teacher_in = fake_b if self.hparams.translator_seg else fake_b.detach()
            else:
                fake_b = fake_a = x_b = None
                teacher_in = x_a
        finally:
            _requires_grad([self.d_a, self.d_b], True)
        logits = self.net(x_a)
        student_feats = self._student_hooks.pop()
        t_logits = self.teacher(teacher_in)
        teacher_feats = self._teacher_hooks.pop()
        terms.update(self.seg_terms(logits, y))
        t = self.seg_terms(t_logits, y)
        terms["teacher_dice"], terms["teacher_ce"] = t["seg_dice"], t["seg_ce"]
        terms["hint"] = hint_loss(student_feats, teacher_feats)
        if self.translate:
            fb, fa = fake_b.detach(), fake_a.detach()
            terms["gan_d"] = 0.5 * (lsgan_loss(self.d_b(x_b), True) + lsgan_loss(self.d_b(fb), False)
                                    + lsgan_loss(self.d_a(x_a), True) + lsgan_loss(self.d_a(fa), False))
        return {"terms": terms, "logits": logits, "fake_b": fake_b}

    def term_weights(self) -> Dict[str, float]:
        h = self.hparams
        return {"seg_dice": h.dice_weight, "seg_ce": h.ce_weight, "teacher_dice": h.teacher_weight * h.dice_weight,
                "teacher_ce": h.teacher_weight * h.ce_weight, "hint": h.hint_weight, "gan_g": h.adv_weight,
                "cycle": h.cycle_weight, "identity": h.identity_weight}

    # ------------------------------------------------------------------ training
    def update(self, batch: Dict, opt_g, opt_d, opt_seg, backward: Optional[Callable] = None,
               step: Optional[Callable] = None, step_seg: Optional[Callable] = None) -> Dict:
        """One CMEDL update: generators and segmenters on the weighted sum, the discriminators on ``gan_d``.

        One backward pass of ``loss + gan_d`` gives each network exactly its own gradients: the
        discriminators were frozen while the generator terms went through them, and ``gan_d`` sees
        detached translations, so the sum separates (``tests/methods/test_cmedl.py`` checks every pairing).
        A single backward per step is also what DDP's gradient reducer expects. Then the generator,
        discriminator and segmenter optimisers step (independent parameters: the order changes nothing),
        the segmenters last: under ``16-mixed`` their step is the one that updates the gradient scaler,
        once per batch.

        ``opt_g`` and ``opt_d`` are ``None`` without a translator. ``backward(loss)`` defaults to
        ``loss.backward()``, ``step(opt)`` and ``step_seg(opt)`` to ``opt.step()`` (the training step
        passes Lightning's manual backward and steps; the speed benchmark plain torch optimisers).
        Returns ``compute_terms``' dict with the total ``loss`` (without ``gan_d``).
        """
        backward = backward or (lambda loss: loss.backward())
        step = step or (lambda o: o.step())
        step_seg = step_seg or step
        out = self.compute_terms(batch)
        terms = out["terms"]
        w = self.term_weights()
        loss = weighted_sum(terms, w)
        for o in (opt_g, opt_d, opt_seg):
            if o is not None:
                o.zero_grad()
        backward(loss + terms["gan_d"] if self.translate else loss)
        if opt_g is not None:
            step(opt_g)
        if self.translate:
            step(opt_d)
        step_seg(opt_seg)
        out["loss"] = loss
        return out

    def training_step(self, batch: Dict, batch_idx: int):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opt_g, opt_d = (opts[0], opts[1]) if self.translate else (None, None)
        # the segmenters' step is the one Lightning counts: trainer.global_step / max_steps count batches
        out = self.update(batch, opt_g, opt_d, opts[-1], backward=self.manual_backward, step=self._step_uncounted,
                          step_seg=lambda o: o.step())
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        bs = batch["image"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=self.device.type == "cpu", batch_size=bs)
        for k, v in out["terms"].items():
            self.log(f"train/{k}", v, batch_size=bs)
        return {"loss": out["loss"].detach(), "logits": out["logits"].detach()}

    def _step_uncounted(self, opt) -> None:
        """Step a Lightning-wrapped optimizer through the strategy (precision plugin, gradient scaler)
        without counting it in ``trainer.global_step``, which Lightning's manual optimisation
        increments on every wrapped ``step()``: with three optimisers ``max_steps`` would otherwise
        mean a third of the batches.

        Under ``16-mixed`` the scaler steps it (unscaling its gradients and skipping the step on an inf)
        without ``scaler.update()``: the precision plugin would update the scale after every optimiser,
        so the next optimiser's gradients would be unscaled by a scale they were not scaled with. The
        segmenters' counted step, last, updates it once per batch."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.step(opt.optimizer)
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, do_nothing_closure)

    def configure_optimizers(self):
        seg = self.make_optimizer(list(self.net.parameters()) + list(self.teacher.parameters()))
        opts = [seg]
        if self.translate:
            h = self.hparams
            betas = tuple(h.gan_betas)
            gen = torch.optim.Adam(list(self.g_ab.parameters()) + list(self.g_ba.parameters()), lr=h.gan_lr, betas=betas)
            disc = torch.optim.Adam(list(self.d_a.parameters()) + list(self.d_b.parameters()), lr=h.gan_lr, betas=betas)
            opts = [gen, disc, seg]
        if self.hparams.scheduler == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(seg, T_max=total)
            return opts, [{"scheduler": sched, "interval": "step"}]
        return opts

    # ------------------------------------------------------------------ validation: student (inherited) + teacher
    def validation_step(self, batch: Dict, batch_idx: int):
        super().validation_step(batch, batch_idx)
        logits = self.teacher(self.to_teacher_domain(batch["image"]))
        self._teacher_hooks.pop()
        pred, label = self._eval_pair(logits, batch["label"])
        self.val_teacher_dice.update(batch["id"], torch.nanmean(per_case_dice(pred, label, self.num_classes), dim=1)[:, None])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val/teacher_dice", self.val_teacher_dice.compute()[0])
        self.val_teacher_dice.reset()

    def model_step(self, batch: Dict, train: bool = True) -> Dict:
        out = super().model_step(batch, train)
        for h in self._student_hooks.hooks:  # evaluation passes of the student leave features behind
            h.value = None
        return out

    @torch.no_grad()
    def translation_examples(self, x_a: Tensor, x_b: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Images for a figure: ``a``, ``fake_b`` = G_AB(a), ``rec_a`` = G_BA(G_AB(a)), and when
        ``x_b`` is given ``b``, ``fake_a``, ``rec_b``; plus the student's and teacher's predictions on ``a``."""
        was_training = self.training
        self.eval()
        try:
            out = {"a": x_a, "fake_b": self.to_teacher_domain(x_a)}
            if self.translate:
                out["rec_a"] = self.g_ba(out["fake_b"])
                if x_b is not None:
                    out.update(b=x_b, fake_a=self.g_ba(x_b))
                    out["rec_b"] = self.g_ab(out["fake_a"])
            out["student_pred"] = self.net(x_a).argmax(1)
            out["teacher_pred"] = self.teacher(out["fake_b"]).argmax(1)
            self._student_hooks.pop()
            self._teacher_hooks.pop()
        finally:
            self.train(was_training)
        return out


def save_translation_figure(module: CMEDLModule, dm, path, n: int = 4):
    """PNG of ``n`` validation images of the student's modality through the translator and both
    segmenters (A, pseudo-B, reconstructed A, teacher and student predictions, truth), and of ``n``
    target images (B, pseudo-A). Returns the path, or ``None`` when there is no validation image."""

    dm.setup()
    val = dm.datasets["val"] if len(dm.datasets["val"]) else dm.datasets["test"]
    n = min(n, len(val))
    if n == 0:
        return None
    items = [val[i] for i in range(n)]
    x_a = torch.stack([it["image"] for it in items]).to(module.device)
    label = torch.stack([it["label"][0] for it in items])
    x_b = None
    if module.translate and getattr(dm, "target_ids", None):
        tds = SubjectDataset(dm.target, dm.target_ids[:n], labels=False)
        x_b = torch.stack([tds[i]["image"] for i in range(len(tds))]).to(module.device)
    ex = {k: v.float().cpu() for k, v in module.translation_examples(x_a, x_b).items()}
    cols = [("a", "student input (A)"), ("fake_b", "pseudo-B = G_AB(A)" if module.translate else "teacher input (= A)")]
    if module.translate:
        cols.append(("rec_a", "G_BA(G_AB(A))"))
    cols += [("teacher_pred", "teacher on pseudo-B"), ("student_pred", "student on A"), ("truth", "ground truth")]
    if x_b is not None:
        cols += [("b", "real B (unpaired)"), ("fake_a", "pseudo-A = G_BA(B)")]
    ex["truth"] = label.float()
    k = module.num_classes
    fig, axes = new_figure(n, len(cols), figsize=(1.9 * len(cols), 1.9 * n + 0.4), squeeze=False)
    for r in range(n):
        for c, (key, title) in enumerate(cols):
            ax = axes[r][c]
            if key in ex and r < ex[key].shape[0]:
                labels = key.endswith("pred") or key == "truth"
                img = ex[key][r] if labels else ex[key][r][0]  # images have a channel axis
                while img.ndim > 2:  # 3D: the middle axial slice
                    img = img[..., img.shape[-1] // 2]
                if labels:
                    ax.imshow(img.T, cmap="tab10", vmin=0, vmax=max(9, k - 1), interpolation="nearest", origin="lower")
                else:
                    ax.imshow(img.T, cmap="gray", vmin=0, vmax=1, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    return path


def build(cfg, net: nn.Module, class_names: Sequence[str], common: Dict) -> CMEDLModule:
    """``distill.method=cmedl``: a teacher of the student's architecture, and the translator of
    ``cmedl.translator`` (``none``: the teacher sees the student's images); ``distill.weight`` is the hint weight."""

    c, dims = cfg.cmedl, len(cfg.data.shape)
    if list(c.target.shape) != list(cfg.data.shape):
        raise ValueError(f"cmedl.target.shape {list(c.target.shape)} must equal data.shape {list(cfg.data.shape)}")
    teacher = build_net(cfg, len(class_names))
    nets = {}
    if c.translator != "none":
        size = {"blocks": c.blocks} if c.translator == "resnet" else {"depth": c.blocks}
        gen = lambda: build_generator(c.translator, channels=c.channels, spatial_dims=dims, **size)  # noqa: E731
        disc = lambda: patch_discriminator(channels=c.disc_channels, layers=c.disc_layers, spatial_dims=dims)  # noqa: E731
        nets = {"g_ab": gen(), "g_ba": gen(), "d_a": disc(), "d_b": disc()}
    return CMEDLModule(net, class_names, teacher=teacher, hint_layers=list(c.hint_layers) if c.hint_layers else None,
                       hint_weight=cfg.distill.weight, teacher_weight=c.teacher_weight, adv_weight=c.adv_weight,
                       cycle_weight=c.cycle_weight, identity_weight=c.identity_weight, translator_seg=c.translator_seg,
                       gan_lr=c.gan_lr, gan_betas=list(c.gan_betas), **nets, **common)


def target_config(cfg: DictConfig) -> DictConfig:
    """The method's hook: ``cfg`` with ``data`` replaced by ``cmedl.target``, the teacher's unpaired modality
    (:func:`lightning_distill.methods.target_config`). Its labels are not used, so classes it lacks
    are a warning there, not an error."""
    tcfg = cfg.copy()
    tcfg.data = cfg.cmedl.target
    tcfg.data.nifti.on_missing = "warn"
    return tcfg


def figures(module: CMEDLModule, dm, cfg: DictConfig, out) -> Dict[str, str]:
    """The method's hook: ``translations.png`` (``cmedl.examples`` test images through the translator)."""
    if cfg.cmedl.examples <= 0:
        return {}
    path = save_translation_figure(module, dm, Path(out) / "translations.png", cfg.cmedl.examples)
    return {"translations": str(path)} if path else {}
