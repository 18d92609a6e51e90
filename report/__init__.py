"""Reading `kvbench run` folders and reporting on them: `load_runs` for notebooks, `write_report` for `kvbench report`."""

from kvbench.report.load import load_runs
from kvbench.report.write import write_report

__all__ = ["load_runs", "write_report"]
