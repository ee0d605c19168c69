"""Environments the multi-turn tests name by path (`tests/envs.py:Name`): scripted, and failing in each way."""
from __future__ import annotations

import os
import signal
import time

from rollout.env import Reply


class Scripted:
    """Answers turn k with the text `obs` (k counted from 1), or the token ids `ids`; done after `done_after`
    turns (never when 0). Gives reward `reward` when done, and counts its calls as `scripted_calls`."""

    def __init__(self, obs: str = " [obs {k}] ", ids: list[int] | None = None, done_after: int = 0,
                 reward: float | None = None):
        self.obs, self.ids, self.done_after, self.reward = obs, ids, done_after, reward

    def step(self, row, turns):
        k = len(turns)
        if self.done_after and k >= self.done_after:
            return Reply(done=True, reward=self.reward, info={"scripted_calls": 1})
        return Reply(list(self.ids) if self.ids is not None else self.obs.format(k=k, **row),
                     info={"scripted_calls": 1})


class Raises:
    def step(self, row, turns):
        raise KeyError("the environment's own bug")


class Hangs:
    def step(self, row, turns):
        time.sleep(3600)


class KillsItself:
    def step(self, row, turns):
        os.kill(os.getpid(), signal.SIGKILL)


class WrongReply:
    def step(self, row, turns):
        return "not a Reply"


class FailsOnOdd:
    """Fails on rows whose `q` is odd, answers the others (failures that are not in a row)."""

    def step(self, row, turns):
        if int(row["q"]) % 2:
            raise ValueError(f"odd row {row['q']}")
        return Reply(done=True)
