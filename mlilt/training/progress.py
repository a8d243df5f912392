"""A rich progress bar with loss, samples/s and ETA; silent when there is no console."""
from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, console: Console | None):
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        """Yield ``advance(n, loss=None)``; shows samples/s over the whole task."""
        if self.console is None:
            yield lambda n, loss=None: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
                   TimeRemainingColumn())
        started = time.perf_counter()
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total, loss="-", rate="-")

            def advance(n: int, loss: float | None = None) -> None:
                done = bar.tasks[0].completed + n
                rate = done / max(1e-9, time.perf_counter() - started)
                fields = {"rate": f"{rate:.1f}"} | ({"loss": f"{loss:.3f}"} if loss is not None else {})
                bar.update(task, advance=n, **fields)

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
                               f"{val['mean_recall']:.1f} ({detail}), {row['samples_per_s']} samples/s")
