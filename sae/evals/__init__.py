"""The papers' evaluations of SAEs, streaming over activations on sparse codes (DESIGN section 10).

`acts` is a tensor [N, d_in] of raw activations or an iterable of [b, d_in] batches (a list, or
`sae.harvest.HarvestedActivations` for a harvest folder); every metric works from the SparseCodes of
`model.encode_sparse`, so no [N, d_sae] matrix is formed. Each function's docstring gives its formula.

| function | what | paper | file |
| --- | --- | --- | --- |
| reconstruction | FVU, MSE, L0 histogram, dead / dense latents, density | Gao et al.; SAELens | reconstruction.py |
| ce_loss_recovered | CE loss recovered (zero / mean ablation), KL | Bricken et al. | fidelity.py |
| coverage, label_reconstruction, sparse_probing | concept labels [N, C] | Karvonen et al. | concepts.py |
| cone_containment | reference directions [C, d] in the decoder's cone | Rocchi--Henry et al. | cone.py |
| monosemanticity | per latent, from input embeddings [N, e] | Pach et al. | monosemanticity.py |
| consistency | two SAEs: MMCS, optimal matching, per index | Wang et al. | consistency.py |
| l0_sweep, pointed_l0 | the L0 the c_dec / n-th projection proxies point at | Chanin et al. | sweep.py |
| latent_records, dashboard_html | top-activating contexts, JSON + HTML | delphi; Neuronpedia | dashboard.py |

`python -m sae eval` and `python -m sae l0-sweep` (cli.py) write them as JSON, Markdown and PNG (report.py).
"""

from .concepts import coverage, label_reconstruction, sparse_probing
from .cone import cone_containment
from .consistency import consistency
from .dashboard import dashboard_html, latent_records, top_activations, write_dashboard
from .fidelity import ce_loss_recovered
from .monosemanticity import monosemanticity
from .reconstruction import reconstruction
from .sweep import l0_sweep, pointed_l0

__all__ = [
    "ce_loss_recovered",
    "cone_containment",
    "consistency",
    "coverage",
    "dashboard_html",
    "l0_sweep",
    "label_reconstruction",
    "latent_records",
    "monosemanticity",
    "pointed_l0",
    "reconstruction",
    "sparse_probing",
    "top_activations",
    "write_dashboard",
]
