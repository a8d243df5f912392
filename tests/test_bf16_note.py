"""--bf16 on a CPU without bfloat16 instructions trains (emulated) and says it will be slow."""
from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from mlilt.demo.data import generate_demo
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_on_cpu_is_pointed_out_where_it_is_emulated(tiny_vit_towers, tmp_path, bf16):
    generate_demo(tmp_path / "data", ["sw"], n=20, image_size=32)
    log = Console(file=io.StringIO(), width=200)
    config = TrainConfig(lang="sw", data=str(tmp_path / "data" / "sw" / "train.jsonl"), out=str(tmp_path / "pack"),
                         text_tower="tiny-bert-0", image_tower="tiny-timm-vit", embed_dim=16, epochs=1,
                         batch_size=8, bf16=bf16, checkpoint_every=0)
    result = train(config, console=log)
    assert (result.pack / "langpack.safetensors").is_file()
    capability = torch.backends.cpu.get_cpu_capability()
    emulated = "AVX512" not in capability and "AMX" not in capability
    assert ("--bf16 on a CPU without bfloat16 instructions" in log.file.getvalue()) == (bf16 and emulated)
