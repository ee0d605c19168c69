"""How a micro-batch's samples become the model's input rows (`learner.layout`). Pure tensor code.

padded: a row per sample: the prompt left-padded, the completion right-padded, so every completion starts at one
        column. A group's prompt is computed once per sample.
shared: a row per distinct prompt: the prompt once, then each of its samples' completions one after another. A
        4D mask lets a completion's tokens attend to the prompt and to their own completion's earlier tokens only,
        and their positions continue from the prompt's end, so every token sees exactly what it sees in a row of its
        own: the same logprobs, and a backward pass that flows into the prompt once with its samples' gradients
        summed. No padding inside a row; rows are padded to the longest.
packed: as shared, with all of the micro-batch's prompts in one row: no padding at all, but the attention of that
        row spans the whole micro-batch (the mask is dense: SDPA still computes the masked-out pairs).

Whatever the layout, `predictors[i, t]` is the flat position (row × L + column) whose output predicts completion
token t of sample i (the prompt's last token for t = 0), and `targets[i, t]` is that token.
"""
from __future__ import annotations

import torch

LAYOUTS = ("padded", "shared", "packed")
MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take an arbitrary 4D mask


def rows(samples: list, layout: str, pad_id: int, attention: str = "sdpa") -> dict[str, torch.Tensor]:
    """input_ids/position_ids [R, L], attention_mask ([R, L] for padded; [R, 1, L, L] otherwise: bool for SDPA,
    additive float for eager), predictors/targets [B, C]."""
    if layout not in LAYOUTS:
        raise ValueError(f"learner.layout must be one of {LAYOUTS}, got {layout!r}")
    B, C = len(samples), max(len(s.completion_ids) for s in samples)
    targets = torch.full((B, C), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        targets[i, :len(s.completion_ids)] = torch.tensor(s.completion_ids, dtype=torch.long)
    if layout == "padded":
        return _padded(samples, pad_id, C) | {"targets": targets}
    units = list(by_prompt(samples).items())
    row_units = [units] if layout == "packed" else [[u] for u in units]
    L = max(sum(len(p) + sum(len(samples[i].completion_ids) for i in members) for p, members in row)
            for row in row_units)
    R = len(row_units)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    allowed = torch.eye(L, dtype=torch.bool).repeat(R, 1, 1)  # padding attends to itself: no all-masked rows
    predictors = torch.zeros((B, C), dtype=torch.long)
    for r, row in enumerate(row_units):
        at = 0
        for prompt, members in row:
            p = len(prompt)
            ids[r, at:at + p] = torch.tensor(prompt, dtype=torch.long)
            pos[r, at:at + p] = torch.arange(p)
            allowed[r, at:at + p, at:at + p] = torch.ones(p, p, dtype=torch.bool).tril()
            at += p
            prompt_end = at
            for i in members:
                c = len(samples[i].completion_ids)
                ids[r, at:at + c] = targets[i, :c]
                pos[r, at:at + c] = torch.arange(p, p + c)
                allowed[r, at:at + c, prompt_end - p:prompt_end] = True
                allowed[r, at:at + c, at:at + c] = torch.ones(c, c, dtype=torch.bool).tril()
                # token 0 is predicted by the prompt's last position, token t by the completion's token t-1
                predictors[i] = r * L + at - 1
                predictors[i, 0] = r * L + prompt_end - 1
                predictors[i, 1:c] = r * L + at + torch.arange(c - 1)
                at += c
    mask = allowed.unsqueeze(1)
    if attention == "eager":  # eager attention adds the mask to its scores
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "predictors": predictors,
            "targets": targets}


def by_prompt(samples: list) -> dict[tuple, list[int]]:
    """The distinct prompts, in order of first appearance → the indices of their samples."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.prompt_ids), []).append(i)
    return groups


def _padded(samples: list, pad_id: int, C: int) -> dict[str, torch.Tensor]:
    P = max(len(s.prompt_ids) for s in samples)
    B, L = len(samples), P + C
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        ids[i, P - p:P] = torch.tensor(s.prompt_ids, dtype=torch.long)
        ids[i, P:P + c] = torch.tensor(s.completion_ids, dtype=torch.long)
        attn[i, P - p:P + c] = 1
    predictors = torch.arange(B)[:, None] * L + P - 1 + torch.arange(C)[None, :]
    return {"input_ids": ids, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0), "attention_mask": attn,
            "predictors": predictors}


# `learner.layout: auto` per device, by measurement (bench/learner.py; docs/gpu.md for the GPU's)
AUTO = {"cpu": "shared", "cuda": "shared"}


def choose(asked: str, device: str, attention: str) -> tuple[str, str]:
    """The layout the learner uses, and why, when it is not the one asked for (`learner.layout`)."""
    layout = AUTO[device] if asked == "auto" else asked
    if layout != "padded" and attention not in MASKED_ATTENTION:
        return "padded", (f"learner.layout {layout} needs an attention implementation that takes a 4D mask "
                          f"({', '.join(MASKED_ATTENTION)}); this model's is {attention}, so each sample gets a row "
                          f"of its own (padded) and its prompt is computed once per sample")
    return layout, ""
