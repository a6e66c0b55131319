"""Mixture-of-experts layer: balance loss without padding, dropless dispatch, grouped_mm against the
per-expert loop, modality routing, routing counts, dense equivalence, parameter counts, training."""

import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F

from fusionlab.batch import IGNORE_INDEX
from fusionlab.models import EarlyFusion
from fusionlab.models.layers import LayerContext, SwiGLU, ffn_hidden_size
from fusionlab.models.moe import MoE, MoEConfig, load_balance_loss, moe_layers, router_z_loss
from fusionlab.testing import check_backbone
from helpers import make_batch

D, FF = 16, 32  # d_model and expert d_ff of the standalone layers: multiples of 8 for grouped_mm


def make_context(image: list[bool], valid: list[bool]) -> LayerContext:
    return LayerContext(image_mask=torch.tensor(image), valid_mask=torch.tensor(valid))


def random_context(n: int, seed: int = 0) -> LayerContext:
    """About a third image positions and a quarter padding, with at least one of each kind."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, generator=g) < 1 / 3
    valid = torch.rand(n, generator=g) > 1 / 4
    image[0], valid[0] = True, True
    image[1], valid[1] = False, True
    valid[2] = False
    return LayerContext(image_mask=image & valid, valid_mask=valid)


def make_layer(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> MoE:
    torch.manual_seed(seed)
    return MoE(D, FF, MoEConfig(**config), layer_idx=3).to(dtype)


def twin(layer: MoE, **changes) -> MoE:
    """A copy of `layer` with the same weights and other config values (e.g. expert_impl)."""
    other = MoE(D, FF, dataclasses.replace(layer.config, **changes), layer.layer_idx)
    other.load_state_dict(layer.state_dict())
    return other.to(next(layer.parameters()).dtype)


def tiny_model(moe: MoEConfig | None = None, seed: int = 0, **kwargs) -> EarlyFusion:
    torch.manual_seed(seed)
    defaults = dict(image_size=8, patch_size=4, d_model=32, n_layers=2, n_heads=2, ffn_multiple_of=32)
    return EarlyFusion(**{**defaults, **kwargs}, moe=moe)


def tiny_batch(seed: int = 0):
    rows = [
        [[("text", 5), ("image", 1), ("text", 4)], [("text", 3)]],
        [[("image", 1), ("text", 6)]],
    ]
    return make_batch(rows, context=20, tokens_per_image=4, image_size=8, seed=seed)


# ------------------------------------------------------------------------------------------------
# load-balancing loss and z-loss


def c9_probs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 2 real + 2 padding tokens: real (0.9, 0.1) and (0.1, 0.9), padding (0.9, 0.1)."""
    row = [[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.9, 0.1]]
    probs = torch.tensor(row + row)
    valid = torch.tensor([True, True, False, False] * 2)
    return probs, valid


def test_balance_loss_ignores_padding():
    probs, valid = c9_probs()
    experts = probs.argmax(-1, keepdim=True)
    loss = load_balance_loss(probs, experts, valid)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    leaked = load_balance_loss(probs, experts, torch.ones_like(valid))
    assert leaked.item() == pytest.approx(1.2, abs=1e-6), "the case must tell padding leakage apart"


def test_balance_loss_of_layer_ignores_padding():
    # A 2-wide router with identity weights turns inputs log(p) into logits whose softmax is p.
    probs, valid = c9_probs()
    layer = MoE(8, 8, MoEConfig(n_experts=2, top_k=1, balance_loss_weight=1.0), layer_idx=0)
    x = torch.zeros(2, 4, 8)
    x[..., :2] = probs.log().view(2, 4, 2)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :2] = torch.eye(2)
    context = make_context([False] * 8, valid.tolist())
    layer(x, context)
    assert context.aux_losses["moe/layer0/load_balance"].item() == pytest.approx(1.0, abs=1e-5)


def test_balance_loss_counts_image_positions():
    # Image positions carry no target but are routed, so they count like text tokens.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    experts = probs.argmax(-1, keepdim=True)
    loss = load_balance_loss(probs, experts, torch.ones(4, dtype=torch.bool))
    assert loss.item() == pytest.approx(2 * (0.5 * 0.5 + 0.5 * 0.5))


def test_balance_loss_top2_uniform_is_one():
    probs = torch.full((6, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]])
    loss = load_balance_loss(probs, experts, torch.ones(6, dtype=torch.bool))
    assert loss.item() == pytest.approx(1.0)


def test_balance_loss_per_modality_group():
    # Experts 0-1 serve image tokens (group 0), 2-3 text tokens (group 1); each group is balanced.
    probs = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    experts = torch.tensor([[0], [1], [2], [3]])
    groups = torch.tensor([0, 0, 1, 1])
    loss = load_balance_loss(probs, experts, torch.ones(4, dtype=torch.bool), groups, n_groups=2)
    assert loss.item() == pytest.approx(1.0)
    collapsed = torch.tensor([[0], [0], [2], [2]])
    loss = load_balance_loss(probs, collapsed, torch.ones(4, dtype=torch.bool), groups, n_groups=2)
    assert loss.item() == pytest.approx(1.0), "probabilities are uniform, so f does not matter here"
    sharp = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 1.0, 0]])
    loss = load_balance_loss(sharp, collapsed, torch.ones(4, dtype=torch.bool), groups, n_groups=2)
    assert loss.item() == pytest.approx(2.0), "a group of 2 collapsed on one expert scores its size"


def test_router_z_loss_ignores_padding():
    logits = torch.tensor([[1.0, 2.0], [3.0, -1.0], [50.0, 50.0]])
    valid = torch.tensor([True, True, False])
    expected = (torch.logsumexp(logits[:2], -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss(logits, valid), expected)


def test_layer_stores_weighted_losses():
    layer = make_layer(n_experts=4, top_k=2, balance_loss_weight=0.5, z_loss_weight=0.25)
    context = random_context(24)
    x = torch.randn(2, 12, D)
    layer(x, context)
    routing = layer.route(x.view(-1, D), context)
    balance = load_balance_loss(routing.probs_NE, routing.experts_NK, context.valid_mask)
    z = router_z_loss(routing.logits_NE, context.valid_mask)
    torch.testing.assert_close(context.aux_losses["moe/layer3/load_balance"], 0.5 * balance)
    torch.testing.assert_close(context.aux_losses["moe/layer3/router_z"], 0.25 * z)


def test_zero_weights_store_no_loss():
    layer = make_layer(n_experts=4, balance_loss_weight=0.0, z_loss_weight=0.0)
    context = random_context(8)
    layer(torch.randn(1, 8, D), context)
    assert context.aux_losses == {}


# ------------------------------------------------------------------------------------------------
# dispatch


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_every_token_gets_k_experts(top_k):
    layer = make_layer(n_experts=4, top_k=top_k)
    context = random_context(40)
    x = torch.randn(4, 10, D)
    routing = layer.route(x.view(-1, D), context)
    valid = context.valid_mask
    chosen = routing.experts_NK[valid]
    assert chosen.shape == (int(valid.sum()), top_k)
    assert all(row.unique().numel() == top_k for row in chosen), "a token was sent twice to one expert"

    layer(x, context)
    routed = context.stats["routing/layer3/image_tokens"] + context.stats["routing/layer3/text_tokens"]
    assert routed.sum().item() == top_k * int(valid.sum())
    expected = torch.bincount(chosen.flatten(), minlength=4)
    assert torch.equal(routed, expected)


def test_gates_are_router_probabilities():
    # Not renormalised over the top_k: with top-1 the router then also learns through the output.
    layer = make_layer(n_experts=4, top_k=2)
    routing = layer.route(torch.randn(12, D), random_context(12))
    torch.testing.assert_close(routing.gates_NK, routing.probs_NE.gather(1, routing.experts_NK))
    assert (routing.gates_NK.sum(-1) < 1).all()


def test_padding_output_is_zero():
    layer = make_layer(n_experts=4, top_k=2)
    context = random_context(20)
    y = layer(torch.randn(2, 10, D), context).view(-1, D)
    assert torch.all(y[~context.valid_mask] == 0)
    assert torch.all(y[context.valid_mask].abs().sum(-1) > 0)


def dense_reference(layer: MoE, x_ND: torch.Tensor, context: LayerContext) -> torch.Tensor:
    """Every expert on every token, then the gated sum of the chosen ones (no sorting, no gather)."""
    routing = layer.route(x_ND, context)
    w = layer.experts
    hidden = F.silu(torch.einsum("nd,efd->nef", x_ND, w.w_gate)) * torch.einsum("nd,efd->nef", x_ND, w.w_up)
    y_NED = torch.einsum("nef,edf->ned", hidden, w.w_down)
    chosen = y_NED.gather(1, routing.experts_NK[..., None].expand(-1, -1, x_ND.shape[1]))
    y = (chosen * routing.gates_NK[..., None]).sum(1)
    return torch.where(context.valid_mask[:, None], y, 0.0)


def forward_and_grads(layer: MoE, x: torch.Tensor, context: LayerContext, weight: torch.Tensor):
    """Output and gradients (input, every parameter) for a random weighting of the output.

    A random weighting, not .sum(): grouped_mm fails on the zero-stride gradient of a sum.
    """
    x = x.detach().clone().requires_grad_()
    y = layer(x, context)
    loss = (y * weight).sum() + sum(context.aux_losses.values())
    names = [name for name, _ in layer.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return y.detach(), dict(zip(["input", *names], grads))


CONFIGS = [
    dict(n_experts=4, top_k=1),
    dict(n_experts=4, top_k=2, z_loss_weight=0.1),
    dict(n_experts=2, top_k=1, routing="modality"),
    dict(n_experts=6, top_k=2, routing="modality"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_loop_matches_dense_reference_float64(config):
    # no auxiliary losses, so that both sides differentiate the same function of the router
    config = {**config, "balance_loss_weight": 0.0, "z_loss_weight": 0.0}
    layer = make_layer(dtype=torch.float64, expert_impl="loop", **config)
    context = random_context(30)
    x = torch.randn(3, 10, D, dtype=torch.float64)
    weight = torch.randn(3, 10, D, dtype=torch.float64)

    y, grads = forward_and_grads(layer, x, context, weight)
    x_ref = x.view(-1, D).clone().requires_grad_()
    y_ref = dense_reference(layer, x_ref, context)
    torch.testing.assert_close(y.view(-1, D), y_ref, rtol=1e-12, atol=1e-12)

    names = [name for name, _ in layer.named_parameters()]
    ref_grads = torch.autograd.grad((y_ref * weight.view(-1, D)).sum(), [x_ref, *layer.parameters()])
    torch.testing.assert_close(grads["input"].view(-1, D), ref_grads[0], rtol=1e-10, atol=1e-12)
    for name, ref in zip(names, ref_grads[1:]):
        torch.testing.assert_close(grads[name], ref, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("config", CONFIGS)
def test_grouped_mm_matches_loop(config):
    # grouped_mm has no float64 kernel (torch 2.14), so both paths run in float32.
    grouped = make_layer(expert_impl="grouped_mm", **config)
    loop = twin(grouped, expert_impl="loop")
    context = random_context(30)
    x = torch.randn(3, 10, D)
    weight = torch.randn(3, 10, D)

    y_grouped, grads_grouped = forward_and_grads(grouped, x, context, weight)
    y_loop, grads_loop = forward_and_grads(loop, x, context, weight)
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-5, atol=1e-6)
    assert grads_grouped.keys() == grads_loop.keys()
    for name in grads_loop:
        assert torch.isfinite(grads_grouped[name]).all(), f"non-finite gradient of {name}"
        torch.testing.assert_close(grads_grouped[name], grads_loop[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grouped_mm_matches_loop_under_bf16_autocast():
    grouped = make_layer(n_experts=4, top_k=2, expert_impl="grouped_mm")
    loop = twin(grouped, expert_impl="loop")
    context = random_context(30)
    x = torch.randn(3, 10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_grouped = grouped(x, context)
        y_loop = loop(x, context)
    assert y_grouped.dtype == torch.bfloat16
    torch.testing.assert_close(y_grouped.float(), y_loop.float(), rtol=2e-2, atol=2e-3)


def test_router_runs_in_float32_under_autocast():
    layer = make_layer(n_experts=4)
    context = random_context(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.route(torch.randn(8, D), context)
    assert routing.logits_NE.dtype == torch.float32
    assert routing.probs_NE.dtype == torch.float32


@pytest.mark.parametrize("expert_impl", ["grouped_mm", "loop"])
def test_single_expert_equals_dense_swiglu(expert_impl):
    torch.manual_seed(0)
    dense = SwiGLU(D, FF)
    layer = make_layer(n_experts=1, top_k=1, expert_impl=expert_impl)
    with torch.no_grad():
        layer.experts.w_gate[0] = dense.gate.weight
        layer.experts.w_up[0] = dense.up.weight
        layer.experts.w_down[0] = dense.down.weight
    x = torch.randn(2, 6, D)
    context = make_context([False] * 12, [True] * 12)
    torch.testing.assert_close(layer(x, context), dense(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# modality routing


@pytest.mark.parametrize("n_experts, top_k", [(2, 1), (4, 1), (6, 2)])
def test_modality_routing_separates_modalities(n_experts, top_k):
    layer = make_layer(n_experts=n_experts, top_k=top_k, routing="modality")
    context = random_context(60)
    x = torch.randn(6, 10, D)
    routing = layer.route(x.view(-1, D), context)
    half = n_experts // 2
    image = context.image_mask & context.valid_mask
    text = ~context.image_mask & context.valid_mask
    assert (routing.experts_NK[image] < half).all(), "an image token reached a text expert"
    assert (routing.experts_NK[text] >= half).all(), "a text token reached an image expert"

    layer(x, context)
    image_counts = context.stats["routing/layer3/image_tokens"]
    text_counts = context.stats["routing/layer3/text_tokens"]
    assert image_counts[half:].sum() == 0
    assert text_counts[:half].sum() == 0
    assert image_counts.sum() == top_k * image.sum()
    assert text_counts.sum() == top_k * text.sum()


def test_modality_routing_one_expert_each_has_no_router():
    layer = make_layer(n_experts=2, routing="modality")
    assert layer.router is None
    context = random_context(10)
    layer(torch.randn(1, 10, D), context)
    assert context.aux_losses == {}, "a fixed assignment has no balance to learn"


# ------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_experts=0), "n_experts"),
        (dict(n_experts=4, top_k=5), "top_k 5"),
        (dict(n_experts=4, top_k=3, routing="modality"), "top_k 3"),
        (dict(n_experts=3, routing="modality"), "even"),
        (dict(routing="hash"), "'hash'"),
        (dict(layers=[1, 1]), "distinct"),
        (dict(balance_loss_weight=-1.0), "non-negative"),
    ],
)
def test_config_rejects_invalid_values(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**fields)


def test_config_rejects_layers_out_of_range():
    with pytest.raises(ValueError, match=r"\[5\] are out of range"):
        tiny_model(MoEConfig(layers=[0, 5]))


def test_grouped_mm_rejects_unaligned_sizes():
    with pytest.raises(ValueError, match="d_model 12"):
        MoE(12, 32, MoEConfig(), layer_idx=0)
    MoE(12, 30, MoEConfig(expert_impl="loop"), layer_idx=0)


def test_early_fusion_rejects_unknown_moe_field():
    with pytest.raises(ValueError, match="n_expert"):
        tiny_model({"n_expert": 4})


# ------------------------------------------------------------------------------------------------
# backbone


def test_moe_backbone_passes_battery():
    moe = MoEConfig(n_experts=2)
    check_backbone(EarlyFusion, d_model=32, n_layers=2, n_heads=2, ffn_multiple_of=32, moe=moe)


def test_moe_layers_follow_config():
    model = tiny_model(MoEConfig(n_experts=4, layers=[1]), n_layers=3)
    assert moe_layers(model) == {1: 4}
    assert isinstance(model.decoder.layers[0].ffn, SwiGLU)
    assert isinstance(model.decoder.layers[2].ffn, SwiGLU)
    assert moe_layers(tiny_model(MoEConfig(n_experts=2))) == {0: 2, 1: 2}


def test_routing_stats_sum_to_token_counts():
    model = tiny_model(MoEConfig(n_experts=4, top_k=2))
    batch = tiny_batch()
    out = model(batch)
    n_image = int((batch.image_mask & ~batch.padding_mask).sum())
    n_text = int((~batch.image_mask & ~batch.padding_mask).sum())
    for layer in (0, 1):
        image = out.stats[f"routing/layer{layer}/image_tokens"]
        text = out.stats[f"routing/layer{layer}/text_tokens"]
        assert image.shape == text.shape == (4,)
        assert image.sum().item() == 2 * n_image
        assert text.sum().item() == 2 * n_text


def test_aux_loss_scales_with_weight():
    # tiny_model seeds the initialisation, so the three models share their weights
    batch = tiny_batch()
    base = tiny_model(MoEConfig(n_experts=4, balance_loss_weight=0.01))(batch).aux_loss
    doubled = tiny_model(MoEConfig(n_experts=4, balance_loss_weight=0.02))(batch).aux_loss
    off = tiny_model(MoEConfig(n_experts=4, balance_loss_weight=0.0))(batch).aux_loss
    assert base.item() > 0
    assert base.requires_grad
    torch.testing.assert_close(doubled, 2 * base)
    assert off.item() == 0


def test_activation_checkpointing_keeps_outputs_and_losses():
    moe = MoEConfig(n_experts=4, top_k=2, z_loss_weight=0.1)
    plain = tiny_model(moe).train()
    checkpointed = tiny_model(moe, activation_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    batch = tiny_batch()
    outputs = []
    for model in (plain, checkpointed):
        out = model(batch)
        weight = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(0))
        ((out.logits * weight).sum() + out.aux_loss).backward()
        outputs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = outputs
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_moe_backbone_trains():
    model = tiny_model(MoEConfig(n_experts=4, top_k=1)).train()
    batch = tiny_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(batch)
        logits, targets = out.logits.flatten(0, 1), batch.targets.flatten()
        token_loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        loss = token_loss + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(token_loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, f"token loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_init_arguments_round_trip_through_checkpoint():
    model = tiny_model(MoEConfig(n_experts=4, top_k=2, routing="modality", layers=[1]))
    buffer = io.BytesIO()
    torch.save({"init_args": model.init_arguments()}, buffer)
    buffer.seek(0)
    init_args = torch.load(buffer, weights_only=True)["init_args"]
    assert init_args["moe"]["routing"] == "modality"
    rebuilt = EarlyFusion(**init_args)
    assert moe_layers(rebuilt) == {1: 4}
    assert rebuilt.decoder.layers[1].ffn.config == model.decoder.layers[1].ffn.config


# ------------------------------------------------------------------------------------------------
# parameter counts


def dense_layer_parameters(d_model: int, d_ff: int) -> int:
    # qkv + proj, two head-dim QK norms (head_dim 16 here), two block norms, SwiGLU
    return 4 * d_model**2 + 2 * 16 + 2 * d_model + 3 * d_model * d_ff


def test_parameter_counts_by_hand():
    vocab, d_model, d_ff, patch_dim = 264, 32, 64, 3 * 4 * 4
    # both embeddings, the patch stem with its bias, the final norm
    shared = 2 * vocab * d_model + patch_dim * d_model + d_model + d_model
    expert = 3 * d_model * d_ff

    dense = tiny_model(d_ff=d_ff).parameter_counts()
    assert dense.total == dense.active == dense.N == shared + 2 * dense_layer_parameters(d_model, d_ff)

    learned = tiny_model(MoEConfig(n_experts=4, top_k=2), d_ff=d_ff).parameter_counts()
    # the dense SwiGLU replaced by 4 experts and a router
    moe_layer = dense_layer_parameters(d_model, d_ff) - expert + 4 * expert + 4 * d_model
    assert learned.total == shared + 2 * moe_layer
    assert learned.active == learned.N == learned.total - 2 * (4 - 2) * expert
    assert learned.N_v == 0

    modality_moe = MoEConfig(n_experts=2, routing="modality", layers=[0])
    modality = tiny_model(modality_moe, d_ff=d_ff).parameter_counts()
    assert modality.total == shared + 2 * dense_layer_parameters(d_model, d_ff) + expert  # no router
    assert modality.active == shared + 2 * dense_layer_parameters(d_model, d_ff)


def test_expert_d_ff_is_configurable():
    model = tiny_model(MoEConfig(n_experts=4, d_ff=16), d_ff=64)
    assert model.decoder.layers[0].ffn.experts.w_up.shape == (4, 16, 32)


def test_flops_use_active_parameters():
    model = tiny_model(MoEConfig(n_experts=8))
    counts = model.parameter_counts()
    assert counts.active < counts.total
    assert model.flops_per_step(1000, 300) == 6.0 * counts.active * 1000


def test_paper_moe_sizes():
    # Every layer an MoE of 8 full-size experts: total = active + 7 * 24 * 3 d h, active = dense
    # plus one router (d x 8) per layer. The dense 275M model at width 800 then has about 1.2B in
    # total (derived from the dense size, not a published MoE count).
    d_model, vocab = 800, 50432
    with torch.device("meta"):
        dense = EarlyFusion(vocab_size=vocab, image_size=224, patch_size=14, d_model=d_model, n_layers=24,
                            n_heads=8, head_dim=100)
        moe = EarlyFusion(vocab_size=vocab, image_size=224, patch_size=14, d_model=d_model, n_layers=24,
                          n_heads=8, head_dim=100, moe=MoEConfig())
    h = ffn_hidden_size(d_model)
    dense_counts, moe_counts = dense.parameter_counts(), moe.parameter_counts()
    assert moe_counts.active == dense_counts.active + 24 * d_model * 8
    assert moe_counts.total == moe_counts.active + 7 * 24 * 3 * d_model * h
    assert abs(moe_counts.total / 1.2e9 - 1) < 0.05
