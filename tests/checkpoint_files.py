"""Reading checkpoints written by a merge, for comparisons in tests."""

from pathlib import Path

import torch
from safetensors import safe_open


def load_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` shard in ``path``, by name."""
    tensors = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors
