"""`panseg report`, pure (no Ray): one self-contained HTML page on a run and/or a folder of predictions.

- `page`: the inputs, the scores and the HTML page (`build_report`)
- `figures`: where to cut a case, which way up to show it, and the PNGs (matplotlib)

What `panseg.report` exported when it was one module is re-exported here, so
`from panseg.report import build_report` keeps working.
"""

from panseg.report.page import (DEFAULT_MAX_CASES, CaseFigure, ReportResult, ReportSources, build_html, build_report,
                                case_metrics, crop_box_of, input_kind, read_metrics_csv, read_training_log,
                                render_case, sources_from_paths, table_rows)

__all__ = ["CaseFigure", "DEFAULT_MAX_CASES", "ReportResult", "ReportSources", "build_html", "build_report",
           "case_metrics", "crop_box_of", "input_kind", "read_metrics_csv", "read_training_log", "render_case",
           "sources_from_paths", "table_rows"]
