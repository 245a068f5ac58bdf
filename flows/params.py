"""The pipeline's parameters, shaped for the run form the Prefect UI builds from them.

Prefect renders the JSON schema of :class:`PipelineParams` as the "Custom run" form, so the
types are chosen for that form: choices are ``Literal`` (a dropdown, and a typo fails before
the run starts), and no field is ``X | None`` (the form would show a type switch set to
"None"). A value that means "not set" is a plain default instead: ``default`` in a dropdown,
``-1`` or ``0`` for a number, an empty string for a name. The settings that only some runs
touch sit in nested groups (TASC-ft, registry and promotion, scale-out), so the top of the
form holds what most runs change.

Class docstrings and field descriptions are what the form shows, so they are written for the
person filling it in; notes for developers are comments. Callers written for the flat
parameters keep working: the group fields are also accepted at the top level (the CLI, JSON
such as ``{"spec": "snips", "vocab_rounds": 2}`` given to ``prefect deployment run``), and
``None`` for the five formerly optional fields means their default. :meth:`PipelineParams.flat`
gives the flat form with ``None`` for "not set", which keys runs and names MLflow params as
before the groups existed, so a scheduled run still finds the runs made before them.
"""

# No `from __future__ import annotations`: Prefect reads the real types of the flow's parameter.

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasc.ft.select import TOKENS_PER_ROUND
from tasc.models import DEFAULT_MODEL

# Kept equal to tasc.models.QUANTISED, tasc.data.spec.BAD_ROW_POLICIES and flows.runners.RUNNERS
# (tests/test_run_form.py checks).
Dtype = Literal["auto", "float32", "bfloat16", "float16", "gguf", "q8_0", "q4_0", "q4_1"]
Policy = Literal["default", "fail", "skip"]
Runner = Literal["default", "thread", "dask"]

# The formerly optional fields and the value that now means "not set" (None before).
UNSET = {"policy": "default", "round_steps": -1, "task_runner": "default", "ngram_shards": 0,
         "finetune_deployment": ""}


# A group's heading in the form is its class's title and docstring (Prefect keeps no field-level
# title or description beside a schema reference).
class _Group(BaseModel):
    """A group of the form; ``None`` for a formerly optional field means its default."""

    @model_validator(mode="before")
    @classmethod
    def _none_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in UNSET)}
        return data


class TascFtParams(_Group):
    """TASC-ft grows the model's vocabulary with the task's frequent strings and fine-tunes it.
    Off while "Vocabulary rounds" is 0: the other settings of this group matter only when it
    is above 0."""

    model_config = ConfigDict(title="TASC-ft (only when vocabulary rounds > 0)")

    vocab_rounds: int = Field(0, ge=0, title="Vocabulary rounds",
                              description="Vocabulary-expansion rounds; 0 turns TASC-ft off and the run speeds up "
                                          "the base model with TASC-spec only.")
    round_steps: int = Field(-1, ge=-1, title="Fine-tuning steps per round",
                             description="Fine-tuning steps inside each round. -1: the device's default; "
                                         "0: expand the vocabulary without fine-tuning.")
    finetune_max_steps: int = Field(0, ge=0, title="Fine-tuning steps after the rounds",
                                    description="Further fine-tuning of the chosen round's model (0: none). "
                                                "A re-run resumes from its last checkpoint.")
    tokens_per_round: int = Field(TOKENS_PER_ROUND, ge=1, title="New tokens per round",
                                  description="The most new tokens one round adds.")
    vocab_min_count: int = Field(5, ge=1, title="Minimum occurrences",
                                 description="How often a string must occur in the task's data to become a token.")
    eval_prompts: int = Field(8, ge=0, title="Validation prompts per round",
                              description="Prompts generated after each round to measure the task metric.")
    min_token_gain: float = Field(0.02, title="Minimum token saving",
                                  description="Rounds stop when one saves less than this fraction of tokens.")
    ft_methods: str = Field("greedy,tasc-ft,tasc-ft+spec", title="Benchmark methods with TASC-ft",
                            description="Comma-separated; used instead of \"Benchmark methods\" when TASC-ft runs.")


class PromotionParams(_Group):
    """Whether the run's model is registered in MLflow, and when it replaces the champion
    (the version that `models:/tasc-<task>@champion` loads)."""

    model_config = ConfigDict(title="Registry and promotion")

    register_model: bool = Field(True, title="Register and promote",
                                 description="Register the model in MLflow as the challenger and run the "
                                             "promotion rule.")
    min_speedup: float = Field(1.05, title="Minimum speedup",
                               description="The challenger must reach this many times the champion's chars/s.")
    max_metric_drop: float = Field(0.01, title="Maximum metric drop",
                                   description="The task metric may drop at most this much (absolute) against the "
                                               "champion; also bounds the choice of the TASC-ft round.")
    metric_floor: float = Field(0.0, title="Metric floor for a first champion",
                                description="The lowest task metric the first version needs to become champion "
                                            "(0: no floor).")


class ScaleOutParams(_Group):
    """Where the work runs. On one machine leave these as they are; the defaults follow the
    worker's environment (TASC_TASK_RUNNER, TASC_NGRAM_SHARDS, TASC_FINETUNE_DEPLOYMENT)."""

    model_config = ConfigDict(title="Scale-out (where the work runs)")

    task_runner: Runner = Field("default", title="Task runner",
                                description="How the n-gram shards run: thread (in the flow's process) or dask. "
                                            "default: the worker's TASC_TASK_RUNNER, else thread.")
    ngram_shards: int = Field(0, ge=0, title="N-gram shards",
                              description="Pieces of the corpus counted as separate tasks. 0: the worker's "
                                          "TASC_NGRAM_SHARDS, else 1 (thread) or one per Dask worker.")
    finetune_deployment: str = Field("", title="Fine-tune on deployment",
                                     description="Run the fine-tuning after the TASC-ft rounds on this Prefect "
                                                 "deployment, e.g. tasc-finetune-remote/gpu (a GPU pool). Leave "
                                                 "empty for the worker's TASC_FINETUNE_DEPLOYMENT, else this process.")


GROUPS: dict[str, type[_Group]] = {"tasc_ft": TascFtParams, "promotion": PromotionParams, "scale_out": ScaleOutParams}


class PipelineParams(BaseModel):
    """Settings of one run: which task and model to speed up, how to benchmark it, and whether
    the result may become the task's champion in MLflow. The groups below the first fields are
    for TASC-ft, the promotion rule and scale-out; most runs leave them as they are."""

    model_config = ConfigDict(title="Pipeline run")

    spec: str = Field("snips", title="Task",
                      description="A shipped task (snips, mbpp, squad, nq-open, prompt-completion) or the path of "
                                  "a task YAML file.")
    model: str = Field(DEFAULT_MODEL, title="Model",
                       description="The model to speed up: a short name, a local folder or a Hugging Face id.")
    methods: str = Field("greedy,pld,tasc-spec,tasc-spec-ref", title="Benchmark methods",
                         description="Decoding methods to benchmark side by side, comma-separated.")
    limit: int = Field(8, ge=1, title="Benchmark prompts", description="Test prompts to benchmark.")
    harvest_limit: int = Field(32, ge=0, title="Harvest prompts",
                               description="Train prompts whose model outputs feed the draft (0: the reference "
                                           "answers only).")
    dtype: Dtype = Field("auto", title="Weights",
                         description="Weight format for the benchmark and the registered model. auto: on a CPU the "
                                     "GGUF file's own blocks, else q8_0; bfloat16 is not lossless.")
    max_n: int = Field(8, ge=1, le=16, title="Longest n-gram", description="The longest n-gram counted.")
    policy: Policy = Field("default", title="Bad rows",
                           description="What to do with malformed data rows: fail the run or skip them. "
                                       "default: the task's own on_bad_rows.")
    force: bool = Field(False, title="Run even if unchanged",
                        description="Run even when the data and these settings are unchanged since a finished run "
                                    "(otherwise such a run does nothing).")
    tasc_ft: TascFtParams = TascFtParams()
    promotion: PromotionParams = PromotionParams()
    scale_out: ScaleOutParams = ScaleOutParams()

    @model_validator(mode="before")
    @classmethod
    def _accept_flat_names(cls, data: Any) -> Any:
        """Move group fields given at the top level (the flat form) into their groups."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (v is None and k in UNSET)}
        for group, model in GROUPS.items():
            flat = {k: data.pop(k) for k in list(data) if k in model.model_fields}
            if flat:
                nested = data.get(group) or {}
                if isinstance(nested, BaseModel):
                    nested = nested.model_dump()
                data[group] = {**nested, **flat}
        return data

    def flat(self) -> dict:
        """All settings under their flat names, ``None`` where a setting is not set."""
        out = self.model_dump(exclude=set(GROUPS))
        for group in GROUPS:
            out.update(getattr(self, group).model_dump())
        return {k: (None if k in UNSET and v == UNSET[k] else v) for k, v in out.items()}
