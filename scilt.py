"""SciLT: long-tailed classification of scientific images by parameter-efficient fine-tuning of a ViT.

Reimplements "Long-Tailed Classification in Scientific Image Domains" (Chen & Su, arXiv 2604.03687):
a frozen vision foundation model (any timm ViT), LoRA adapters written from scratch, a cosine classifier
on the penultimate block's features (s_1) and one on the final block's (s_2), a learned per-class gate
that fuses them, dual supervision with logit-adjusted cross-entropy, long-tail metrics, and a Rademacher
sanity check of the hypothesis class F_SciLT = F_{N-1} + F_N. The paper's equations are not public:
where this file fixes a detail (cosine heads, the gate, logit adjustment, lambda), it is our reading,
and the README says which parts are which.

Follows: LoRA (Hu et al. 2021; microsoft/LoRA loralib), logit adjustment (Menon et al. 2021), Rademacher
complexity of sums of classes (Bartlett & Mendelson 2002). Depends on torch, and on timm (and its
safetensors) only to build or load a model; copy this one file into another project and it works.
"""
import json
import math
import os
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("scilt", "final", "penultimate")
FUSIONS = ("class", "fixed")  # a learned per-class gate, or a = 1/2 (1 / levels)
COSINE_SCALE = 25.0           # s = scale * cos(W_k, h) as a head is built; init_heads then fits it


# ----------------------------------------------------------------------------------------------------
# LoRA: y = W x + b + (alpha / r) * B A x, with W, b frozen and B = 0 at start.

class LoRALinear(nn.Module):
    """Drops in where `base` was; freezes it. Starts as the identity change: the model is the pretrained one.
    alpha defaults to the rank (scaling 1), here and wherever a LoRALinear is made."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: Optional[float] = None, dropout: float = 0.0):
        super().__init__()
        assert isinstance(base, nn.Linear), f"LoRALinear wraps an nn.Linear, got {type(base).__name__}"
        assert rank > 0, f"LoRA rank must be positive, got {rank}"
        self.base = base.requires_grad_(False)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)  # a bf16 base gets bf16 A and B
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = (rank if alpha is None else alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        if self.merged:  # the update already lives in base.weight
            return self.base(x)
        # scaling goes on the small (out, r) matrix rather than on the (B, T, out) activations
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B * self.scaling)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    # Some attentions (EVA-02, BEiT, RoPE ViTs) call F.linear(x, qkv.weight, their_own_bias) themselves
    # instead of qkv(x): they read the adapted weight here, so LoRA applies to them too (without dropout).
    @property
    def weight(self):
        return self.base.weight if self.merged else self.base.weight + self.delta_weight()

    bias = property(lambda self: self.base.bias)

    @torch.no_grad()
    def merge(self):
        """Fold B A into W for inference at the plain model's speed. Outputs do not change."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def add_lora(model, rank=8, alpha=None, targets=("qkv", "proj"), dropout=0.0):
    """Wrap every nn.Linear in `model.blocks` whose last name is in `targets` (the attention's `qkv` and
    `proj`; the MLP's `fc1`, `fc2` may be added); freeze the rest. Returns how many were wrapped."""
    model.requires_grad_(False)
    found = [(block, name) for block in model.blocks for name, module in block.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    for block, name in found:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    if not found:
        raise ValueError(f"no nn.Linear named {'/'.join(targets)} in the model's blocks")
    return len(found)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model):
    for layer in lora_layers(model):
        layer.unmerge()


# ----------------------------------------------------------------------------------------------------
# The tap, the two classifiers and adaptive fusion.

def tap(backbone, x, blocks=(-2, -1)):
    """ONE pass through the blocks: h_l = pool(norm(z_l)), (B, C), for each of `blocks` (0-based, in block
    order); by default h_pen = pool(norm(z_{N-1})) and h_fin = pool(norm(z_N)). `norm` and `pool` are the
    backbone's own; timm's forward_intermediates hands back each norm(z_l) split into spatial and prefix
    (CLS, register) tokens, which go back together before pooling. Blocks after the last one asked for are
    not run. Nothing is kept between calls."""
    prefix = backbone.num_prefix_tokens > 0
    levels = backbone.forward_intermediates(x, indices=[b % len(backbone.blocks) for b in blocks], norm=True,
                                            output_fmt="NLC", return_prefix_tokens=prefix, stop_early=True,
                                            intermediates_only=True)
    return [backbone.forward_head(torch.cat([z[1], z[0]], dim=1) if prefix else z, pre_logits=True)
            for z in levels]  # (B, T, C) with prefix tokens first, pooled to (B, C)


class CosineClassifier(nn.Module):
    """s_k = scale * <W_k / |W_k|, h / |h|>: class scores that do not grow with a class's sample count."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(num_classes, dim), dim=-1))  # see SciLT.init_heads
        self.register_buffer("scale", torch.tensor(COSINE_SCALE))  # a temperature: fitted, not trained

    def forward(self, h):  # (B, D) -> (B, K)
        return self.scale * F.linear(F.normalize(h, dim=-1), F.normalize(self.weight, dim=-1))

    @torch.no_grad()
    def set_class_means(self, h, labels):
        """Each class's row := the unit-norm mean of its normalised features h (N, D) (a class without
        samples keeps its random unit row). Equal norms: with AdamW a row turns as 1/|W_k|, so unequal
        norms would be per-class learning rates."""
        sums = torch.zeros_like(self.weight).index_add_(0, labels, F.normalize(h.to(self.weight), dim=-1))
        seen = torch.bincount(labels, minlength=len(sums)) > 0
        self.weight[seen] = F.normalize(sums[seen], dim=-1)
        return self


class SciLTOutput(NamedTuple):
    logits: torch.Tensor          # (B, K) the fused scores s: what predictions come from
    levels: list                  # (B, K) per level, in block order: [s_1, s_2] = penultimate, final by default


class SciLT(nn.Module):
    """A frozen timm ViT with LoRA, a cosine classifier per level, fused by a per-class gate.

    The paper's method is two levels: heads[0] (classifier1) on h_pen gives s_1, heads[1] (classifier2) on
    h_fin gives s_2, and s = a * s_1 + (1 - a) * s_2 per class. `blocks` generalises it to any set of
    levels l (0-based, or negative from the end; default the paper's N-1, N): s = sum_l a_l s_l, a per
    class a softmax over the levels. method: "scilt" (all of that), "final" (the final level alone: the
    standard PEFT long-tail baseline) or "penultimate" (block N-1 alone). fusion: "class" (a = softmax of
    a learned per-class gate) or "fixed" (a = 1 / levels)."""

    def __init__(self, backbone, class_counts, *, method="scilt", fusion="class", blocks=(-2, -1), rank=8,
                 alpha=None, targets=("qkv", "proj"), tau=1.0, aux_weight=0.5):
        super().__init__()
        assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
        assert fusion in FUSIONS, f"fusion must be one of {FUSIONS}, got {fusion!r}"
        for attribute in ("blocks", "forward_intermediates", "forward_head", "num_prefix_tokens"):
            assert hasattr(backbone, attribute), f"backbone needs `{attribute}` like a timm ViT"
        depth = len(backbone.blocks)
        assert depth >= 2, "the tap needs at least two blocks"
        assert all(-depth <= b < depth for b in blocks), f"blocks must lie in -{depth}..{depth - 1}, got {blocks}"
        counts = torch.as_tensor(class_counts, dtype=torch.float)
        assert counts.ndim == 1 and (counts > 0).all(), f"class_counts must be positive, got {class_counts}"
        num_classes, dim = len(counts), backbone.num_features
        self.method, self.tau, self.aux_weight = method, tau, aux_weight
        self.blocks = sorted({b % depth for b in {"scilt": blocks, "final": [-1], "penultimate": [-2]}[method]})
        self.fusion = fusion if len(self.blocks) > 1 else None  # one level: nothing to fuse
        self.backbone = backbone
        self.num_lora_layers = add_lora(backbone, rank, alpha, targets)
        for block in backbone.blocks[self.blocks[-1] + 1:]:  # never reach the output: cannot learn
            block.requires_grad_(False)
        self.heads = nn.ModuleList(CosineClassifier(dim, num_classes) for _ in self.blocks)
        # the gate's logits g: a = softmax(g) over the levels, 1 / levels at start (a = 1/2 for two)
        self.gate = nn.Parameter(torch.zeros(num_classes, len(self.blocks))) if self.fusion == "class" else None
        self.register_buffer("log_prior", torch.log(counts / counts.sum()))

    def level_names(self):
        """"penultimate" for block N-1, "final" for block N, "block<l>" (1-based) for the others."""
        depth = len(self.backbone.blocks)
        return [{depth - 2: "penultimate", depth - 1: "final"}.get(b, f"block{b + 1}") for b in self.blocks]

    def features(self, x):
        return tap(self.backbone, x, self.blocks)

    def fusion_weights(self):
        """(K, L): per class, how much the prediction leans on each level (rows sum to 1)."""
        if self.gate is not None:
            return torch.softmax(self.gate, dim=1)
        levels = len(self.blocks)
        return torch.full((len(self.log_prior), levels), 1 / levels, device=self.log_prior.device)

    @property
    def scale(self):  # the heads' cosine scale: a temperature, shared by all levels
        return self.heads[0].scale.item()

    def classify(self, *h):
        """The features of each level -> the fused scores s and each level's s_l."""
        levels = [head(h_l) for head, h_l in zip(self.heads, h)]
        if len(levels) == 1:  # an ablation: its one head is the prediction
            return SciLTOutput(levels[0], levels)
        # with two levels s = a * s_1 + (1 - a) * s_2: a classifier on the fused representation [h_pen, h_fin],
        # inside F_{N-1} + F_N
        a = self.fusion_weights().to(levels[0].dtype)
        return SciLTOutput(sum(a[:, l] * s for l, s in enumerate(levels)), levels)

    def forward(self, x):
        return self.classify(*self.features(x))

    def loss(self, output, target):
        """Dual supervision: L = LA(s) + lambda * (LA(s_1) + LA(s_2)) (+ one term per further level), LA the
        logit-adjusted CE."""
        loss = logit_adjusted_loss(output.logits, target, self.log_prior, self.tau)
        if len(output.levels) > 1:
            loss = loss + self.aux_weight * sum(logit_adjusted_loss(s, target, self.log_prior, self.tau)
                                                for s in output.levels)
        return loss

    @torch.no_grad()
    def init_heads(self, h, labels, max_images=20_000, chunk=4096):
        """The heads begin as nearest-class-mean classifiers on the (un-augmented) training features h, one
        (N, D) per level, with the cosine scale (shared) that minimises this step-0 model's training loss: a
        temperature that changes no prediction. Too high a scale (25) makes the first steps undo confident
        mistakes."""
        for head, h_l in zip(self.heads, h):
            head.set_class_means(h_l, labels)
            head.scale.fill_(1.0)
        if len(labels) > max_images:  # one number needs no more: a seeded subset, in chunks of (chunk, K)
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:max_images]
            h, labels = [h_l[keep.to(h_l.device)] for h_l in h], labels[keep.to(labels.device)]
        scales, losses = torch.logspace(0, 2, 161).tolist(), torch.zeros(161)  # 1 .. 100, 1.2% apart
        for i in range(0, len(labels), chunk):  # cosines at scale 1: every score is linear in s
            out, y = self.classify(*(h_l[i:i + chunk] for h_l in h)), labels[i:i + chunk]
            losses += torch.tensor([len(y) * self.loss(SciLTOutput(s * out.logits, [s * z for z in out.levels]), y)
                                    for s in scales])
        for head in self.heads:
            head.scale.fill_(scales[losses.argmin()])


def logit_adjusted_loss(logits, target, log_prior, tau=1.0):
    """LA(z, y) = CE(z + tau * log(prior), y) (Menon et al. 2021), prior = training class frequencies:
    adding the log prior during training makes the plain argmax of z balanced at test time."""
    return F.cross_entropy(logits.float() + tau * log_prior, target)


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# Long-tail metrics.

def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def long_tail_metrics(preds, targets, class_counts, class_names=None):
    """Accuracies as fractions. Groups: many / medium / few by training count (> 100, 20..100, < 20) and
    head / middle / tail by frequency rank (thirds); a group is the mean of its classes' accuracies, and an
    empty group (or a class absent from `targets`) is None. Balanced accuracy is the mean per-class recall
    over the classes present; macro-F1 averages 2TP / (2TP + FP + FN) over classes seen in either."""
    preds, targets, counts = np.asarray(preds), np.asarray(targets), np.asarray(class_counts)
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(counts))]
    per_class, f1 = [], []
    for k in range(len(counts)):
        is_k, said_k = targets == k, preds == k
        hits = int((is_k & said_k).sum())
        per_class.append(hits / int(is_k.sum()) if is_k.any() else None)
        if is_k.any() or said_k.any():
            f1.append(2 * hits / (int(is_k.sum()) + int(said_k.sum())))
    by_rank = np.array_split(np.argsort(-counts, kind="stable"), 3)
    group = lambda classes: _mean([per_class[k] for k in classes])
    return {
        "overall_acc": float((preds == targets).mean()) if len(targets) else None,
        "balanced_acc": _mean(per_class),
        "macro_f1": _mean(f1),
        "many": group(np.flatnonzero(counts > 100)),
        "medium": group(np.flatnonzero((counts >= 20) & (counts <= 100))),
        "few": group(np.flatnonzero(counts < 20)),
        "head": group(by_rank[0]), "middle": group(by_rank[1]), "tail": group(by_rank[2]),
        "per_class_acc": dict(zip(names, per_class)),
    }


# ----------------------------------------------------------------------------------------------------
# Rademacher sanity check of F_SciLT = F_{N-1} + F_N.

def rademacher_draws(features, bound, draws=1000, seed=0):
    """Per draw of sigma in {-1, 1}^n: sup over {h -> <w, h> : |w| <= bound} of (1/n) sum_i sigma_i <w, h_i>
    = (bound / n) |sum_i sigma_i h_i|, (draws,); their mean estimates the empirical Rademacher complexity on
    `features` (n, D). One seed, the same sigmas: draws pair across feature sets. 10^7 signs at a time."""
    h = torch.as_tensor(features, dtype=torch.float64)
    generator, chunk, sups = torch.Generator().manual_seed(seed), max(1, 10**7 // len(h)), []
    for start in range(0, draws, chunk):
        sigma = torch.randint(0, 2, (min(chunk, draws - start), len(h)), generator=generator) * 2.0 - 1
        sups.append(bound / len(h) * (sigma.to(h) @ h).norm(dim=1))
    return torch.cat(sups)


def rademacher_check(levels, fusion_weights, scale, draws=1000, seed=0):
    """The complexity of what the heads compute, F_l = {h -> <w, h/|h|> : |w| <= scale}, on the TRAINING
    sample (what a generalisation bound is about). `levels`: name -> features (n, D), by default the
    penultimate and final ones. The sum class F_{N-1} + F_N (R(F + G) <= R(F) + R(G), Bartlett & Mendelson
    2002; equal here, the supremum splits) is one average over the same, paired sigmas, with its own
    standard error; `fused` is sum_l a_l F_l for the mean class's weights a (L,). The closed bound
    (Jensen), scale / sqrt(n) per level for unit features, is fixed by n and the scale: no test. A
    `fraction` of it, 0.80 = sqrt(2/pi) for identical features to 1 for orthogonal ones, says how diverse
    the training features are."""
    def unit(h):  # a float64 copy, normalised in place: one (n, D) copy at a time
        h = torch.as_tensor(h).to(torch.float64, copy=True)
        return h.div_(h.norm(dim=1, keepdim=True).clamp_min(1e-12))
    sups = {name: rademacher_draws(unit(h), scale, draws, seed) for name, h in levels.items()}
    a = torch.as_tensor(fusion_weights, dtype=torch.float64).reshape(-1, len(levels)).mean(0).tolist()
    n = len(next(iter(levels.values())))
    bound = scale / math.sqrt(n)
    classes = {name: (s, bound) for name, s in sups.items()}
    classes.update(sum=(sum(sups.values()), len(sups) * bound),
                   fused=(sum(w * s for w, s in zip(a, sups.values())), bound))
    check = {name: {"estimate": s.mean().item(), "stderr": s.std().item() / math.sqrt(draws),
                    "bound": limit, "fraction": s.mean().item() / limit} for name, (s, limit) in classes.items()}
    return {**check, "n": n, "scale": float(scale), "mean_a": a}


# ----------------------------------------------------------------------------------------------------
# One file for inference: the backbone with LoRA merged in, the heads and the gate.

def export(model, path, /, **metadata):
    """One .safetensors file: the backbone with LoRA merged in (timm's names after `backbone.`), the heads,
    the gate, and `metadata` (JSON values) naming the timm `model` and `model_kwargs` load_exported() needs."""
    from safetensors.torch import save_file

    merge_lora(model)
    state = {name.replace(".base.", "."): tensor.detach().cpu().clone().contiguous()
             for name, tensor in model.state_dict().items() if ".lora_" not in name}
    unmerge_lora(model)
    metadata.update(method=model.method, fusion=model.fusion, blocks=model.blocks)
    save_file(state, str(path), metadata={key: json.dumps(value) for key, value in metadata.items()})


def load_exported(path):
    """The model export() wrote, merged and in eval mode, and its metadata. Needs timm, not its hub."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        metadata = {key: json.loads(value) for key, value in file.metadata().items()}
        state = {name: file.get_tensor(name) for name in file.keys()}
    backbone = create_backbone(metadata["model"], **metadata["model_kwargs"])
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    model = SciLT(backbone, state["log_prior"].exp(), method=metadata["method"], fusion=metadata["fusion"] or "class",
                  blocks=metadata["blocks"])
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("backbone.")}, strict=False)
    merge_lora(model)  # B = 0: the plain model's speed, the same outputs
    return model.eval(), metadata


# ----------------------------------------------------------------------------------------------------
# Backbones.

def create_backbone(name, pretrained=False, weights=None, **timm_kwargs):
    """A headless timm ViT (num_classes=0). `weights`: a local file (safetensors or a state dict), loaded as
    timm loads the hub's (head dropped, position embeddings resized to `img_size`)."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: expected a timm ViT name such as "
                         "vit_base_patch16_224.augreg_in21k (see timm.list_models('vit_*'))")
    if weights is not None:
        if not os.path.isfile(weights):
            raise ValueError(f"weights file {weights} not found: expected a .safetensors or .pth state dict")
        timm_kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
    try:
        model = timm.create_model(name, pretrained=pretrained or weights is not None, num_classes=0,
                                  **timm_kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        if weights is not None:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise ValueError(f"could not load weights file {weights} into {name}: {reason}") from None
        if pretrained:
            raise ValueError(f"could not fetch pretrained weights for {name} ({type(error).__name__}): "
                             "without internet, load them from a local file instead") from None
        raise
    if not all(hasattr(model, a) for a in ("blocks", "forward_intermediates", "forward_head")):
        raise ValueError(f"model {name!r} is not a ViT: SciLT needs blocks, forward_intermediates, forward_head")
    return model
