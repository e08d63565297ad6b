"""An exponential moving average of the trained weights (train.ema_decay), kept in fp32.

After each optimizer step ``shadow = d * shadow + (1 - d) * weight``; with warm-up the decay of update n is
``min(ema_decay, (1 + n) / (10 + n))`` (the warm-up of diffusers' EMAModel), so the first steps are not averaged
with the random start. The saved LoRA holds the shadow weights (``applied()`` swaps them in for the save);
a checkpoint stores the shadow and the update count, so a resumed run continues the same average.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class Ema:
    def __init__(self, params: list[torch.Tensor], decay: float, warmup: bool):
        self.params, self.decay, self.warmup = params, float(decay), warmup
        self.shadow = [p.detach().float().clone() for p in params]
        self.updates = 0

    def decay_now(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay_now()
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)
        self.updates += 1

    @contextmanager
    def applied(self):
        """The shadow weights in the live parameters for the duration (a save, a validation), then back."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"shadow.{i}": s.contiguous() for i, s in enumerate(self.shadow)}
        out["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if len([k for k in tensors if k.startswith("shadow.")]) != len(self.shadow):
            raise ValueError("the checkpoint's EMA does not match the trained parameters")
        for i, s in enumerate(self.shadow):
            s.copy_(tensors[f"shadow.{i}"])
        self.updates = int(tensors["updates"].item())


@contextmanager
def nothing():
    yield
