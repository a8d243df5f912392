"""What users of other CLIs expect: --version, -h, flags shown as flags, eval's batch size,
device and progress, train's column and device options."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import mlilt
from mlilt.cli import app
from mlilt.demo.data import generate_demo
from tiny_towers import train_tiny_pack

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cnn_towers")
runner = CliRunner()
TINY = ["--text-tower", "tiny-bert-0", "--image-tower", "tiny-timm-cnn", "--embed-dim", "16", "--epochs", "1",
        "--batch-size", "8", "--method", "ln", "--checkpoint-every", "0"]


def test_version_and_short_help():
    assert runner.invoke(app, ["--version"]).output.strip() == f"mlilt {mlilt.__version__}"
    for args in (["-h"], ["train", "-h"], ["eval", "-h"], ["data", "translate", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage:" in result.output, args


def test_on_off_flags_are_shown_without_a_value():
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    lines = [line for line in result.output.splitlines() if "--skip-bad" in line or "--bf16" in line]
    assert len(lines) == 2 and not any("<bool>" in line for line in lines), lines


def test_train_reads_named_columns_and_takes_a_device(tmp_path):
    generate_demo(tmp_path / "data", ["sw"], n=40, image_size=32)
    rows = [json.loads(line) for line in (tmp_path / "data/sw/train.jsonl").read_text().splitlines()]
    renamed = tmp_path / "data/sw/renamed.jsonl"
    renamed.write_text("".join(json.dumps({"picture": r["image"], "swahili": r["caption"]}) + "\n" for r in rows))
    out = tmp_path / "sw"
    result = runner.invoke(app, ["train", "--lang", "sw", "--data", str(renamed), "--out", str(out), "--image-column",
                                 "picture", "--caption-column", "swahili", "--device", "cpu", "--warmup", "2", *TINY])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "langpack.json").read_text())["data"]["rows"] == len(rows)
    without = runner.invoke(app, ["train", "--lang", "sw", "--data", str(renamed), "--out", str(tmp_path / "x"), *TINY])
    assert without.exit_code != 0 and "image" in without.output
    if not torch.cuda.is_available():
        refused = runner.invoke(app, ["train", "--lang", "sw", "--data", str(renamed), "--out", str(tmp_path / "y"),
                                      "--device", "cuda", *TINY])
        assert refused.exit_code != 0 and "CUDA is not available" in refused.output


def test_eval_takes_a_batch_size_and_device_and_shows_progress(tmp_path):
    pack = train_tiny_pack(tmp_path)
    result = runner.invoke(app, ["eval", "--benchmark", "demo", "--root", str(tmp_path / "data"), "--pack", str(pack),
                                 "--batch-size", "3", "--device", "cpu"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "images: " in result.output and "captions (sw: sw): " in result.output
    same = runner.invoke(app, ["eval", "--benchmark", "demo", "--root", str(tmp_path / "data"), "--pack", str(pack),
                               "--batch-size", "64"], terminal_width=200)
    table = [line for line in result.output.splitlines() if line.strip().startswith("│ sw")]
    assert table and table == [line for line in same.output.splitlines() if line.strip().startswith("│ sw")]
