"""SciLT: long-tailed classification of scientific images by parameter-efficient fine-tuning.

Reimplements "Long-Tailed Classification in Scientific Image Domains" (Chen & Su, arXiv 2604.03687):
a frozen vision foundation model (any timm ViT), LoRA adapters written from scratch, a cosine
classifier on the penultimate block's features (s_1) and one on the final block's (s_2), a learned
per-class gate that fuses them, dual supervision with logit-adjusted cross-entropy (Menon et al.
2021), long-tail metrics, and a Rademacher sanity check of F_SciLT = F_{N-1} + F_N. The paper's
equations are not public: where this file fixes a detail, it is our reading (see the README).
Blocks are indexed as Python and timm index them: 0-based, negatives from the end (the paper's
blocks N-1 and N are -2 and -1). Needs torch, and timm to build a backbone: copy it anywhere.
"""
import math
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("scilt", "final", "penultimate")
FUSIONS = ("class", "fixed", "feature")  # of scores by a per-class gate or a = 1/2; of features
COSINE_SCALE = 25.0           # s = scale * cos(W_k, h) as a head is built; init_heads then fits it


# -------------------------------------------------------------------------------------------------
# LoRA: y = W x + b + (alpha / r) * B A x, with W, b frozen and B = 0 at start.

class LoRALinear(nn.Module):
    """Drops in where `base` was and freezes it. Starts as the identity change: the model is the
    pretrained one. alpha defaults to the rank (scaling 1), wherever a LoRALinear is made."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: Optional[float] = None):
        super().__init__()
        assert isinstance(base, nn.Linear), f"LoRALinear wraps nn.Linear, not {type(base).__name__}"
        assert rank > 0, f"LoRA rank must be positive, got {rank}"
        self.base = base.requires_grad_(False)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)  # bf16 base: bf16 A and B
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = (rank if alpha is None else alpha) / rank
        self.merged = False

    def forward(self, x):
        if self.merged:  # the update already lives in base.weight
            return self.base(x)
        # scaling goes on the small (out, r) matrix rather than on the (B, T, out) activations
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B * self.scaling)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    # Some attentions (EVA-02, BEiT, RoPE ViTs) call F.linear(x, qkv.weight, their_own_bias) instead
    # of qkv(x): they read the adapted weight here, so LoRA applies to them too.
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


def add_lora(model, rank=8, alpha=None, targets=("qkv", "proj")):
    """Wrap every nn.Linear in `model.blocks` whose last name is in `targets` (the attention's `qkv`
    and `proj`; the MLP's `fc1`, `fc2` may be added); freeze the rest. Returns how many."""
    model.requires_grad_(False)
    found = [(block, name) for block in model.blocks for name, module in block.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named {'/'.join(targets)} in the model's blocks")
    for block, name in found:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return len(found)


def lora_layers(model):
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def merge_lora(model):
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model):
    for layer in lora_layers(model):
        layer.unmerge()


# -------------------------------------------------------------------------------------------------
# The tap, the two classifiers and adaptive fusion.

def tap(backbone, x, blocks=(-2, -1)):
    """ONE pass through the blocks: h_l = pool(norm(z_l)), (B, C), for each of `blocks` in the
    order asked; by default [h_pen, h_fin] = [pool(norm(z_{N-1})), pool(norm(z_N))], with the
    backbone's own `norm` and `pool`. Blocks after the last one asked for are not run."""
    depth = len(backbone.blocks)
    asked = [b % depth for b in blocks]
    indices = sorted(set(asked))  # what timm runs: each block once, in order
    prefix = backbone.num_prefix_tokens > 0
    found = backbone.forward_intermediates(x, indices=indices, norm=True, output_fmt="NLC",
                                           return_prefix_tokens=prefix, stop_early=True,
                                           intermediates_only=True)
    pooled = {}
    for index, z in zip(indices, found):
        # timm splits the prefix (CLS, register) tokens off: (B, T, C) with them first again
        tokens = torch.cat([z[1], z[0]], dim=1) if prefix else z
        pooled[index] = backbone.forward_head(tokens, pre_logits=True)  # (B, C)
    return [pooled[b] for b in asked]


class CosineClassifier(nn.Module):
    """s_k = scale * <W_k / |W_k|, h / |h|>: scores that do not grow with a class's sample count."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(num_classes, dim), dim=-1))
        self.register_buffer("scale", torch.tensor(COSINE_SCALE))  # a temperature: fitted once

    def forward(self, h):  # (B, D) -> (B, K)
        return self.scale * F.linear(F.normalize(h, dim=-1), F.normalize(self.weight, dim=-1))

    @torch.no_grad()
    def set_class_means(self, h, labels):
        """Each class's row := the unit-norm mean of its normalised features h (N, D) (a class
        without samples keeps its random row). Equal norms: with AdamW a row turns as 1/|W_k|."""
        unit = F.normalize(h.to(self.weight), dim=-1)
        sums = torch.zeros_like(self.weight).index_add_(0, labels, unit)
        seen = torch.bincount(labels, minlength=len(sums)) > 0
        self.weight[seen] = F.normalize(sums[seen], dim=-1)
        return self


class SciLTOutput(NamedTuple):
    logits: torch.Tensor  # (B, K) the fused scores s: what predictions come from
    levels: list          # (B, K) per level, in block order: [s_1, s_2] by default


class SciLT(nn.Module):
    """A frozen timm ViT with LoRA, a cosine classifier per level, fused by a per-class gate.

    The paper's method is two levels: heads[0] (classifier1) on h_pen gives s_1, heads[1]
    (classifier2) on h_fin gives s_2, and s = a * s_1 + (1 - a) * s_2 per class. `blocks` takes
    any set of levels: s = sum_l w_l s_l, a class's level weights w a softmax over the levels.
    method: "scilt", "final" (the final level alone: the standard PEFT long-tail baseline) or
    "penultimate". fusion: "class" (a learned per-class gate), "fixed" (w = 1 / levels) or
    "feature" (the literal reading: a per-channel gate fuses the unit features, f = sum_l w_l *
    h_l / |h_l|, and a third cosine classifier on f gives s; the level heads still give s_l)."""

    def __init__(self, backbone, class_counts, *, method="scilt", fusion="class", blocks=(-2, -1),
                 rank=8, alpha=None, targets=("qkv", "proj"), tau=1.0, aux_weight=0.5):
        super().__init__()
        assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
        assert fusion in FUSIONS, f"fusion must be one of {FUSIONS}, got {fusion!r}"
        for attribute in ("blocks", "forward_intermediates", "forward_head", "num_prefix_tokens"):
            assert hasattr(backbone, attribute), f"backbone needs `{attribute}` like a timm ViT"
        depth = len(backbone.blocks)
        assert depth >= 2, "the tap needs at least two blocks"
        in_range = all(-depth <= b < depth for b in blocks)
        assert in_range, f"blocks must lie in -{depth}..{depth - 1}, got {blocks}"
        counts = torch.as_tensor(class_counts, dtype=torch.float)
        assert counts.ndim == 1 and (counts > 0).all(), f"counts must be positive: {class_counts}"
        num_classes, dim = len(counts), backbone.num_features
        self.method, self.tau, self.aux_weight = method, tau, aux_weight
        levels = {"scilt": blocks, "final": [-1], "penultimate": [-2]}[method]
        self.blocks = sorted({b % depth for b in levels})  # 0-based, in block order
        self.fusion = fusion if len(self.blocks) > 1 else None  # one level: nothing to fuse
        self.backbone = backbone
        self.num_lora_layers = add_lora(backbone, rank, alpha, targets)
        for block in backbone.blocks[self.blocks[-1] + 1:]:  # never reach the output: cannot learn
            block.requires_grad_(False)
        self.heads = nn.ModuleList(CosineClassifier(dim, num_classes) for _ in self.blocks)
        # the gate's logits g: w = softmax(g) over the levels, 1 / L at start (a = 1/2): per class
        # (K, L) for the scores, per channel (D, L) for the features
        self.gate, self.fused_head = None, None
        if self.fusion in ("class", "feature"):
            rows = num_classes if self.fusion == "class" else dim
            self.gate = nn.Parameter(torch.zeros(rows, len(self.blocks)))
        if self.fusion == "feature":
            self.fused_head = CosineClassifier(dim, num_classes)
        self.register_buffer("log_prior", torch.log(counts / counts.sum()))

    def level_names(self):
        """"penultimate" for block N-1, "final" for block N, "block<l>" (1-based) for the others."""
        depth = len(self.backbone.blocks)
        named = {depth - 2: "penultimate", depth - 1: "final"}
        return [named.get(b, f"block{b + 1}") for b in self.blocks]

    def features(self, x):
        return tap(self.backbone, x, self.blocks)

    def level_weights(self):
        """(K, L): per class, how much the prediction leans on each level (rows sum to 1; the
        channels' mean for every class with feature fusion). With the paper's two levels, column 0
        is a, the weight on the penultimate level."""
        if self.fusion == "feature":
            return torch.softmax(self.gate, dim=1).mean(0).expand(len(self.log_prior), -1)
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
        if self.fusion == "feature":  # inside F_{N-1} + F_N too: <w, sum_l a_l u_l> is linear
            return SciLTOutput(self.fused_head(self.fused_features(*h)), levels)
        # with two levels s = a * s_1 + (1 - a) * s_2: a linear classifier on the fused
        # representation [h_pen, h_fin], inside F_{N-1} + F_N
        weights = self.level_weights().to(levels[0].dtype)
        fused = sum(weights[:, l] * s_l for l, s_l in enumerate(levels))
        return SciLTOutput(fused, levels)

    def forward(self, x):
        return self.classify(*self.features(x))

    def fused_features(self, *h):
        """f = sum_l w_l * h_l / |h_l|, (B, D), w the per-channel gate's softmax over the levels."""
        weights = torch.softmax(self.gate, dim=1).to(h[0].dtype)  # (D, L)
        return sum(weights[:, l] * F.normalize(h_l, dim=-1) for l, h_l in enumerate(h))

    def loss(self, output, target):
        """Dual supervision: L = LA(s) + lambda * (LA(s_1) + LA(s_2)) (+ a term per further level),
        LA the logit-adjusted cross-entropy."""
        loss = logit_adjusted_loss(output.logits, target, self.log_prior, self.tau)
        if len(output.levels) > 1:
            per_level = [logit_adjusted_loss(s, target, self.log_prior, self.tau)
                         for s in output.levels]
            loss = loss + self.aux_weight * sum(per_level)
        return loss

    @torch.no_grad()
    def init_heads(self, h, labels, max_images=20_000, chunk=4096):
        """The heads begin as nearest-class-mean classifiers on the (un-augmented) training
        features h, one (N, D) per level, with the shared cosine scale that minimises this step-0
        model's training loss: a temperature that changes no prediction."""
        heads, features = list(self.heads), list(h)
        if self.fused_head is not None:  # its rows: the class means of the fused features
            heads.append(self.fused_head)
            features.append(self.fused_features(*h))
        for head, h_l in zip(heads, features):
            head.set_class_means(h_l, labels)
            head.scale.fill_(1.0)
        if len(labels) > max_images:  # one number needs no more: a seeded subset
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
            keep = keep[:max_images]
            h, labels = [h_l[keep.to(h_l.device)] for h_l in h], labels[keep.to(labels.device)]
        scales = torch.logspace(0, 2, 161).tolist()  # 1 .. 100, 1.2% apart
        losses = torch.zeros(len(scales))
        for start in range(0, len(labels), chunk):  # (chunk, K) scores at a time
            out = self.classify(*(h_l[start:start + chunk] for h_l in h))  # cosines: scale 1
            y = labels[start:start + chunk]
            for i, s in enumerate(scales):  # every score is linear in the scale
                scaled = SciLTOutput(s * out.logits, [s * z for z in out.levels])
                losses[i] += len(y) * self.loss(scaled, y)
        for head in heads:
            head.scale.fill_(scales[losses.argmin()])


def logit_adjusted_loss(logits, target, log_prior, tau=1.0):
    """LA(z, y) = CE(z + tau * log(prior), y) (Menon et al. 2021), prior = the training class
    frequencies: adding the log prior in training makes the plain argmax of z balanced at test."""
    return F.cross_entropy(logits.float() + tau * log_prior, target)


# -------------------------------------------------------------------------------------------------
# Long-tail metrics.

def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def long_tail_metrics(preds, targets, class_counts, class_names=None):
    """Accuracies as fractions. Groups: many / medium / few by training count (> 100, 20..100,
    < 20) and head / middle / tail by frequency rank (thirds), each the mean of its classes'
    accuracies; an empty group (or a class absent from `targets`) is None. Balanced accuracy: the
    mean per-class recall; macro-F1: the mean of 2TP / (2TP + FP + FN) over the classes seen."""
    preds, targets, counts = np.asarray(preds), np.asarray(targets), np.asarray(class_counts)
    names = [str(k) for k in range(len(counts))] if class_names is None else list(class_names)
    per_class, f1 = [], []
    for k in range(len(counts)):
        is_k, said_k = targets == k, preds == k
        hits = int((is_k & said_k).sum())
        per_class.append(hits / int(is_k.sum()) if is_k.any() else None)
        if is_k.any() or said_k.any():
            f1.append(2 * hits / (int(is_k.sum()) + int(said_k.sum())))

    def group(classes):
        return _mean([per_class[k] for k in classes])

    head, middle, tail = np.array_split(np.argsort(-counts, kind="stable"), 3)
    if not len(tail):  # two classes: a head and a tail, no middle
        middle, tail = tail, middle
    return {
        "overall_acc": float((preds == targets).mean()) if len(targets) else None,
        "balanced_acc": _mean(per_class),
        "macro_f1": _mean(f1),
        "many": group(np.flatnonzero(counts > 100)),
        "medium": group(np.flatnonzero((counts >= 20) & (counts <= 100))),
        "few": group(np.flatnonzero(counts < 20)),
        "head": group(head), "middle": group(middle), "tail": group(tail),
        "per_class_acc": dict(zip(names, per_class)),
    }


# -------------------------------------------------------------------------------------------------
# Rademacher sanity check of F_SciLT = F_{N-1} + F_N.

def rademacher_draws(features, bound, draws=1000, seed=0):
    """Per draw of sigma in {-1, 1}^n: sup over {h -> <w, h> : |w| <= bound} of
    (1/n) sum_i sigma_i <w, h_i> = (bound / n) |sum_i sigma_i h_i|, (draws,); their mean estimates
    the empirical Rademacher complexity on `features` (n, D). One seed, the same sigmas: draws pair
    across feature sets. 10^7 signs at a time."""
    h = torch.as_tensor(features, dtype=torch.float64)
    generator, chunk, sups = torch.Generator().manual_seed(seed), max(1, 10**7 // len(h)), []
    for start in range(0, draws, chunk):
        signs = torch.randint(0, 2, (min(chunk, draws - start), len(h)), generator=generator)
        sigma = signs * 2.0 - 1  # (chunk, n)
        sups.append(bound / len(h) * (sigma.to(h) @ h).norm(dim=1))
    return torch.cat(sups)


class Estimate(NamedTuple):  # one class's complexity
    estimate: float         # the Monte-Carlo mean of the draws, and its standard error
    stderr: float
    bound: float            # the closed bound (Jensen), and estimate / bound
    fraction: float


class RademacherCheck(NamedTuple):
    classes: dict        # name -> Estimate: each level, "sum" (F_{N-1} + F_N) and "fused"
    n: int               # training images
    scale: float         # the norm bound t of every class
    level_weights: list  # (L,) the mean class's level weights, which make the fused class


def rademacher_check(levels, level_weights, scale, fused=None, draws=1000, seed=0):
    """The complexity of what the heads compute, F_l = {h -> <w, h/|h|> : |w| <= scale}, on the
    TRAINING sample (what a generalisation bound is about), `levels`: name -> features (n, D). The
    sum class F_{N-1} + F_N (R(F + G) <= R(F) + R(G), Bartlett & Mendelson 2002; equal here) is one
    average over the same, paired sigmas, with its own standard error; `fused` is sum_l w_l F_l for
    the mean class's level weights w (from `level_weights`, (K, L)), or the class on the `fused`
    features (n, D) where features are fused rather than scores. The closed bound, scale /
    sqrt(n) a level for unit features, is fixed by n and the scale: no test. Its `fraction`, from
    0.80 = sqrt(2/pi) for identical features to 1 for orthogonal ones, says how diverse they are."""
    def unit(h):  # a float64 copy, normalised in place: one (n, D) copy at a time
        h = torch.as_tensor(h).to(torch.float64, copy=True)
        return h.div_(h.norm(dim=1, keepdim=True).clamp_min(1e-12))

    sups = {name: rademacher_draws(unit(h), scale, draws, seed) for name, h in levels.items()}
    weights = torch.as_tensor(level_weights, dtype=torch.float64).reshape(-1, len(levels))
    mean_weights, n = weights.mean(0).tolist(), len(next(iter(levels.values())))
    bound = scale / math.sqrt(n)
    draws_and_bounds = {name: (s, bound) for name, s in sups.items()}
    draws_and_bounds["sum"] = (sum(sups.values()), len(sups) * bound)
    draws_and_bounds["fused"] = (sum(w * s for w, s in zip(mean_weights, sups.values())), bound)
    if fused is not None:
        draws_and_bounds["fused"] = (rademacher_draws(unit(fused), scale, draws, seed), bound)
    classes = {}
    for name, (s, limit) in draws_and_bounds.items():
        mean, stderr = s.mean().item(), s.std().item() / math.sqrt(draws)
        classes[name] = Estimate(mean, stderr, limit, mean / limit)
    return RademacherCheck(classes, n, float(scale), mean_weights)


# -------------------------------------------------------------------------------------------------

def create_backbone(name, **timm_kwargs):
    """A timm ViT without its classifier (num_classes=0), as SciLT takes it; timm_kwargs such as
    pretrained=True, img_size=... or pretrained_cfg_overlay=dict(file=...) go to timm."""
    import timm

    model = timm.create_model(name, num_classes=0, **timm_kwargs)
    needs = ("blocks", "forward_intermediates", "forward_head", "num_prefix_tokens")
    if not all(hasattr(model, attribute) for attribute in needs):
        raise ValueError(f"model {name!r} is not a ViT: SciLT needs {', '.join(needs)}")
    return model
