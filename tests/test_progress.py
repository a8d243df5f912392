"""Progress output: plain lines in a log file (no half-drawn bars), samples/s that count only
this process's work after a resume, and the epoch a pack keeps named after training."""
from __future__ import annotations

import io
import time

from rich.console import Console

from mlilt.cli.train import best_epoch_line
from mlilt.training import progress as progress_module
from mlilt.training.progress import TrainProgress


def _log_console() -> tuple[Console, io.StringIO]:
    stream = io.StringIO()
    return Console(file=stream, force_terminal=False, width=60), stream


def test_a_log_file_gets_whole_plain_lines_with_the_loss_and_a_final_line(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    console, stream = _log_console()
    with TrainProgress(console).task("training", 30) as advance:
        for _ in range(3):
            advance(10, loss=1.25)
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("training: 30/30, loss 1.250, ") and "eta 0:00:00" in lines[-1]
    assert [line.split(",")[0] for line in lines] == ["training: 10/30", "training: 20/30", "training: 30/30",
                                                      "training: 30/30"]
    assert all("\x1b" not in line and "━" not in line for line in lines)  # no bar drawing in a log


def test_long_lines_are_not_wrapped_in_a_log_file():
    console, stream = _log_console()
    row = {"epoch": 3, "loss": 1.5, "samples_per_s": 123.4,
           "val": {"mean_recall": 50.0, "image_retrieval_recall@1": 40.0, "text_retrieval_recall@1": 41.0}}
    TrainProgress(console).log_epoch(row)
    assert len(stream.getvalue().splitlines()) == 1 and len(stream.getvalue()) > 60


def test_a_resumed_task_counts_only_its_own_samples_per_second(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    console, stream = _log_console()
    with TrainProgress(console).task("training", 1000, completed=900) as advance:
        time.sleep(0.2)
        advance(10)
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("training: 910/1000, ")
    rate = float(line.split(", ")[1].split()[0])
    assert rate < 10 / 0.2 + 1e-6  # 910 counted would be > 4000/s


def test_the_kept_epoch_is_named_with_the_reason():
    history = [{"epoch": 0, "val": {"mean_recall": 5.0}}] + [
        {"epoch": e, "val": {"mean_recall": r}} for e, r in ((1, 30.0), (2, 42.0), (3, 41.0))]
    assert best_epoch_line(history, 3).startswith("kept epoch 2 of 3: its validation mean recall (42.0) is the best")
    history[-1]["val"]["mean_recall"] = 50.0
    assert best_epoch_line(history, 3).startswith("kept epoch 3 of 3")
