"""Speed hints that an encoder learns from its calls: explicit, owned by the caller, never module state."""

from __future__ import annotations

import dataclasses

DEFAULT_CAPACITY = 64  # the first capacity guess of a threshold encoder


@dataclasses.dataclass
class EncodeHints:
    """What earlier calls measured, so that the next call runs fewer passes. Hints change speed only: a call
    returns the same result and layout with a fresh EncodeHints as with a warm one.

    A model owns one and passes it to every encode (`hints=`); it is not part of the model's state and is
    never saved. `hints=None` means fresh defaults for that call. The ops update it after each call.

    capacity:         first guess of the slots per row of a threshold encoder (relu, jumprelu, gated,
                      batch_topk_inference) when the caller fixes no capacity; a wrong guess costs a rerun.
    relu_dense:       the last relu_encode was dense: try the dense matrix product first.
    candidate_factor: BatchTopK candidates per row, as a multiple of k; too few cost a rerun with twice as many.
    """

    capacity: int = DEFAULT_CAPACITY
    relu_dense: bool = False
    candidate_factor: int = 2

    def observe_capacity(self, need: int) -> None:
        """Next guess after a call whose largest row kept `need` entries: a quarter more, so that small
        growth costs no rerun."""
        self.capacity = max(DEFAULT_CAPACITY // 4, need + need // 4)
