"""Statistical analysis of difficulty scores: reliability across runs, agreement, sensitivity.

Vectorised over examples (numpy/scipy); `report` turns training workdirs into
tables (`jaxdiff.report.analysis` writes them, with figures).
"""

from jaxdiff.analysis.agreement import (FRACTIONS, SIDES, Spectrum, expected_overlap,
                                        order_random_ties, overlap_matrix, pca_spectrum,
                                        run_overlap, score_agreement, selection_probabilities,
                                        stack_means, top_fraction_mask, topk_overlap)
from jaxdiff.analysis.correlation import (METHODS, correlate_rows, correlation_matrix,
                                          kendall_rows, pearson_rows, rank_average, spearman_rows)
from jaxdiff.analysis.reliability import (TARGETS, ReliabilityCurve, Spread, check_scores,
                                          default_ns, fit_spearman_brown, implied_single_run,
                                          reliability_curve, reliability_flags, runs_needed,
                                          runs_needed_table, spearman_brown,
                                          spread_vs_difficulty, tie_share)
from jaxdiff.analysis.sensitivity import (PairwiseSensitivity, WelchResult, bh_adjust, bh_mask,
                                          bh_threshold, bonferroni_mask, cohens_d, hedges_g,
                                          log_t_sf, pairwise_sensitivity, permutation_groups,
                                          permutation_test, welch_t_test)
from jaxdiff.analysis.report import (NOT_SCORES, Analysis, analyze, load_workdirs,
                                     score_problems)
