"""checkpoints.py: train.py's checkpoints: atomic directories, HF-format exports, exact resume.

out_dir/checkpoints/step_NNNNNN/ holds llm/ and retriever/ in their HF formats (LoRA merged, loadable
by llama.py, retriever.py and transformers), option_head.safetensors, and what an exact resume
needs: trainable.safetensors (every trainable parameter, unmerged), optimizer.pt (loaded with
weights_only=True), rng_RANK.pt and state.json (the step, which fixes the data position, and the
config). A checkpoint is written as step_NNNNNN.tmp and renamed when complete, so a crash during a
save leaves the previous one intact; `latest` names the newest. Under FSDP2 the full state dict is
gathered (a collective: every rank calls save_checkpoint) and rank 0 writes.
"""

import functools
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import retriever as rt
from colbert_index import file_sha256
from jmlr import JMLR, OptionHead
from llama import (Llama, add_lora, atomic_write, check_keys_and_shapes, check_weight_values, open_safetensors,
                   read_headers, read_json)

if TYPE_CHECKING:                     # train.py imports this file; the config class is only named here
    from train import TrainConfig


def plain_modules(model: JMLR, state: dict, cfg: "TrainConfig") -> tuple[Llama, rt.ColBERT | None]:
    """The LLM and the retriever as ordinary modules holding whole tensors, for HF-format exports:
    the model's own under DDP or one process; under FSDP2 copies built on the meta device and
    filled from the gathered full state dict (sharded parameters cannot be saved directly)."""
    llm = model.llm.llm if isinstance(model.llm, OptionHead) else model.llm
    from torch.distributed.tensor import DTensor
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return llm, model.retriever
    prefix = "llm.llm." if isinstance(model.llm, OptionHead) else "llm."
    with torch.device("meta"):
        plain = Llama(llm.cfg)
        if cfg.use_lora:
            add_lora(plain, cfg.lora)
    plain.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, assign=True)
    if plain.cfg.tie_word_embeddings:
        plain.lm_head.weight = plain.embed_tokens.weight
    retriever = None
    if model.retriever is not None:
        r = model.retriever
        with torch.device("meta"):
            retriever = rt.ColBERT(r.bert_cfg, r.cfg, r.tokenizer.tok)
        retriever.load_state_dict({k.removeprefix("retriever."): v for k, v in state.items()
                                   if k.startswith("retriever.")}, assign=True)
    return plain, retriever



def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(model: JMLR, optimizer, cfg: "TrainConfig", step: int, rank: int):
    """out_dir/checkpoints/step_NNNNNN/: llm/ and retriever/ in their HF formats (LoRA merged;
    loadable by llama.py, retriever.py and transformers), option_head.safetensors, and for the exact
    resume: trainable.safetensors (every trainable parameter, unmerged), optimizer.pt, rng_RANK.pt and
    state.json (step = data position, config). Written as step_NNNNNN.tmp and renamed when complete,
    so a crash during a save leaves the previous checkpoint intact. Keeps the last cfg.keep_last
    (0: all), the one just written always among them."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)                  # collective under FSDP
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    root = Path(cfg.out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]   # tied weights once
        save_file({n: state[n].contiguous() for n in trainable}, tmp / "trainable.safetensors")
        torch.save(optim, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "examples_seen": step * cfg.batch_size,
                                                    "config": asdict(cfg), "inputs": input_digests(cfg)},
                                                   indent=1, default=str))
    if rank == 0:
        llm, retriever = plain_modules(model, state, cfg)
        llm.save_pretrained(tmp / "llm")
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
            if (Path(cfg.llm) / name).is_file():
                shutil.copy(Path(cfg.llm) / name, tmp / "llm" / name)
        if isinstance(model.llm, OptionHead):
            save_file({k: v.contiguous() for k, v in state.items() if k.startswith(("llm.query.", "llm.key."))},
                      tmp / "option_head.safetensors")
        if retriever is not None:
            retriever.save_pretrained(tmp / "retriever")
    if dist.is_initialized():
        dist.barrier()
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)                                            # the commit point
        atomic_write(root / "latest", lambda p: Path(p).write_text(final.name))
        if cfg.keep_last:   # 0 keeps every one; all are this run's (train.check_out_dirs keeps other runs out)
            others = sorted(d for d in root.glob("step_*") if not d.name.endswith(".tmp") and d != final)
            for old in others[:max(0, len(others) - (cfg.keep_last - 1))]:   # never the one just written
                shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def read_trainable(ckpt: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """trainable.safetensors, once it holds exactly the model's trainable parameters (the names
    save_checkpoint writes), each of its shape, stored as floats, with finite values; anything else
    is refused naming the tensor (a missing one would resume at its initial value)."""
    path = ckpt / "trainable.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the checkpoint is incomplete: resume from an earlier one "
                                "(write its name into checkpoints/latest) or start a new out_dir")
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}   # global shapes
    check_keys_and_shapes(ckpt, expected, read_headers([path]), against="the model being resumed (its trainable "
                          "parameters); resume with the settings it was saved with")
    with open_safetensors(path) as f:
        return {k: check_weight_values(f.get_tensor(k), k, path) for k in expected}


def load_optimizer_state(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; the checkpoint is incomplete: resume from an earlier one "
                                "(write its name into checkpoints/latest) or start a new out_dir") from None
    except Exception as e:                  # a truncated zip, pickled objects weights_only refuses, ...
        raise ValueError(f"{path}: not a readable optimizer state ({type(e).__name__}: {str(e)[:200]}); the "
                         "checkpoint is damaged: resume from an earlier one (write its name into "
                         "checkpoints/latest) or start a new out_dir") from None


INPUT_FILES = ("train_file", "val_file", "test_file", "corpus", "candidates")


def input_digests(cfg: "TrainConfig") -> dict[str, str]:
    """{setting: sha256 of its file} for every file a run reads its data from: a resumed run must
    read the same data, and a file edited in place keeps its name (the config alone cannot tell)."""
    paths = {key: getattr(cfg, key, "") for key in INPUT_FILES}
    return {key: file_digest(Path(path)) for key, path in paths.items() if path and Path(path).is_file()}


def file_digest(path: Path) -> str:
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:   # once per file version, not at every save
    return file_sha256(Path(path))


# Settings a resumed run may change without changing what it trains (others: train.py's resume_changes)
RESUME_MAY_CHANGE = {"resume", "resume_changes", "out_dir", "log_every", "eval_every", "eval_batch_size",
                     "eval_helpfulness", "save_every", "keep_last", "dist_timeout_minutes", "jmlr.max_pass_tokens"}


def flat(config: dict, prefix: str = "") -> dict:
    """{"jmlr": {"tau": 1.0}} -> {"jmlr.tau": 1.0}."""
    out = {}
    for k, v in config.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def load_checkpoint(model: JMLR, optimizer, cfg: "TrainConfig", rank: int) -> int:
    """Restore the last complete checkpoint into a freshly built model -> the step to continue
    from (0 when there is none). Frozen weights come from the same sources as at the start."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    root = Path(cfg.out_dir) / "checkpoints"
    if not (root / "latest").is_file():
        return 0
    ckpt = root / (root / "latest").read_text().strip()
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"{root / 'latest'} names {ckpt.name}, which holds no state.json; write the name of a "
                                f"complete checkpoint ({', '.join(sorted(d.name for d in root.glob('step_*')))}) into "
                                "it, or start a new out_dir")
    saved = read_json(ckpt / "state.json", "the checkpoint is damaged: resume from an earlier one (write its name "
                      "into checkpoints/latest) or start a new out_dir")
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or not isinstance(saved.get("step"), int):
        raise ValueError(f"{ckpt / 'state.json'}: expected {{step, config, ...}} as save_checkpoint writes it; "
                         "resume from an earlier checkpoint or start a new out_dir")
    now, then = flat(json.loads(json.dumps(asdict(cfg), default=str))), flat(saved["config"])
    changed = [k for k in sorted(now.keys() | then.keys())
               if now.get(k) != then.get(k) and k not in RESUME_MAY_CHANGE and k not in getattr(cfg, "resume_changes", ())]
    if changed:
        diffs = "; ".join(f"{k}: saved {then.get(k)!r}, now {now.get(k)!r}" for k in changed[:4])
        raise ValueError(f"{ckpt}: the settings differ from the ones it was saved with ({diffs}); resume with the "
                         f"same settings, or name the intended changes: --resume_changes={tuple(changed)!r}")
    allowed = getattr(cfg, "resume_changes", ())
    edited = [k for k, digest in input_digests(cfg).items() if k in saved.get("inputs", {})
              and saved["inputs"][k] != digest and k not in allowed]
    if edited:
        raise ValueError(f"{getattr(cfg, edited[0])}: its contents changed since {ckpt} was saved (sha256 differs); "
                         f"resume with the file it was trained on, or name the intended change: "
                         f"--resume_changes={tuple(edited)!r}")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    trainable, optim = read_trainable(ckpt, model), load_optimizer_state(ckpt / "optimizer.pt")   # both checked first
    set_model_state_dict(model, trainable, options=opts)
    set_optimizer_state_dict(model, optimizer, optim, options=opts)
    rng_file = ckpt / f"rng_{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return saved["step"]
