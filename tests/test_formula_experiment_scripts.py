"""The long experiment scripts under examples/: what they read from fairseq's logs,
and that their tables and plots come from the committed results files alone (the work
directories under outputs/ do not outlive a checkout)."""

import json
import os
import sys

import pytest
from conftest import load_example


def redirect(module, tmp_path, results_json_name):
    module.WORK = str(tmp_path / "work")
    module.RESULTS = str(tmp_path / "results")
    module.RESULTS_JSON = os.path.join(module.RESULTS, results_json_name)


LM_LOG = (
    "2026-12-02 07:01:34 | INFO | train_inner | epoch 001:     50 / 1000 loss=9.1, ppl=548.2, "
    "wps=2000, ups=1, num_updates=50, lr=0.001\n"
    "2026-12-02 07:04:31 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.2 | "
    "ppl 294.07 | wps 1 | wpb 2 | bsz 3 | num_updates 1000\n"
)

MT_LOG = (
    "2026-12-02 07:01:34 | INFO | train_inner | epoch 002:     65 / 130 loss=6.5, nll_loss=6, "
    "ppl=90.5, num_updates=195\n"
    "2026-12-02 07:04:31 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 6.839 | "
    "nll_loss 6.1 | bleu 4.6 | wps 1 | num_updates 260\n"
)


def test_wikitext2_curves_from_log_and_report_from_results_file(tmp_path, capsys):
    family = load_example("language_model/wikitext2_family.py")
    redirect(family, tmp_path, "wikitext2.json")
    log = tmp_path / "train.log"
    log.write_text(LM_LOG)
    train, valid = family.curves(str(log))
    assert train == [(50 * 2048, 548.2)]
    assert valid == [(1000 * 2048, 294.07)]

    runs = [{"model": "moe-16", "seed": seed, "valid_ppl": v, "test_ppl": t, "tokens": 4096,
             "moe_cv_imp_last_epoch": 0.1, "curve": {"train": train, "valid": valid}}
            for seed, v, t in ((1, 170.0, 160.0), (2, 174.0, 163.0))]
    runs.append({"model": "4xlstm", "seed": 1, "valid_ppl": 180.0, "test_ppl": 170.5, "tokens": 4096})
    # Its work directory holds the log of an interrupted retraining, not of this result.
    os.makedirs(tmp_path / "work" / "4xlstm.seed1")
    (tmp_path / "work" / "4xlstm.seed1" / "train.log").write_text(LM_LOG)
    family.report({"runs": runs})
    assert "no curve kept for 4xlstm:1" in capsys.readouterr().out
    table = (tmp_path / "results" / "wikitext2.md").read_text()
    assert "| moe-16 | 1,2 | 161.50 ± 1.50 | 172.00 ± 2.00 | 0.10 ± 0.00 | - | - | 4,096 |" in table
    assert "| 4xlstm | 1 | 170.50 | 180.00 |" in table
    assert (tmp_path / "results" / "wikitext2_curves.png").stat().st_size > 0


def mt_result(model, seed, valid, test, epochs_trained=7):
    """A finished run whose best epoch is 2: with 7 epochs it stopped on its plateau (patience 5)."""
    return {"model": model, "seed": seed, "epochs_trained": epochs_trained, "best_epoch": 2,
            "chosen": "checkpoint_best.pt", "valid_bleu_beam5": {"checkpoint_best.pt": valid},
            "test2016_bleu_tokenized": test, "test2016_sacrebleu": test - 0.1,
            "curve": [{"epoch": 2, "valid_loss": 6.839, "valid_bleu_greedy": 4.6}],
            "train_curve": [[1.5, 6.5]]}


def test_multi30k_validations_from_log_and_plot_from_results_file(tmp_path, capsys):
    experiment = load_example("translation/multi30k_results.py")
    redirect(experiment, tmp_path, "multi30k.json")
    experiment.RUN_HYP = str(tmp_path / "results" / "{model}.seed{seed}.hyp")
    experiment.HYP = str(tmp_path / "results" / "{model}.hyp")
    work = tmp_path / "work" / "moe.seed1"
    work.mkdir(parents=True)
    (work / "train.log").write_text(MT_LOG)
    assert experiment.validations(str(work)) == [(2, 6.839, 4.6)]
    assert experiment.training_curve(str(work)) == [(1.5, 6.5)]
    assert experiment.work_dirs() == {("moe", 1): " (training)"}

    # A finished run is plotted from the results file even with its work directory gone.
    (work / "train.log").unlink()
    result = mt_result("baseline", 1, 5.1, 4.9)
    experiment.save_result(result)
    assert json.loads((tmp_path / "results" / "multi30k.json").read_text())["runs"] == [result]
    assert experiment.curves(str(work), result) == ([(1.5, 6.5)], [(2, 6.839, 4.6)])
    (tmp_path / "results" / "baseline.seed1.hyp").write_text("ein hund .\n")
    experiment.report()
    table = (tmp_path / "results" / "multi30k.md").read_text()
    assert "| baseline | 1 | - | 7 (2) | checkpoint_best.pt | 5.10 | **4.90** | 4.80 | - |" in table
    assert (tmp_path / "results" / "multi30k_curves.png").stat().st_size > 0


def test_training_wall_adds_the_segments_of_a_resumed_run():
    tools = load_example("experiment_tools.py")
    log = ("| train_inner | epoch 001:  20 / 130 loss=9, wall=60\n"
           "| train | epoch 001 | loss 8 | wall 300\n"
           "| train_inner | epoch 002:  20 / 130 loss=7, wall=360\n"  # stopped here, resumed:
           "| train_inner | epoch 002:  20 / 130 loss=7, wall=55\n"
           "| train | epoch 002 | loss 6 | train_wall 280 | wall 290\n")
    assert tools.training_wall(log) == 360 + 290
    assert tools.training_wall("no clock here") is None


def test_mean_and_half_range_rounds_half_up_from_the_written_values():
    tools = load_example("experiment_tools.py")
    # 157.855 and 2.235 exactly; as binary floats the half range would round down to 2.23.
    assert tools.mean_and_half_range([160.09, 155.62]) == "157.86 ± 2.24"
    assert tools.mean_and_half_range([167.69, 165.24]) == "166.47 ± 1.23"
    assert tools.mean_and_half_range([39.15, 38.35, 39.27]) == "38.92 ± 0.46"
    assert tools.mean_and_half_range([36.79]) == "36.79"
    assert tools.mean_and_half_range([]) == "-"


def test_multi30k_seeds_give_mean_and_spread_and_the_best_on_validation_stands_for_the_model(tmp_path):
    """Two seeds: the table shows mean ± half range, and MODEL.hyp is a copy of the hypotheses of
    the seed with the better validation BLEU, even where the other seed scores higher on test."""
    experiment = load_example("translation/multi30k_results.py")
    redirect(experiment, tmp_path, "multi30k.json")
    experiment.RUN_HYP = str(tmp_path / "results" / "{model}.seed{seed}.hyp")
    experiment.HYP = str(tmp_path / "results" / "{model}.hyp")
    for seed, valid, test in ((2, 6.0, 5.0), (1, 5.0, 6.0)):
        experiment.save_result(mt_result("moe", seed, valid, test))
        (tmp_path / "results" / f"moe.seed{seed}.hyp").write_text(f"seed {seed}\n")
    # A second save of a run replaces it; runs are kept in (model, seed) order.
    experiment.save_result(mt_result("moe", 2, 7.0, 5.0))
    runs = json.loads((tmp_path / "results" / "multi30k.json").read_text())["runs"]
    assert [(r["seed"], r["valid_bleu_beam5"]["checkpoint_best.pt"]) for r in runs] == [(1, 5.0), (2, 7.0)]
    experiment.report()
    table = (tmp_path / "results" / "multi30k.md").read_text()
    assert "| moe | 1,2 | **5.50 ± 0.50** | 5.40 ± 0.50 | 6.00 ± 1.00 | seed 2's (best valid BLEU) |" in table
    assert (tmp_path / "results" / "moe.hyp").read_text() == "seed 2\n"

    # A seed one model has and its twin not yet is listed, but left out of the means and of MODEL.hyp.
    for seed in (1, 2):
        experiment.save_result(mt_result("baseline", seed, 4.0, 4.0))
        (tmp_path / "results" / f"baseline.seed{seed}.hyp").write_text(f"baseline {seed}\n")
    experiment.save_result(mt_result("moe", 3, 9.0, 1.0))
    (tmp_path / "results" / "moe.seed3.hyp").write_text("seed 3\n")
    experiment.report()
    table = (tmp_path / "results" / "multi30k.md").read_text()
    assert "| moe | 1,2 | **5.50 ± 0.50** |" in table
    assert "| baseline | 1,2 | **4.00 ± 0.00** |" in table
    assert "until every model has the seed: moe seed 3." in table
    assert "| moe | 3 | - | 7 (2) | checkpoint_best.pt | 9.00 | **1.00** |" in table
    assert (tmp_path / "results" / "moe.hyp").read_text() == "seed 2\n"


def test_multi30k_resume_skips_finished_runs_redo_clears_them_and_a_failure_is_reported(tmp_path, capsys,
                                                                                      monkeypatch):
    experiment = load_example("translation/multi30k_results.py")
    redirect(experiment, tmp_path, "multi30k.json")
    experiment.RUN_HYP = str(tmp_path / "results" / "{model}.seed{seed}.hyp")
    experiment.HYP = str(tmp_path / "results" / "{model}.hyp")
    monkeypatch.setattr(experiment.subprocess, "run", lambda *args, **kwargs: None)  # data prepared
    trained = []

    def fake_train(model, seed, max_epoch, patience, threads):
        work = experiment.work_dir(model, seed)
        trained.append((model, seed, os.path.exists(os.path.join(work, "leftover"))))
        os.makedirs(work, exist_ok=True)
        (tmp_path / "work" / f"{model}.seed{seed}" / "leftover").write_text("")
        if model == "baseline":
            raise RuntimeError("fairseq-train failed (status 1); end of its log: out of memory")

    def fake_evaluate(model, seed, threads, max_epoch, patience):
        (tmp_path / "results" / f"{model}.seed{seed}.hyp").write_text(f"{model} {seed}\n")
        return mt_result(model, seed, 10.0 + seed, 9.0 + len(trained))

    monkeypatch.setattr(experiment, "train", fake_train)
    monkeypatch.setattr(experiment, "evaluate", fake_evaluate)
    os.makedirs(tmp_path / "results")
    experiment.save_result(mt_result("moe", 1, 11.0, 1.0))
    (tmp_path / "results" / "moe.seed1.hyp").write_text("moe 1\n")

    # A repeated seed is one run; seed 1 has a result; baseline fails and is named, the rest goes on.
    assert experiment.main(["--seeds", "1,2,2", "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "moe seed 1: has a result" in out and "baseline seed 2 failed: fairseq-train failed" in out
    assert sorted(trained) == [("baseline", 1, False), ("baseline", 2, False), ("moe", 2, False)]
    runs = json.loads((tmp_path / "results" / "multi30k.json").read_text())["runs"]
    assert [(r["model"], r["seed"], r["test2016_bleu_tokenized"]) for r in runs] == [("moe", 1, 1.0),
                                                                                      ("moe", 2, 11.0)]
    assert (tmp_path / "results" / "moe.hyp").read_text() == "moe 2\n"  # seed 2 is better on valid
    assert experiment.work_dirs()[("baseline", 2)] == " (training)"

    # --redo trains a finished run again from a cleared work directory and replaces its result.
    trained.clear()
    assert experiment.main(["--redo", "--models", "moe", "--seeds", "2"]) == 0
    assert trained == [("moe", 2, False)]
    runs = json.loads((tmp_path / "results" / "multi30k.json").read_text())["runs"]
    assert [(r["seed"], r["test2016_bleu_tokenized"]) for r in runs] == [(1, 1.0), (2, 10.0)]


def test_multi30k_report_names_a_missing_hypotheses_file_and_a_result_without_seed(tmp_path, capsys):
    experiment = load_example("translation/multi30k_results.py")
    redirect(experiment, tmp_path, "multi30k.json")
    experiment.RUN_HYP = str(tmp_path / "results" / "{model}.seed{seed}.hyp")
    experiment.HYP = str(tmp_path / "results" / "{model}.hyp")
    experiment.save_result(mt_result("moe", 3, 11.0, 1.0))
    experiment.report()
    assert "moe.seed3.hyp is missing" in capsys.readouterr().out
    table = (tmp_path / "results" / "multi30k.md").read_text()
    assert "| moe | 3 | - | 7 (2) | checkpoint_best.pt |" in table
    old = mt_result("baseline", 1, 11.0, 1.0)
    del old["seed"]
    with pytest.raises(RuntimeError, match='has no "seed"'):
        experiment.save_result(old)


def test_multi30k_a_run_cut_by_max_epoch_trains_on_when_it_is_raised(tmp_path, capsys, monkeypatch):
    """A run that --max-epoch stopped 1 epoch after its best (patience 5) is marked in the table;
    a larger --max-epoch resumes it (train.done removed, so fairseq-train runs again from
    checkpoint_last.pt); one whose checkpoints are gone is named with the --redo that retrains it."""
    experiment = load_example("translation/multi30k_results.py")
    redirect(experiment, tmp_path, "multi30k.json")
    experiment.RUN_HYP = str(tmp_path / "results" / "{model}.seed{seed}.hyp")
    experiment.HYP = str(tmp_path / "results" / "{model}.hyp")
    monkeypatch.setattr(experiment.subprocess, "run", lambda *args, **kwargs: None)
    trained = []

    def fake_train(model, seed, max_epoch, patience, threads):
        done = os.path.join(experiment.work_dir(model, seed), "train.done")
        trained.append((model, seed, max_epoch, os.path.exists(done)))

    def fake_evaluate(model, seed, threads, max_epoch, patience):
        return mt_result(model, seed, 12.0, 8.0, epochs_trained=9)

    monkeypatch.setattr(experiment, "train", fake_train)
    monkeypatch.setattr(experiment, "evaluate", fake_evaluate)
    for model in ("moe", "baseline"):
        experiment.save_result(mt_result(model, 2, 11.0, 7.0, epochs_trained=3))
        (tmp_path / "results" / f"{model}.seed2.hyp").write_text("")
    experiment.report()
    table = (tmp_path / "results" / "multi30k.md").read_text()
    assert "| baseline | 2 | - | 3 (2), cut by --max-epoch |" in table
    checkpoints = tmp_path / "work" / "baseline.seed2" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "checkpoint_last.pt").write_text("")
    (checkpoints.parent / "train.done").write_text("")

    assert experiment.main(["--seeds", "2", "--max-epoch", "3"]) == 0
    assert trained == [] and "a --max-epoch above 3 trains it on" in capsys.readouterr().out
    assert experiment.main(["--seeds", "2", "--max-epoch", "10"]) == 0
    out = capsys.readouterr().out
    assert trained == [("baseline", 2, 10, False)]
    assert "baseline seed 2: stopped at epoch 3 (--max-epoch), 1 after its best" in out
    assert "so it cannot train on (--redo --models moe --seeds 2 trains it again" in out
    runs = {r["model"]: r for r in json.loads((tmp_path / "results" / "multi30k.json").read_text())["runs"]}
    assert runs["baseline"]["epochs_trained"] == 9 and runs["moe"]["epochs_trained"] == 3


@pytest.mark.parametrize("argv", [["--jobs", "0"], ["--threads", "0"], ["--models", "moe,nope"],
                                  ["--seeds", "1,two"], ["--seeds", "-1"]])
def test_multi30k_refuses_impossible_arguments(argv, capsys):
    experiment = load_example("translation/multi30k_results.py")
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_wikitext2_resume_skips_finished_runs_and_redo_trains_them_again(tmp_path):
    """Without --redo a run with a result is not trained again; with it the run's work directory
    is cleared and the new result replaces the old one."""
    family = load_example("language_model/wikitext2_family.py")
    redirect(family, tmp_path, "wikitext2.json")
    family.DATA = str(tmp_path / "bin")
    os.makedirs(family.DATA)
    (tmp_path / "bin" / "dict.txt").write_text("a 1\n")
    trained = []

    def fake_train_and_evaluate(model, seed, epochs):
        work = os.path.join(family.WORK, f"{model}.seed{seed}")
        leftover = os.path.exists(os.path.join(work, "stale"))
        os.makedirs(work, exist_ok=True)
        open(os.path.join(work, "stale"), "w").close()
        trained.append((model, seed, leftover))
        return {"model": model, "seed": seed, "valid_ppl": 100.0 + len(trained),
                "test_ppl": 90.0 + len(trained), "tokens": 4096, "wall_s": 1}

    family.train_and_evaluate = fake_train_and_evaluate
    family.main(["--runs", "moe-4:1", "--jobs", "1"])
    family.main(["--runs", "moe-4:1,moe-4:2", "--jobs", "1"])
    assert trained == [("moe-4", 1, False), ("moe-4", 2, False)]
    family.main(["--runs", "moe-4:1", "--jobs", "1", "--redo"])
    assert trained[-1] == ("moe-4", 1, False)  # its work directory was cleared first
    runs = json.loads((tmp_path / "results" / "wikitext2.json").read_text())["runs"]
    assert [(r["seed"], r["test_ppl"]) for r in runs] == [(1, 93.0), (2, 92.0)]


def test_run_logged_sets_threads_and_malloc_and_a_failure_shows_the_log(tmp_path, monkeypatch):
    """A job runs on the threads asked for and with glibc keeping freed buffers (unless the user
    set the variable); a failing job raises with the end of its log."""
    tools = load_example("experiment_tools.py")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    log = tmp_path / "job.log"
    names = ("OMP_NUM_THREADS", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
    show = f"import os; print([os.environ[v] for v in {names}])"
    tools.run_logged([sys.executable, "-c", show], str(log), str(tmp_path), threads=3)
    assert log.read_text().strip() == "['3', '0', '12345']"
    with pytest.raises(RuntimeError, match=r"python[\d.]* failed \(status 3\)(.|\n)*going down"):
        tools.run_logged([sys.executable, "-c", "print('going down'); raise SystemExit(3)"], str(log),
                         str(tmp_path))


def test_capacity_lm_width_follows_the_declared_rule():
    """The family's width comes from the baseline pilots alone: the largest width whose 4xLSTM
    underfits (valid/train <= MAX_GAP) and whose family fits the budget; else the smallest."""
    capacity = load_example("language_model/capacity_lm.py")

    def pilot(width, valid, train, wall):
        return {"model": "4xlstm", "width": width, "seed": 1, "valid_ppl": valid,
                "train_ppl": train, "wall_s": wall}

    assert capacity.choose_width({"runs": [pilot(64, 100, 99, 600)]})[0] is None  # 128 missing
    small, large = capacity.PILOT_WIDTHS[0], capacity.PILOT_WIDTHS[-1]
    hour = 3600  # a pilot of half an hour: 21 runs x 1.5 / 2 side by side = about 8 h
    fits = {"runs": [pilot(small, 100, 98, hour / 4), pilot(large, 80, 78, hour / 2)]}
    assert capacity.choose_width(fits)[0] == large
    overfits = {"runs": [pilot(small, 100, 98, hour / 4), pilot(large, 80, 60, hour / 2)]}
    width, why = capacity.choose_width(overfits)
    assert width == small and f"W={large}: valid/train 1.333" in why
    too_slow = {"runs": [pilot(small, 100, 98, hour / 4), pilot(large, 80, 78, 4 * hour)]}
    assert capacity.choose_width(too_slow)[0] == small
    none = {"runs": [pilot(small, 100, 50, hour), pilot(large, 80, 40, hour)]}
    assert capacity.choose_width(none)[0] == small
    costs = {m: capacity.model_costs(m, 64) for m in capacity.FAMILY}
    assert len({c["ops_per_token"] for c in costs.values()}) == 1  # one active compute
    assert costs["moe-256"]["moe_params"] > costs["moe-64"]["moe_params"] > costs["moe-4"]["moe_params"]
