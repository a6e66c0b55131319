"""FusionModule under FSDP on CPU over gloo: global gradient norm and unsharded parameter counts.

Lightning runs its FSDP strategy on CUDA only, so these tests wrap the backbone with torch's
FullyShardedDataParallel directly and give FusionModule a stand-in trainer whose strategy contains it.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FullyShardedDataParallel

from fusionlab.models import EarlyFusion
from fusionlab.training.module import FusionModule
from helpers import make_batch

RANKS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        torch.manual_seed(0)
        backbone = EarlyFusion(vocab_size=264, image_size=8, patch_size=4, d_model=32, n_layers=2, n_heads=2,
                               ffn_multiple_of=32)
        unsharded_count = backbone.parameter_counts().N
        module = FusionModule(backbone, grad_clip=1e9)
        module.setup("fit")
        # Lightning wraps the whole LightningModule; wrapping the backbone shards the same parameters
        # and keeps FusionModule's calls to self.backbone going through FSDP's forward.
        module.backbone = FullyShardedDataParallel(backbone, device_id=torch.device("cpu"))
        module.trainer = SimpleNamespace(strategy=SimpleNamespace(model=module.backbone))

        # Different data per rank, so that the ranks' gradient shards differ.
        batch = make_batch([[[("text", 20)]], [[("image", 1), ("text", 9)]]], 32, 4, 8, seed=rank)
        token_loss, aux = module._token_loss(batch)
        (token_loss.sum() + aux).backward()
        local = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], float("inf"))
        global_norm = module._clip_gradients()
        results[rank] = (float(local), float(global_norm), unsharded_count, module.parameter_counts.N)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results() -> dict:
    """Per rank: (local shard norm, clipping norm, unsharded N, module N), from one 2-process run."""
    shared = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), shared), nprocs=RANKS)
    return dict(shared)


def test_fsdp_clipping_uses_global_norm(results):
    local = [results[r][0] for r in range(RANKS)]
    global_norm = [results[r][1] for r in range(RANKS)]
    # The global norm combines every shard: the same on each rank, and the root sum of squares of the
    # per-shard norms (each shard's gradient is already reduced over ranks).
    assert global_norm[0] == global_norm[1]
    assert abs(global_norm[0] - (local[0] ** 2 + local[1] ** 2) ** 0.5) < 1e-4 * global_norm[0]
    assert local[0] != local[1]


def test_fsdp_parameter_counts_stay_unsharded(results):
    for rank in range(RANKS):
        assert results[rank][3] == results[rank][2]
