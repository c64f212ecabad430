"""FLARE 2024 Task 1 scores, pure (no Ray).

- `metrics`: lesion DSC and NSD on arrays with the per-case rules, and their summaries
- `folders`: a folder of predictions against a folder of ground truth (`evaluate_folders`)
- `lesions`: lesions found, false components and organ Dice of all-label predictions, per case
- `verdict`: the demo's closing verdict, read back from its CSVs

What `panseg.evaluation` exported when it was one module is re-exported here, so
`from panseg.evaluation import evaluate_folders` keeps working.
"""

from panseg.evaluation.folders import (ROW_COLUMNS, EvaluationResult, evaluate_folders, format_table, mask_files,
                                       reference_line, write_csv)

__all__ = ["EvaluationResult", "ROW_COLUMNS", "evaluate_folders", "format_table", "mask_files", "reference_line",
           "write_csv"]
