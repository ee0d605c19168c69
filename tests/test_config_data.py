"""Config loading, GSM8K data, prompt order and the cluster-fit check: fast, no Ray/vLLM/DeepSpeed processes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cluster import ClusterTooSmall, bundles, check_fits, exposure_warning
from launch.config import CONFIG_DIR, REFERENCE_PROMPT, ConfigError, dump_config, load_config, parse_overrides
from launch.data import Example, PromptOrder, encode_prompts, load_gsm8k, parse_rows, read_rows, render_prompt

PRESETS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


# ---- entry points and exit codes ----------------------------------------------------------------------------------

def test_exit_codes_come_from_one_table(capsys):
    from launch import exits
    from launch.cluster import ClusterTooSmall
    from launch.supervisor import RestartsExhausted, StopRequested

    def raising(err):
        def job():
            raise err
        return job

    assert exits.run_job(lambda: None) == exits.OK == 0
    assert exits.run_job(raising(ConfigError("model.path: bad"))) == exits.UNUSABLE == 2
    assert exits.run_job(raising(ClusterTooSmall("GPU: need 2"))) == exits.UNUSABLE
    assert exits.run_job(raising(RestartsExhausted("after 3 restarts"))) == exits.FAILED == 1
    assert exits.run_job(raising(StopRequested("SIGTERM: stopped after step 3"))) == exits.STOPPED == 75
    out = capsys.readouterr()
    assert "error: model.path: bad" in out.err and "error: after 3 restarts" in out.err and "SIGTERM" in out.out
    # a bug: its traceback, and the code for which the watching entry point starts the driver again
    assert exits.run_job(raising(ZeroDivisionError("a bug"))) == exits.CRASHED == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: a bug" in err


def test_console_entry_points(tmp_path):
    """`rlvr-train` and `rlvr-eval` ([project.scripts], installed by scripts/setup.sh) are the two entry points."""
    bin_dir = Path(sys.executable).parent
    done = subprocess.run([bin_dir / "rlvr-train", "--config", "toy_tiny_cpu.yaml", "--dry-run"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "path: builtin:tiny-qwen2" in done.stdout, done.stderr
    for cmd in (["rlvr-train", "--config", "toy_tiny_cpu.yaml"], ["rlvr-eval", "--config", "toy_tiny_cpu.yaml"]):
        bad = subprocess.run([bin_dir / cmd[0], *cmd[1:], "rollout.temprature=0.5"], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert bad.returncode == 2 and "rollout.temprature: unknown key" in bad.stderr, (cmd, bad.stderr[-2000:])


# ---- config -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.rollout.n >= 2
    assert load_config(preset, []).model_dump() == cfg.model_dump()


def test_gpu_preset_is_the_reference_job():
    cfg = load_config("gsm8k_qwen2.5_0.5b.yaml")
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B"
    assert cfg.data.prompt_template == REFERENCE_PROMPT and not cfg.data.chat_template
    assert cfg.rollout.n == 16
    assert cfg.rewards["accuracy"] >= 5 * cfg.rewards["format"]
    assert (cfg.learner.num_workers, cfg.rollout.num_engines) == (1, 1)


def test_multinode_preset_inherits_and_scales():
    base, multi = load_config("gsm8k_qwen2.5_0.5b.yaml"), load_config("gsm8k_qwen2.5_0.5b_multinode.yaml")
    assert multi.rollout.tensor_parallel_size > 1 and multi.learner.num_workers > 1
    assert multi.model == base.model and multi.data == base.data


def test_reference_prompt_is_verbatim():
    text = REFERENCE_PROMPT.format(prompt="What is 2+2?")
    assert text.startswith("Assistant solves the user's question step by step before answering.")
    assert "<answer>\n[Answer based on the reasoning above enclosed in <answer> tags]\n</answer>" in text
    assert text.endswith("User: What is 2+2?\nAssistant:")


def test_overrides_are_typed_and_nested():
    cfg = load_config("toy_tiny_cpu.yaml", ["rollout.n=4", "learner.lr=3e-4", "rollout.stop=['</answer>']",
                                            "rewards.format=0.5", "train.stop_after=3"])
    assert cfg.rollout.n == 4 and cfg.learner.lr == pytest.approx(3e-4)
    assert cfg.rollout.stop == ["</answer>"] and cfg.rewards == {"digits": 1.0, "format": 0.5}
    assert cfg.train.stop_after == 3
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("override,needle", [
    ("rollout.nn=3", "rollout.nn: unknown key"),
    ("rollout.n=many", "rollout.n:"),
    ("rollout.n=1", "rollout.n: GRPO needs at least 2"),
    ("learner.zero_stage=4", "learner.zero_stage:"),
    ("rewards.bogus=1.0", "rewards.bogus: unknown reward"),
    ("rewards.format=-1", "rewards.format: weight must be >= 0"),
    ("data.prompt_template=no placeholder", "must contain {prompt}"),
    ("train=5", "train:"),
    ("nokey", "expected key.sub=value"),
    ("rollout.top_p=0.9", "rollout.top_p < 1: vLLM's logprobs are then renormalised"),
    ("grpo.old_logprobs=vllm", "grpo.importance corrects the learner's old policy"),
    ("grpo.importance=tis", "grpo.importance:"),
    ("grpo.importance_cap=1", "grpo.importance_cap:"),
    ("timeouts.generate_s=0", "timeouts.generate_s:"),
])
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("toy_tiny_cpu.yaml", [override])
    assert needle in str(err.value)


def test_engine_window_covers_training_and_eval():
    cfg = load_config("toy_tiny_cpu.yaml", ["data.max_prompt_tokens=100", "rollout.max_tokens=16"])
    assert cfg.max_model_len == 116
    assert load_config("toy_tiny_cpu.yaml", ["data.max_prompt_tokens=100", "rollout.max_tokens=16",
                                             "eval.max_tokens=64"]).max_model_len == 164
    with pytest.raises(ConfigError, match="eval.num_examples"):
        load_config("toy_tiny_cpu.yaml", ["eval.num_examples=0"])


@pytest.mark.parametrize("argv", [["--config=toy_tiny_cpu.yaml"], ["--config", "toy_tiny_cpu.yaml", "rollout.n=4"]])
def test_local_job_anchors_relative_output_dir(argv, monkeypatch, tmp_path):
    from launch.local_job import absolute_output_dir

    monkeypatch.chdir(tmp_path)
    assert absolute_output_dir(argv) == [*argv, f"train.output_dir={tmp_path / 'runs' / 'toy'}"]
    kept = [*argv, "train.output_dir=/elsewhere"]
    assert absolute_output_dir(kept) == kept


def test_missing_preset_and_inherit(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(f"inherit: {CONFIG_DIR / 'toy_tiny_cpu.yaml'}\nrollout:\n  n: 3\n")
    cfg = load_config(child)
    assert cfg.rollout.n == 3 and cfg.rollout.max_tokens == load_config("toy_tiny_cpu.yaml").rollout.max_tokens


def test_dump_round_trips(tmp_path):
    cfg = load_config("mawps_smollm2_cpu.yaml")
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_dry_run_prints_resolved_config(capsys):
    from launch.gsm8k import main

    assert main(["--config", "toy_tiny_cpu.yaml", "--dry-run", "rollout.n=5"]) == 0
    out = capsys.readouterr().out
    assert "n: 5" in out and "builtin:tiny-qwen2" in out
    assert main(["--config", "toy_tiny_cpu.yaml", "--dry-run", "rollout.bad=1"]) == 2
    assert "rollout.bad: unknown key" in capsys.readouterr().err


# ---- data ---------------------------------------------------------------------------------------------------------

def test_offline_gsm8k_sizes():
    train, test = load_gsm8k("train", "offline"), load_gsm8k("test", "offline")
    assert (len(train), len(test)) == (7473, 1319)  # no row of the real data is malformed: 0 skipped
    assert train[0].idx == 0 and train[0].gold == "72"
    assert all(float(ex.gold) == float(ex.gold) for ex in test)
    assert not any("," in ex.gold for ex in train + test)


def test_malformed_rows_are_skipped_counted_and_reported(tmp_path, caplog):
    rows = [{"question": "ok?", "answer": "so #### 1,234"}, {"question": "no marker", "answer": "42"},
            {"question": "text gold", "answer": "#### many"}, {"answer": "#### 3"}, {"question": "", "answer": "#### 1"},
            {"question": "ok2", "answer": "#### -5"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with caplog.at_level("WARNING", logger="rlvr.data"):
        examples = load_gsm8k("train", str(tmp_path))
    assert [(e.idx, e.gold) for e in examples] == [(0, "1234"), (5, "-5")]
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "5 skipped" in msg and "no '####' or non-numeric gold: 2" in msg and "missing question/answer: 3" in msg
    _, skipped = parse_rows(read_rows("train", str(tmp_path))[0])
    assert sum(skipped.values()) == 5


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        read_rows("train", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no train.jsonl"):
        read_rows("train", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        read_rows("validation")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "none"}) + "\n")
    with pytest.raises(ValueError, match="no usable rows"):
        load_gsm8k("test", str(tmp_path))


def test_parquet_source(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"question": "2+2?", "answer": "4 #### 4"}]).to_parquet(str(tmp_path / "test.parquet"))
    assert load_gsm8k("test", str(tmp_path)) == [Example(0, "2+2?", "4")]


def test_prompts_plain_and_chat(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    plain = load_config("gsm8k_qwen2.5_0.5b.yaml").data
    assert render_prompt("Q?", plain) == REFERENCE_PROMPT.replace("{prompt}", "Q?")
    chat = load_config("mawps_smollm2_cpu.yaml").data
    text = render_prompt("How many?", chat, tok)
    assert text.index(chat.system_prompt) < text.index(chat.few_shot[0].answer) < text.index("How many?")
    assert text.endswith("<|im_start|>assistant\n")
    examples = [Example(0, "short", "1"), Example(1, "long " * 400, "2")]
    kept, ids, dropped = encode_prompts(examples, plain.model_copy(update={"max_prompt_tokens": 200}), tok)
    assert [e.idx for e in kept] == [0] and dropped == 1 and len(ids[0]) <= 200


def test_prompt_order_resumes_exactly_across_epochs():
    full = PromptOrder(10, seed=3)
    batches = [full.next(4) for _ in range(6)]  # 24 ids: crosses two epoch boundaries
    assert sorted(batches[0] + batches[1] + batches[2][:2]) == list(range(10))
    part = PromptOrder(10, seed=3)
    for _ in range(2):
        part.next(4)
    resumed = PromptOrder.from_state(json.loads(json.dumps(part.state_dict())))
    assert [resumed.next(4) for _ in range(4)] == batches[2:]
    assert PromptOrder(10, seed=4).next(10) != PromptOrder(10, seed=3).next(10)


# ---- cluster fit --------------------------------------------------------------------------------------------------

def test_bundles_per_device():
    cfg = load_config("gsm8k_qwen2.5_0.5b_multinode.yaml")
    learner, rollout = bundles(cfg, "cuda")
    assert learner == [{"CPU": cfg.learner.cpus_per_worker, "GPU": 1}] * cfg.learner.num_workers
    assert rollout[0]["GPU"] == cfg.rollout.tensor_parallel_size and len(rollout) == cfg.rollout.num_engines
    with pytest.raises(ClusterTooSmall, match="needs GPUs"):
        bundles(cfg, "cpu")


def test_a_cluster_open_beyond_loopback_without_auth_is_named():
    warning = exposure_warning("10.0.0.5:6379", token_auth=False)
    assert "10.0.0.5:6379" in warning and "RAY_AUTH_MODE=token" in warning
    assert exposure_warning("[fd00::5]:6379", token_auth=False) is not None
    assert exposure_warning("10.0.0.5:6379", token_auth=True) is None  # token auth: nothing to say
    for local in ("127.0.0.1:6379", "[::1]:6379", "localhost:6379"):
        assert exposure_warning(local, token_auth=False) is None


def test_check_fits_accepts_a_fitting_cluster():
    check_fits([{"GPU": 1, "CPU": 1}] * 8, [{"GPU": 2, "CPU": 1}] * 8, [{"GPU": 8, "CPU": 64}] * 3)
    check_fits([{"CPU": 1}], [{"CPU": 1}], [{"CPU": 2}])


@pytest.mark.parametrize("learner,rollout,nodes,needle", [
    ([{"GPU": 1}] * 2, [{"GPU": 1}] * 2, [{"GPU": 2, "CPU": 8}], "GPU: need 4 (learner 2 + rollout 2), cluster has 2"),
    ([{"CPU": 1}], [{"CPU": 1}] * 3, [{"CPU": 2}], "CPU: need 4 (learner 1 + rollout 3), cluster has 2"),
    ([{"GPU": 1}], [{"GPU": 8}], [{"GPU": 4}, {"GPU": 4}], "one rollout bundle {'GPU': 8} fits on no single node"),
    ([{"GPU": 3}] * 2, [{"GPU": 2}], [{"GPU": 4}, {"GPU": 4}], "do not pack"),
])
def test_check_fits_names_the_shortfall(learner, rollout, nodes, needle):
    with pytest.raises(ClusterTooSmall) as err:
        check_fits(learner, rollout, nodes)
    assert needle in str(err.value)


def test_an_environment_that_cannot_be_loaded_is_a_config_error_naming_it(tmp_path):
    """env.name that names no file, no class in a module, or a file that fails to import: a ConfigError naming
    env.name and what is wrong, before any actor starts (exit 2)."""
    from launch.actors import check_inputs

    broken = tmp_path / "broken_env.py"
    broken.write_text("class Env:\n    def step(self, row, turns)\n        return None\n")  # no colon: SyntaxError
    for name, says in ((f"{tmp_path}/missing.py:Env", "no file .*missing.py"),
                       ("rollout.env:NoSuchEnv", "has no function 'NoSuchEnv'"),
                       ("no_such_package.envs:Env", "cannot import 'no_such_package.envs'"),
                       (f"{broken}:Env", "importing .*broken_env.py raised SyntaxError")):
        cfg = load_config("toy_tiny_cpu.yaml", [f"env.name={name}"])
        with pytest.raises(ConfigError, match="env.name: .*" + says):
            check_inputs(cfg)
    check_inputs(load_config("toy_tiny_cpu.yaml", ["env.name=python"]))  # the built-in loads
