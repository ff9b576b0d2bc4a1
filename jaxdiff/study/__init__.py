"""The paper's study end to end: architectures x runs, analysis, fingerprint, pruning, one report.

`run_study(config, workdir)` trains every architecture (resuming interrupted runs), runs the
analysis, the architecture fingerprint and the pruning experiment, and writes
`<workdir>/report/report.md` with figures and CSV/JSON tables (Kwok et al. 2024, arXiv 2401.01867).
Every stage skips work already done, so rerunning after an interruption finishes the study.

Modules: `config` (names, checks, the workdir's config record), `scores` (which scores, the
primary one), `stages` (training, analysis, fingerprint, pruning; the stage cache and timings),
`findings` (the numbers of each finding), `run` (`run_study`); the page itself is
`jaxdiff.report.study`.

Layout of a study workdir::

    <workdir>/study_config.json     the resolved study config
    <workdir>/runs/<arch>/          one training workdir per architecture (train.train_and_evaluate)
    <workdir>/pruning/<condition>/  one training workdir per pruned training set
    <workdir>/report/report.md      the findings, each with its numbers
    <workdir>/report/findings.json  every number of report.md, machine-readable
    <workdir>/report/figures/       reliability, agreement, sensitivity, fingerprint, pruning
    <workdir>/report/tables/        CSV (and JSON) of every table
    <workdir>/report/analysis/      the full analysis report (report.analysis.write_report)
    <workdir>/report/fingerprint/   the full fingerprint report and the saved fingerprint
"""

from jaxdiff.report.study import SECTIONS, summary_lines
from jaxdiff.study.config import (StudyError, arch_config, arch_names, check_study_workdir,
                                  model_label, validate_config)
from jaxdiff.study.findings import (agreement_findings, final_accuracy,
                                    fingerprint_findings, load_findings, pruning_findings,
                                    reliability_findings, sensitivity_findings, study_findings)
from jaxdiff.study.run import run_study
from jaxdiff.study.scores import NOT_SCORES, PRIMARY_PREFERENCE, choose_score, usable_scores
from jaxdiff.study.stages import (add_timing, arch_workdir, enable_compilation_cache,
                                  find_workdirs, is_trained, load_analysis,
                                  load_fingerprint_report, load_sets, read_timings,
                                  run_analysis, run_fingerprint, run_pruning_stage, train_archs)
