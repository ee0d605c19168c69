"""Multi-turn trajectories on one engine: the model's turns and the environment's observations, token-exact.

Every trajectory is its own request chain on the engine (vLLM's `LLMEngine.add_request` / `step`, the loop
`LLM.generate` runs itself): when a turn finishes, its environment call goes to the pool (`rollout.env.EnvPool`)
and the engine steps on with the other trajectories' turns; when the reply comes back, the trajectory's next turn
is added at once, its prompt the token ids so far (prompt + model ids + observation ids: nothing is decoded and
encoded again). So a trajectory whose tool answers early never waits for the slowest one.

A trajectory ends when the environment says done, after `env.max_turns` model turns (the last turn is not sent to
the environment), when a turn is cut at its token budget (`finish_reason` "length": the turn's max_tokens, or the
window `max_model_len` holding the prompt and every turn), or when an environment call fails (scored 0).
"""
from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field

from core.types import Sample
from rollout.env import EnvPool

POLL_S = 0.05  # how long the loop waits on environment calls when the engine has nothing to run


@dataclass
class Trajectory:
    prompt: list[int]
    row: dict
    key: str
    ids: list[int] = field(default_factory=list)  # after the prompt: model and environment tokens
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)  # the model's turns as text
    transcript: list[str] = field(default_factory=list)  # turns and observations as text
    info: dict = field(default_factory=dict)
    finish: str = ""

    def add(self, key: str, value: float) -> None:
        self.info[key] = self.info.get(key, 0.0) + value

    def sample(self, version: int) -> Sample:
        env = {"turns": float(len(self.turns)), "env_tokens": float(len(self.mask) - sum(self.mask)), **self.info}
        return Sample(self.prompt, self.ids, self.logprobs, self.finish, version, "".join(self.turns), self.mask, env,
                      "".join(self.transcript))


def generate(engine, pool: EnvPool, prompts: list[list[int]], rows: list[dict], params, n: int, cfg,
             max_model_len: int, tokenize, detokenize, tick, version: int,
             seed: int | None = None) -> list[list[Sample]]:
    """n trajectories per prompt (`params`: the turn's SamplingParams, n and max_tokens set per turn here;
    `tokenize` text → ids for text observations, `detokenize` for the transcript; `tick` counts progress)."""
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    trajs = [[Trajectory(p, row, f"{i}.{j}") for j in range(n)] for i, (p, row) in enumerate(zip(prompts, rows))]
    by_request: dict[str, Trajectory] = {}
    waiting: dict = {}  # environment future → trajectory

    def next_turn(t: Trajectory) -> None:
        room = max_model_len - len(t.prompt) - len(t.ids)
        if room < 1:
            t.finish = "length"
            return
        turn = params.clone()
        turn.n, turn.max_tokens, turn.output_kind = 1, min(params.max_tokens, room), RequestOutputKind.FINAL_ONLY
        if seed is not None:  # each trajectory and turn its own stream, the same in every run
            i, j = map(int, t.key.split("."))
            turn.seed = seed + (i * n + j) * 1009 + len(t.turns)
        request = f"mt-{t.key}-{len(t.turns)}"
        by_request[request] = t
        engine.add_request(request, TokensPrompt(prompt_token_ids=t.prompt + t.ids), turn)

    def turn_done(t: Trajectory, comp) -> None:
        ids = list(comp.token_ids)
        t.ids += ids
        t.mask += [1] * len(ids)
        t.logprobs += [d[tok].logprob for d, tok in zip(comp.logprobs, ids)] if comp.logprobs else [0.0] * len(ids)
        t.turns.append(comp.text)
        t.transcript.append(comp.text)
        if comp.finish_reason != "stop":
            t.finish = "length"
        elif len(t.turns) >= cfg.max_turns:
            t.finish = "stop"
        else:
            waiting[pool.submit(t.row, list(t.turns))] = t

    def reply_done(future, t: Trajectory) -> None:
        reply, cause = pool.result(future)  # raises EnvironmentFailed at env.max_failures in a row
        t.add("env_seconds", time.monotonic() - future.started_at)
        t.add("env_calls", 1.0)
        if reply is None:
            t.finish, t.info["env_failed"] = "stop", 1.0
            return
        for k, v in reply.info.items():
            t.add(k, float(v))
        if reply.reward is not None:
            t.add("env_reward", float(reply.reward))
        if reply.done:
            t.finish = "stop"
            return
        obs = reply.observation if isinstance(reply.observation, list) else tokenize(reply.observation)
        obs = obs[:cfg.max_observation_tokens]
        if len(t.prompt) + len(t.ids) + len(obs) >= max_model_len:  # no room left for a model turn after it
            t.finish = "length"
            return
        t.transcript.append(detokenize(obs))
        t.ids += obs
        t.mask += [0] * len(obs)
        t.logprobs += [0.0] * len(obs)
        next_turn(t)

    try:
        for group in trajs:
            for t in group:
                next_turn(t)
        while engine.has_unfinished_requests() or waiting:
            if engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        turn_done(by_request.pop(request_key(out.request_id, by_request)), out.outputs[0])
            done = [f for f in waiting if f.done()]
            if not done and waiting and not engine.has_unfinished_requests():
                done = list(concurrent.futures.wait(list(waiting), POLL_S,
                                                    concurrent.futures.FIRST_COMPLETED).done)
                tick()  # waiting on the environment is progress: the stall watch must not take it for a hang
            for future in done:
                reply_done(future, waiting.pop(future))
    except BaseException:
        if by_request:
            engine.abort_request(list(by_request))
        for future in waiting:
            future.cancel()
        raise
    return [[t.sample(version) for t in group] for group in trajs]


def request_key(request_id: str, known: dict) -> str:
    """The id a request was added under (vLLM may report it with a suffix of its own)."""
    if request_id in known:
        return request_id
    base = request_id.rsplit("-", 1)[0]
    if base in known:
        return base
    raise KeyError(f"the engine returned request {request_id!r}, which this loop did not add")
