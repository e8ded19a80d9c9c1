"""Posterior diagnostics for a fitted guide, on ArviZ: the boundary where ArviZ is imported.

* :func:`to_inference_data` (:mod:`.inference_data`) -- guide draws (vectorized), the model
  replayed on them, as an :class:`arviz.InferenceData` (posterior, posterior_predictive,
  observed_data, log_likelihood, sample_stats with per-draw importance weights and ELBO terms);
  the draws themselves come from :mod:`.sampling` (no ArviZ there);
* :func:`psis_diagnostics` (:mod:`.psis`) -- Pareto-smoothed importance sampling of the guide
  against the model (Yao et al. 2018, arXiv:1802.02538): k-hat, verdict, ESS, corrected means;
* :func:`compare_posterior` (:mod:`.compare_posterior`) -- the guide's summary against a
  reference posterior (NUTS draws or a conjugate problem's closed form) in one table;
* :func:`diagnose` (:mod:`.workflow`) -- fit a guide with a named estimator, then all of the
  above (what ``pyro-elbo-ext diagnose`` runs).

Needs the ``diagnostics`` extra (arviz): ``pip install 'pyro-elbo-ext[diagnostics]'``.

>>> from pyro_elbo_ext.diagnostics import psis_diagnostics, to_inference_data  # doctest: +SKIP
"""

from .._extras import require

require("arviz", "diagnostics")

from .compare_posterior import closed_form_reference, compare_posterior  # noqa: E402
from .inference_data import to_inference_data  # noqa: E402
from .psis import (  # noqa: E402
    MIN_PSIS_SAMPLES,
    PSISResult,
    khat_verdict,
    psis_diagnostics,
    psis_from_inference_data,
)
from .sampling import SamplingError  # noqa: E402
from .workflow import Diagnosis, diagnose  # noqa: E402

__all__ = [
    "MIN_PSIS_SAMPLES",
    "Diagnosis",
    "PSISResult",
    "SamplingError",
    "closed_form_reference",
    "compare_posterior",
    "diagnose",
    "khat_verdict",
    "psis_diagnostics",
    "psis_from_inference_data",
    "to_inference_data",
]
