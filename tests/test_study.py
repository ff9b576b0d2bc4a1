"""Tests of the study: the real script end to end at tiny size, every report number checked against
an independent recomputation from the saved score files; resumption; pruning selection; configs."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from jaxdiff import models
from jaxdiff import pruning
from jaxdiff import store
from jaxdiff import study
from jaxdiff.report import analysis as analysis_report
from experiments.configs import study as study_config
from experiments.configs import study_cifar10
from experiments.configs import study_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "study.py")
TINY = os.path.join(ROOT, "experiments", "configs", "study_tiny.py")


def _run_script(workdir, *extra):
  env = dict(os.environ, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1")
  proc = subprocess.run([sys.executable, SCRIPT, f"--config={TINY}", f"--workdir={workdir}",
                         *extra], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  wd = tmp_path_factory.mktemp("study") / "tiny"
  proc = _run_script(str(wd))
  with open(wd / "report" / "findings.json") as f:
    findings = json.load(f)
  with open(wd / "report" / "report.md") as f:
    md = f.read()
  cfg = study_tiny.get_config()
  sets = {a: store.load_scores(str(wd / "runs" / a / "scores")) for a in cfg.arch_order}
  return dict(wd=wd, out=proc.stdout, findings=findings, md=md, cfg=cfg, sets=sets)


# ----------------------------------------------------------------------------- end to end


def test_report_has_every_section_filled(tiny):
  md, f = tiny["md"], tiny["findings"]
  for i, title in enumerate(study.SECTIONS, 1):
    assert f"## {i}. {title}" in md
    body = md.split(f"## {i}. {title}")[1].split("\n## ")[0]
    assert "(disabled)" not in body and "(none)" not in body and re.search(r"\d\.\d", body)
  # What the script printed is what the report states, line by line.
  printed = [l for l in tiny["out"].splitlines() if re.match(r"\(\d\)|    Averaging", l)]
  assert len(printed) == 6 and printed == [l for l in f["summary"]]
  for line in printed:
    assert line.strip() in md
  for name in ("reliability", "agreement", "sensitivity", "fingerprint", "pruning"):
    assert os.path.getsize(tiny["wd"] / "report" / "figures" / f"{name}.png") > 1000
  assert f["primary"] == "el2n" and "learning_time_inf" in f["dropped_scores"]
  for n in f["dropped_scores"]:  # the *_inf variants: +inf for never-learned examples
    assert not all(np.isfinite(s.get(n)).all() for s in tiny["sets"].values()), n


def test_reliability_numbers_match_scipy(tiny):
  """rho1 = mean over the documented draws of Spearman(run perm[0], run perm[-1]); runs needed by
  the smallest n whose Spearman-Brown prediction reaches the target (a loop)."""
  f, cfg = tiny["findings"], tiny["cfg"]
  names = sorted(f["scores"])
  j = names.index(f["primary"])
  for i, a in enumerate(cfg.arch_order):
    s = tiny["sets"][a].get(f["primary"])
    rng = np.random.default_rng(cfg.analysis.seed + 1000 * i + j)
    rhos = []
    for _ in range(cfg.analysis.num_draws):
      perm = rng.permutation(s.shape[0])
      rhos.append(scipy.stats.spearmanr(s[perm[0]], s[perm[-1]]).statistic)
    r = f["reliability"]["archs"][a]
    assert r["rho1"] == pytest.approx(np.mean(rhos), abs=1e-6)
    for t in (0.9, 0.95):
      n = 1
      while n * r["rho1"] / (1 + (n - 1) * r["rho1"]) < t:
        n += 1
      assert r[f"runs_for_{t:g}"] == n
    row = re.search(rf"\| {a} \| {r['rho1']:.3f} \[.*\] \| n=3: {r['rho_n_max']:.3f} .*\| "
                    rf"{r['runs_for_0.9']:.0f} \(measured", tiny["md"])
    assert row, a


def test_agreement_pc1_matches_numpy(tiny):
  f = tiny["findings"]
  for a, s in tiny["sets"].items():
    means = np.stack([s.get(n).mean(0, dtype=np.float64) for n in sorted(f["scores"])])
    corr = scipy.stats.spearmanr(means.T).statistic
    ev = np.linalg.eigvalsh(corr)
    share = ev.max() / ev.sum()
    got = f["agreement"]["archs"][a]["pc1_share"]
    assert got == pytest.approx(share, abs=1e-9)
    assert f"| {a} | {len(f['scores'])} | {100 * got:.1f}% |" in tiny["md"]


def test_sensitivity_counts_match_scipy(tiny):
  f, sets = tiny["findings"], tiny["sets"]
  se = f["sensitivity"]
  x = {a: sets[a].get(f["primary"]).astype(np.float64) for a in sets}
  n = se["num_examples"]
  p_anova = np.array([scipy.stats.f_oneway(*[x[a][:, i] for a in x]).pvalue for i in range(n)])
  assert se["anova_bonferroni"] == int(np.sum(p_anova < 0.05 / n))
  archs = list(x)
  any_bh = np.zeros(n, bool)
  for ia in range(len(archs)):
    for ib in range(ia + 1, len(archs)):
      p = scipy.stats.ttest_ind(x[archs[ia]], x[archs[ib]], axis=0, equal_var=False).pvalue
      any_bh |= scipy.stats.false_discovery_control(np.nan_to_num(p, nan=1.0)) <= 0.05
  assert se["bh_any_pair"] == int(any_bh.sum())
  assert (f"(3) Sensitivity: {se['anova_bonferroni']} of {n} examples" in tiny["md"])


def test_fingerprint_numbers_are_the_held_out_accuracies(tiny):
  fp, cfg = tiny["findings"]["fingerprint"], tiny["cfg"]
  per_arch_test = cfg.train.num_runs - round(cfg.train.num_runs * cfg.fingerprint.fit_fraction)
  assert fp["n_test"] == len(cfg.arch_order) * per_arch_test
  csv = pd.read_csv(tiny["wd"] / "report" / "fingerprint" / "accuracy_vs_k.csv")
  for k in fp["ks"]:
    acc = fp["table"]["pvalue"][str(k)]["accuracy"]
    ref = csv[(csv.method == "pvalue") & (csv.classifier == "logreg") & (csv.k == k)].accuracy
    assert acc == pytest.approx(float(ref.iloc[0]))
    assert round(acc * fp["n_test"]) == pytest.approx(acc * fp["n_test"], abs=1e-9)
  assert fp["chance"] == pytest.approx(1 / 3)
  row = re.search(r"\| pvalue \| (.*) \|", tiny["md"]).group(1).split(" | ")
  assert row == [f"{100 * fp['table']['pvalue'][str(k)]['accuracy']:.1f}%" for k in fp["ks"]]


def test_pruning_subsets_and_accuracies_from_files(tiny):
  wd, cfg, f = tiny["wd"], tiny["cfg"], tiny["findings"]
  s = tiny["sets"][cfg.pruning.arch].get(f["primary"]).astype(np.float64)
  n = s.shape[1]
  rows = []
  for cond in pruning.conditions(cfg.pruning.fractions):
    kept = np.load(wd / "pruning" / cond.name / "kept_ids.npy")
    assert kept.size == n - round(cond.fraction * n)
    pruned = np.setdiff1d(np.arange(n), kept)
    if cond.method in ("single", "mean"):
      v = s[cfg.pruning.single_run] if cond.method == "single" else s.mean(0)
      if cond.keep == "hardest":
        assert v[kept].min() >= v[pruned].max()
      else:
        assert v[kept].max() <= v[pruned].min()
    with open(wd / "pruning" / cond.name / "metrics.jsonl") as fh:
      recs = [json.loads(l) for l in fh]
    last = [r["test_acc"] for r in recs if r["epoch"] == cfg.pruning.num_epochs]
    assert len(last) == cfg.pruning.num_seeds
    rows.append((cond.name, np.mean(last), np.std(last, ddof=1)))
  summary = {r["condition"]: r for r in f["pruning"]["summary"]}
  for name, mean, std in rows:
    assert summary[name]["mean"] == pytest.approx(mean, abs=1e-7)
    assert summary[name]["std"] == pytest.approx(std, abs=1e-7)
    assert f"| {name} | {summary[name]['kept']} | {100 * mean:.2f}% ± {100 * std:.2f}% |" in \
        tiny["md"]
  # The averaging effect is the paired mean difference, with scipy's paired t-test.
  res = pd.read_csv(wd / "report" / "tables" / "pruning_results.csv")
  eff = {(r["fraction"], r["keep"]): r for r in f["pruning"]["effect"]}
  for (frac, keep), r in eff.items():
    a = res[(res.method == "mean") & (res.keep == keep)].sort_values("seed").test_acc.to_numpy()
    b = res[(res.method == "single") & (res.keep == keep)].sort_values("seed").test_acc.to_numpy()
    assert r["mean_minus_single"] == pytest.approx(np.mean(a - b), abs=1e-9)
    if r["p_value"] is not None:
      assert r["p_value"] == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue, rel=1e-6)


def test_rerun_skips_finished_and_resumes_interrupted(tiny, tmp_path):
  wd = tmp_path / "copy"
  shutil.copytree(tiny["wd"], wd)
  stamp = {p: os.path.getmtime(wd / p / "scores" / "meta.json")
           for p in ("runs/linear", "runs/mlp_deep", "pruning/full")}
  # Interrupt mlp's training after its last checkpoint: its scores were never written.
  shutil.rmtree(wd / "runs" / "mlp" / "scores")
  proc = _run_script(str(wd))
  assert "linear: trained already" in proc.stderr and "training mlp (2/3)" in proc.stderr
  assert "mlp_deep: trained already" in proc.stderr
  for p, t in stamp.items():
    assert os.path.getmtime(wd / p / "scores" / "meta.json") == t, p
  a = store.load_scores(str(tiny["wd"] / "runs" / "mlp" / "scores"))
  b = store.load_scores(str(wd / "runs" / "mlp" / "scores"))
  np.testing.assert_array_equal(a.get("el2n"), b.get("el2n"))
  with open(wd / "report" / "findings.json") as fh:
    again = json.load(fh)
  assert again["summary"] == tiny["findings"]["summary"]


def test_workdir_of_another_training_config_is_refused(tiny, tmp_path):
  wd = tmp_path / "copy"
  shutil.copytree(tiny["wd"] / "runs", wd / "runs")
  shutil.copy(tiny["wd"] / "study_config.json", wd / "study_config.json")
  cfg = study_tiny.get_config()
  cfg.train.num_epochs = 4
  with pytest.raises(study.StudyError, match=r"train.num_epochs: workdir has 3, config has 4"):
    study.run_study(cfg, str(wd))


# ----------------------------------------------------------------------------- units


def test_kept_indices_match_a_python_loop():
  rng = np.random.default_rng(0)
  s = rng.integers(0, 5, size=(3, 50)).astype(np.float32)  # many ties
  for method in ("single", "mean"):
    v = s[1] if method == "single" else s.mean(0, dtype=np.float64)
    tie = np.random.default_rng([7, round(1e6 * 0.3)]).permutation(50)
    for keep in pruning.KEEP:
      got = pruning.kept_indices(s, pruning.Condition(method, keep, 0.3), single_run=1, seed=7)
      sign = -1 if keep == "hardest" else 1
      ref = sorted(range(50), key=lambda i: (sign * v[i], tie[i]))[:35]
      assert got.tolist() == sorted(ref)
  r1 = pruning.kept_indices(s, pruning.Condition("random", "random", 0.3), seed=1)
  r2 = pruning.kept_indices(s, pruning.Condition("random", "random", 0.3), seed=2)
  assert r1.size == 35 and len(set(r1)) == 35 and not np.array_equal(r1, r2)
  full = pruning.kept_indices(s, pruning.Condition("full", "all", 0.0))
  assert full.tolist() == list(range(50))


def test_subset_overlap_of_a_tied_score_is_the_random_tie_break_expectation():
  # A single run of a forgetting-like count (most examples tie at 0) against the mean of runs:
  # the overlap of the kept sets must not come from one tie order shared by both rankings.
  rng = np.random.default_rng(3)
  n = 1000
  s = rng.poisson(0.3, size=(4, n)).astype(np.float32)
  got = pruning.subset_overlap(s, (0.5,), ("easiest",))
  k = pruning.num_kept(n, 0.5)
  single, mean = s[0], s.mean(0, dtype=np.float64)
  trials, total = 200, 0.0
  for t in range(trials):  # Monte-Carlo reference: independent random tie-breaks
    a = set(np.lexsort((rng.permutation(n), single))[:k])
    b = set(np.lexsort((rng.permutation(n), mean))[:k])
    total += len(a & b) / k
  assert got.overlap.item() == pytest.approx(total / trials, abs=0.005)
  # Without ties: the plain overlap of the two kept sets.
  x = rng.standard_normal((3, 200))
  got = pruning.subset_overlap(x, (0.3,), ("hardest",))
  a = pruning.kept_indices(x, pruning.Condition("single", "hardest", 0.3))
  b = pruning.kept_indices(x, pruning.Condition("mean", "hardest", 0.3))
  assert got.overlap.item() == pytest.approx(np.intersect1d(a, b).size / a.size)


def test_conditions_and_bad_input():
  names = [c.name for c in pruning.conditions((0.1, 0.5))]
  assert names == ["full", "single_hardest_p10", "single_easiest_p10", "mean_hardest_p10",
                   "mean_easiest_p10", "random_p10", "single_hardest_p50", "single_easiest_p50",
                   "mean_hardest_p50", "mean_easiest_p50", "random_p50"]
  with pytest.raises(ValueError, match=r"unknown pruning method 'best'; valid choices"):
    pruning.conditions((0.1,), methods=("best",))
  with pytest.raises(ValueError, match=r"unknown kept side 'middle'"):
    pruning.conditions((0.1,), keep=("middle",))
  with pytest.raises(ValueError, match=r"pruned fraction 1.0 must be in \(0, 1\)"):
    pruning.conditions((1.0,))
  with pytest.raises(ValueError, match=r"single_run=5 is out of range for 3 runs"):
    pruning.ranking_score(np.zeros((3, 4)), "single", 5)


def test_averaging_effect_matches_scipy():
  rng = np.random.default_rng(1)
  rows = []
  for seed in range(5):
    for m in ("single", "mean"):
      rows.append(dict(condition=f"{m}_hardest_p30", method=m, keep="hardest", fraction=0.3,
                       kept=7, seed=seed, test_acc=rng.uniform(0.5, 0.9), diverged=False))
  df = pd.DataFrame(rows)
  eff = pruning.averaging_effect(df).iloc[0]
  a = df[df.method == "mean"].test_acc.to_numpy()
  b = df[df.method == "single"].test_acc.to_numpy()
  assert eff.mean_minus_single == pytest.approx((a - b).mean())
  assert eff.p_value == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue)


def test_usable_scores_and_choice():
  meta = dict(num_runs=3, diverged=[False, False, True])
  rng = np.random.default_rng(0)
  good = rng.standard_normal((3, 10))
  inf = good.copy()
  inf[0, 2] = np.inf
  const = np.ones((3, 10))
  bad_diverged = good.copy()
  bad_diverged[2] = np.nan  # only in the diverged run: still usable
  s = store.ScoreSet(scores=dict(loss=good, learning_time_inf=inf, never=const,
                                 mb_presentations=good, aum=bad_diverged),
                     example_ids=np.arange(10), labels=np.zeros(10, int), meta=meta)
  kept, dropped = study.usable_scores({"a": s})
  assert kept == ["aum", "loss"]
  assert set(dropped) == {"learning_time_inf", "never", "mb_presentations"}
  assert study.choose_score(kept) == "aum"  # el2n absent: next in PRIMARY_PREFERENCE
  assert study.choose_score(["zeta", "beta"]) == "beta"
  with pytest.raises(study.StudyError, match=r"score 'el2n' is not usable here; valid choices"):
    study.choose_score(kept, "el2n")


@pytest.mark.parametrize("mutate,match", [
    (lambda c: setattr(c.pruning, "arch", "vit"), r"pruning.arch='vit' is not a study arch"),
    (lambda c: setattr(c, "arch_order", ("mlp", "gpt")), r"arch_order names \['gpt'\]"),
    (lambda c: c.archs.mlp.update(dict(width=-1)), r"architecture 'mlp': .*width=-1"),
    (lambda c: setattr(c.train, "num_runs", 1), r"needs >= 2 runs"),
    (lambda c: setattr(c.pruning, "methods", ("single", "oracle")), r"unknown pruning method"),
])
def test_bad_study_config_is_refused_before_training(tmp_path, mutate, match):
  cfg = study_tiny.get_config()
  mutate(cfg)
  with pytest.raises(ValueError, match=match):
    study.run_study(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module", [study_config, study_tiny, study_cifar10])
def test_configs_build_every_model_and_validate(module):
  cfg = module.get_config()
  study.validate_config(cfg)
  num_classes = 10
  for name in study.arch_names(cfg):
    model = models.build_model(study.arch_config(cfg, name).model, num_classes)
    assert model is not None
  assert cfg.pruning.arch in cfg.archs


def test_cifar10_config_is_the_papers_setting():
  cfg = study_cifar10.get_config()
  t = cfg.train
  assert t.data.name == "cifar10" and t.augment and t.batch_size == 128
  assert (t.optim.name, t.optim.lr, t.optim.momentum, t.optim.weight_decay, t.optim.schedule) == (
      "sgd", 0.1, 0.9, 1e-4, "step")
  depths = {n: (cfg.archs[n].name, cfg.archs[n].get("depth")) for n in cfg.archs}
  assert depths["resnet20"] == ("resnet", 20) and depths["resnet32"] == ("resnet", 32)
  assert depths["vgg16"] == ("vgg", 16) and cfg.archs.resnet20_wide.width > 16


def test_find_workdirs_accepts_each_layout(tiny):
  wd = tiny["wd"]
  order = list(tiny["cfg"].arch_order)
  assert list(study.find_workdirs(str(wd))) == order
  assert list(study.find_workdirs(str(wd / "report"))) == order
  assert list(study.find_workdirs(str(wd / "runs" / "mlp"))) == ["mlp"]
  with pytest.raises(study.StudyError, match="no finished training workdir"):
    study.find_workdirs(str(wd / "report" / "figures"))


def test_most_sensitive_ids_follow_the_gallery_ranking(tmp_path):
  # The study report's "most sensitive example ids" and the gallery's "most arch-sensitive" row
  # must rank by the same test (the analysis' pairwise Welch ranking), not ANOVA for one of them.
  from jaxdiff import analysis  # pylint: disable=g-import-not-at-top
  from jaxdiff.fingerprint import selection  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  n, runs = 200, 6
  shifts = np.zeros((3, n))
  shifts[1, :10] = 3.0  # one pair far apart, with noise twice as large in arch 1
  shifts[1, 10:20], shifts[2, 10:20] = 1.2, 2.4  # all three apart moderately
  noise = np.ones((3, n))
  noise[1, :10] = 2.0
  sets = {}
  for k, a in enumerate(("mlp", "cnn", "res")):
    s = shifts[k][None] + rng.standard_normal((runs, n)) * noise[k][None]
    sets[a] = store.ScoreSet(scores=dict(loss=s.astype(np.float32)), example_ids=np.arange(n),
                             labels=np.zeros(n, int), meta=dict(num_runs=runs))
  out = str(tmp_path / "analysis")
  res = analysis.analyze(sets, num_draws=2, kendall_draws=0, methods=("spearman",), top_m=10)
  analysis_report.write_report(res, out, figures=False)
  se = study.sensitivity_findings(sets, "loss", study.load_analysis(out), 0.05)
  table = res.tables["sensitive_examples"]
  welch = table[(table.score == "loss") & (table.group == "most")].example_id.tolist()
  assert se["most_sensitive_ids"] == welch[:10]
  x = np.concatenate([sets[a].get("loss") for a in sets]).astype(np.float64)
  y = np.repeat(np.arange(3), runs)
  log_p, f_stat = selection.anova_log_pvalues(x, y)
  assert np.lexsort((-f_stat, log_p))[:10].tolist() != welch[:10]  # the rankings do differ here


def test_findings_from_the_analysis_in_memory_equal_those_read_from_its_files(tmp_path):
  # A study reads its findings from the `Analysis` in memory when the stage ran, and from the
  # one it loads back from the written files when it was up to date: both must give the same
  # numbers.
  from jaxdiff import analysis  # pylint: disable=g-import-not-at-top
  from jaxdiff.report import study as study_report  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  n, runs = 200, 6
  sets = {}
  for a in ("mlp", "cnn", "res"):
    base = rng.standard_normal(n)
    scores = dict(loss=base + rng.standard_normal((runs, n)),
                  el2n=base + 2 * rng.standard_normal((runs, n)))
    sets[a] = store.ScoreSet(scores={k: v.astype(np.float32) for k, v in scores.items()},
                             example_ids=np.arange(n), labels=np.arange(n) % 3,
                             meta=dict(num_runs=runs))
  res = analysis.analyze(sets, num_draws=3, kendall_draws=0, methods=("spearman",), top_m=10,
                         primary_score="el2n")
  out = str(tmp_path / "analysis")
  analysis_report.write_report(res, out, figures=False)
  as_json = lambda f: json.dumps(study_report._json_ready(f), sort_keys=True)
  archs = list(sets)
  loaded = study.load_analysis(out)
  for fn in (study.reliability_findings, study.agreement_findings):
    assert as_json(fn(res, "el2n", archs)) == as_json(fn(loaded, "el2n", archs)), fn.__name__
  assert (as_json(study.sensitivity_findings(sets, "el2n", res, 0.05))
          == as_json(study.sensitivity_findings(sets, "el2n", loaded, 0.05)))


def test_load_analysis_gives_back_what_analyze_computed(tmp_path):
  # The stage cache's one loader: a written analysis read back is the same object type with the
  # same tables, per-pair sensitivity and agreement as the `Analysis` that was written.
  from jaxdiff import analysis  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  n, runs = 120, 5
  sets = {a: store.ScoreSet(scores={k: (rng.standard_normal((runs, n)) + i).astype(np.float32)
                                    for k in ("loss", "el2n", "aum")},
                            example_ids=np.arange(n) + 7, labels=np.arange(n) % 4,
                            meta=dict(num_runs=runs))
          for i, a in enumerate(("mlp", "cnn"))}
  res = analysis.analyze(sets, num_draws=3, kendall_draws=0, methods=("pearson", "spearman"),
                         top_m=10)
  out = str(tmp_path / "analysis")
  analysis_report.write_report(res, out, figures=False)
  got = study.load_analysis(out)
  assert isinstance(got, analysis.Analysis) and got.primary_score == res.primary_score
  assert got.settings == res.settings and got.dropped == res.dropped
  np.testing.assert_array_equal(got.example_ids, res.example_ids)
  np.testing.assert_array_equal(got.labels, res.labels)
  for name, df in res.tables.items():  # CSV keeps no None or "": both come back as NaN
    pd.testing.assert_frame_equal(got.tables[name], df.replace({None: np.nan, "": np.nan}),
                                  check_dtype=False, obj=name)
  for score, want in res.sensitivity.items():
    have = got.sensitivity[score]
    assert have.pairs == want.pairs and have.archs == want.archs
    for field in ("t", "df", "log10_p", "mean_diff", "hedges_g"):
      np.testing.assert_array_equal(getattr(have, field), getattr(want, field), err_msg=field)
    np.testing.assert_array_equal(have.bh(), want.bh())
    np.testing.assert_array_equal(have.ranking(), want.ranking())
  for a, want in res.agreement.items():
    have = got.agreement[a]
    assert have["names"] == want["names"]
    for m in want["corr"]:
      np.testing.assert_allclose(have["corr"][m], want["corr"][m], rtol=1e-15)
    for m in want["pca"]:
      np.testing.assert_allclose(have["pca"][m].shares, want["pca"][m].shares, rtol=1e-15)
      assert have["pca"][m].names == want["pca"][m].names
    assert set(have["overlap"]) == set(want["overlap"])


@pytest.mark.parametrize("progress", [True, False])
def test_study_progress_names_each_stage(tiny, tmp_path, caplog, progress):
  # A rerun of the finished tiny study (every stage up to date): with progress, the plan, then one
  # line per stage in order with the stages left; without, no such line.
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from test_progress import done_stages  # pylint: disable=g-import-not-at-top
  wd = tmp_path / "copy"
  shutil.copytree(tiny["wd"], wd)
  cfg = study_tiny.get_config()
  cfg.progress = progress
  absl_logging.set_verbosity(absl_logging.INFO)
  with caplog.at_level(logging.INFO, logger="absl"):
    caplog.clear()
    study.run_study(cfg, str(wd))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study")]
  if not progress:
    assert lines == []
    return
  stages = ["train", "analysis", "fingerprint", "pruning", "report"]
  assert lines[0] == "study of 3 architecture(s) x 6 runs: " + ", ".join(stages)
  done = done_stages(lines, "study")
  assert [d[0] for d in done] == stages
  assert [d[2] for d in done] == [", ".join(stages[i + 1:]) or "nothing" for i in range(5)]


def test_study_layout_comes_from_workdir_py(tiny):
  # The study folder's paths are workdir.py's: every one of them is where the real run wrote.
  from jaxdiff import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  wd = str(tiny["wd"])
  for name in ("config", "timings", "runs", "pruning", "report"):
    assert os.path.exists(workdir_lib.study_path(wd, name)), name
  assert study.arch_workdir(wd, "mlp") == os.path.join(wd, "runs", "mlp")
  assert study.is_trained(study.arch_workdir(wd, "mlp"))
  for part in workdir_lib.STUDY_REPORT_PARTS:
    assert os.path.exists(os.path.join(workdir_lib.study_report_dir(wd, part), "report.md"))
  with pytest.raises(KeyError, match=r"unknown study file 'runz'; valid: config, timings, runs"):
    workdir_lib.study_path(wd, "runz")
