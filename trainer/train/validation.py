"""The validation set: held-out images measured with the same noise and the same timesteps at every evaluation.

A validation loss of random noise and random timesteps jumps by more than a LoRA improves in a hundred steps;
fixing both (noise seeded per image, timesteps spread evenly over the trained range) makes the points of one
run's curve comparable, so a rising curve means overfitting and not bad luck.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.train.data import Example, LatentCache


def fixed_timesteps(k: int, lo: int, hi: int) -> torch.Tensor:
    """k timesteps at the centres of k equal bins of [lo, hi)."""
    width = (hi - lo) / k
    return torch.tensor([int(lo + (i + 0.5) * width) for i in range(k)], dtype=torch.long)


@dataclass
class ValidationSet:
    examples: list[Example]
    cache: LatentCache | None
    timesteps: torch.Tensor
    seed: int
    _noise: dict[int, torch.Tensor] = field(default_factory=dict)

    def noise(self, j: int, like: torch.Tensor) -> torch.Tensor:
        """The fixed noise of example j (one draw per timestep), made once from its own generator."""
        if j not in self._noise:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * (j + 1)) % (2**63))
            self._noise[j] = torch.randn(tuple(like.shape), generator=g)
        return self._noise[j].to(like.device, like.dtype)
