"""The capacity benchmark of examples/capacity/facts_benchmark.py: its data generator,
the recall and information scorer, the bits formulas, its argument errors, and (slow) one tiny
run through fairseq-preprocess, fairseq-train and the checkpoint scorer."""

import math
import os
from collections import Counter

import pytest
import torch
from conftest import ROOT, load_example


@pytest.fixture()
def bench():
    return load_example("capacity/facts_benchmark.py")


def test_facts_are_deterministic_unique_and_uniform(bench):
    facts = bench.make_facts(8, 4, 16, seed=3)
    assert facts == bench.make_facts(8, 4, 16, seed=3)
    assert facts != bench.make_facts(8, 4, 16, seed=4)
    # every (k1, k2) once, k1 = k2 included, each with one value per attribute
    assert sorted(facts) == [(a, b) for a in range(8) for b in range(8)]
    assert all(len(values) == 4 for values in facts.values())
    # exactly uniform: each of the 16 values goes to 8·8·4/16 = 16 facts
    counts = Counter(v for values in facts.values() for v in values)
    assert counts == {v: 16 for v in range(16)}
    # not a pattern: the value of (k1, k2, attr) is not a function of k1, of k2 or of attr alone
    for position in (0, 1):
        by_key = {}
        for entity, values in facts.items():
            by_key.setdefault(entity[position], set()).update(values)
        assert all(len(seen) > 4 for seen in by_key.values())
    assert len({facts[e][0] for e in facts}) > 4
    with pytest.raises(ValueError, match="multiple of values"):
        bench.make_facts(3, 1, 2, seed=1)


def test_corpus_lines_hold_every_fact_once(bench):
    facts = bench.make_facts(4, 3, 4, seed=1)
    lines = bench.corpus_lines(facts, seed=1)
    assert lines == bench.corpus_lines(facts, seed=1)
    assert len(lines) == 16 and len(set(lines)) == 16
    parsed = {}
    for line in lines:
        words = line.split()
        assert len(words) == 2 + 2 * 3
        assert words[2::2] == ["r0", "r1", "r2"]
        parsed[int(words[0][1:]), int(words[1][1:])] = [int(w[1:]) for w in words[3::2]]
    assert parsed == facts
    assert bench.entity_line(1, 2, [3, 0]) == "k1 k2 r0 v3 r1 v0"


def test_recall_and_information_on_a_hand_made_case(bench):
    # vocabulary of 6: ids 2..5 are the four values; 4 facts
    value_ids = [2, 3, 4, 5]
    targets = torch.tensor([2, 3, 4, 5])
    p = torch.full((4, 6), 1e-9)
    p[0, 2] = 1.0             # right, certain
    p[1, [2, 3, 4, 5]] = 0.25  # uniform over the values: argmax is id 2, wrong; no information
    p[2, 4], p[2, 5] = 0.5, 0.25  # right, p(value) = 0.5 over values 0.5 + 0.25 + 2e-9
    p[3, 0] = 0.9             # a non-value token is the argmax: wrong, however p over values reads
    p[3, 5] = 0.1
    recall, info, ce_bits = bench.recall_and_information(p.log(), targets, value_ids)
    assert recall == pytest.approx(0.5)
    expected_ce = [0.0, 2.0, -math.log2(0.5 / 0.75), 0.0]  # row 3: all value mass is on id 5
    assert ce_bits == pytest.approx(sum(expected_ce), abs=1e-6)
    assert info == pytest.approx(4 * 2.0 - sum(expected_ce), abs=1e-6)


def test_bits_formulas(bench):
    assert bench.information_bits(16384, 256, 16384 * 8.0) == 0.0           # knows nothing
    assert bench.information_bits(16384, 256, 0.0) == 16384 * 8             # knows every value
    assert bench.information_bits(10, 4, 30.0) == -10.0                      # confidently wrong
    assert bench.recall_bits(0.5, 16384, 256) == 0.5 * 16384 * 8
    assert bench.recall_bits(1.0, 1000, 1024) == 10000


def test_model_table_is_equal_compute(bench):
    table = bench.model_table(64, 4)
    assert table["moe-1-wide"][table["moe-1-wide"].index("--moe-hidden-dim") + 1] == "256"
    flags = table["moe-256-h"]
    assert flags[flags.index("--moe-groups") + 1] == "16" and flags[flags.index("--moe-k") + 1] == "2"
    flat = table["moe-256"]
    assert "--moe-groups" not in flat and flat[flat.index("--moe-k") + 1] == "4"


@pytest.mark.parametrize("argv, message", [
    (["--runs", "moe-3:1"], "bad run 'moe-3:1'"),
    (["--runs", "moe-4:x"], "bad run 'moe-4:x'"),
    (["--runs", "moe-4:0"], "bad run 'moe-4:0'"),
    (["--jobs", "3"], "--jobs must be 1 or 2"),
    (["--report", "--runs", "moe-4:1"], "takes no --runs"),
])
def test_bad_arguments_are_one_line_errors(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def redirect(bench, tmp_path):
    bench.WORK = str(tmp_path / "work")
    bench.RESULTS = str(tmp_path / "results")
    bench.RESULTS_JSON = os.path.join(bench.RESULTS, "facts.json")


def test_report_from_results_file(bench, tmp_path):
    redirect(bench, tmp_path)
    base = {"facts": 16384, "values": 256, "updates": 4000, "train_loss_last_epoch": 1.0,
            "train_wall_s": 100, "score_wall_s": 3.0, "value_ce_bits": 2.0}
    runs = [dict(base, model="moe-4", seed=s, params=100, moe_params=50, recall=r, bits=b,
                 bits_recall=r * 131072, moe_cv_load_last_epoch=0.1, eval_cv_load=0.5, eval_unused_experts=0)
            for s, r, b in ((1, 0.5, 60000.0), (2, 0.6, 70000.0))]
    runs.append(dict(base, model="4xlstm", seed=1, params=80, moe_params=0, recall=0.4, bits=50000.0,
                     bits_recall=0.4 * 131072))
    runs.append(dict(base, model="moe-256-h", seed=1, params=1000, moe_params=900, recall=0.7, bits=90000.0,
                     bits_recall=0.7 * 131072))
    for r in runs:
        bench.save_result(r)
    bench.report(bench.load_results())
    table = (tmp_path / "results" / "facts.md").read_text()
    assert "| moe-4 | 4 | 100 | 50 | 0.5500 ± 0.0500 | 65,000 ± 5,000 |" in table
    assert "| 4xlstm | - | 80 | 0 | 0.4000 | 50,000 |" in table
    assert (tmp_path / "results" / "facts.png").stat().st_size > 0


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_through_the_clis(bench, tmp_path, capsys):
    """4 keys × 4 attributes → 64 facts of 4 values; width 8; 40 updates; main() twice (resume)."""
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "fairseq-train")):
        pytest.skip("no .venv with fairseq")
    redirect(bench, tmp_path)
    bench.TASK = {"keys": 4, "attrs": 4, "values": 4, "seed": 5}
    bench.TRAIN = dict(bench.TRAIN, batch_size=8, updates=40, warmup=5, save_interval=5)
    bench.WIDTH = 8
    bench.MODELS = bench.model_table(16, 4)
    assert bench.main(["--runs", "moe-4:1", "--jobs", "1"]) == 0
    results = bench.load_results()
    (r,) = results["runs"]
    assert r["model"] == "moe-4" and r["seed"] == 1 and r["facts"] == 64 and r["updates"] == 40
    assert 0.0 <= r["recall"] <= 1.0 and r["bits"] <= 64 * 2
    assert r["bits_recall"] == pytest.approx(r["recall"] * 128)
    assert 0 < r["moe_params"] < r["params"] and "eval_cv_load" in r and "moe_cv_load_last_epoch" in r
    assert results["setting"]["task"] == bench.TASK
    capsys.readouterr()
    assert bench.main(["--runs", "moe-4:1", "--jobs", "1"]) == 0  # resumes: nothing to train
    assert "1 of 1 runs already have results; 0 to go" in capsys.readouterr().out
    assert (tmp_path / "results" / "facts.md").exists()
