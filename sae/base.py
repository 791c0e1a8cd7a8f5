"""The small base every SAE class shares: parameters, normalisation, decode, forward, loss, folding.

Shapes: x [..., d_in] -> code (SparseCode, [B, K]) -> x_hat [..., d_out], B the product of the leading dims.
Weights are latent-major: W_enc [d_sae, d_in], W_dec [d_sae, d_out]; optional skip W_skip [d_out, d_in].

Pipeline (forward and loss): rows -> normalise -> encode -> decode (+ skip) -> undo the normalisation.
Normalisation, as in SAELens: "none"; "layer_norm" ((x - mean) / (std + 1e-5), per token, unbiased std);
"constant_norm_rescale" (x * sqrt(d_in) / ||x||, per token); "expected_average_only_in" (nothing at run time:
the inputs were scaled by a dataset-wide constant); then a constant `act_scale` (that dataset-wide scale, when the
model applies it itself). Losses are measured in the normalised space.
reshape_activations="hook_z" (SAELens): inputs may be [..., n_heads, d_head] with n_heads * d_head = d_in; they are
flattened, and outputs come back in the input's shape.

Initial weights are drawn by blocks of INIT_BLOCK latent rows, block j from a generator seeded with (seed, j), seed
one draw from torch's global generator: row i depends on (seed, i) only, so a latent shard (sae.distributed) builds
its own rows, and nothing else, with the values one process builds block by block.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable

import torch
from torch import nn

import kernels
from kernels import SparseCode

from . import metrics

NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")
LN_EPS = 1e-5
INIT_BLOCK = 1024  # latent rows per counter-seeded block of the initial weights
_LATENT_ROWS: contextvars.ContextVar[range | None] = contextvars.ContextVar("latent_rows", default=None)


@contextlib.contextmanager
def latent_rows(rows: range):
    """Within, SAE constructors draw only these rows of W_enc and W_dec (a latent shard's, for sae.distributed);
    the other tensors stay whole. What they make is the raw material of a shard, not a model to use."""
    if not isinstance(rows, range) or not len(rows) or rows.step != 1:
        raise ValueError(f"rows must be a non-empty range with step 1, got {rows!r}")
    token = _LATENT_ROWS.set(rows)
    try:
        yield
    finally:
        _LATENT_ROWS.reset(token)


def init_seed(device) -> int:
    """The base seed of a model's initial weights: one draw from torch's global generator (none on meta)."""
    return 0 if torch.device(device or "cpu").type == "meta" else int(torch.randint(2**62, ()))


def init_rows(seed: int, rows: range, d: int, stream: int, device) -> torch.Tensor:
    """Rows `rows` of an [n, d] matrix of unit-norm Gaussian rows, fp32 [len(rows), d].

    Block j (rows j * INIT_BLOCK onwards) is drawn whole from a generator seeded with (seed, stream, j) and cut to
    the rows asked for, so any row range gets the rows that one draw of the whole matrix gives. stream tells
    matrices of one model apart (0: W_dec, 1: W_enc).
    """
    out = torch.empty(len(rows), d, dtype=torch.float32, device=device)
    if out.device.type == "meta" or not len(rows):
        return out
    g = torch.Generator(device=out.device)
    for j in range(rows.start // INIT_BLOCK, -(-rows.stop // INIT_BLOCK)):
        g.manual_seed(((seed * 1_000_003 + stream) * 1_000_003 + j) % 2**63)
        block = torch.randn(INIT_BLOCK, d, generator=g, device=out.device)
        a, b = max(rows.start, j * INIT_BLOCK), min(rows.stop, (j + 1) * INIT_BLOCK)
        out[a - rows.start : b - rows.start] = block[a - j * INIT_BLOCK : b - j * INIT_BLOCK]
    return out / out.norm(dim=1, keepdim=True)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class SAE(nn.Module):
    """x_hat = f(x) W_dec + b_dec (+ x W_skip^T) with latent-major weights.

    Decoder rows start at unit norm and the encoder starts as the decoder (when d_out == d_in).
    Subclasses define `_encode` (and, for extra loss terms, `_encode_info` and `_add_losses`).
    """

    has_b_enc = True  # gated SAEs have b_gate / b_mag instead
    name = ""  # the key in sae.registry.ARCHITECTURES
    architecture = "standard"  # the SAELens architecture name `sae.save` writes
    saelens_aliases: tuple[str, ...] = ()  # other SAELens architecture names read as this class
    file_names: dict[str, str] = {}  # our tensor name -> its name in SAELens files, where they differ

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        d_out: int | None = None,
        skip: bool = False,
        apply_b_dec_to_input: bool | None = None,
        normalize_activations: str = "none",
        act_scale: float = 1.0,
        reshape_activations: str = "none",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        for name, value in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
            _positive_int(name, value)
        if apply_b_dec_to_input is None:
            apply_b_dec_to_input = d_out == d_in
        if apply_b_dec_to_input and d_out != d_in:
            raise ValueError(f"apply_b_dec_to_input needs d_out == d_in, got d_in={d_in}, d_out={d_out}")
        if normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, got {normalize_activations!r}")
        if reshape_activations not in RESHAPES:
            raise ValueError(f"reshape_activations must be one of {RESHAPES}, got {reshape_activations!r}")
        if reshape_activations == "hook_z" and d_out != d_in:
            raise ValueError(f"reshape_activations='hook_z' needs d_out == d_in, got d_in={d_in}, d_out={d_out}")
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_out
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize_activations = normalize_activations
        self.act_scale = float(act_scale)
        self.reshape_activations = reshape_activations
        kw = {"dtype": dtype or torch.float32, "device": device}
        seed, rows = init_seed(device), _LATENT_ROWS.get() or range(d_sae)
        W_dec = init_rows(seed, rows, d_out, 0, device)
        W_enc = W_dec.clone() if d_out == d_in else init_rows(seed, rows, d_in, 1, device)
        self.W_dec = nn.Parameter(W_dec.to(**kw))
        self.W_enc = nn.Parameter(W_enc.to(**kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw)) if self.has_b_enc else None
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **kw)) if skip else None
        self.hints = kernels.EncodeHints()  # what earlier encodes measured (speed only; never saved)

    # Shapes and normalisation ---------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def _rows(self, x: torch.Tensor, dim: str = "d_in", name: str = "x") -> torch.Tensor:
        """[..., d] (or [..., n_heads, d_head] under hook_z) -> [B, d] in the parameters' dtype; dim names d."""
        d = getattr(self, dim)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if self._heads(x, d):
            return x.reshape(-1, d).to(self.dtype)
        if x.dim() == 0 or x.shape[-1] != d:
            hint = (
                " or [..., n_heads, d_head] with n_heads * d_head = d_in"
                if self.reshape_activations == "hook_z"
                else ""
            )
            raise ValueError(f"{name} must have last dimension {dim}={d}{hint}, got shape {tuple(x.shape)}")
        return x.reshape(-1, d).to(self.dtype)

    def _heads(self, x: torch.Tensor, d: int) -> bool:
        """Whether x is [..., n_heads, d_head] (hook_z) rather than [..., d]."""
        hooked = self.reshape_activations == "hook_z" and x.dim() >= 2 and x.shape[-1] != d
        return hooked and x.shape[-2] * x.shape[-1] == d

    def _lead(self, x: torch.Tensor) -> tuple[int, ...]:
        """The leading (token) dimensions of an input x."""
        return tuple(x.shape[:-2] if self._heads(x, self.d_in) else x.shape[:-1])

    def _shape_out(self, x: torch.Tensor) -> tuple[int, ...]:
        """The shape of the reconstruction of x: x's own shape under hook_z, else [..., d_out]."""
        return tuple(x.shape) if self._heads(x, self.d_in) else (*x.shape[:-1], self.d_out)

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """x [B, d_in] -> (normalised x, state) with x = xn * state[0] + state[1] (per token)."""
        mode = self.normalize_activations
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            xn, scale, shift = (x - mu) / (std + LN_EPS), std, mu
        elif mode == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True)
            xn, scale, shift = x * coeff, 1 / coeff, None
        else:
            xn, scale, shift = x, None, None
        if self.act_scale != 1.0:
            xn = xn * self.act_scale
            scale = 1 / self.act_scale if scale is None else scale / self.act_scale
        return xn, (scale, shift)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> [B, d_in]: the rows the encoder sees (normalised, scaled by act_scale)."""
        return self._normalize(self._rows(x))[0]

    @staticmethod
    def _denormalize(y: torch.Tensor, state: tuple) -> torch.Tensor:
        scale, shift = state
        y = y if scale is None else y * scale
        return y if shift is None else y + shift

    def _target(self, target: torch.Tensor | None, xn: torch.Tensor, state: tuple) -> torch.Tensor:
        """The loss's target in the normalised space: xn itself, or a transcoder's target [..., d_out]."""
        if target is None:
            if self.d_out != self.d_in:
                raise ValueError(f"a transcoder (d_out={self.d_out} != d_in={self.d_in}) needs a target")
            return xn
        return self._normalize_like(self._rows(target, "d_out", "target"), state)

    @staticmethod
    def _normalize_like(y: torch.Tensor, state: tuple) -> torch.Tensor:
        """A target in the normalised space of the input whose state this is."""
        scale, shift = state
        y = y if shift is None else y - shift
        return y if scale is None else y / scale

    # Encode / decode ------------------------------------------------------------------------------

    def _centre(self) -> torch.Tensor | None:
        """b_dec as the encoder's input centering, or None."""
        return self.b_dec if self.apply_b_dec_to_input else None

    def _encode(self, xn: torch.Tensor) -> SparseCode:
        """Normalised rows xn [B, d_in] -> SparseCode [B, K]."""
        raise NotImplementedError

    def _encode_info(self, xn: torch.Tensor) -> tuple[SparseCode, object]:
        """(code, what the loss terms need besides the code)."""
        return self._encode(xn), None

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """x: [..., d_in] -> SparseCode with [B, K] values and indices (of the normalised input)."""
        return self._encode(self.normalize(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense activations [..., d_sae] (for compatibility; allocates B x d_sae)."""
        return self.encode_sparse(x).to_dense(self.d_sae).reshape(*self._lead(x), self.d_sae)

    def decode(self, code: SparseCode) -> torch.Tensor:
        """[B, d_out] = b_dec + sum of the code's W_dec rows (in the normalised space, no skip)."""
        return kernels.sparse_decode(code, self.W_dec, self.b_dec)

    def _output(self, code: SparseCode, xn: torch.Tensor) -> torch.Tensor:
        out = self.decode(code)
        return out if self.W_skip is None else out + xn @ self.W_skip.T

    def run(
        self, x: torch.Tensor, *, edit: Callable[[SparseCode], SparseCode] | None = None
    ) -> tuple[SparseCode, torch.Tensor]:
        """x: [..., d_in] -> (code [B, K], x_hat [..., d_out] in x.dtype; x's shape under hook_z); `edit` may
        change the code before it is decoded (steering)."""
        xn, state = self._normalize(self._rows(x))
        code = self._encode(xn)
        if edit is not None:
            code = edit(code)
        out = self._denormalize(self._output(code, xn), state)
        return code, out.reshape(self._shape_out(x)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> x_hat: [..., d_out]."""
        return self.run(x)[1]

    # Loss -----------------------------------------------------------------------------------------

    def loss(
        self, x: torch.Tensor, *, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """{"loss" (the total to backprop), "mse", "fvu", "l0", the architecture's parts, and "code"}.

        x: [..., d_in]; target: [..., d_out] (transcoders; default x); dead_mask: [d_sae] bool (AuxK).
        mse = mean over tokens of ||y - y_hat||^2 and fvu = its sum over sum ||y - mean(y)||^2, both in
        the normalised space; "code" is the step's SparseCode [B, K] (values detached).
        """
        xn, state = self._normalize(self._rows(x))
        y = self._target(target, xn, state)
        code, info = self._encode_info(xn)
        y_hat = self._output(code, xn)
        mse = metrics.mse(y, y_hat)
        parts = {"loss": mse, "mse": mse, "fvu": metrics.fvu(y, y_hat), "l0": metrics.l0(code)}
        self._add_losses(parts, xn=xn, y=y, code=code, info=info, y_hat=y_hat, dead_mask=dead_mask)
        parts["code"] = SparseCode(code.values.detach(), code.indices)  # for firing statistics
        return parts

    def _add_losses(self, parts: dict, **ctx) -> None:
        """Add the architecture's terms to parts (and to parts["loss"])."""

    # Weight transforms ----------------------------------------------------------------------------

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Give every decoder row unit norm without changing x_hat: W_dec,i /= n_i, f_i *= n_i.

        Rows of norm 0 (dead latents) are left as they are. Exact for ReLU, JumpReLU and gated SAEs;
        selections across latents (TopK, BatchTopK) compare rescaled values afterwards.
        """
        norms = self.W_dec.float().norm(dim=1)
        s = torch.where(norms > 0, norms, 1.0)
        self.W_dec.copy_(self.W_dec.float() / s[:, None])
        self.W_enc.copy_(self.W_enc.float() * s[:, None])
        self._scale_latents(s)

    def _scale_latents(self, s: torch.Tensor) -> None:
        """Scale the per-latent pre-activation parameters by s [d_sae] (the encoder rows are done)."""
        if self.b_enc is not None:
            self.b_enc.copy_(self.b_enc.float() * s)

    @torch.no_grad()
    def fold_act_scale(self) -> None:
        """Fold the constant act_scale into the weights (act_scale becomes 1; outputs unchanged)."""
        c = self.act_scale
        if c == 1.0:
            return
        self.W_enc.mul_(c)  # z = (c x - b_dec) W_enc^T + b_enc = (x - b_dec / c) (c W_enc)^T + b_enc
        self.W_dec.div_(c)  # the output was divided by c; W_skip sees c x and is divided by c: unchanged
        self.b_dec.div_(c)
        self.act_scale = 1.0

    def config(self) -> dict:
        """Every constructor argument but dtype and device: what rebuilds this model besides its tensors.

        The one list of a class's hyperparameters: `sae.save` writes it and `sae.load` passes it back.
        """
        return {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "d_out": self.d_out,
            "skip": self.W_skip is not None,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "act_scale": self.act_scale,
            "reshape_activations": self.reshape_activations,
        }

    # SAELens's names for this class's facts (sae.formats.saelens reads and writes them)

    def saelens_architecture(self) -> str:
        return self.architecture

    def saelens_fields(self) -> dict:
        """The SAELens cfg fields of this class beyond the base ones (d_in, d_sae, normalisation, ...)."""
        return {}

    @classmethod
    def config_from_saelens(cls, cfg: dict) -> dict:
        """Constructor arguments beyond the base ones, from a SAELens cfg.json."""
        return {}

    def extra_repr(self) -> str:
        out = f"d_in={self.d_in}, d_sae={self.d_sae}"
        if self.d_out != self.d_in:
            out += f", d_out={self.d_out}"
        return f"{out}, dtype={self.dtype}"
