"""SciLT: long-tailed classification of scientific images by parameter-efficient fine-tuning.

Reimplements "Long-Tailed Classification in Scientific Image Domains" (Chen & Su, arXiv 2604.03687):
a frozen timm ViT, LoRA written from scratch, cosine classifiers on the penultimate (s_1) and final
(s_2) blocks' features fused by a learned per-class gate, dual supervision with logit-adjusted
cross-entropy (Menon et al. 2021), the step-0 start and the optimizer's groups, long-tail metrics
and a Rademacher sanity check of F_{N-1} + F_N. Where the paper's equations (not public) leave a
detail open, this is our reading. Blocks are 0-based as in timm (N-1 and N are -2 and -1). Needs
torch and numpy, and timm to build a backbone.
"""
import math
from collections import namedtuple
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("scilt", "final", "penultimate")
VIT_NEEDS = ("blocks", "forward_intermediates", "forward_head", "num_prefix_tokens")  # as timm's
FUSIONS = ("class", "fixed", "feature")  # of scores by a per-class gate or a = 1/2; of features
COSINE_SCALE = 25.0   # s = scale * cos(W_k, h) as a head is built; init_heads then fits it
WEIGHT_DECAY = 1e-2   # AdamW's, on LoRA and the heads; none on the gate
GATE_LR_SCALE = 30    # the gate's learning rate over the others' (see configure_optimizer)
MANY_SHOT, FEW_SHOT = 100, 20  # many: > 100 training images, few: < 20, medium: in between


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
        self.merged = False  # a plain bool, so that forward never waits on the GPU to branch

    def get_extra_state(self):  # in the state dict: a merged state makes its model merged
        return {"merged": self.merged}

    def set_extra_state(self, state):
        self.merged = bool(state["merged"])

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
    def merge(self, merged=True):
        """Fold B A into W (merged=False: take it out): the plain model's speed, same outputs."""
        if merged != self.merged:
            sign = 1 if merged else -1
            self.base.weight += sign * self.delta_weight().to(self.base.weight.dtype)
            self.merged = merged

    def unmerge(self):
        self.merge(False)


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


def merge_lora(model, merged=True):  # merged=False unmerges
    for layer in lora_layers(model):
        layer.merge(merged)


# -------------------------------------------------------------------------------------------------
# The backbone, the tap, the two classifiers and adaptive fusion.

def create_backbone(name, **timm_kwargs):
    """A timm ViT without its classifier, as SciLT takes it; timm_kwargs (pretrained=True, ...)."""
    import timm  # here, so that the rest of the file needs only torch and numpy
    model = timm.create_model(name, num_classes=0, **timm_kwargs)
    if not all(hasattr(model, attribute) for attribute in VIT_NEEDS):
        raise ValueError(f"model {name!r} is not a ViT: SciLT needs {', '.join(VIT_NEEDS)}")
    return model


def autocast(device):  # every pass: bf16 on a GPU (the real job), float32 on a CPU
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def tap(backbone, x, blocks=(-2, -1)):
    """ONE pass through the blocks: h_l = pool(norm(z_l)), (B, C), with the backbone's own norm
    and pool, for each of `blocks` in the order asked (by default [h_pen, h_fin]), no further."""
    asked = [b % len(backbone.blocks) for b in blocks]
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
        self.register_buffer("scale", torch.tensor(COSINE_SCALE))  # a temperature, fitted at step 0

    def forward(self, h):  # (B, D) -> (B, K)
        return self.scale * F.linear(F.normalize(h, dim=-1), F.normalize(self.weight, dim=-1))

    @torch.no_grad()
    def set_class_means(self, h, labels):
        """Each class's row := the unit-norm mean of its unit features h (N, D); a class without
        any keeps its random row. Equal norms: with AdamW a row turns as 1 / |W_k|."""
        unit = F.normalize(h.to(self.weight), dim=-1)
        sums = torch.zeros_like(self.weight).index_add_(0, labels, unit)  # (K, D)
        seen = sums.any(dim=1, keepdim=True)  # (K, 1), with no boolean indexing
        self.weight.copy_(torch.where(seen, F.normalize(sums, dim=-1), self.weight))
        return self


class SciLTOutput(NamedTuple):
    logits: torch.Tensor  # (B, K) the fused scores s: what predictions come from
    level_scores: list    # (B, K) per level, in block order: [s_1, s_2] by default


class SciLT(nn.Module):
    """A frozen timm ViT with LoRA, a cosine classifier per level, fused by a per-class gate.

    The paper's two levels: heads[0] on h_pen gives s_1, heads[1] on h_fin s_2, and s = a * s_1 +
    (1 - a) * s_2 per class; any `blocks`: s = sum_l w_l s_l, w a softmax over the levels. method:
    "scilt", "final" (the standard PEFT long-tail baseline) or "penultimate" (one level alone).
    fusion: "class" (a learned per-class gate), "fixed" (w = 1 / L) or "feature" (a per-channel
    gate on the unit features, f = sum_l w_l h_l / |h_l|, and a third cosine classifier on f).
    Train it as the method does: init_heads_from(the un-augmented training images) at step 0,
    then configure_optimizer(lr) and model.loss(model(x), y)."""

    def __init__(self, backbone, class_counts, *, method="scilt", fusion="class", blocks=(-2, -1),
                 rank=8, alpha=None, targets=("qkv", "proj"), tau=1.0, aux_weight=0.5):
        super().__init__()
        assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
        assert fusion in FUSIONS, f"fusion must be one of {FUSIONS}, got {fusion!r}"
        for attribute in VIT_NEEDS:
            assert hasattr(backbone, attribute), f"backbone needs `{attribute}` like a timm ViT"
        depth = len(backbone.blocks)
        assert all(-depth <= b < depth for b in blocks), f"blocks outside -{depth}..{depth - 1}"
        counts = torch.as_tensor(class_counts, dtype=torch.float)
        assert counts.ndim == 1 and (counts > 0).all(), f"counts must be positive: {class_counts}"
        num_classes, dim = len(counts), backbone.num_features
        self.method, self.tau, self.aux_weight = method, tau, aux_weight
        read = {"scilt": blocks, "final": [-1], "penultimate": [-2]}[method]
        self.blocks = sorted({b % depth for b in read})  # 0-based, in block order
        self.fusion = fusion if len(self.blocks) > 1 else None  # one level: nothing to fuse
        self.backbone = backbone
        self.num_lora_layers = add_lora(backbone, rank, alpha, targets)
        for block in backbone.blocks[self.blocks[-1] + 1:]:  # never reach the output: cannot learn
            block.requires_grad_(False)
        self.heads = nn.ModuleList(CosineClassifier(dim, num_classes) for _ in self.blocks)
        # the gate's logits g, w = softmax(g) over the levels (1 / L at start): (K, L), or (D, L)
        rows = {"class": num_classes, "feature": dim}.get(self.fusion)  # none where fixed
        self.gate = nn.Parameter(torch.zeros(rows, len(self.blocks))) if rows else None
        self.fused_head = CosineClassifier(dim, num_classes) if self.fusion == "feature" else None
        self.register_buffer("log_prior", torch.log(counts / counts.sum()))

    def level_names(self):
        """"penultimate" for block N-1, "final" for block N, "block<l>" (1-based) for the others."""
        depth = len(self.backbone.blocks)
        named = {depth - 2: "penultimate", depth - 1: "final"}
        return [named.get(b, f"block{b + 1}") for b in self.blocks]

    def features(self, x):
        return tap(self.backbone, x, self.blocks)

    def level_weights(self):
        """(K, L): how much each class's prediction leans on each level; column 0 is a."""
        if self.fusion == "feature":
            return torch.softmax(self.gate, dim=1).mean(0).expand(len(self.log_prior), -1)
        if self.gate is not None:
            return torch.softmax(self.gate, dim=1)
        levels = len(self.blocks)
        return torch.full((len(self.log_prior), levels), 1 / levels, device=self.log_prior.device)

    scale = property(lambda self: self.heads[0].scale.item())  # the heads' shared temperature

    def classify(self, *h):
        """The features of each level -> the fused scores s and each level's s_l."""
        scores = [head(h_l) for head, h_l in zip(self.heads, h)]
        if len(scores) == 1:  # an ablation: its one head is the prediction
            return SciLTOutput(scores[0], scores)
        if self.fusion == "feature":
            # a cosine head on f divides by |f|, which mixes the levels: outside F_{N-1} + F_N
            return SciLTOutput(self.fused_head(self.fused_features(*h)), scores)
        # s_k = sum_l w_kl s_lk adds a function of each level's features: inside F_{N-1} + F_N
        weights = self.level_weights().to(scores[0].dtype)
        fused = sum(weights[:, l] * s_l for l, s_l in enumerate(scores))
        return SciLTOutput(fused, scores)

    def forward(self, x):
        return self.classify(*self.features(x))

    def fused_features(self, *h):
        """f = sum_l w_l * h_l / |h_l|, (B, D), w the per-channel gate's softmax over the levels."""
        weights = torch.softmax(self.gate, dim=1).to(h[0].dtype)  # (D, L)
        return sum(weights[:, l] * F.normalize(h_l, dim=-1) for l, h_l in enumerate(h))

    def loss(self, output, target, *, terms=False):
        """Dual supervision: L = LA(s) + lambda * sum_l LA(s_l), LA the logit-adjusted loss; with
        terms=True, also its terms [LA(s), LA(s_1), ...] (1 + L,), detached (one level: LA(s))."""
        scores = [output.logits] + (output.level_scores if len(output.level_scores) > 1 else [])
        per_head = [logit_adjusted_loss(s, target, self.log_prior, self.tau) for s in scores]
        parts = torch.stack(per_head)
        total = parts[0] + self.aux_weight * parts[1:].sum()
        return (total, parts.detach()) if terms else total

    @torch.no_grad()
    def init_heads(self, h, labels, max_images=20_000, chunk=4096):
        """The method's step 0: nearest-class-mean heads on the un-augmented training features h,
        one (N, D) per level, with the shared cosine scale (a temperature, which changes no
        prediction) that minimises the step-0 training loss. All on the features' device."""
        heads, features = list(self.heads), list(h)
        if self.fused_head is not None:  # its rows are the class means of the fused features
            heads.append(self.fused_head)
            features.append(self.fused_features(*h))
        for head, h_l in zip(heads, features):
            head.set_class_means(h_l, labels)
            head.scale.fill_(1.0)
        if len(labels) > max_images:  # a seeded subset fits one number as well as all of them
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
            keep = keep[:max_images]
            h, labels = [h_l[keep.to(h_l.device)] for h_l in h], labels[keep.to(labels.device)]
        scales = torch.logspace(0, 2, 161, device=labels.device)  # 1 .. 100, 2.9% apart
        losses = torch.zeros_like(scales)
        for start in range(0, len(labels), chunk):  # (chunk, K) scores at a time
            out = self.classify(*(h_l[start:start + chunk] for h_l in h))  # cosines: scale 1
            y = labels[start:start + chunk]
            for i, s in enumerate(scales):  # every score is linear in the scale
                scaled = SciLTOutput(s * out.logits, [s * z for z in out.level_scores])
                losses[i] += len(y) * self.loss(scaled, y)
        best = scales[losses.argmin().view(1)]  # indexed by a (1,) tensor: no copy to the host
        for head in heads:
            head.scale.copy_(best[0])

    @torch.no_grad()
    def init_heads_from(self, data_loader):
        """init_heads on the (images, labels) of a loader of the un-augmented training images."""
        was_training, device = self.training, self.log_prior.device
        self.eval()
        batches = [(self.features(x.to(device)), y.to(device)) for x, y in data_loader]
        h = [torch.cat([f[l] for f, _ in batches]).float() for l in range(len(self.heads))]
        self.init_heads(h, torch.cat([y for _, y in batches]))
        self.train(was_training)

    def configure_optimizer(self, lr, weight_decay=WEIGHT_DECAY, gate_lr_scale=GATE_LR_SCALE):
        """AdamW on LoRA and the heads with weight decay, and on the gate without (nothing pulls a
        class toward 1 / L) at gate_lr_scale x the lr: AdamW moves a weight by about lr a step, a
        gate logit must move by about 1. A schedule sets a group's lr to lr(step) * lr_scale."""
        gate = [self.gate] if self.gate is not None else []
        others = [p for p in self.parameters() if p.requires_grad and p is not self.gate]
        groups = [dict(params=others, weight_decay=weight_decay, lr_scale=1.0),
                  dict(params=gate, weight_decay=0.0, lr_scale=gate_lr_scale)]
        return torch.optim.AdamW([dict(group, lr=lr * group["lr_scale"]) for group in groups])


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
    < 20) and head / middle / tail by rank (thirds), each its classes' mean accuracy; an empty group
    or a class absent from `targets` is None. Balanced accuracy: the mean per-class recall."""
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
        "balanced_acc": _mean(per_class), "macro_f1": _mean(f1),  # mean 2TP / (2TP + FP + FN)
        "many": group(np.flatnonzero(counts > MANY_SHOT)),
        "medium": group(np.flatnonzero((counts >= FEW_SHOT) & (counts <= MANY_SHOT))),
        "few": group(np.flatnonzero(counts < FEW_SHOT)),
        "head": group(head), "middle": group(middle), "tail": group(tail),
        "per_class_acc": dict(zip(names, per_class)),
    }


# -------------------------------------------------------------------------------------------------
# Rademacher sanity check of F_SciLT = F_{N-1} + F_N.

def rademacher_draws(features, bound, draws=1000, seed=0):
    """Per draw of sigma in {-1, 1}^n, sup_{|w| <= bound} (1/n) sum_i sigma_i <w, h_i> =
    (bound / n) |sum_i sigma_i h_i|, (draws,): their mean estimates the empirical Rademacher
    complexity on `features` (n, D). One seed draws the same sigmas for every feature set."""
    h = torch.as_tensor(features, dtype=torch.float64)
    generator, chunk, sups = torch.Generator().manual_seed(seed), max(1, 10**7 // len(h)), []
    for start in range(0, draws, chunk):
        signs = torch.randint(0, 2, (min(chunk, draws - start), len(h)), generator=generator)
        sigma = signs * 2.0 - 1  # (chunk, n)
        sups.append(bound / len(h) * (sigma.to(h) @ h).norm(dim=1))
    return torch.cat(sups)


Estimate = namedtuple("Estimate", "estimate stderr bound fraction")  # fraction: estimate / bound


class RademacherCheck(NamedTuple):
    classes: dict        # name -> Estimate: each level, "sum" (F_{N-1} + F_N), "fused"
    n: int               # training images
    scale: float         # the norm bound t of every class
    level_weights: list  # (L,) the mean class's level weights, which make the fused class


def rademacher_check(level_features, level_weights, scale, fused=None, draws=1000, seed=0):
    """The complexity of the heads' classes F_l = {h -> <w, h/|h|> : |w| <= scale} on the TRAINING
    sample, `level_features`: name -> (n, D). The sum F_{N-1} + F_N (R(F + G) <= R(F) + R(G),
    Bartlett & Mendelson 2002) is averaged over the same sigmas. "fused" is the fused prediction's
    class: sum_l w_l F_l for the mean class's weights w (`level_weights` (K, L)), a member of the
    sum; with feature fusion, the cosine class on the `fused` features (n, D), which is not. The
    closed bound, scale / sqrt(n) a level, is fixed by n and the scale; the `fraction` of it, 0.80
    = sqrt(2/pi) for identical features to 1 for orthogonal ones, says how diverse they are."""
    def unit(h):  # a float64 copy, normalised in place: one (n, D) copy at a time
        h = torch.as_tensor(h).to(torch.float64, copy=True)
        return h.div_(h.norm(dim=1, keepdim=True).clamp_min(1e-12))

    sups = {k: rademacher_draws(unit(h), scale, draws, seed) for k, h in level_features.items()}
    weights = torch.as_tensor(level_weights, dtype=torch.float64).reshape(-1, len(sups))
    mean_weights, n = weights.mean(0).tolist(), len(next(iter(level_features.values())))
    bound = scale / math.sqrt(n)
    fused_draws = (sum(w * s for w, s in zip(mean_weights, sups.values())) if fused is None
                   else rademacher_draws(unit(fused), scale, draws, seed))
    draws_and_bounds = {**{name: (s, bound) for name, s in sups.items()},
                        "sum": (sum(sups.values()), len(sups) * bound),
                        "fused": (fused_draws, bound)}
    classes = {name: Estimate(s.mean().item(), s.std().item() / math.sqrt(draws), limit,
                              s.mean().item() / limit)
               for name, (s, limit) in draws_and_bounds.items()}
    return RademacherCheck(classes, n, float(scale), mean_weights)
