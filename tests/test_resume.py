"""Checkpoints and --resume: a run killed mid-epoch continues to the same pack; a run whose loss
goes non-finite stops naming the step (or skips and counts with --skip-nonfinite)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mlilt.training.checkpoint import STATE_FILE, checkpoint_dir, find_checkpoint
from mlilt.cli import app
from mlilt.demo.data import generate_demo
from mlilt.packs import PACK_CONFIG, PACK_TENSORS
from mlilt.towers.registry import register_tower
from mlilt.training import Callback, train
from mlilt.training.config import TrainConfig
from tiny_towers import tiny_text_tower, tiny_timm_cnn

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
TESTS = Path(__file__).resolve().parent
NAN_LR = "1e30"  # AdamW's first step puts weights near 1e30: the next loss is NaN (step 2)
LAUNCHER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import torch
torch.set_num_threads(1)
from mlilt.towers.registry import register_tower
from tiny_towers import tiny_text_tower, tiny_timm_cnn
register_tower(tiny_text_tower())
register_tower(tiny_timm_cnn())
from mlilt.cli import main
sys.argv = ["mlilt"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume-demo") / "data"
    generate_demo(out, ["sw"], n=60, image_size=32)
    return out / "sw" / "train.jsonl"


@pytest.fixture(autouse=True)
def tiny_towers():
    register_tower(tiny_text_tower())
    register_tower(tiny_timm_cnn())


def _config(data, out, **overrides) -> TrainConfig:
    settings = dict(lang="sw", data=str(data), out=str(out), text_tower="tiny-bert-0", image_tower="tiny-timm-cnn",
                    epochs=3, batch_size=8, embed_dim=16, checkpoint_every=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def _args(data, out, *extra) -> list[str]:
    return ["train", "--lang", "sw", "--data", str(data), "--out", str(out), "--text-tower", "tiny-bert-0",
            "--image-tower", "tiny-timm-cnn", "--batch-size", "8", "--embed-dim", "16", *extra]


def _state(out) -> dict | None:
    try:
        return json.loads((checkpoint_dir(out) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_pack(data, tmp_path):
    epochs = 8  # 5 steps an epoch: ~40 steps after the kill at step 2, seconds of training
    reference = train(_config(data, tmp_path / "reference", epochs=epochs))
    assert not checkpoint_dir(reference.pack).exists()  # deleted once the pack is written

    out = tmp_path / "langpacks" / "sw"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    process = subprocess.Popen([sys.executable, str(launcher), *_args(data, out, "--epochs", str(epochs),
                                                                      "--checkpoint-every", "2")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while True:
            state = _state(out)
            if state and state["step"] >= 2 and state["batch"] > 0:
                os.kill(process.pid, signal.SIGKILL)
                break
            if process.poll() is not None:
                pytest.fail(f"the run ended (rc {process.returncode}) before a mid-epoch checkpoint was seen; "
                            f"lengthen it: {process.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no mid-epoch checkpoint within 240 s"
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (out / PACK_CONFIG).exists()
    assert find_checkpoint(out) is not None
    killed_at = _state(out)
    assert killed_at["step"] >= 2 and killed_at["epoch"] <= epochs

    resumed = train(_config(data, out, epochs=epochs, resume=True))
    assert not checkpoint_dir(out).exists()
    expected, got = load_file(str(reference.pack / PACK_TENSORS)), load_file(str(out / PACK_TENSORS))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    best = [json.loads((p / PACK_CONFIG).read_text())["training"]["best_epoch"] for p in (reference.pack, out)]
    assert best[0] == best[1]
    assert [row["epoch"] for row in resumed.history] == list(range(epochs + 1))
    for ours, theirs in zip(resumed.history, reference.history):
        assert ours["val"] == theirs["val"] and ours.get("loss") == pytest.approx(theirs.get("loss"), abs=1e-6)


def test_resume_with_changed_settings_names_the_field(data, tmp_path):
    out = tmp_path / "sw"
    # stops at step 2 (NaN) and keeps the checkpoint of step 1
    result = runner.invoke(app, _args(data, out, "--epochs", "2", "--lr", NAN_LR, "--checkpoint-every", "1"))
    assert result.exit_code == 1 and checkpoint_dir(out).is_dir()
    result = runner.invoke(app, _args(data, out, "--epochs", "3", "--lr", NAN_LR, "--resume"))
    assert result.exit_code == 2, result.output
    assert "epochs" in result.output and "--resume" in result.output
    assert checkpoint_dir(out).is_dir()


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_old_pack(data, tmp_path):
    out = tmp_path / "sw"
    train(_config(data, out, epochs=1))
    before = _files(out)
    result = runner.invoke(app, _args(data, out, "--epochs", "2", "--lr", NAN_LR, "--checkpoint-every", "1",
                                      "--overwrite"), terminal_width=400)
    assert result.exit_code == 1, result.output
    assert "nan" in result.output and "epoch 1, step 2" in result.output and "Traceback" not in result.output
    assert _files(out) == before  # the finished pack is untouched
    state = _state(out)  # the last good checkpoint: after step 1, not the bad step
    assert state is not None and state["step"] == 1
    tensors = load_file(str(checkpoint_dir(out) / "checkpoint.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("param."))


def test_skip_nonfinite_counts_skipped_batches(data, tmp_path):
    out = tmp_path / "sw"
    result = runner.invoke(app, _args(data, out, "--epochs", "2", "--lr", NAN_LR, "--skip-nonfinite"))
    assert result.exit_code == 0, result.output
    pack = json.loads((out / PACK_CONFIG).read_text())
    steps = 2 * (pack["data"]["train_pairs"] // 8)
    assert pack["training"]["nonfinite_batches_skipped"] == steps - 1  # every step after the first blow-up
    assert not checkpoint_dir(out).exists()


def test_checkpoint_without_resume_is_replaced(data, tmp_path):
    out = tmp_path / "sw"
    runner.invoke(app, _args(data, out, "--epochs", "2", "--lr", NAN_LR, "--checkpoint-every", "1"))
    assert _state(out)["step"] == 1
    result = runner.invoke(app, _args(data, out, "--epochs", "1"))  # other settings, no --resume: starts over
    assert result.exit_code == 0, result.output
    assert (out / PACK_CONFIG).exists() and not checkpoint_dir(out).exists()


def test_checkpoint_every_zero_writes_no_checkpoint_and_the_same_pack(data, tmp_path):
    """Studies of short runs turn checkpoints off; training itself is unchanged."""
    written = []

    class Written(Callback):
        def on_checkpoint(self, state):
            written.append(state.step)

    without = train(_config(data, tmp_path / "none", checkpoint_every=0), callbacks=[Written()])
    assert written == [] and not checkpoint_dir(tmp_path / "none").exists()
    with_checkpoints = train(_config(data, tmp_path / "some"), callbacks=[Written()])
    assert written  # the same callback does hear checkpoints when they are on
    assert (without.pack / PACK_TENSORS).read_bytes() == (with_checkpoints.pack / PACK_TENSORS).read_bytes()


def test_sigterm_mid_run_prints_the_exact_command_that_resumes_it(data, tmp_path):
    out = tmp_path / "langpacks" / "sw"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    args = _args(data, out, "--epochs", "8", "--checkpoint-every", "2", "--lr", "0.002")
    process = subprocess.Popen([sys.executable, str(launcher), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"})
    deadline = time.monotonic() + 240
    while not (_state(out) and _state(out)["step"] >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint seen"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, output[-2000:]
    assert f"the last checkpoint is in {checkpoint_dir(out)}" in output
    command = shlex.split(output.split("Continue with:")[1].strip().splitlines()[0])
    assert command[:2] == ["mlilt", "train"] and command[-1] == "--resume"
    assert set(args[1:]) <= set(command[2:]) and not (out / PACK_CONFIG).exists()
    resumed = runner.invoke(app, command[1:])  # the printed command, as a user would paste it
    assert resumed.exit_code == 0, resumed.output
    assert (out / PACK_CONFIG).exists() and "kept epoch" in resumed.output
