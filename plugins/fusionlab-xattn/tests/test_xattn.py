"""The cross-attention plugin: registration, the shared battery, its attention mask, and training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fusionlab_xattn import CrossAttentionFusion
from fusionlab_xattn.model import image_keys

from fusionlab import plugins
from fusionlab.batch import IGNORE_INDEX, Batch
from fusionlab.data.build import write_sample_set
from fusionlab.testing import VOCAB_SIZE, check_backbone, tiny_batch
from fusionlab.training.cli import run_lightning_cli

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny_xattn.yaml"
TINY = dict(
    d_model=32, n_layers=2, n_heads=2, ffn_multiple_of=32, cross_every=1, encoder_width=32, encoder_layers=1
)


def tiny_model(**overrides) -> CrossAttentionFusion:
    torch.manual_seed(0)
    return CrossAttentionFusion(vocab_size=VOCAB_SIZE, image_size=8, patch_size=4, **{**TINY, **overrides})


def two_document_batch() -> Batch:
    """Build tiny_batch with 4 positions per image.

    Row 0 is one document (6 text, image 0, 6 text, then padding). Row 1 contains document 0 (4 text)
    then document 1 (3 text, image 1, 2 text, image 2, 3 text).
    """
    return tiny_batch(tokens_per_image=4, image_size=8)


def test_entry_point_is_registered():
    arch = plugins.discover()["cross_attention"]
    assert arch.status == "ok"
    assert arch.cls is CrossAttentionFusion
    assert arch.distribution == "fusionlab-xattn"


@pytest.mark.parametrize("image_scope", ["preceding", "document"])
def test_backbone_battery(image_scope):
    check_backbone(CrossAttentionFusion, image_scope=image_scope)


def test_zero_gates_reject_battery_then_learn():
    """Flamingo's gate_init=0: the block is the identity, so only the gates learn in the first step."""
    with pytest.raises(AssertionError, match="parameters without gradient"):
        check_backbone(CrossAttentionFusion, gate_init=0.0)

    model = tiny_model(gate_init=0.0)
    batch = two_document_batch()
    shuffled = batch.with_images(batch.images.flip(0))
    with torch.no_grad():
        assert torch.equal(model(batch).logits, model(shuffled).logits), "pixels reached a zero-gated model"

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(batch).logits.square().mean().backward()
    assert model.cross_blocks[0].attn_gate.grad.abs() > 0
    assert model.cross_blocks[0].attn.q.weight.grad.abs().sum() == 0
    optimizer.step()
    optimizer.zero_grad()
    model(batch).logits.square().mean().backward()
    assert model.cross_blocks[0].attn.q.weight.grad.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_mask_preceding_images_of_same_document():
    batch = two_document_batch()
    features = torch.randn(3, 4, 8)
    _, mask, has_image = image_keys(features, batch, "preceding")
    has_image = has_image[..., 0].bool()

    # row 0: image 0 takes positions 6-9 and padding 16-19; text before the image gets no image
    assert not has_image[0, :6].any()
    assert has_image[0, 6:16].all()
    assert not has_image[0, 16:].any(), "padding attended to an image"
    assert mask[0, 0, 6:16, :4].all()
    assert not mask[0, 0, 6:16, 4:].any(), "an empty key slot is visible"
    # row 1: document 0 (positions 0-3) is text only; document 1 starts at 4, images at 7-10 and 13-16
    assert not has_image[1, :7].any()
    assert has_image[1, 7:20].all()
    assert mask[1, 0, 7:13, :4].all()
    assert not mask[1, 0, 7:13, 4:].any(), "image 2 visible before it starts"
    assert mask[1, 0, 13:20, :].all()


def test_mask_document_scope_includes_later_images():
    batch = two_document_batch()
    _, mask, has_image = image_keys(torch.randn(3, 4, 8), batch, "document")
    has_image = has_image[..., 0].bool()
    assert has_image[0, :16].all()
    assert not has_image[1, :4].any(), "a text-only document attended to the next document's images"
    assert has_image[1, 4:20].all()
    assert mask[1, 0, 4:20, :].all()


def test_pixels_change_only_later_positions_of_their_document():
    model = tiny_model().eval()
    batch = two_document_batch()
    changed = batch.images.clone()
    changed[2] = 255 - changed[2]  # image 2: row 1, document 1, positions 13-16
    with torch.no_grad():
        before = model(batch).logits
        after = model(batch.with_images(changed)).logits
    assert torch.equal(after[0], before[0]), "another row changed"
    assert torch.equal(after[1, :13], before[1, :13]), "positions before the image changed"
    assert not torch.allclose(after[1, 13:20], before[1, 13:20]), "the image did not reach later positions"


def test_text_only_batch_gives_every_parameter_a_gradient():
    """Distributed data parallel needs every parameter in the graph, also on a text-only rank."""
    model = tiny_model()
    batch = two_document_batch()
    text = Batch(
        tokens=batch.tokens[1:, :4],
        images=batch.images[:0],
        image_index=torch.full((1, 4), -1),
        patch_index=torch.full((1, 4), -1),
        document=torch.zeros(1, 4, dtype=torch.long),
        positions=torch.arange(4)[None],
        targets=torch.full((1, 4), IGNORE_INDEX),
        source=torch.full((1, 4), 2),
    )
    model(text).logits.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters outside the graph of a text-only step: {missing[:5]}"


def test_activation_checkpointing_keeps_outputs():
    batch = two_document_batch()
    plain = tiny_model().train()
    checkpointed = tiny_model(activation_checkpointing=True).train()
    torch.testing.assert_close(checkpointed(batch).logits, plain(batch).logits)


def test_parameter_counts_split_vision_side():
    model = tiny_model()
    counts = model.parameter_counts()
    encoder = sum(p.numel() for p in model.encoder.parameters())
    connector = sum(p.numel() for p in model.connector.parameters())
    kv = sum(block.attn.kv.weight.numel() for block in model.cross_blocks)
    assert counts.N_v == encoder + connector + kv
    assert counts.N + counts.N_v == counts.total == sum(p.numel() for p in model.parameters())


def test_bad_cross_every_names_the_value():
    with pytest.raises(ValueError, match="cross_every 5"):
        tiny_model(cross_every=5)


def test_recipe_trains_through_fusionlab_fit(tmp_path):
    """The plugin's recipe, shrunk and pointed at a small sample set, trains with no change to fusionlab."""
    sample = tmp_path / "sample"
    write_sample_set(
        sample,
        seed=0,
        variant="simple",
        image_size=32,
        n_train_scenes=48,
        n_val_scenes=8,
        n_train_docs=8,
        n_val_docs=4,
        n_train_texts=4,
        n_val_texts=2,
        n_train_questions=0,
        n_val_questions=0,
    )
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["model"]["backbone"]["class_path"] == "CrossAttentionFusion"
    recipe["model"]["backbone"]["init_args"].update(TINY, encoder_width=32)
    recipe["trainer"].update(
        accelerator="cpu",
        precision="32-true",
        max_steps=2,
        val_check_interval=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    for split in ("train", "val"):
        for source in recipe["data"][split]:
            source["urls"] = str(sample / source["urls"].removeprefix("data/sample/"))
    recipe["data"].update(image_size=16, context=96, batch_size=2, num_workers=0)
    config = tmp_path / "tiny_xattn.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))

    run_lightning_cli(["fit", "--config", str(config)])

    run_dir = tmp_path / "runs" / "tiny_xattn" / "version_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["architecture"] == "CrossAttentionFusion"
    assert summary["steps"] == 2
    assert summary["parameters"]["N_v"] > 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["backbone"]["class_path"] == "fusionlab_xattn.model.CrossAttentionFusion"
    assert checkpoint["backbone"]["init_args"]["gate_init"] == 0.0
