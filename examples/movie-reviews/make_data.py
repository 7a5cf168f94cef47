"""Regenerate this example's data from the SST-2 files in $RAEE_DATA_DIR (LM-BFF layout): a seeded 2,000 training
sentences and the 872 test sentences, as JSON Lines with string labels. Run from the repository root:

    python examples/movie-reviews/make_data.py
"""

import json
from pathlib import Path

from raee.tasks import builtin_task, load_split

HERE = Path(__file__).resolve().parent
WORDS = {0: "negative", 1: "positive"}

for split, limit in (("train", 2000), ("test", None)):
    data = load_split(builtin_task("sst2"), split).sample(limit, seed=0)
    with (HERE / f"{split}.jsonl").open("w", encoding="utf-8") as f:
        for text, label in zip(data.texts, data.labels, strict=True):
            f.write(json.dumps({"review": text, "sentiment": WORDS[int(label)]}) + "\n")
    print(f"{split}: {len(data)} rows")
