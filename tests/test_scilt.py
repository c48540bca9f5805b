"""The method module: LoRA, the tap, heads and fusion, losses, metrics and the Rademacher check."""
import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import scilt
from conftest import TINY, tiny_vit

COUNTS = [120, 60, 30, 12, 4]


def build(method="scilt", global_pool="token", **kwargs):
    backbone = tiny_vit(global_pool)
    pretrained = copy.deepcopy(backbone)
    return scilt.SciLT(backbone, len(COUNTS), COUNTS, method=method, **kwargs), pretrained


def timm_features(vit, x):
    """What timm itself gives: pool(norm(z_{N-1})) via forward_intermediates, and pool(norm(z_N))."""
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
    scilt.unmerge_lora(model)
    torch.testing.assert_close(model(x).logits, before.logits, rtol=1e-5, atol=1e-5)


def test_add_lora_targets_and_freezing():
    vit = tiny_vit()
    assert scilt.add_lora(vit) == 2 * 3  # qkv and proj of 3 blocks
    assert scilt.add_lora(tiny_vit(), targets=("qkv", "proj", "fc1", "fc2")) == 4 * 3
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        scilt.add_lora(tiny_vit(), targets=("nonexistent",))


@pytest.mark.parametrize("method", scilt.METHODS)
def test_gradients_reach_exactly_the_trainable_parameters(method):
    model, _ = build(method)
    randomize_lora(model)  # so that lora_A's gradient is not zero by construction
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out = model(torch.randn(6, 3, 32, 32))
    model.loss(out, torch.tensor([0, 1, 2, 3, 4, 0])).backward()
    expected = {n for n, p in model.named_parameters()
                if n.endswith(("lora_A", "lora_B")) or n.startswith(("classifier", "gate"))}
    if method == "penultimate":  # the last block's output never reaches the loss
        expected = {n for n in expected if not n.startswith(f"backbone.blocks.{len(model.backbone.blocks) - 1}.")}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == expected == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1).step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, frozen_before[name], rtol=0, atol=0)


def test_methods_produce_the_documented_outputs():
    x = torch.randn(3, 3, 32, 32)
    fused, _ = build("scilt")
    out = fused(x)
    assert out.logits.shape == out.s1.shape == out.s2.shape == (3, len(COUNTS))
    torch.testing.assert_close(fused.fusion_weights(), torch.full((5,), 0.5))
    torch.testing.assert_close(out.logits, 0.5 * out.s1 + 0.5 * out.s2)
    with torch.no_grad():
        fused.gate.copy_(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    a = torch.sigmoid(fused.gate)
    out = fused(x)
    torch.testing.assert_close(out.logits, a * out.s1 + (1 - a) * out.s2)
    assert out.logits.abs().max() <= 25.0 + 1e-4  # cosine heads are bounded by their scale

    final, _ = build("final")
    out = final(x)
    assert out.s1 is None and out.logits is out.s2 and final.classifier1 is None and final.gate is None
    torch.testing.assert_close(final.fusion_weights(), torch.zeros(5))

    penultimate, _ = build("penultimate")
    out = penultimate(x)
    assert out.s2 is None and out.logits is out.s1 and penultimate.classifier2 is None
    torch.testing.assert_close(penultimate.fusion_weights(), torch.ones(5))
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
    assert scilt.logit_adjusted_loss(logits, target, counts).item() == pytest.approx(expected, rel=1e-6)
    # tau = 0 is plain cross-entropy
    assert scilt.logit_adjusted_loss(logits, target, counts, tau=0.0).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6)


def test_dual_supervision_loss():
    model, _ = build("scilt", aux_weight=0.3)
    out = model(torch.randn(4, 3, 32, 32))
    y = torch.tensor([0, 1, 2, 4])
    la = lambda s: scilt.logit_adjusted_loss(s, y, COUNTS)
    torch.testing.assert_close(model.loss(out, y), la(out.logits) + 0.3 * (la(out.s1) + la(out.s2)))
    final, _ = build("final")
    out = final(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(final.loss(out, y), la(out.s2))


def test_init_heads_sets_class_means():
    model, _ = build()
    h = torch.randn(10, 48)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0, 1])  # class 4 has no sample: keeps its random start
    random_row = model.classifier1.weight[4].clone()
    model.init_heads(h, 2 * h, labels)
    for head in (model.classifier1, model.classifier2):
        for k in range(4):
            mean = F.normalize(h[labels == k], dim=-1).mean(0)
            assert F.cosine_similarity(head.weight[k], mean, dim=0) > 1 - 1e-5
    torch.testing.assert_close(model.classifier1.weight[4], random_row)


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
    # a class absent from the test labels has no accuracy and does not count in the means
    m = scilt.long_tail_metrics([0, 0], [0, 0], [200, 10])
    assert m["per_class_acc"]["1"] is None and m["balanced_acc"] == 1.0 and m["few"] is None


def test_rademacher_estimate_and_bound():
    h = torch.randn(200, 16) + 3.0  # correlated features: the estimate sits well under the bound
    estimate, bound = scilt.rademacher_complexity(h, 2.0), scilt.rademacher_bound(h, 2.0)
    assert 0 < estimate < bound
    # orthonormal features: |sum sigma_i h_i| = sqrt(n) for every sigma, so the estimate IS the bound
    q = torch.linalg.qr(torch.randn(32, 32))[0]
    assert scilt.rademacher_complexity(q) == pytest.approx(scilt.rademacher_bound(q)) == pytest.approx(
        1 / math.sqrt(32))
    # linear in the scale of the features (same draws) and in the norm bound
    assert scilt.rademacher_complexity(3 * h) == pytest.approx(3 * scilt.rademacher_complexity(h))
    assert scilt.rademacher_complexity(h, 5.0) == pytest.approx(5 * scilt.rademacher_complexity(h))
    check = scilt.rademacher_check(h, torch.randn(200, 16), bound=25.0)
    for key in ("estimate", "bound"):
        assert check["scilt"][key] == pytest.approx(check["penultimate"][key] + check["final"][key])
    assert check["holds"] and check["n"] == 200
    # the cosine heads see unit features: each level's bound is scale / sqrt(n)
    assert check["final"]["bound"] == pytest.approx(25.0 / math.sqrt(200))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_create_backbone_from_local_weights_file(tmp_path, suffix):
    # with a classifier head, as a downloaded checkpoint has
    source = timm.create_model("vit_tiny_patch16_224", num_classes=7, **TINY)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(source.state_dict(), path)
    loaded = tiny_vit(weights=path)
    source.eval(), loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.forward_head(loaded.forward_features(x), pre_logits=True),
                               source.forward_head(source.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="missing.pth not found"):
        tiny_vit(weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="could not load weights file .* into vit_tiny_patch16_224"):
        scilt.create_backbone("vit_tiny_patch16_224", weights=path, **{**TINY, "embed_dim": 64})


def test_create_backbone_errors():
    with pytest.raises(ValueError, match="unknown model 'vit_nonexistent'"):
        scilt.create_backbone("vit_nonexistent")
    with pytest.raises(ValueError, match="is not a ViT"):
        scilt.create_backbone("resnet18")


def test_parameter_counts():
    model, pretrained = build()
    trainable, total = scilt.count_parameters(model)
    lora = sum(p.numel() for layer in scilt.lora_layers(model) for p in (layer.lora_A, layer.lora_B))
    assert trainable == lora + 2 * 5 * 48 + 5
    assert total == trainable + sum(p.numel() for p in pretrained.parameters())
    assert np.isclose(lora, 3 * 8 * ((48 + 3 * 48) + (48 + 48)))
