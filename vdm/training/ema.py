"""Exponential moving average of the weights, kept in fp32, correct under ZeRO 0-3."""

from __future__ import annotations

import contextlib

import torch


def _gathered(params: list[torch.nn.Parameter]):
    """Full parameters for reading: under ZeRO 3 each rank holds a shard, so gather them first."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EMA:
    """EMA of a module's trainable parameters: `shadow = decay * shadow + (1 - decay) * param`.

    Every rank keeps the same fp32 shadow (so any rank can save it); under ZeRO 3 the parameters
    are gathered for the update. Before `start_step` the shadow simply follows the weights.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.995, update_every: int = 1,
                 start_step: int = 0):
        self.decay, self.update_every, self.start_step = decay, update_every, start_step
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = self._params(module)
        with _gathered(params):
            self.shadow = {n: p.detach().float().clone() for n, p in zip(self.names, params)}

    def _params(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        named = dict(module.named_parameters())
        return [named[n] for n in self.names]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> bool:
        """Fold the current weights in after optimizer step `step`; True when an update happened."""
        if step % self.update_every:
            return False
        params = self._params(module)
        with _gathered(params):
            for name, p in zip(self.names, params):
                if step <= self.start_step:
                    self.shadow[name].copy_(p.detach())
                else:
                    self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name in self.names:
            self.shadow[name].copy_(state[name])
