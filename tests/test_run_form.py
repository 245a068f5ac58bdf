"""The pipeline's parameters as the Prefect UI's run form and the deployments see them: the JSON
schema Prefect builds for the flow (dropdowns for choices, no "None" type switches, a
description everywhere, groups for the rarely changed settings), the flat names older callers
use, and the deployments of prefect.yaml and flows/serve.py. No Prefect server is needed."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# The flat parameters before the groups existed: the run key (whether a run is unchanged since a
# finished one) and the MLflow params are built from these names, so they must not change.
FLAT_NAMES = {"spec", "model", "methods", "limit", "harvest_limit", "dtype", "max_n", "policy", "vocab_rounds",
              "round_steps", "finetune_max_steps", "tokens_per_round", "vocab_min_count", "eval_prompts",
              "min_token_gain", "ft_methods", "register_model", "min_speedup", "max_metric_drop", "metric_floor",
              "task_runner", "ngram_shards", "finetune_deployment", "force"}


@pytest.fixture(scope="module")
def schema() -> dict:
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    return parameter_schema(pipeline).model_dump_for_openapi()


def _fields(schema: dict) -> dict[str, dict]:
    """Every field of every model in the schema, as ``Model.field``."""
    return {f"{model}.{name}": prop for model, d in schema["definitions"].items()
            for name, prop in d["properties"].items()}


def test_choices_are_dropdowns(schema):
    fields = _fields(schema)
    assert fields["PipelineParams.dtype"]["enum"] == ["auto", "float32", "bfloat16", "float16", "gguf", "q8_0",
                                                      "q4_0", "q4_1"]
    assert fields["PipelineParams.policy"]["enum"] == ["default", "fail", "skip"]
    assert fields["ScaleOutParams.task_runner"]["enum"] == ["default", "thread", "dask"]


def test_no_field_is_a_none_type_switch(schema):
    def nulls(node) -> list:
        if isinstance(node, dict):
            here = [node] if node.get("type") == "null" or "anyOf" in node or "oneOf" in node else []
            return here + [n for v in node.values() for n in nulls(v)]
        return [n for v in node for n in nulls(v)] if isinstance(node, list) else []

    assert not nulls(schema["definitions"]), nulls(schema["definitions"])
    assert all(prop.get("default") is not None for prop in _fields(schema).values())


def test_every_field_and_group_is_described_for_the_user(schema):
    for name, prop in _fields(schema).items():  # a group's heading is its definition's, checked below
        assert "$ref" in prop or (prop.get("description") and prop.get("title")), name
    for name, model in schema["definitions"].items():
        assert model.get("description") and model.get("title"), name
        assert "render" not in model["description"] and "form)" not in model["description"], name


def test_groups_hold_the_rarely_changed_settings(schema):
    top = schema["definitions"]["PipelineParams"]["properties"]
    assert {"tasc_ft", "promotion", "scale_out"} <= set(top)
    assert not {"round_steps", "tokens_per_round", "task_runner", "finetune_deployment"} & set(top)
    tasc_ft = schema["definitions"]["TascFtParams"]
    assert "vocabulary rounds > 0" in tasc_ft["title"] and len(tasc_ft["properties"]) == 8


def test_choices_match_what_the_stages_accept():
    from flows.params import Dtype, Policy, Runner
    from flows.runners import RUNNERS
    from tasc.data.spec import BAD_ROW_POLICIES
    from tasc.models import QUANTISED

    assert set(get_args(Dtype)) == {"auto", "float32", "bfloat16", "float16", *QUANTISED}
    assert get_args(Policy) == ("default", *BAD_ROW_POLICIES)
    assert get_args(Runner) == ("default", *RUNNERS)


def test_a_typo_in_a_choice_fails_before_the_run():
    from pydantic import ValidationError

    from flows.params import PipelineParams

    with pytest.raises(ValidationError, match="dtype"):
        PipelineParams(dtype="bf16")
    with pytest.raises(ValidationError, match="task_runner"):
        PipelineParams(scale_out={"task_runner": "dask "})


def test_flat_names_and_none_keep_their_meaning():
    """The CLI and JSON written for the flat parameters (None: not set) give the grouped ones."""
    from flows.params import PipelineParams

    cli = PipelineParams(spec="snips", vocab_rounds=2, round_steps=None, finetune_max_steps=600,
                         finetune_deployment="tasc-finetune-remote/gpu", task_runner=None, ngram_shards=None,
                         policy=None, register_model=False, min_speedup=0.0)
    nested = PipelineParams.model_validate({"spec": "snips", "tasc_ft": {"vocab_rounds": 2, "finetune_max_steps": 600},
                                            "scale_out": {"finetune_deployment": "tasc-finetune-remote/gpu"},
                                            "promotion": {"register_model": False, "min_speedup": 0.0}})
    assert cli == nested
    assert cli.tasc_ft.round_steps == -1 and cli.scale_out.task_runner == "default" and cli.policy == "default"
    flat = cli.flat()
    assert set(flat) == FLAT_NAMES
    assert flat["round_steps"] is None and flat["task_runner"] is None and flat["ngram_shards"] is None
    assert flat["policy"] is None and flat["vocab_rounds"] == 2 and flat["finetune_deployment"].endswith("/gpu")
    assert PipelineParams().flat()["finetune_deployment"] is None
    # A flat value given next to its group overrides the group's.
    mixed = PipelineParams.model_validate({"tasc_ft": {"vocab_rounds": 1, "eval_prompts": 2}, "vocab_rounds": 3})
    assert (mixed.tasc_ft.vocab_rounds, mixed.tasc_ft.eval_prompts) == (3, 2)


def test_the_default_model_round_trips_through_its_dump():
    from flows.params import PipelineParams

    params = PipelineParams(spec="mbpp", vocab_rounds=1)
    assert PipelineParams.model_validate(params.model_dump()) == params
    assert PipelineParams.model_validate_json(params.model_dump_json()) == params


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


def test_prefect_yaml_parameters_fit_the_form(schema):
    from prefect.utilities.schema_tools.validation import validate

    from flows.params import PipelineParams

    for d in _deployments().values():
        if d["entrypoint"] == "flows/pipeline.py:pipeline":
            validate(d.get("parameters", {}), schema, raise_on_error=True)
            PipelineParams.model_validate(d.get("parameters", {}).get("params", {}))


def test_prefect_yaml_descriptions_say_what_runs_them():
    for name, d in _deployments().items():
        pool = d["work_pool"]["name"]
        text = " ".join(d["description"].split())
        assert f"prefect worker start --pool {pool}" in text, name
        assert "Not Ready" in text, name
        for schedule in d.get("schedules", []):
            assert schedule["timezone"] in text, name


def test_served_deployments_are_described_and_scheduled_in_utc(monkeypatch):
    import flows.serve
    from flows.params import PipelineParams

    served = []
    monkeypatch.setattr(flows.serve, "serve", lambda *deployments: served.extend(deployments))
    flows.serve.serve_pipeline("snips", "0 3 * * *")
    nightly, on_demand = served
    assert [s.schedule.timezone for s in nightly.schedules] == ["UTC"] and not on_demand.schedules
    assert "UTC" in nightly.description and "Custom run" in on_demand.description
    for d in served:
        assert PipelineParams.model_validate(d.parameters["params"]) == PipelineParams(spec="snips")


def test_docs_list_every_parameter():
    text = (ROOT / "docs" / "pipeline.md").read_text()
    assert not [name for name in FLAT_NAMES if f"| `{name}` |" not in text]
