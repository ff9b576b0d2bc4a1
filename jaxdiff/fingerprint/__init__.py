"""Architecture fingerprinting: which architecture trained a model, from a few examples' scores.

Select architecture-sensitive examples on fit runs, classify runs from their scores there,
evaluate on held-out runs, save/load the fingerprint (Kwok et al., arXiv 2401.01867).

Modules: `selection` (per-example tests, ranking), `classify` (logistic regression, k-means,
"none of these"), `model` (`Fingerprint`, save/load/predict), `evaluate` (splits, studies, the
`Report`, which `jaxdiff.report.fingerprint` writes).
"""

from jaxdiff.fingerprint.classify import CLASSIFIERS, Classifier, train_classifier
from jaxdiff.fingerprint.evaluate import (BASELINE, DEFAULT_KS, Report, RunScores,
                                          accuracy_vs_fit_runs, accuracy_vs_k, collect_runs,
                                          holdout, load_workdirs, run_report, split_runs)
from jaxdiff.fingerprint.model import Fingerprint, Prediction, fit_fingerprint, load_fingerprint
from jaxdiff.fingerprint.selection import (SELECTION_METHODS, TESTS, Ranking, anova_log_pvalues,
                                           rank_examples, sensitivity, welch_log_pvalues)
