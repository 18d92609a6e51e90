"""Reading `kvbench run` folders and reporting on them: `load_runs` for notebooks, `write_report` for `kvbench report`."""

from kvbench.results.load import load_runs
from kvbench.results.report import write_report

__all__ = ["load_runs", "write_report"]
