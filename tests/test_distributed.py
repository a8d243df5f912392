"""Training under torchrun: 2 real processes on CPU (gloo) with a global batch B give the
1-process run with batch B: the same loss history, validation and pack tensors. Only rank 0
writes; --resume continues a killed run on another process count."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlilt.training.checkpoint import STATE_FILE, checkpoint_dir
from mlilt.demo.data import caption_scene, generate_demo, make_scenes
from mlilt.packs import PACK_CONFIG, PACK_TENSORS
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig

# Each torchrun start imports torch, transformers and timm in every worker: 30-80 s a test here.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
TEXT_SPEC, IMAGE_SPEC = "tiny-bert-0", "tiny-timm-vit"
# Every process registers the same tiny towers (fixed seeds: identical weights), then runs
# the real CLI. SEPARATE_OUT points ranks other than 0 at a folder of their own, which must
# stay empty: a rank that wrote anything would show there.
LAUNCHER = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
import torch
torch.set_num_threads(1)
from mlilt.towers.registry import register_tower
from tiny_towers import tiny_text_tower, tiny_timm_vit
register_tower(tiny_text_tower())
register_tower(tiny_timm_vit())
args = sys.argv[1:]
if os.environ.get("SEPARATE_OUT") and os.environ.get("RANK", "0") != "0":
    where = args.index("--out") + 1
    args[where] = args[where] + ".rank" + os.environ["RANK"]
from mlilt.cli import main
sys.argv = ["mlilt"] + args
main()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-demo") / "data"
    generate_demo(out, ["sw"], n=48, image_size=32)
    return out / "sw" / "train.jsonl"


def _settings(data, out, **overrides) -> dict:
    settings = dict(lang="sw", data=str(data), out=str(out), text_tower=TEXT_SPEC, image_tower=IMAGE_SPEC,
                    epochs=2, batch_size=8, embed_dim=16, checkpoint_every=2)
    settings.update(overrides)
    return settings


def _args(settings: dict) -> list[str]:
    args = ["train"]
    for key, value in settings.items():
        flag = f"--{key.replace('_', '-')}"
        args += [flag] if value is True else [flag, str(value)]  # True: a bare flag (--resume)
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, settings: dict, nproc: int = 2, env: dict | None = None, wait: bool = True):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(launcher), *_args(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)  # its own group: a kill reaches every worker
    if not wait:
        return process
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output.decode()[-4000:]
    return output.decode()


def _history(pack: Path) -> list[dict]:
    return [json.loads(line) for line in (pack / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(expected: Path, got: Path, atol: float = 1e-5) -> None:
    for ours, theirs in zip(_history(got), _history(expected), strict=True):
        assert ours["epoch"] == theirs["epoch"]
        assert ours.get("loss") == pytest.approx(theirs.get("loss"), abs=atol)
        assert ours["val"] == pytest.approx(theirs["val"], abs=1e-3)
    want, have = load_file(str(expected / PACK_TENSORS)), load_file(str(got / PACK_TENSORS))
    assert want.keys() == have.keys()
    for name in want:
        assert torch.allclose(want[name], have[name], atol=atol), (name, (want[name] - have[name]).abs().max())
    best = [json.loads((p / PACK_CONFIG).read_text())["training"]["best_epoch"] for p in (expected, got)]
    assert best[0] == best[1]


@pytest.mark.parametrize("method", ["ln+adapter", "unlock:1@text"])
def test_two_processes_train_the_one_process_pack(tiny_vit_towers, data, tmp_path, monkeypatch, method):
    """ln+adapter runs the image tower on each rank's pixels; unlock:1@text reads cached image
    features (rank 0 fills the cache first)."""
    settings = _settings(data, tmp_path / "one", method=method)
    one = train(TrainConfig(**settings)).pack
    monkeypatch.setenv("MLILT_CACHE", str(tmp_path / "fresh-cache"))  # the 2-process run fills its own
    two = tmp_path / "two"
    output = _torchrun(tmp_path, _settings(data, two, method=method), env={"SEPARATE_OUT": "1"})
    _assert_same_run(one, two)
    assert output.count("pack written") == 1  # only rank 0 reports
    assert not (tmp_path / "two.rank1").exists() and not checkpoint_dir(tmp_path / "two.rank1").exists()
    assert not checkpoint_dir(two).exists()  # rank 0 removed it once the pack was written


def test_batch_that_does_not_split_over_the_processes_is_refused(tiny_vit_towers, data, tmp_path):
    launcher_output = _torchrun_failing(tmp_path, _settings(data, tmp_path / "odd", batch_size=9, epochs=1))
    assert "cannot be split evenly over 2 processes" in launcher_output
    assert not (tmp_path / "odd").exists()


def _torchrun_failing(tmp_path, settings: dict) -> str:
    process = _torchrun(tmp_path, settings, wait=False)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    return output.decode()


def _state(out: Path) -> dict | None:
    try:
        return json.loads((checkpoint_dir(out) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def test_resume_a_killed_two_process_run_gives_the_uninterrupted_pack(tiny_vit_towers, data, tmp_path):
    settings = _settings(data, tmp_path / "reference", method="unlock:1@text", epochs=6)
    reference = train(TrainConfig(**settings)).pack
    out = tmp_path / "sw"
    process = _torchrun(tmp_path, {**settings, "out": str(out)}, wait=False)
    deadline = time.monotonic() + 240
    try:
        while True:
            state = _state(out)
            if state and state["step"] >= 2 and state["batch"] > 0:
                os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
                break
            assert process.poll() is None, f"the run ended before a mid-epoch checkpoint: {process.stdout.read()}"
            assert time.monotonic() < deadline, "no mid-epoch checkpoint within 240 s"
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        process.stdout.close()
    assert not (out / PACK_CONFIG).exists()
    _torchrun(tmp_path, {**settings, "out": str(out), "resume": True})
    _assert_same_run(reference, out)


def test_setup_picks_the_gpu_without_making_it_current(monkeypatch):
    """One process on a CUDA machine: the device is handed out, never set process-wide."""
    from mlilt.training import distributed

    def refuse(*args):
        raise AssertionError("setup() set the process's current CUDA device")

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", refuse)
    ranks = distributed.setup()
    assert ranks.device == torch.device("cuda:1") and ranks.world == 1
    with ranks.worker_scope():  # one process: nothing to make current
        pass
    two = distributed.Ranks(rank=1, world=2, local_rank=1, device=torch.device("cpu"))
    with two.worker_scope():  # CPU processes: nothing either
        pass


def test_two_processes_distil_the_one_process_student(tiny_vit_towers, data, tmp_path, monkeypatch):
    """Parallel text only: each rank embeds its slice of every batch of sentence pairs, the
    loss sees the whole batch, and the teacher's embeddings come from one cache."""
    teacher = train(TrainConfig(**_settings(data, tmp_path / "teacher", epochs=1, method="ln"))).pack
    scenes = make_scenes(48, seed=9, image_size=32)
    parallel = tmp_path / "en_sw.tsv"
    parallel.write_text("".join(f"{caption_scene(s, 'en', 9)}\t{caption_scene(s, 'sw', 9)}\n" for s in scenes))
    settings = {**_settings(data, tmp_path / "one", method="ln"), "parallel": str(parallel), "teacher": str(teacher)}
    del settings["data"], settings["image_tower"], settings["embed_dim"]  # all three come from the teacher
    one = train(TrainConfig(**{**settings, "data": None})).pack
    monkeypatch.setenv("MLILT_CACHE", str(tmp_path / "fresh-cache"))
    two = tmp_path / "two"
    output = _torchrun(tmp_path, {**settings, "out": str(two)}, env={"SEPARATE_OUT": "1"})
    _assert_same_run(one, two)
    assert output.count("pack written") == 1
