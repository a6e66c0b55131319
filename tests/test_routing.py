"""Routing statistics: specialisation scores, the validation callback (TensorBoard scalars and
heatmap, sums over batches and ranks) and the report for a checkpoint on shards."""

import io
import json
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from fusionlab.models import EarlyFusion
from fusionlab.models.moe import MoEConfig
from fusionlab.training.module import FusionModule
from fusionlab.training.routing import (
    RoutingCounts,
    RoutingStatistics,
    collect_routing_counts,
    figure_to_array,
    heatmap_figure,
    load_backbone,
    read_shard_batches,
    routing_report,
    specialization_scores,
)
from helpers import make_batch

IMAGE_SIZE, PATCH_SIZE, P = 8, 4, 4


def scores_of(image: list[list[int]], text: list[list[int]]) -> tuple[list[float], list[int]]:
    scores, empty = specialization_scores(torch.tensor(image), torch.tensor(text))
    return scores.tolist(), empty.tolist()


# ------------------------------------------------------------------------------------------------
# scores


def test_unimodal_experts_score_one():
    scores, empty = scores_of([[10, 0, 7]], [[0, 5, 0]])
    assert scores == [pytest.approx(1.0)]
    assert empty == [0]


def test_half_half_experts_score_zero():
    scores, empty = scores_of([[4, 9]], [[4, 9]])
    assert scores == [pytest.approx(0.0)]
    assert empty == [0]


def test_empty_experts_are_left_out_and_counted():
    scores, empty = scores_of([[6, 0, 3, 0]], [[0, 0, 3, 0]])
    assert scores == [pytest.approx((1.0 + 0.0) / 2)]
    assert empty == [2]


def test_score_of_a_quarter_share():
    # p = 1/4: H = -(1/4 log2 1/4 + 3/4 log2 3/4) = 0.811278...
    scores, _ = scores_of([[1]], [[3]])
    assert scores == [pytest.approx(1 - 0.8112781244591328)]


def test_all_empty_layer_scores_nan():
    scores, empty = scores_of([[0, 0], [2, 0]], [[0, 0], [0, 2]])
    assert math.isnan(scores[0])
    assert empty == [2, 0]
    assert scores[1] == pytest.approx(1.0)


def test_counts_add_and_ignore_other_keys():
    counts = RoutingCounts({0: 3})
    stats = {
        "routing/layer0/image_tokens": torch.tensor([1, 2, 3]),
        "routing/layer0/text_tokens": torch.tensor([0, 1, 0]),
        "routing/layer2/image_tokens": torch.tensor([5, 0, 0]),
        "other/value": torch.tensor(7.0),
    }
    counts.add(stats)
    counts.add(stats)
    assert counts.layers == [0, 2]
    assert counts.image_tokens.tolist() == [[2, 4, 6], [10, 0, 0]]
    assert counts.text_tokens.tolist() == [[0, 2, 0], [0, 0, 0]]


def test_counts_reject_other_expert_count():
    counts = RoutingCounts({0: 3})
    with pytest.raises(ValueError, match="4 experts but earlier batches had 3"):
        counts.add({"routing/layer0/image_tokens": torch.zeros(4, dtype=torch.long)})


def test_heatmap_renders_rgb():
    fig = heatmap_figure([0, 1], torch.tensor([[3, 0], [0, 0]]), torch.tensor([[1, 0], [0, 4]]))
    image = figure_to_array(fig)
    assert image.dtype == np.uint8
    assert image.ndim == 3
    assert image.shape[2] == 3
    assert image.shape[0] > 50
    assert image.shape[1] > 50


# ------------------------------------------------------------------------------------------------
# validation callback


def tiny_model(seed: int = 0, **moe) -> EarlyFusion:
    torch.manual_seed(seed)
    return EarlyFusion(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, d_model=32, n_layers=2, n_heads=2, ffn_multiple_of=32,
        moe=MoEConfig(**{"n_experts": 4, "top_k": 2, **moe}),
    )


def loader(batches: list) -> DataLoader:
    """A DataLoader that yields the ready-made Batches unchanged."""
    return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def val_batches() -> list:
    rows_a = [[[("text", 4), ("image", 1), ("text", 5)]], [[("image", 1), ("text", 6)], [("text", 3)]]]
    rows_b = [[[("text", 9)]], [[("text", 2), ("image", 1), ("image", 1), ("text", 2)]]]
    return [
        make_batch(rows, context=20, tokens_per_image=P, image_size=IMAGE_SIZE, seed=seed)
        for seed, rows in enumerate([rows_a, rows_b])
    ]


@torch.no_grad()
def direct_counts(model: EarlyFusion, batches: list) -> RoutingCounts:
    model.eval()
    counts = RoutingCounts()
    for batch in batches:
        counts.add(model(batch).stats)
    return counts


def run_validation(tmp_path, model: EarlyFusion, batches: list) -> tuple[RoutingStatistics, L.Trainer]:
    callback = RoutingStatistics()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = FusionModule(model, shuffled_image_eval=False)
    trainer.validate(module, dataloaders=loader(batches), verbose=False)
    return callback, trainer


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_callback_logs_scores_and_heatmap(tmp_path):
    model = tiny_model()
    batches = val_batches()
    expected = direct_counts(model, batches)
    expected_scores, expected_empty = specialization_scores(expected.image_tokens, expected.text_tokens)

    callback, trainer = run_validation(tmp_path, model, batches)
    assert callback.last_scores.keys() == {0, 1}
    for layer in (0, 1):
        assert callback.last_scores[layer] == pytest.approx(float(expected_scores[layer]))

    events = read_events(trainer.logger.log_dir)
    scalars = set(events.Tags()["scalars"])
    for layer in (0, 1):
        assert f"routing/specialization_layer{layer}" in scalars
        logged = events.Scalars(f"routing/specialization_layer{layer}")[-1].value
        assert logged == pytest.approx(float(expected_scores[layer]), abs=1e-6)
        empty = events.Scalars(f"routing/empty_experts_layer{layer}")[-1].value
        assert empty == float(expected_empty[layer])
    assert "routing/image_share" in events.Tags()["images"]
    png = events.Images("routing/image_share")[-1].encoded_image_string
    assert Image.open(io.BytesIO(png)).mode in ("RGB", "RGBA")


def test_callback_counts_match_token_counts(tmp_path):
    model = tiny_model()
    batches = val_batches()
    seen = {}

    class Recording(RoutingStatistics):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen["counts"] = self.counts.stacked().clone()
            super().on_validation_epoch_end(trainer, pl_module)

    callback = Recording()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    module = FusionModule(model, shuffled_image_eval=False)
    trainer.validate(module, dataloaders=loader(batches), verbose=False)

    n_image = sum(int((b.image_mask & ~b.padding_mask).sum()) for b in batches)
    n_text = sum(int((~b.image_mask & ~b.padding_mask).sum()) for b in batches)
    counts = seen["counts"]  # (layers, image/text, experts)
    assert counts.shape == (2, 2, 4)
    for layer in (0, 1):
        assert counts[layer, 0].sum().item() == 2 * n_image, "top_k 2: two slots per image token"
        assert counts[layer, 1].sum().item() == 2 * n_text, "top_k 2: two slots per text token"
    assert torch.equal(counts, direct_counts(model, batches).stacked())


def test_fit_trains_moe_and_logs_routing(tmp_path):
    model = tiny_model()
    train = val_batches() * 4
    callback = RoutingStatistics()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=8, val_check_interval=8, log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path, name="tb"), callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    module = FusionModule(model, lr=3e-3, warmup_steps=1, cooldown_fraction=0.0, shuffled_image_eval=False)
    trainer.fit(module, train_dataloaders=loader(train), val_dataloaders=loader(val_batches()))

    events = read_events(trainer.logger.log_dir)
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.3, f"train/loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
    assert callback.last_scores.keys() == {0, 1}, "the validation after step 8 was logged"
    assert len(events.Scalars("routing/specialization_layer0")) == 1, "the sanity check logs nothing"


def test_callback_sums_over_ranks():
    # A stand-in strategy: its reduce adds the counts of a second rank whose tokens were all text
    # routed to expert 0, so the logged scores must come from the reduced counts.
    model = tiny_model()
    batches = val_batches()
    module = FusionModule(model)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    other_rank = torch.zeros(2, 2, 4, dtype=torch.long)
    other_rank[:, 1, 0] = 1000
    reduced = []

    def reduce(tensor, reduce_op):
        assert reduce_op == "sum"
        reduced.append(tensor.clone())
        return tensor + other_rank

    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce=reduce), sanity_checking=False, is_global_zero=True, loggers=[]
    )
    callback = RoutingStatistics()
    callback.on_validation_epoch_start(trainer, module)
    for i, batch in enumerate(batches):
        with torch.no_grad():
            callback.on_validation_batch_end(trainer, module, {"stats": model(batch).stats}, batch, i)
    callback.on_validation_epoch_end(trainer, module)

    local = direct_counts(model, batches).stacked()
    assert len(reduced) == 1, "one reduction per epoch"
    assert torch.equal(reduced[0], local)
    total = local + other_rank
    scores, _ = specialization_scores(total[:, 0], total[:, 1])
    local_scores, _ = specialization_scores(local[:, 0], local[:, 1])
    assert not torch.allclose(scores, local_scores), "the second rank must change the scores"
    for layer in (0, 1):
        assert logged[f"routing/specialization_layer{layer}"] == pytest.approx(float(scores[layer]))


def test_callback_skips_sanity_check():
    module = FusionModule(tiny_model())
    module.log = lambda *args, **kwargs: pytest.fail("logged during the sanity check")
    identity = SimpleNamespace(reduce=lambda tensor, reduce_op: tensor)
    trainer = SimpleNamespace(strategy=identity, sanity_checking=True, is_global_zero=True, loggers=[])
    callback = RoutingStatistics()
    callback.on_validation_epoch_start(trainer, module)
    batch = val_batches()[0]
    with torch.no_grad():
        callback.on_validation_batch_end(trainer, module, {"stats": module.backbone(batch).stats}, batch, 0)
    callback.on_validation_epoch_end(trainer, module)
    assert callback.last_scores == {}


def test_callback_ignores_dense_backbone(tmp_path):
    torch.manual_seed(0)
    dense = EarlyFusion(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, d_model=32, n_layers=2, n_heads=2)
    callback, trainer = run_validation(tmp_path, dense, val_batches()[:1])
    assert callback.last_scores == {}
    events = read_events(trainer.logger.log_dir)
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("routing/")]


# ------------------------------------------------------------------------------------------------
# report for a checkpoint


def save_checkpoint(tmp_path, model: EarlyFusion):
    """Write a checkpoint through Lightning and FusionModule.on_save_checkpoint."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.validate(FusionModule(model), dataloaders=loader(val_batches()[:1]), verbose=False)
    path = tmp_path / "moe.ckpt"
    trainer.save_checkpoint(path)
    return path


def write_shards(tmp_path) -> list[dict]:
    """One caption shard (3 samples) and one text shard (2 samples)."""
    rng = np.random.default_rng(0)
    caption_dir, text_dir = tmp_path / "caption", tmp_path / "text"
    caption_dir.mkdir()
    text_dir.mkdir()
    with wds.TarWriter(str(caption_dir / "val-000000.tar"), encoder=False) as sink:
        for i in range(3):
            pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            sink.write({"__key__": f"c{i:03d}", "png": buffer.getvalue(), "txt": f"a scene {i}".encode()})
    with wds.TarWriter(str(text_dir / "val-000000.tar"), encoder=False) as sink:
        for i in range(2):
            sink.write({"__key__": f"t{i:03d}", "txt": f"plain text number {i}".encode()})
    return [
        {"urls": str(caption_dir / "val-000000.tar"), "type": "caption"},
        {"urls": str(text_dir / "val-000000.tar"), "type": "text"},
    ]


def test_load_backbone_restores_weights(tmp_path):
    model = tiny_model(routing="modality", n_experts=4, top_k=1)
    restored = load_backbone(save_checkpoint(tmp_path, model))
    assert isinstance(restored, EarlyFusion)
    assert restored.decoder.layers[0].ffn.config == model.decoder.layers[0].ffn.config
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_backbone_rejects_foreign_checkpoint(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="no 'backbone' entry"):
        load_backbone(path)


def test_routing_report_writes_png_and_json(tmp_path):
    model = tiny_model()
    checkpoint = save_checkpoint(tmp_path, model)
    sources = write_shards(tmp_path)
    out_dir = tmp_path / "report"

    report = routing_report(checkpoint, sources, out_dir, context=32, batch_size=2)

    batches = list(read_shard_batches(model, sources, context=32, batch_size=2, tokenizer="byte"))
    n_image = sum(int((b.image_mask & ~b.padding_mask).sum()) for b in batches)
    n_text = sum(int((~b.image_mask & ~b.padding_mask).sum()) for b in batches)
    assert n_image == 3 * P, "three caption images"

    written = json.loads((out_dir / "routing.json").read_text())
    assert written == report
    assert written["batches"] == len(batches)
    assert [layer["layer"] for layer in written["layers"]] == [0, 1]
    expected, _ = collect_routing_counts(model.eval(), batches)
    scores, _ = specialization_scores(expected.image_tokens, expected.text_tokens)
    for i, layer in enumerate(written["layers"]):
        assert sum(layer["image_tokens"]) == 2 * n_image
        assert sum(layer["text_tokens"]) == 2 * n_text
        assert layer["image_tokens"] == expected.image_tokens[i].tolist()
        assert layer["specialization"] == pytest.approx(float(scores[i]))
    with Image.open(out_dir / "routing.png") as png:
        assert png.format == "PNG"
        assert png.size[0] > 50
        assert png.size[1] > 50


def test_report_rejects_dense_backbone():
    torch.manual_seed(0)
    dense = EarlyFusion(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, d_model=32, n_layers=2, n_heads=2)
    with pytest.raises(ValueError, match="no MoE layer"):
        collect_routing_counts(dense, val_batches())
