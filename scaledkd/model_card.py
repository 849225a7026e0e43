"""The ``README.md`` model card of an exported student: what it is, where it came from, how well it does and how
to load it, written from the run's provenance so it never disagrees with ``scaledkd_provenance.json``."""
from __future__ import annotations

from typing import Any

CARD_FILE = "README.md"

_AUTO_CLASS = {"causal_lm": "AutoModelForCausalLM", "agnostic": "AutoModel"}


def _scores(block: dict[str, Any] | None) -> str:
    if not block:
        return "-"
    return ", ".join(f"{k} {v:.4f}" for k, v in block.items() if isinstance(v, float) and k != "step")


def render_card(provenance: dict[str, Any], config: Any, task: str) -> str:
    """Markdown for an exported student.

    Args:
        provenance: what ``scaledkd_provenance.json`` records (teacher, student_init, losses, data, seed, steps,
            scores).
        config: the student's Hugging Face config (architecture, depth, width).
        task: the run's task kind (``classification``, ``regression``, ``agnostic``, ``causal_lm``).
    """
    init = provenance.get("student_init") or {}
    data = provenance.get("data") or {}
    teacher = provenance.get("teacher")
    auto = _AUTO_CLASS.get(task, "AutoModelForSequenceClassification")
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    copied = init.get("copied_blocks")
    layers = copied.get("from_layers") if isinstance(copied, dict) else (copied or init.get("layers"))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [knowledge-distillation, scaledkd]",
        "---",
        "",
        f"# {'Distilled' if teacher else 'Fine-tuned'} {arch} ({config.num_hidden_layers} blocks, width "
        f"{config.hidden_size})",
        "",
        f"Trained with [scaledkd](https://pypi.org/project/scaledkd/) {provenance.get('scaledkd_version', '')}"
        f"{' from the teacher `' + str(teacher) + '`' if teacher else ' without a teacher'}.",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {f'`{teacher}`' if teacher else 'none'} |",
        f"| student | {arch}: {config.num_hidden_layers} blocks, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads; `init: {init.get('init')}` from `{init.get('from')}`"
        f"{f', source blocks {layers}' if layers else ''} |",
        "| losses | " + "; ".join(
            f"`{loss['name']}` x {loss['weight']:g}" + (f" (mapping {loss['mapping']})" if loss.get("mapping") else "")
            + (f" {loss['params']}" if loss.get("params") else "") for loss in provenance.get("losses") or [])
        + " |",
        f"| data | task `{data.get('task')}`, {data.get('train_examples')} training examples"
        f"{', from ' + str(data.get('data_dir')) if data.get('data_dir') else ''} |",
        f"| training | {provenance.get('steps')} optimiser steps, seed {provenance.get('seed')}; exported: "
        f"{provenance.get('exported')} |",
        f"| dev scores | student: {_scores(provenance.get('final'))}"
        + (f"; best (step {provenance['best'].get('step')}): {_scores(provenance['best'])}"
           if provenance.get("best") else "")
        + (f"; teacher: {_scores(provenance.get('teacher_scores'))}" if provenance.get("teacher_scores") else "")
        + " |",
        "",
        "## Load it",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "`scaledkd_config.yaml` is the full recipe of the run and `scaledkd_provenance.json` its record; "
        "`scaledkd eval <this folder> --data-dir ...` re-scores it with the task and length it was trained with.",
        "",
    ]
    return "\n".join(lines)
