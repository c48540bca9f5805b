"""The method module: LoRA, the tap, heads and fusion, losses, metrics and the Rademacher check."""
import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import scilt
import train
from conftest import ROOT, TINY, tiny_vit

COUNTS = [120, 60, 30, 12, 4]
LOG_PRIOR = torch.log(torch.tensor(COUNTS) / sum(COUNTS))


def build(method="scilt", global_pool="token", **kwargs):
    backbone = tiny_vit(global_pool)
    pretrained = copy.deepcopy(backbone)
    return scilt.SciLT(backbone, COUNTS, method=method, **kwargs), pretrained


def timm_features(vit, x):
    """What timm itself gives: pool(norm(z_{N-1})) via forward_intermediates, and
    pool(norm(z_N))."""
    n = len(vit.blocks)
    final, [(spatial, prefix)] = vit.forward_intermediates(
        x, indices=[n - 2], norm=True, return_prefix_tokens=True, output_fmt="NLC")
    h_pen = vit.forward_head(torch.cat([prefix, spatial], dim=1), pre_logits=True)
    return h_pen, vit.forward_head(final, pre_logits=True)


def randomize_lora(model):
    for layer in scilt.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.05)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_tap_equals_timm_intermediates_and_model_starts_pretrained(global_pool):
    model, pretrained = build(global_pool=global_pool)
    model.eval(), pretrained.eval()
    x = torch.randn(4, 3, 32, 32)
    h_pen, h_fin = model.features(x)
    expected_pen, expected_fin = timm_features(pretrained, x)
    # at step 0 (B = 0) the adapted model is exactly the pretrained one, at both levels
    torch.testing.assert_close(h_pen, expected_pen, rtol=0, atol=0)
    torch.testing.assert_close(h_fin, expected_fin, rtol=0, atol=0)
    # and after training has moved B, the tap still equals timm's intermediates of the same network
    randomize_lora(model)
    h_pen, h_fin = model.features(x)
    expected_pen, expected_fin = timm_features(model.backbone, x)
    torch.testing.assert_close(h_pen, expected_pen)
    torch.testing.assert_close(h_fin, expected_fin)
    assert not torch.allclose(h_fin, timm_features(pretrained, x)[1])


def test_tap_of_every_block_equals_timm_intermediates():
    vit = tiny_vit("avg")
    caught = []
    for block in vit.blocks:
        block.register_forward_hook(lambda module, inputs, output: caught.append(output))
    x = torch.randn(2, 3, 32, 32)
    levels = scilt.tap(vit, x, range(3))
    assert len(caught) == 3  # one pass
    for h, z in zip(levels, caught):
        torch.testing.assert_close(h,
                                   vit.forward_head(vit.norm(z), pre_logits=True), rtol=0, atol=0)


def test_tap_returns_the_levels_asked_for_in_the_order_asked():
    vit = tiny_vit("avg").eval()
    x = torch.randn(2, 3, 32, 32)
    pen, fin = scilt.tap(vit, x)  # the default (-2, -1)
    swapped = scilt.tap(vit, x, (-1, -2))
    torch.testing.assert_close(swapped[0], fin, rtol=0, atol=0)
    torch.testing.assert_close(swapped[1], pen, rtol=0, atol=0)
    twice = scilt.tap(vit, x, (2, -1, 0))
    assert len(twice) == 3
    torch.testing.assert_close(twice[0], twice[1], rtol=0, atol=0)
    torch.testing.assert_close(twice[0], fin, rtol=0, atol=0)
    assert not torch.allclose(twice[2], fin)


def test_tap_runs_each_block_once():
    model, _ = build()
    calls = [0] * len(model.backbone.blocks)
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_hook(lambda *args, i=i: calls.__setitem__(i, calls[i] + 1))
    model(torch.randn(2, 3, 32, 32))
    assert calls == [1] * len(calls)


def test_lora_linear_merge_is_exact_and_unmerge_restores():
    base = torch.nn.Linear(12, 20)
    original = base.weight.detach().clone()
    layer = scilt.LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 7, 12)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: identity change
    assert layer.scaling == 2.0 and layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (20, 4)
    torch.nn.init.normal_(layer.lora_B)
    expected = F.linear(x, original + 2.0 * layer.lora_B @ layer.lora_A, base.bias)
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    layer.merge()  # a second merge is a no-op, not a double update
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original)
    torch.testing.assert_close(layer(x), expected)


def test_lora_alpha_defaults_to_the_rank_in_every_constructor():
    """One default: SciLT(rank=16), add_lora and LoRALinear all scale B A by 1, as train.py
    --lora-rank 16 does."""
    model = scilt.SciLT(tiny_vit(), COUNTS, rank=16)
    assert {layer.scaling for layer in scilt.lora_layers(model)} == {1.0}
    assert scilt.LoRALinear(torch.nn.Linear(4, 4), rank=2).scaling == 1.0

    built = checkpoint.build_model(train.parse_args(["--lora-rank", "16"]), COUNTS)
    assert {layer.scaling for layer in scilt.lora_layers(built)} == {1.0}


def test_lora_linear_follows_the_base_dtype():
    """A bf16 base (no autocast) gets bf16 A and B: the forward pass, merge and unmerge all work
    in bf16."""
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = scilt.LoRALinear(base, rank=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert layer.lora_A.device == base.weight.device
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    adapted = layer(x)
    assert adapted.dtype == torch.bfloat16 and not torch.equal(adapted, base(x))
    layer.merge()
    torch.testing.assert_close(layer(x), adapted, rtol=0.05, atol=0.05)


def test_merged_model_equals_unmerged():
    model, _ = build()
    model.eval()
    randomize_lora(model)
    x = torch.randn(3, 3, 32, 32)
    before = model(x)
    scilt.merge_lora(model)
    assert all(layer.merged for layer in scilt.lora_layers(model))
    for got, want in zip(model(x), before):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    scilt.merge_lora(model, False)
    torch.testing.assert_close(model(x).logits, before.logits, rtol=1e-5, atol=1e-5)


def test_a_merged_state_dict_makes_the_model_it_loads_into_merged():
    """Whether B A lives in base.weight travels with it: a merged state loaded into an unmerged
    model gives the same outputs (B A is not added twice), and so does the reverse; the state
    still loads without pickled code."""
    model, _ = build()
    model.eval()
    randomize_lora(model)
    x = torch.randn(3, 3, 32, 32)
    expected = model(x).logits
    scilt.merge_lora(model)
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    unmerged, _ = build()
    unmerged.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    assert all(layer.merged for layer in scilt.lora_layers(unmerged))
    torch.testing.assert_close(unmerged.eval()(x).logits, expected, rtol=1e-4, atol=1e-4)
    scilt.merge_lora(model, False)
    unmerged.load_state_dict(model.state_dict())  # into a merged model: unmerged again
    assert not any(layer.merged for layer in scilt.lora_layers(unmerged))
    torch.testing.assert_close(unmerged(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_add_lora_targets_and_freezing():
    vit = tiny_vit()
    assert scilt.add_lora(vit) == 2 * 3  # qkv and proj of 3 blocks
    assert scilt.add_lora(tiny_vit(), targets=("qkv", "proj", "fc1", "fc2")) == 4 * 3
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        scilt.add_lora(tiny_vit(), targets=("nonexistent",))


@pytest.mark.parametrize("method, fusion", [(m, "class") for m in scilt.METHODS]
                         + [("scilt", "feature"), ("scilt", "fixed")])
def test_gradients_reach_exactly_the_trainable_parameters(method, fusion):
    model, _ = build(method, fusion=fusion)
    randomize_lora(model)  # so that lora_A's gradient is not zero by construction
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    out = model(torch.randn(6, 3, 32, 32))
    model.loss(out, torch.tensor([0, 1, 2, 3, 4, 0])).backward()
    learns = ["lora_A", "lora_B"]  # LoRA, every head, and a gate where one learns
    expected = {n for n, p in model.named_parameters()
                if n.endswith(tuple(learns)) or n.startswith(("heads.", "fused_head."))
                or (n == "gate" and method == "scilt" and fusion != "fixed")}
    if method == "penultimate":  # the last block's output never reaches the loss
        expected = {n for n in expected
                    if not n.startswith(f"backbone.blocks.{len(model.backbone.blocks) - 1}.")}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None
                 and p.grad.abs().sum() > 0}
    assert with_grad == expected == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1,
                      weight_decay=0.1).step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, frozen_before[name], rtol=0, atol=0)


@pytest.mark.parametrize("blocks", [(0, 2), (0, 1), (0, 1, 2), (-3, -2, -1, 1)])
def test_any_set_of_levels_taps_timm_intermediates_and_fuses_by_a_per_class_softmax(blocks):
    model, pretrained = build("scilt", blocks=blocks)
    model.eval(), pretrained.eval()
    x = torch.randn(4, 3, 32, 32)
    chosen = sorted({b % 3 for b in blocks})
    assert model.blocks == chosen
    assert model.level_names() == [["block1", "penultimate", "final"][b] for b in chosen]
    after = [p for block in model.backbone.blocks[chosen[-1] + 1:] for p in block.parameters()]
    # blocks after the last level never reach the output
    assert not any(p.requires_grad for p in after)
    # each level at step 0 is timm's own intermediate of the pretrained model, pooled
    _, expected = pretrained.forward_intermediates(x, indices=chosen, norm=True,
                                                   return_prefix_tokens=True, output_fmt="NLC")
    for h, (spatial, prefix) in zip(model.features(x), expected):
        pooled = pretrained.forward_head(torch.cat([prefix, spatial], 1), pre_logits=True)
        torch.testing.assert_close(h, pooled, rtol=0, atol=0)
    # one gate weight per class and level, a softmax over the levels: 1 / L at start
    assert model.gate.shape == (len(COUNTS), len(chosen)) and len(model.heads) == len(chosen)
    torch.testing.assert_close(model.level_weights(), torch.full((5, len(chosen)), 1 / len(chosen)))
    with torch.no_grad():
        model.gate.normal_()
    out, a = model(x), torch.softmax(model.gate, dim=1)
    torch.testing.assert_close(out.logits, sum(a[:, l] * s for l, s in enumerate(out.level_scores)))
    # dual supervision over every level, and the gradient reaches every head and the gate
    y = torch.tensor([0, 1, 2, 4])
    la = lambda s: scilt.logit_adjusted_loss(s, y, LOG_PRIOR)
    loss = model.loss(out, y)
    torch.testing.assert_close(loss, la(out.logits) + 0.5 * sum(la(s) for s in out.level_scores))
    loss.backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in model.heads)
    assert model.gate.grad.abs().min() > 0


def test_the_two_level_default_is_the_papers_fusion():
    """blocks (-2, -1): s = a * s_1 + (1 - a) * s_2 per class with a = sigmoid(g_1 - g_2), s_1 on
    z_{N-1}."""
    model, pretrained = build("scilt")
    assert model.blocks == [1, 2] and model.level_names() == ["penultimate", "final"]
    with torch.no_grad():
        model.gate.normal_()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    a = torch.sigmoid(model.gate[:, 0] - model.gate[:, 1])
    s1, s2 = out.level_scores
    torch.testing.assert_close(out.logits, a * s1 + (1 - a) * s2)
    torch.testing.assert_close(s1, model.heads[0](timm_features(pretrained.eval(), x)[0]))


def test_feature_fusion_is_a_cosine_classifier_on_the_gated_unit_features():
    """--fusion feature, the paper's "adaptive feature fusion" read literally: f = w_1 * u_pen +
    w_2 * u_fin per channel (u = h / |h|, w a softmax over the levels), s = t cos(W, f); the two
    level heads keep giving s_1 and s_2 for the dual supervision."""
    model, pretrained = build("scilt", fusion="feature")
    model.eval(), pretrained.eval()
    assert model.gate.shape == (48, 2) and model.fused_head is not None
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 0, 1, 2, 3, 4, 4, 1])
    with torch.no_grad():  # step 0: equal weights, and class means of the fused features
        h_pen, h_fin = timm_features(pretrained, torch.cat([x, x + 1]))
        model.init_heads([h_pen, h_fin], labels)
    mean_unit = (F.normalize(h_pen, dim=-1) + F.normalize(h_fin, dim=-1)) / 2
    expected_rows = torch.stack([F.normalize(mean_unit[labels == k], dim=-1).mean(0)
                                 for k in range(5)])
    torch.testing.assert_close(model.fused_head.weight, F.normalize(expected_rows, dim=-1))
    with torch.no_grad():
        model.gate.normal_()
        for head in (*model.heads, model.fused_head):
            head.weight.normal_()
    out = model(x)
    h_pen, h_fin = timm_features(pretrained, x)
    w = torch.softmax(model.gate, dim=1)
    f = w[:, 0] * F.normalize(h_pen, dim=-1) + w[:, 1] * F.normalize(h_fin, dim=-1)
    t = model.scale
    expected = t * F.normalize(f, dim=-1) @ F.normalize(model.fused_head.weight, dim=-1).T
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.level_scores[0], model.heads[0](h_pen))
    torch.testing.assert_close(out.level_scores[1], model.heads[1](h_fin))
    torch.testing.assert_close(model.level_weights(), w.mean(0).expand(5, 2))
    y = torch.tensor([0, 1, 2, 4])
    model.loss(out, y).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"gate", "fused_head.weight", "heads.0.weight", "heads.1.weight"} <= trainable
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n in ("gate", "fused_head.weight", "heads.0.weight", "heads.1.weight"))


def test_methods_produce_the_documented_outputs():
    x = torch.randn(3, 3, 32, 32)
    fused, _ = build("scilt")
    out = fused(x)
    s1, s2 = out.level_scores
    assert out.logits.shape == s1.shape == s2.shape == (3, len(COUNTS))
    torch.testing.assert_close(fused.level_weights(), torch.full((5, 2), 0.5))
    torch.testing.assert_close(out.logits, 0.5 * s1 + 0.5 * s2)
    assert out.logits.abs().max() <= 25.0 + 1e-4  # cosine heads are bounded by their scale
    fixed, _ = build("scilt", fusion="fixed")
    assert fixed.gate is None and [n for n, _ in fixed.named_parameters() if "gate" in n] == []
    torch.testing.assert_close(fixed.level_weights(), torch.full((5, 2), 0.5))

    final, _ = build("final")
    out = final(x)
    assert final.level_names() == ["final"] and final.gate is None
    assert out.logits is out.level_scores[0]
    torch.testing.assert_close(final.level_weights(), torch.ones(5, 1))

    penultimate, _ = build("penultimate")
    out = penultimate(x)
    assert penultimate.level_names() == ["penultimate"] and out.logits is out.level_scores[0]
    with pytest.raises(AssertionError, match="method must be one of"):
        build("both")


def test_logit_adjusted_loss_equals_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    target = torch.tensor([0, 2])
    counts = [6, 3, 1]
    prior = [0.6, 0.3, 0.1]
    expected = 0.0
    for row, y in zip(logits.tolist(), target.tolist()):
        adjusted = [z + math.log(p) for z, p in zip(row, prior)]
        expected += -(adjusted[y] - math.log(sum(math.exp(a) for a in adjusted))) / 2
    log_prior = torch.log(torch.tensor(counts) / 10)
    loss = scilt.logit_adjusted_loss(logits, target, log_prior).item()
    assert loss == pytest.approx(expected, rel=1e-6)
    # tau = 0 is plain cross-entropy
    assert scilt.logit_adjusted_loss(logits, target, log_prior, tau=0.0).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6)


def test_dual_supervision_loss():
    model, _ = build("scilt", aux_weight=0.3)
    out = model(torch.randn(4, 3, 32, 32))
    y = torch.tensor([0, 1, 2, 4])
    la = lambda s: scilt.logit_adjusted_loss(s, y, LOG_PRIOR)
    s1, s2 = out.level_scores
    torch.testing.assert_close(model.loss(out, y), la(out.logits) + 0.3 * (la(s1) + la(s2)))
    final, _ = build("final")
    out = final(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(final.loss(out, y), la(out.logits))


def test_init_heads_sets_unit_norm_class_means():
    model, _ = build()
    h = torch.randn(10, 48)
    # class 4 has no sample: keeps its random start
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0, 1])
    random_row = model.heads[0].weight[4].clone()
    model.init_heads([h, 2 * h], labels)
    for head in model.heads:
        # every row, the random one too
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(5))
        for k in range(4):
            mean = F.normalize(h[labels == k], dim=-1).mean(0)
            torch.testing.assert_close(head.weight[k], mean / mean.norm())
    torch.testing.assert_close(model.heads[0].weight[4], random_row)


def test_init_heads_fits_the_scale_that_minimises_the_step_0_loss_and_changes_no_prediction():
    model, _ = build()
    labels = torch.arange(5).repeat_interleave(torch.tensor([40, 20, 10, 5, 3]))
    torch.manual_seed(0)
    # classes that overlap, as on pretrained features
    centres = F.normalize(torch.randn(5, 48), dim=-1)
    h_pen = centres[labels] + 0.3 * torch.randn(78, 48)
    h_fin = centres[labels] + 0.3 * torch.randn(78, 48)
    model.init_heads([h_pen, h_fin], labels)
    scale = model.scale
    assert 2 < scale < 50 and model.heads[0].scale.item() == model.heads[1].scale.item() == scale
    out = model.classify(h_pen, h_fin)
    def loss(s):
        scaled = [s / scale * z for z in out.level_scores]
        return model.loss(scilt.SciLTOutput(s / scale * out.logits, scaled), labels)
    # the minimum of the loss in s
    assert loss(scale) < loss(0.9 * scale) and loss(scale) < loss(1.1 * scale)
    x = torch.randn(100, 48)
    fitted = model.classify(x, x)
    for head in model.heads:
        head.scale.fill_(scilt.COSINE_SCALE)
    assert torch.equal(model.classify(x, x).logits.argmax(1), fitted.logits.argmax(1))


def test_init_heads_in_chunks_and_on_a_subset_fits_the_same_scale():
    """Bounded memory: chunks of images give the very same scale; a seeded subset of a large
    training set nearly the same (one number is fitted, and the loss is flat near its minimum)."""
    labels = torch.arange(5).repeat_interleave(torch.tensor([400, 200, 100, 50, 30]))
    centres = F.normalize(torch.randn(5, 48), dim=-1)
    h_pen = centres[labels] + 0.3 * torch.randn(780, 48)
    h_fin = centres[labels] + 0.3 * torch.randn(780, 48)
    scales = []
    for kwargs in ({}, {"chunk": 7}, {"max_images": 300}):
        model, _ = build()
        model.init_heads([h_pen, h_fin], labels, **kwargs)
        scales.append(model.scale)
    assert scales[1] == pytest.approx(scales[0], rel=1e-4)
    assert scales[2] == pytest.approx(scales[0], rel=0.1)


@pytest.mark.parametrize("method, fusion", [("scilt", "class"), ("scilt", "feature"),
                                            ("scilt", "fixed"), ("final", "class")])
def test_step_zero_and_a_training_step_stay_on_the_models_device(method, fusion):
    """The same-device rule, checked without a GPU: under PyTorch's fake tensors the model, the
    features and the labels sit "on" cuda, and a CPU tensor that meets them fails. Reached: the
    heads' start (class means, the scale search, its subset and chunks), init_heads_from a
    loader of CPU batches, forward and loss, the optimizer's groups and an AdamW step. Not
    reached (tests/test_cuda.py runs them where there is a GPU): backward, which needs the real
    device; bf16 autocast, which is off without CUDA; and whatever reads values (.item(), the
    linear probe, the metrics)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, _ = build(method, fusion=fusion)
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda = torch.device("cuda")
        model = model.to_empty(device=cuda)
        h = [torch.randn(30, 48, device=cuda) for _ in model.heads]
        model.init_heads(h, torch.randint(0, 5, (30,), device=cuda), max_images=20, chunk=7)
        model.init_heads_from([(images[:4], labels[:4]), (images[4:], labels[4:])])
        assert {head.scale.device for head in model.heads} == {model.log_prior.device}
        optimizer = model.configure_optimizer(1e-3)
        loss = model.loss(model(images.to(cuda)), labels.to(cuda))
        assert loss.device == model.log_prior.device and loss.device.type == "cuda"
        for p in model.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        optimizer.step()


def test_configure_optimizer_gives_the_gate_its_learning_rate_and_no_weight_decay():
    """The method's recipe travels with the model: LoRA and the heads decay, the gate does not
    (nothing pulls a class's weights toward 1 / L) and learns GATE_LR_SCALE x faster."""
    model, _ = build()
    optimizer = model.configure_optimizer(1e-3)
    others, gate = optimizer.param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert gate["params"] == [model.gate] and len(others["params"]) == len(trainable) - 1
    assert gate["lr"] == pytest.approx(30 * others["lr"]) and gate["lr_scale"] == 30
    # one step with no gradient: the gate stays where it is, the heads shrink by lr x decay
    with torch.no_grad():
        model.gate.normal_()
    gate_before, row_before = model.gate.detach().clone(), model.heads[0].weight.detach().clone()
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(model.gate, gate_before)
    torch.testing.assert_close(model.heads[0].weight, row_before * (1 - 1e-3 * 1e-2))
    assert len(build("final")[0].configure_optimizer(1e-3).param_groups[1]["params"]) == 0


def test_score_fusion_is_a_sum_of_level_functions_and_feature_fusion_is_not():
    """What the docstrings claim about F_{N-1} + F_N: with scores fused, s(p, f) is a sum of a
    function of the penultimate features p and one of the final features f, so its mixed
    difference s(p, f) - s(p', f) - s(p, f') + s(p', f') vanishes; the feature fusion's cosine
    head normalises the fused features, and so it does not."""
    p, p2, f, f2 = torch.randn(4, 16, 48).unbind(0)
    for fusion, is_sum in (("class", True), ("fixed", True), ("feature", False)):
        model, _ = build(fusion=fusion)
        with torch.no_grad():
            if model.gate is not None:
                model.gate.normal_()
            s = lambda pen, fin: model.classify(pen, fin).logits
            mixed = (s(p, f) - s(p2, f) - s(p, f2) + s(p2, f2)).abs().max().item()
        assert (mixed < 1e-4) == is_sum, (fusion, mixed)


def test_the_readmes_use_of_scilt_py_trains_and_predicts(monkeypatch):
    """The README's "Use scilt.py in your project" block, run as it stands, on a tiny ViT (timm
    would fetch the weights it names) and generated images of three colour classes."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use scilt.py in your project", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    vit = tiny_vit()
    monkeypatch.setattr(scilt, "create_backbone", lambda name, **kwargs: vit)
    labels = torch.arange(3).repeat_interleave(torch.tensor([24, 12, 6]))
    images = 0.5 * torch.randn(len(labels), 3, 32, 32)
    images[torch.arange(len(labels)), labels] += 1.0  # class k: a brighter channel k
    plain = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, len(labels), 8)]
    shuffled = [(images[i], labels[i]) for _ in range(3) for i in torch.randperm(42).split(8)]
    given = dict(class_counts=[24, 12, 6], device=torch.device("cpu"), plain_loader=plain,
                 train_loader=shuffled)
    exec(code, given)
    model, optimizer = given["model"], given["optimizer"]
    assert model.scale != scilt.COSINE_SCALE  # the heads were started at step 0
    assert optimizer.param_groups[1]["params"] == [model.gate]
    assert all(layer.lora_B.abs().sum() > 0 for layer in scilt.lora_layers(model))  # it trained
    assert given["predicted"].shape == given["labels"].shape
    assert (given["predicted"] == given["labels"]).float().mean() >= 0.75


def test_one_optimizer_step_turns_head_and_tail_rows_alike():
    """Unit rows: AdamW turns a 400-image class's prototype as fast as a 4-image class's (with rows
    of norm proportional to class counts, the head class's turned about 100x slower)."""
    model, _ = build("final")
    labels = torch.tensor([0] * 400 + [4] * 4)
    h = F.normalize(torch.randn(5, 48), dim=-1)[labels] + 0.3 * torch.randn(404, 48)
    model.init_heads([h], labels)
    head = model.heads[0]
    before = head.weight.detach().clone()
    optimizer = torch.optim.AdamW([head.weight], lr=1e-2)
    scilt.logit_adjusted_loss(head(torch.randn(64, 48)),
                              torch.randint(0, 5, (64,)), LOG_PRIOR).backward()
    optimizer.step()
    angle = torch.arccos(F.cosine_similarity(before, head.weight.detach(), dim=1).clamp(max=1))
    assert 0.5 < angle[0] / angle[4] < 2


def test_deepcopy_after_a_training_forward_gives_the_same_model():
    model, _ = build()
    randomize_lora(model)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    # a graph was built: nothing of it stays behind
    model.loss(model(x), torch.tensor([0, 1])).backward()
    twin = copy.deepcopy(model).eval()
    model.eval()
    for got, want in zip(twin(x), model(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


FAMILIES = {  # one small configuration of each family the README names (pretrained=False)
    "vit_tiny_patch16_224": {}, "deit3_small_patch16_224": {},
    "deit_tiny_distilled_patch16_224": {}, "vit_small_patch14_reg4_dinov2": {},
    "vit_base_patch16_clip_224": {}, "vit_base_patch16_siglip_224": {},
    "eva02_tiny_patch14_224": {}, "beit_base_patch16_224": {},
    "vit_base_patch16_rope_reg1_gap_256": {},
    "vit_small_patch16_224": dict(global_pool="avg", class_token=False),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_named_family_taps_and_adapts_exactly(name):
    backbone = scilt.create_backbone(name, **{**TINY, **FAMILIES[name]})
    for parameter_name, parameter in backbone.named_parameters():
        # layer scales start at 1e-5 in some: a trained model's are larger
        if "gamma" in parameter_name:
            torch.nn.init.ones_(parameter)
    model = scilt.SciLT(backbone, COUNTS).eval()
    x = torch.randn(2, 3, 32, 32)
    randomize_lora(model)
    # the tap against timm's own pieces: forward_features for z_N, a hook on block N-1 for z_{N-1}
    caught = []
    def catch(module, inputs, output):
        caught.append(output)

    hook = backbone.blocks[-2].register_forward_hook(catch)
    h_pen, h_fin = model.features(x)
    hook.remove()
    torch.testing.assert_close(h_fin,
                               backbone.forward_head(backbone.forward_features(x), pre_logits=True))
    torch.testing.assert_close(h_pen,
                               backbone.forward_head(backbone.norm(caught[0]), pre_logits=True))
    # LoRA reaches the output (EVA-02, BEiT and RoPE ViTs read qkv.weight themselves), and merges
    # exactly
    adapted = model(x).logits
    merged = copy.deepcopy(model)
    scilt.merge_lora(merged)
    torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-4, atol=1e-4)
    for layer in scilt.lora_layers(model):
        torch.nn.init.zeros_(layer.lora_B)
    assert (model(x).logits - adapted).abs().max() > 1e-3


def test_long_tail_metrics_against_hand_computed_values():
    counts = [150, 50, 10, 5]  # many: 0; medium: 1; few: 2, 3. Head: 0, 1; middle: 2; tail: 3
    targets = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    preds = [0, 0, 0, 1, 1, 0, 2, 0, 0, 0]
    m = scilt.long_tail_metrics(preds, targets, counts, ["a", "b", "c", "d"])
    assert m["per_class_acc"] == {"a": 0.75, "b": 0.5, "c": 0.5, "d": 0.0}
    assert m["overall_acc"] == pytest.approx(0.5)  # 5 of 10
    assert m["balanced_acc"] == pytest.approx((0.75 + 0.5 + 0.5 + 0.0) / 4)
    # F1 per class = 2TP / (2TP + FP + FN): a: 6/(6+4+1), b: 2/(2+1+1), c: 2/(2+0+1), d: 0
    assert m["macro_f1"] == pytest.approx((6 / 11 + 2 / 4 + 2 / 3 + 0) / 4)
    assert m["many"] == 0.75 and m["medium"] == 0.5 and m["few"] == pytest.approx(0.25)
    assert (m["head"], m["middle"], m["tail"]) == (pytest.approx(0.625), 0.5, 0.0)
    # no class with more than 100 training images: the many group is empty, and None, not NaN
    m = scilt.long_tail_metrics([0, 1, 1], [0, 1, 2], [60, 30, 3])
    assert m["many"] is None and m["medium"] == 1.0 and m["few"] == 0.0
    assert m["per_class_acc"] == {"0": 1.0, "1": 1.0, "2": 0.0}
    # the group boundaries: many > 100, medium 20..100 (both ends included), few < 20
    m = scilt.long_tail_metrics([0, 1, 0, 3, 0], [0, 1, 2, 3, 4], [101, 100, 20, 19, 1000])
    assert (m["many"], m["medium"], m["few"]) == (0.5, 0.5, 1.0)
    # a class absent from the test labels has no accuracy and does not count in the means
    m = scilt.long_tail_metrics([0, 0], [0, 0], [200, 10])
    assert m["per_class_acc"]["1"] is None and m["balanced_acc"] == 1.0 and m["few"] is None


def test_rademacher_draws_estimate_the_complexity_under_its_bound():
    h = torch.randn(200, 16) + 3.0  # correlated features: the estimate sits under the closed bound
    sups = scilt.rademacher_draws(h, 2.0)
    bound = 2.0 / 200 * h.double().pow(2).sum().sqrt()  # (B / n) sqrt(sum_i |h_i|^2), Jensen
    # nearly alike: near sqrt(2/pi)
    assert sups.shape == (1000,) and 0.75 * bound < sups.mean() < 0.9 * bound
    # orthonormal features: |sum sigma_i h_i| = sqrt(n) for every sigma, so every draw IS the bound
    q = torch.linalg.qr(torch.randn(32, 32))[0]
    torch.testing.assert_close(scilt.rademacher_draws(q, 1.0),
                               torch.full((1000,), 1 / math.sqrt(32), dtype=torch.float64))
    # linear in the features and in the norm bound, draw by draw (the same sigmas)
    torch.testing.assert_close(scilt.rademacher_draws(3 * h, 5.0), 15 * sups / 2.0)


def test_rademacher_check_pairs_the_levels_and_reports_fractions_of_the_bound():
    n, weights = 500, torch.tensor([[0.2, 0.8], [0.4, 0.6]])
    same = torch.randn(1, 8).repeat(n, 1)  # identical features: |sum sigma_i h| = |sum sigma_i| |h|
    check = scilt.rademacher_check({"penultimate": same, "final": same}, weights, scale=7.0)
    level, total = check.classes["final"], check.classes["sum"]
    assert level.bound == pytest.approx(7 / math.sqrt(n))
    assert total.bound == pytest.approx(14 / math.sqrt(n))
    # E|sum sigma_i| ~ sqrt(2n/pi)
    assert level.fraction == pytest.approx(math.sqrt(2 / math.pi), abs=0.05)
    # the sum class from the same draws: twice a level's estimate AND twice its standard error
    # (paired draws move together), not sqrt(2) times as for independent estimates
    assert total.estimate == pytest.approx(2 * level.estimate)
    assert total.stderr == pytest.approx(2 * level.stderr)
    # orthogonal features: the estimate is its bound; the fused class with the mean class's a = 0.3
    q = torch.linalg.qr(torch.randn(64, 64))[0]
    check = scilt.rademacher_check({"penultimate": q, "final": torch.randn(64, 64)}, weights,
                                   scale=7.0)
    pen, fin = check.classes["penultimate"], check.classes["final"]
    assert pen.fraction == pytest.approx(1.0) and pen.stderr < 1e-8
    assert check.classes["fused"].estimate == pytest.approx(0.3 * pen.estimate + 0.7 * fin.estimate)
    assert check.classes["sum"].estimate == pytest.approx(pen.estimate + fin.estimate)
    assert check.n == 64 and check.scale == 7.0 and check.level_weights == pytest.approx([0.3, 0.7])
    # fused features: the fused class is measured on them, from the same draws
    fused = scilt.rademacher_check({"penultimate": q, "final": q}, weights, 7.0, fused=2 * q)
    assert fused.classes["fused"].estimate == pytest.approx(pen.estimate)


def test_create_backbone_refuses_what_is_not_a_vit():
    with pytest.raises(ValueError, match="model 'resnet18' is not a ViT"):
        scilt.create_backbone("resnet18")


def test_parameter_counts():
    model, pretrained = build()
    trainable, total = checkpoint.count_parameters(model)
    lora = sum(p.numel() for layer in scilt.lora_layers(model)
               for p in (layer.lora_A, layer.lora_B))
    # two heads, the gate: a weight per class and level
    assert trainable == lora + 2 * 5 * 48 + 5 * 2
    assert total == trainable + sum(p.numel() for p in pretrained.parameters())
    assert np.isclose(lora, 3 * 8 * ((48 + 3 * 48) + (48 + 48)))
