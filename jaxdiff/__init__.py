"""jaxdiff: example difficulty with vectorised ensembles of neural networks in JAX/Flax.

Modules: data, models, ensemble, train, recording, store, scores, analysis, fingerprint, plots.
"""

__version__ = "0.1.0"
