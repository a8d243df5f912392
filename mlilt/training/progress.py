"""Progress of a run's long steps: a rich bar with loss, samples/s and ETA on a terminal, plain
lines now and then in a log file; silent when there is no console."""
from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

LOG_EVERY_S = 30.0  # a log file gets a line at most this often (and at the end)


class TrainProgress:
    def __init__(self, console: Console | None):
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: int, completed: int = 0):
        """Yield ``advance(n, loss=None)``. ``completed``: done before this process started (a
        resumed run): shown as done, but samples/s and the ETA count only this process's work."""
        if self.console is None:
            yield lambda n, loss=None: None
            return
        rate = _Rate(completed)
        if not self.console.is_terminal:
            yield from _log_lines(self.console, description, total, rate)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
                   TextColumn("eta {task.fields[eta]}"))
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total, completed=completed, loss="-", rate="-", eta="-")

            def advance(n: int, loss: float | None = None) -> None:
                rate.add(n)
                fields = {"rate": f"{rate.per_s():.1f}", "eta": rate.eta(total)}
                bar.update(task, advance=n, **fields | ({"loss": f"{loss:.3f}"} if loss is not None else {}))

            yield advance

    def log_epoch(self, row: dict) -> None:
        if self.console is not None:
            val = row["val"]
            if "image_retrieval_recall@1" in val:
                detail = (f"t2i R@1 {val['image_retrieval_recall@1']:.1f}, "
                          f"i2t R@1 {val['text_retrieval_recall@1']:.1f}")
            else:  # parallel pairs only: the student's translations retrieving the teacher's sources
                detail = f"target->source R@1 {val['target_to_source_recall@1']:.1f}, distance {val['distance']:.3f}"
            self.console.print(f"epoch {row['epoch']}: loss {row['loss']:.3f}, val mean recall "
                               f"{val['mean_recall']:.1f} ({detail}), {row['samples_per_s']} samples/s",
                               soft_wrap=True, highlight=False)  # one line per epoch in a log, too

    def note(self, message: str) -> None:
        """A one-line status of a step that takes a while (and shows no bar)."""
        if self.console is not None:
            self.console.print(message, soft_wrap=True, highlight=False)


class _Rate:
    """Items per second of this process's work only, and the time left at that rate."""

    def __init__(self, completed: int):
        self.done = completed
        self.here = 0
        self.started = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        self.here += n

    def per_s(self) -> float:
        return self.here / max(1e-9, time.perf_counter() - self.started)

    def eta(self, total: int) -> str:
        rate = self.per_s()
        if not rate:
            return "-"
        seconds = int(max(0, total - self.done) / rate)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _log_lines(console: Console, description: str, total: int, rate: _Rate):
    """The log-file form of a bar: a plain line every LOG_EVERY_S and one when the task ends."""
    last = {"at": time.perf_counter(), "loss": None}

    def line() -> str:
        loss = f", loss {last['loss']:.3f}" if last["loss"] is not None else ""
        return (f"{description}: {rate.done}/{total}{loss}, {rate.per_s():.1f} samples/s, "
                f"eta {rate.eta(total)}")

    def advance(n: int, loss: float | None = None) -> None:
        rate.add(n)
        last["loss"] = loss if loss is not None else last["loss"]
        if time.perf_counter() - last["at"] >= LOG_EVERY_S:
            last["at"] = time.perf_counter()
            console.print(line(), soft_wrap=True, highlight=False)

    yield advance
    console.print(line(), soft_wrap=True, highlight=False)
