"""Studies: methods × languages × data budgets × seeds, each cell trained and evaluated, then a report."""
from mlilt.studies.config import Cell, StudyConfig, load_study

__all__ = ["Cell", "StudyConfig", "load_study", "default_out"]


def default_out(study: StudyConfig):
    from pathlib import Path

    return Path("benchmarks") / "results" / study.name
