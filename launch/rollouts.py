"""Where a step's rollout comes from (train.pipeline). `Synchronous`: generated when the step asks, from the
learner's latest weights. `OneStepOff`: the rollout of step k + 1 is generated in a thread while the learner trains
step k, from weights one update behind (the importance correction, grpo.importance, accounts for that). The loop
calls both the same way: `next` for the step's rollout, `weights_out` after the update (under the weight channel's
lock), `settle` before an evaluation, `close` when the attempt ends (after the actors are gone)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from launch.batch import Rollout, StepTimer, check_versions
from launch.weights import WeightChannel


class Synchronous:
    def __init__(self, collect: Callable[[], Rollout], channel: WeightChannel):
        self.collect, self.channel = collect, channel

    def _rollout(self) -> Rollout:
        version = self.channel.version  # what the engines hold as the rollout starts
        ro = self.collect()
        ro.version = version
        return ro

    def next(self, step: int, timer: StepTimer) -> Rollout:
        """Step `step`'s rollout; its samples come from the weights the engines held as it began (or, after an
        engine was replaced mid-rollout, the learner's)."""
        ro = self._rollout()
        for k in ("generate", "reward"):
            timer.add(k, ro.parts.get(k, 0.0))
        check_versions(ro.groups, {ro.version, self.channel.learner_version})
        return ro

    def weights_out(self, step: int, timer: StepTimer) -> dict:
        """Right after the update: the engines get the learner's new weights."""
        with timer("broadcast"):
            return self.channel.sync(step)

    def settle(self, timer: StepTimer) -> None:
        """Before an evaluation: the engines idle, holding the learner's latest weights."""
        if self.channel.version != self.channel.learner_version:
            with timer("broadcast"):
                self.channel.sync(self.channel.learner_version)

    def close(self) -> None:
        pass


class OneStepOff(Synchronous):
    def __init__(self, collect: Callable[[], Rollout], channel: WeightChannel, last: int, stop):
        super().__init__(collect, channel)
        self.last, self.stop = last, stop  # no rollout is started past the last step, or once a stop is requested
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self.pending: Future | None = None  # the next step's rollout, generating while this step trains

    def next(self, step: int, timer: StepTimer) -> Rollout:
        """Step `step`'s rollout (generated while the learner trained the step before, except the first), then the
        engines catch up with the learner and the next step's rollout starts."""
        if self.pending is None:
            ro = super().next(step, timer)
        else:
            with timer("generate"):  # the part of the rollout the learner waited for
                ro, self.pending = self.pending.result(), None
            ro.overlapped = True
            check_versions(ro.groups, {ro.version, self.channel.learner_version})
        if step < self.last and not self.stop.requested:
            self.settle(timer)
            self.pending = self.pool.submit(self._rollout)
        return ro

    def weights_out(self, step: int, timer: StepTimer) -> dict:
        return {}  # between rollouts: the engines finish the one they are generating first (`settle`)

    def settle(self, timer: StepTimer) -> None:
        """The engines finish the next step's rollout, then get the learner's latest weights."""
        if self.pending is not None:
            with timer("generate"):
                self.pending.result()
        super().settle(timer)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
