"""Posterior diagnostics for a fitted guide, on ArviZ: the boundary where ArviZ is imported.

* :func:`to_inference_data` -- guide draws (vectorized), the model replayed on them, as an
  :class:`arviz.InferenceData` (posterior, posterior_predictive, observed_data,
  log_likelihood, sample_stats with per-draw importance weights and ELBO terms).
* :func:`psis_diagnostics` -- Pareto-smoothed importance sampling of the guide against the
  model (Yao et al. 2018, arXiv:1802.02538): k-hat, verdict, ESS, corrected means.
* :func:`compare_posterior` -- the guide's summary against a reference posterior (NUTS draws
  or a conjugate problem's closed form) in one table.

>>> from pyro_elbo_ext.diagnostics import psis_diagnostics, to_inference_data  # doctest: +SKIP
"""

from .compare_posterior import closed_form_reference, compare_posterior
from .inference_data import to_inference_data
from .psis import PSISResult, khat_verdict, psis_diagnostics, psis_from_inference_data
from .sampling import SamplingError

__all__ = [
    "PSISResult",
    "SamplingError",
    "closed_form_reference",
    "compare_posterior",
    "khat_verdict",
    "psis_diagnostics",
    "psis_from_inference_data",
    "to_inference_data",
]
