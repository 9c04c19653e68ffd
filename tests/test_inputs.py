"""checkpoints.load_checkpoint against damaged resume files: each refused before any parameter
changes, naming the file (and the tensor), on a toy module with the files laid out as
save_checkpoint writes them (a JMLR model is not needed to read them)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from checkpoints import load_checkpoint


@dataclass
class ToyConfig:                      # the fields load_checkpoint compares, and where it looks
    out_dir: str
    steps: int = 10
    batch_size: int = 4
    seed: int = 0
    jmlr: dict = field(default_factory=dict)


def toy_checkpoint(tmp_path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, ToyConfig, Path]:
    """A 2-layer module with one frozen layer, and out_dir/checkpoints/step_000004 of it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    cfg = ToyConfig(out_dir=str(tmp_path))
    ckpt = tmp_path / "checkpoints" / "step_000004"
    ckpt.mkdir(parents=True)
    save_file({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, ckpt / "trainable.safetensors")
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    torch.save(get_optimizer_state_dict(model, optimizer, options=opts), ckpt / "optimizer.pt")
    (ckpt / "state.json").write_text(json.dumps({"step": 4, "config": {"steps": 10, "batch_size": 4, "seed": 0,
                                                                       "jmlr": {}}}))
    (tmp_path / "checkpoints" / "latest").write_text(ckpt.name)
    with torch.no_grad():                                  # a fresh model: what a resume must overwrite
        model[1].weight.zero_()
    return model, optimizer, cfg, ckpt


def test_a_complete_checkpoint_resumes(tmp_path):
    model, optimizer, cfg, ckpt = toy_checkpoint(tmp_path)
    assert load_checkpoint(model, optimizer, cfg, rank=0) == 4
    assert model[1].weight.abs().sum() > 0, "the trainable weight was not restored"


@pytest.mark.parametrize("damage, message", [
    (lambda c: save_file({"1.bias": torch.zeros(2)}, c / "trainable.safetensors"),
     r"missing tensor 1.weight \(expected shape \[2, 4\]\)"),          # resumed silently at its initial value
    (lambda c: save_file({"1.weight": torch.zeros(2, 4, dtype=torch.int8), "1.bias": torch.zeros(2)},
                         c / "trainable.safetensors"), "tensor 1.weight in trainable.safetensors is stored as I8"),
    (lambda c: save_file({"1.weight": torch.full((2, 4), float("nan")), "1.bias": torch.zeros(2)},
                         c / "trainable.safetensors"), "trainable.safetensors: tensor 1.weight holds NaN"),
    (lambda c: (c / "state.json").write_text('{"step": 4,'), r"state.json: not valid JSON"),
    (lambda c: (c / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated"), r"optimizer.pt: not a readable optimizer state"),
    (lambda c: (c.parent / "latest").write_text("step_000009"), r"latest names step_000009, which holds no state.json"),
])
def test_damaged_checkpoint_files_are_refused_naming_them(tmp_path, damage, message):
    model, optimizer, cfg, ckpt = toy_checkpoint(tmp_path)
    damage(ckpt)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_checkpoint(model, optimizer, cfg, rank=0)
    assert model[1].weight.abs().sum() == 0, "a refused checkpoint must change no parameter"
