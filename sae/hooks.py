"""Splice an SAE into a PyTorch model: read its features, replace an activation with the reconstruction
(loss-recovered evaluation), or steer chosen latents.

    with sae.attach(model.layers[3], my_sae, replace=True) as spliced:
        logits = model(tokens)
    spliced.codes[0]  # the SparseCode of each call, [tokens, K]

The hook acts on the module's output (its first element when the module returns a tuple, as Hugging Face
blocks do), of shape [..., d_in]. Steering edits the code before it is decoded: `clamp={latent: value}`
sets a latent's activation on every token, `add={latent: value}` adds to it. With error_term=True the
output is x + (x_hat_edited - x_hat), so only the edit changes the model.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import SparseCode

from .base import SAE


def _steer(code: SparseCode, clamp: dict, add: dict) -> SparseCode:
    """Zero the clamped latents' slots, then append one slot per clamped or added latent (decode is linear,
    so an appended slot adds value * W_dec row)."""
    values, indices = code.values, code.indices
    B = values.shape[0]
    if clamp:
        ids = torch.tensor(list(clamp), device=indices.device, dtype=indices.dtype)
        values = torch.where(torch.isin(indices, ids), 0, values)
    extra = {**add}
    for i, v in clamp.items():
        extra[i] = v if i not in add else v + add[i]
    if not extra:
        return SparseCode(values, indices)
    ids = torch.tensor(list(extra), device=indices.device, dtype=indices.dtype).expand(B, -1)
    vals = torch.tensor(list(extra.values()), device=values.device, dtype=values.dtype).expand(B, -1)
    return SparseCode(torch.cat([values, vals], 1), torch.cat([indices, ids], 1))


class Splice:
    """A forward hook on `module` that runs `sae` on its output; see the module docstring."""

    def __init__(
        self,
        module: nn.Module,
        sae: SAE,
        *,
        replace: bool = False,
        clamp: dict[int, float] | None = None,
        add: dict[int, float] | None = None,
        error_term: bool = False,
        keep_codes: bool = True,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(sae, SAE):
            raise TypeError(f"sae must be an SAE, got {type(sae).__name__}")
        self.clamp, self.add = dict(clamp or {}), dict(add or {})
        for name, d in (("clamp", self.clamp), ("add", self.add)):
            bad = [i for i in d if not isinstance(i, int) or not 0 <= i < sae.d_sae]
            if bad:
                raise ValueError(f"{name}: latents {bad} are not ints in [0, d_sae={sae.d_sae})")
        if sae.d_out != sae.d_in and (replace or self.clamp or self.add):
            raise ValueError("a transcoder's output cannot replace the activation it reads")
        self.module, self.sae = module, sae
        self.edit = bool(self.clamp or self.add)
        self.replace = replace or self.edit
        self.error_term = error_term
        self.keep_codes = keep_codes
        self.codes: list[SparseCode] = []
        self._handle = None

    def _hook(self, module, inputs, output):
        act = output[0] if isinstance(output, tuple) else output
        edit = (lambda c: _steer(c, self.clamp, self.add)) if self.edit else None
        code, x_hat = self.sae.run(act, edit=edit)
        if self.keep_codes:
            self.codes.append(code)
        if not self.replace:
            return None
        if self.error_term:
            x_hat = act + (x_hat - self.sae(act)) if self.edit else act
        return (x_hat, *output[1:]) if isinstance(output, tuple) else x_hat

    def attach(self) -> Splice:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> Splice:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(module: nn.Module, sae: SAE, **kwargs) -> Splice:
    """A Splice of `sae` on `module`'s output (use as a context manager, or call .remove()).

    kwargs: replace (bool: the output becomes the reconstruction), clamp / add ({latent: value}: steer;
    implies replace), error_term (bool: keep the SAE's error, so only a steering edit changes the output),
    keep_codes (bool: record each call's SparseCode in .codes).
    """
    return Splice(module, sae, **kwargs)
