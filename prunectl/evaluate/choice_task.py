"""A HellaSwag-like zero-shot task built from held-out text: pick a passage's true continuation.

The wrong endings are the true ending's own words in shuffled order. They hold (nearly) the same
tokens, so a model that ignores word order, like an untrained one, scores at chance; a model that
has learnt the language prefers the real sentence. (Endings taken from other passages would be
just as fluent: a toy model could not tell them apart, and would be judged on topic memory.)

`data prepare` writes it next to the token shards (tasks/<name>.jsonl), from the validation range
only, so no model trained or calibrated on this data has read it. The eval stage turns it into an
lm-eval task YAML pointing at that file, so lm-eval runs it like any other multiple-choice task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field

from ..schema import Strict


class ChoiceTaskConfig(Strict):
    range: str = Field("validation", description="held-out range whose documents the items come from")
    items: int = Field(400, ge=1)
    context_words: int = Field(32, ge=4)
    ending_words: int = Field(12, ge=2)
    choices: int = Field(4, ge=2)
    seed: int = Field(0, ge=0)


def build(docs: list[str], cfg: ChoiceTaskConfig) -> list[dict]:
    """Items {context, endings, label}: the true ending among choices-1 distinct shuffles of its words."""
    rng = random.Random(cfg.seed)
    words = [d.split() for d in docs]
    span = cfg.context_words + cfg.ending_words
    usable = [i for i, w in enumerate(words) if len(w) >= span]
    if not usable:
        raise ValueError(f"range '{cfg.range}' has no document of {span}+ words; lower context_words/ending_words")
    items = []
    while len(items) < cfg.items:
        doc = words[rng.choice(usable)]
        start = rng.randrange(len(doc) - span + 1)
        context, ending = doc[start : start + cfg.context_words], doc[start + cfg.context_words : start + span]
        endings = {" ".join(ending)}
        for _ in range(50 * cfg.choices):  # distinct shuffles; short repetitive endings may not have enough
            if len(endings) == cfg.choices:
                break
            endings.add(" ".join(rng.sample(ending, len(ending))))
        if len(endings) < cfg.choices:
            continue
        wrong = sorted(endings - {" ".join(ending)})
        rng.shuffle(wrong)
        label = rng.randrange(cfg.choices)
        wrong.insert(label, " ".join(ending))
        items.append({"context": " ".join(context), "endings": wrong, "label": label})
    return items


def write(items: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def task_yaml(name: str, jsonl: Path) -> str:
    """lm-eval's YAML for the task (written at eval time: the data file is wherever the data run is now)."""
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(jsonl).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "endings",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "higher_is_better": True}, {"metric": "acc_norm", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return json.dumps(spec, indent=2) + "\n"  # JSON is YAML
