"""train.py: config overrides, schedule, optimizer groups, torchrun equivalence, exact resume, the demo."""

import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import demo
import train
from llama import Llama
from retriever import ColBERT

ROOT = Path(__file__).resolve().parents[1]
# a small knowledge base and short runs: every test here takes seconds; fp32 (autocast "auto" is bf16 on
# CPUs with AVX512-BF16), so that comparisons between runs are exact
SMALL = ["--demo_diseases=100", "--compare=()", "--curriculum=0.0", "--batch_size=8", "--micro_batch_size=2",
         "--warmup_steps=2", "--log_every=1", "--jmlr.num_sampled=4", "--eval_helpfulness=0", "--autocast=off"]


def run_train(args: list[str], nproc: int = 1, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """train.py in a fresh process (python, or torchrun with nproc ranks on gloo), one thread per rank."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(launcher + [str(ROOT / "train.py")] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_params(out_dir: Path) -> dict[str, torch.Tensor]:
    root = out_dir / "checkpoints"
    return load_file(root / (root / "latest").read_text().strip() / "trainable.safetensors")


def test_overrides_are_typed_and_unknown_keys_refused():
    cfg = train.parse_args(["--steps=7", "--lr_llm=1e-4", "--jmlr.tau=2", "--out_dir=runs/x", "--compare=('rag',)"])
    assert (cfg.steps, cfg.lr_llm, cfg.jmlr.tau, cfg.out_dir, cfg.compare) == (7, 1e-4, 2.0, "runs/x", ("rag",))
    assert cfg.option_head and cfg.jmlr.top_k == 2                      # the demo preset's values
    with pytest.raises(ValueError, match="unknown setting 'stepz'"):
        train.parse_args(["--stepz=3"])
    with pytest.raises(ValueError, match="steps=.*expected int"):
        train.parse_args(["--steps=1.5"])
    with pytest.raises(ValueError, match="unknown setting jmlr.'taux'"):
        train.parse_args(["--jmlr.taux=1"])
    with pytest.raises(ValueError, match="objective='foo'"):
        train.parse_args(["--jmlr.objective=foo"])
    data = ["--train_file=qa.jsonl"]
    assert train.parse_args(["--preset=llama2-13b"] + data).fsdp
    assert train.parse_args(["--preset=llama2-7b"] + data).use_lora
    with pytest.raises(ValueError, match="give --train_file"):
        train.parse_args(["--preset=llama2-7b"])


@pytest.mark.lr_schedule
def test_lr_schedule_warmup_then_cosine_to_the_floor():
    cfg = train.TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    f = [train.lr_factor(step, cfg) for step in range(120)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0), \
        f"warmup: steps 0, 4, 9 of 10 must give (step + 1) / 10 = 0.1, 0.5, 1.0; got {f[0]}, {f[4]}, {f[9]}"
    assert f[10] == pytest.approx(1.0), f"the decay starts at the peak: step 10 gives {f[10]}, expected 1.0"
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5), f"half-way through the decay cos(pi/2) = 0: step 60 gives " \
        f"{f[60]}, expected 0.1 + 0.9 * 0.5"
    assert f[35] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))), f"a quarter of the way: {f[35]}"
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1), \
        f"the last step and any after it stay at min_lr_ratio 0.1: got {f[110]}, {f[119]}"
    assert all(a >= b for a, b in itertools.pairwise(f[10:])), "after warmup the factor must never rise"
    no_warmup = train.TrainConfig(steps=5, warmup_steps=0, min_lr_ratio=0.0)
    assert train.lr_factor(0, no_warmup) == pytest.approx(1.0), "without warmup the first step is at the peak"
    assert train.lr_factor(3, train.TrainConfig(steps=3, warmup_steps=3)) == pytest.approx(1.0), \
        "warmup_steps == steps: the decay starts at the peak, with no steps to decay over (and no ZeroDivisionError)"


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    paths = demo.make_demo(out / "data", seed=0, n_diseases=100)
    return out, paths


def test_demo_knowledge_base_needs_retrieval(small_demo):
    _, paths = small_demo
    corpus = {json.loads(line)["id"]: json.loads(line)["content"] for line in open(paths["corpus"])}
    test = [json.loads(line) for line in open(paths["test_file"])]
    train_q = [json.loads(line) for line in open(paths["train_file"])]
    cands = {json.loads(line)["id"]: json.loads(line)["doc_ids"] for line in open(paths["candidates"])}
    train_diseases = {q["question"].split()[-2] for q in train_q}
    for q in test:
        assert q["question"].split()[-2] not in train_diseases, "a test disease appears in training questions"
        assert q["options"][q["answer"]] in corpus[q["gold_doc"]], "the gold document must state the answer"
        assert q["gold_doc"] in cands[q["id"]] and len(cands[q["id"]]) == 16
        assert len(set(q["options"].values())) == 4
    assert len(test) == 40 * 4 * 3


def test_colbert_lengths_reach_the_retriever(small_demo):
    _, paths = small_demo
    cfg = train.parse_args([f"--{k}={v}" for k, v in paths.items()] + ["--query_maxlen=24", "--doc_maxlen=20"])
    retriever = train.build_model(cfg, torch.device("cpu")).retriever
    assert (retriever.cfg.query_maxlen, retriever.cfg.doc_maxlen) == (24, 20)
    assert train.parse_args(["--preset=llama2-7b", "--dry_run=True"]).query_maxlen == 512   # the official setting


def test_optimizer_groups_apply_each_models_learning_rate(small_demo):
    """The official code's group prefix never matched; here one SGD-like Adam step moves each
    model's parameters by its own learning rate (Adam's first step is lr * sign(grad))."""
    out, paths = small_demo
    cfg = train.parse_args([f"--{k}={v}" for k, v in paths.items()] + ["--lr_llm=1e-3", "--lr_retriever=1e-2",
                                                                        "--compare=()", "--curriculum=0.0"])
    model = train.build_model(cfg, torch.device("cpu"))
    opt = train.make_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            lr = 1e-2 if n.startswith("retriever.") else 1e-3
            assert torch.allclose(before[n] - p.detach(), torch.full_like(p, lr), rtol=1e-3), n
    assert not model.llm.embed_tokens.weight.requires_grad and not model.retriever.word_embeddings.weight.requires_grad


def perturbed_demo(tmp_path: Path):
    """The small demo, with the retriever's zero-initialized residual outputs made non-zero: a zero
    output layer gives its attention weights an exactly-zero gradient, and Adam turns the rounding
    noise of a zero gradient into +-lr steps, which no equivalence test can pass."""
    paths = demo.make_demo(tmp_path / "demo-data-seed0", seed=0, n_diseases=100)
    model = ColBERT.from_pretrained(paths["retriever"])
    with torch.no_grad():
        for layer in model.layers:
            layer.attn_out.weight.normal_(std=0.05), layer.ffn_out.weight.normal_(std=0.05)
    model.save_pretrained(paths["retriever"])


def assert_same(one: dict, other: dict):
    assert one.keys() == other.keys()
    assert any(n.startswith("retriever.") for n in one) and any(n.startswith("llm.") for n in one)
    for n in one:
        if n.endswith("key.bias"):   # softmax ignores a per-query constant: its gradient is rounding noise
            continue
        assert (one[n] - other[n]).abs().max() <= 1e-6, n


def test_two_ranks_equal_one_process_and_bf16_follows_fp32(tmp_path):
    """torchrun with 2 gloo ranks (2 accumulation steps each) == 1 process (4 accumulation steps).
    Without a candidate file every rank takes part in the index build and the search (no rank waits
    at a barrier for another's hours of work), and the file is the one a single process writes.
    And --autocast=bf16 (bf16 autocast on any device, what a GPU run does) follows the fp32 losses
    within bf16's precision."""
    perturbed_demo(tmp_path)
    args = SMALL + ["--steps=3", f"--out_dir={tmp_path}/PLACE", f"--candidates={tmp_path}/PLACE.jsonl",
                    "--eval_helpfulness=24"]
    run_train([a.replace("PLACE", "one") for a in args])
    run_train([a.replace("PLACE", "two") for a in args], nproc=2)
    assert_same(final_params(tmp_path / "one"), final_params(tmp_path / "two"))
    one, two = (tmp_path / "one.jsonl").read_bytes(), (tmp_path / "two.jsonl").read_bytes()
    assert one == two and one.count(b"\n") > 400, "2 ranks must write the candidate file of 1 process"
    run_train([a.replace("PLACE", "bf16") for a in args] + ["--autocast=bf16"])
    losses = {run: [r["loss"] for r in map(json.loads, open(tmp_path / run / "log.jsonl")) if "loss" in r]
              for run in ("one", "bf16")}
    assert len(losses["one"]) == 3 and losses["one"] != losses["bf16"], "bf16 must actually run"
    for a, b in zip(losses["one"], losses["bf16"]):
        assert abs(a - b) <= 0.03 * abs(a), f"bf16 losses {losses['bf16']} vs fp32 {losses['one']}"


def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    """FSDP2 on 2 gloo ranks == 1 process. A small max_pass_tokens cuts the no-gradient passes into
    chunks whose number differs between the ranks' questions: each pass gathers the sharded
    weights, so without equal pass counts (jmlr.JMLR.equal_passes) a rank would wait forever."""
    perturbed_demo(tmp_path)
    args = SMALL + ["--steps=3", f"--out_dir={tmp_path}/PLACE", "--jmlr.max_pass_tokens=150", "--eval_helpfulness=24"]
    run_train([a.replace("PLACE", "one") for a in args])
    run_train([a.replace("PLACE", "fsdp") for a in args] + ["--fsdp=True"], nproc=2)
    assert_same(final_params(tmp_path / "one"), final_params(tmp_path / "fsdp"))
    # the exported HF checkpoints hold whole tensors, loadable as usual
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_000003"
    assert Llama.from_pretrained(ckpt / "llm").layers[0].self_attn.q_proj.weight.shape == (64, 64)
    ColBERT.from_pretrained(ckpt / "retriever")


def test_collectives_receive_their_tensors_on_the_process_groups_device(monkeypatch, small_demo):
    """NCCL has no CPU backend: a CPU tensor reaching an all-reduce on GPUs ends the run. Every
    collective of train.py must get its tensor on the device it is given, the process group's
    (setup_distributed's). Here a stand-in all_reduce records what reaches it; a device other than
    the default one (meta) shows that nothing is created on the CPU by default along the way."""
    out, paths = small_demo
    cfg = train.parse_args([f"--{k}={v}" for k, v in paths.items()] + ["--compare=()", "--curriculum=0.0"])
    _, val, _ = train.prepare(cfg, rank=0)
    model = train.build_model(cfg, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.dist, "all_reduce", lambda t, op=None: seen.append(t.device))
    meta = torch.device("meta")
    for collective in (lambda: train.most_over_ranks(3, meta),
                       lambda: train.mean_over_ranks([{"loss": 1.0}], ("loss",), meta)):
        with pytest.raises(RuntimeError, match="meta"):       # meta tensors hold no values to read back
            collective()
        assert seen.pop() == meta
    # validation: its sums live where the model does
    train.evaluate(model, val[:4], cfg, rank=0, world=1)
    assert seen == [model.llm.embed_tokens.weight.device]


def test_resume_is_bitwise_and_survives_sigkill(tmp_path):
    args = SMALL + ["--steps=6", "--save_every=1", "--keep_last=2"]
    run_train(args + [f"--out_dir={tmp_path}/straight"])
    assert sorted(d.name for d in (tmp_path / "straight" / "checkpoints").glob("step_*")) == \
        ["step_000005", "step_000006"], "keep_last=2 keeps the newest two"
    # 1. 4 steps, resume, 2 more steps == 6 steps (a run that saved at 2, 4, 6, rolled back to 4)
    run_train(args + [f"--out_dir={tmp_path}/resumed", "--save_every=2"])
    ckpts = tmp_path / "resumed" / "checkpoints"
    (ckpts / "latest").write_text("step_000004")
    shutil.rmtree(ckpts / "step_000006")
    run_train(args + [f"--out_dir={tmp_path}/resumed", "--save_every=2", "--resume=True"])
    straight, resumed = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    for n in straight:
        assert torch.equal(straight[n], resumed[n]), f"{n} differs after resume"
    # 2. SIGKILL at a random moment after the first checkpoint, then --resume
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py")] + args + [f"--out_dir={killed}", "--steps=40"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "latest").is_file() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = (killed / "checkpoints" / "latest").read_text().strip()
    assert (killed / "checkpoints" / last / "trainable.safetensors").is_file()
    out = run_train(args + [f"--out_dir={killed}", "--steps=40", "--resume=True"])
    assert f"resumed from {last}" in out.stdout
    run_train(args + [f"--out_dir={tmp_path}/straight40", "--steps=40"])
    a, b = final_params(killed), final_params(tmp_path / "straight40")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_refuses_an_input_file_edited_in_place(tmp_path):
    """The same path with other contents is other data: a resumed run refuses it, naming the file,
    unless the change is named in resume_changes."""
    args = SMALL + [f"--out_dir={tmp_path}/run", "--resume_changes=('steps',)"]
    run_train(args + ["--steps=2"])
    candidates = tmp_path / "demo-data-seed0" / "candidates.jsonl"
    first, *rest = candidates.read_text().splitlines(keepends=True)
    record = json.loads(first)
    record["doc_ids"][:2] = record["doc_ids"][1::-1]                       # still valid, but other lists
    candidates.write_text(json.dumps(record) + "\n" + "".join(rest))
    proc = run_train(args + ["--steps=3", "--resume=True"], check=False)
    assert proc.returncode == 2 and f"{candidates}: its contents changed" in proc.stderr, proc.stderr[-2000:]
    assert "--resume_changes=('candidates',)" in proc.stderr
    proc = run_train(SMALL + [f"--out_dir={tmp_path}/run", "--steps=3", "--resume=True",
                              "--resume_changes=('steps', 'candidates')"])
    assert "resumed from step_000002" in proc.stdout


def test_short_demo_raises_recall_above_the_frozen_retriever(tmp_path):
    """The built-in demo, shortened: 400 curriculum steps teach the LLM to read, then 150 JMLR steps
    must lift the retriever's recall@1 on held-out diseases well above the frozen retriever's."""
    run_train(["--compare=('jmlr',)", "--steps=550", "--curriculum=0.73", "--log_every=50", "--eval_helpfulness=0",
               f"--out_dir={tmp_path}/run"])
    jmlr = json.loads((tmp_path / "run" / "results.json").read_text())["jmlr"]["test"]
    cfg = train.parse_args([f"--out_dir={tmp_path}/run", "--compare=()", "--jmlr.objective=rag", "--eval_helpfulness=0"])
    _, _, test = train.prepare(cfg, rank=0)
    frozen = train.evaluate(train.build_model(cfg, torch.device("cpu")), test, cfg, rank=0, world=1)
    print(f"recall@1 on held-out diseases: frozen {frozen['recall@1']:.3f}, after JMLR {jmlr['recall@1']:.3f}")
    assert jmlr["recall@1"] > frozen["recall@1"] + 0.15


def test_non_finite_step_is_skipped_with_a_warning(tmp_path):
    """A learning rate of 1e30 makes the second forward pass overflow: that step and the following
    ones must be skipped with a warning, never written into the parameters."""
    proc = run_train(SMALL + ["--steps=3", "--lr_llm=1e30", f"--out_dir={tmp_path}/run"])
    assert "non-finite gradient norm" in proc.stderr and "step skipped" in proc.stderr
    assert all(torch.isfinite(t).all() for t in final_params(tmp_path / "run").values())


def test_a_new_run_never_touches_an_earlier_runs_directory(tmp_path):
    """A second run in a used out_dir (keep_last would count the first run's checkpoints and delete
    the new one) is refused before any work, the earlier run left as it was; so is --resume=True
    where a run logged steps but saved no checkpoint. Settings are checked before any work too."""
    earlier = tmp_path / "run" / "checkpoints" / "step_000006"
    earlier.mkdir(parents=True)
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 6}\n')
    proc = run_train(SMALL + ["--steps=3", f"--out_dir={tmp_path}/run"], check=False)
    assert proc.returncode != 0 and "holds an earlier run" in proc.stderr and "--resume=True" in proc.stderr
    assert earlier.is_dir() and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "log.jsonl"]
    shutil.rmtree(earlier)
    proc = run_train(SMALL + ["--steps=3", f"--out_dir={tmp_path}/run", "--resume=True"], check=False)
    assert proc.returncode != 0 and "saved no checkpoint" in proc.stderr
    for bad, message in (("--lr_llm=1e999", "lr_llm=inf"), ("--lr_retriever=-1e-4", "lr_retriever=-0.0001"),
                         ("--grad_clip=0.0", "grad_clip=0.0"), ("--keep_last=-1", "keep_last=-1"),
                         ("--jmlr.max_doc_tokens=0", "jmlr.max_doc_tokens=0"), ("--jmlr.tau=0.0", "jmlr.tau=0.0"),
                         ("--compare=('jmlr', 'rga')", "compare=")):
        with pytest.raises(ValueError, match=re.escape(message)):
            train.parse_args(SMALL + [bad])
