"""The component reference in docs/components.md is generated from the components and complete."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from kfp_components.components import reference

ROOT = Path(__file__).resolve().parents[1]


def test_reference_is_current():
    text = (ROOT / "docs" / "components.md").read_text()
    assert reference.updated(text) == text, "docs/components.md is stale: run `make compile`"


@pytest.mark.parametrize("component", reference.COMPONENTS, ids=lambda c: c.name)
def test_every_input_and_output_is_documented(component):
    documented = {**reference.arg_docs(component), **reference.output_docs(component)}
    names = list(inspect.signature(component.python_func).parameters)
    names += [name for name, _ in reference._returns(component)]
    assert [name for name in names if not documented.get(name)] == []
    assert set(documented) <= set(names), "the docstring documents arguments the component does not have"


def test_rendered_section_lists_types_defaults_and_outputs():
    lines = reference.render_component(reference.train_model)
    assert "| `train_dataset` | Input[Dataset] | required |" in "\n".join(lines)
    assert any(line.startswith("| `model` | Output[Model] | The trained model") for line in lines)
    assert any(line.startswith("| `unfreeze_rank_ratio` | float | `0.25` | OSFT:") for line in lines)
    assert any(line.startswith("| `Output` | str | The TrainJob's name") for line in lines)
    registry = "\n".join(reference.render_component(reference.register_model))
    assert "| `run_id` | str | set by KFP |" in registry
    assert "| `training_metrics` | Input[Metrics] | optional |" in registry


def test_entries_join_continuations_and_shared_names():
    section = "    a, b: first line\n        continued.\n    c: other\n"
    assert reference._entries(section) == {
        "a": "first line continued.",
        "b": "first line continued.",
        "c": "other",
    }


def test_usage_example_compiles(tmp_path):
    from kfp import compiler

    text = (ROOT / "docs" / "components.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(example, "docs/components.md", "exec", dont_inherit=True), namespace)
    compiler.Compiler().compile(namespace["my_pipeline"], str(tmp_path / "pipeline.yaml"))
    compiled = (tmp_path / "pipeline.yaml").read_text()
    assert "dataset-download" in compiled and "evaluate-model" in compiled
