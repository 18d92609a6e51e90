"""Write LongBench prediction files whose every prediction is the sample's first gold answer.

Usage: python scripts/gold_predictions.py DATA_DIR OUTPUT_DIR

DATA_DIR holds LongBench ``<task>.jsonl`` samples; OUTPUT_DIR gets one
``<task>.jsonl`` in LongBench's pred format per task, which ``kvbench eval``
scores: a check of the scorer on real data (gold answers score 100 on every task).
"""

import json
import sys
from pathlib import Path


def write_gold_predictions(data_dir: Path, output_dir: Path) -> int:
    data_files = sorted(data_dir.glob("*.jsonl"))
    if not data_files:
        sys.exit(f"error: {data_dir}: no LongBench <task>.jsonl files (is ../shared beside the checkout?)")
    output_dir.mkdir(parents=True, exist_ok=True)
    for data_file in data_files:
        with open(data_file, encoding="utf-8") as samples, open(output_dir / data_file.name, "w", encoding="utf-8") as predictions:
            for line in samples:
                sample = json.loads(line)
                row = {"pred": sample["answers"][0], "answers": sample["answers"], "all_classes": sample["all_classes"], "length": sample["length"]}
                predictions.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(data_files)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    count = write_gold_predictions(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote gold predictions for {count} tasks to {sys.argv[2]}")
