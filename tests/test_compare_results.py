"""simulator.compare_results: the check behind "every figure in RESULTS.md is reproduced by its command"."""
from __future__ import annotations

import copy
import json

from simulator.compare_results import compare, main

DOC = {"seeds": [0, 1], "data": {"fedavg": {"accuracy": [0.5, 0.71, 0.8], "epsilon": 1234.5},
                                 "fedatt": {"accuracy": [0.5, 0.7, 0.79], "max_weight": [0.1, 0.4]}}}


def _write(tmp_path, name, doc):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return str(p)


def test_identical_files_reproduce(tmp_path, capsys):
    assert main([_write(tmp_path, "a.json", DOC), _write(tmp_path, "b.json", DOC)]) == 0
    out = capsys.readouterr().out
    assert "REPRODUCED" in out and "accuracy" in out


def test_an_accuracy_beyond_tolerance_fails_and_says_where(tmp_path, capsys):
    new = copy.deepcopy(DOC)
    new["data"]["fedatt"]["accuracy"][2] = 0.75  # 0.04 off
    assert main([_write(tmp_path, "a.json", DOC), _write(tmp_path, "b.json", new), "--tol", "0.01"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT" in out and "data/fedatt/accuracy/[2]" in out
    assert main([_write(tmp_path, "a.json", DOC), _write(tmp_path, "b.json", new), "--tol", "0.05"]) == 0


def test_epsilon_is_compared_relatively_and_missing_leaves_fail(tmp_path):
    new = copy.deepcopy(DOC)
    new["data"]["fedavg"]["epsilon"] = 1234.5 * 1.001
    res = compare(DOC, new)["metrics"]["epsilon"]
    assert res["kind"] == "relative" and abs(res["max_diff"] - 0.001) < 1e-9
    new["clip"] = 1.0  # a field a later version of the study records: listed, accepted
    assert main([_write(tmp_path, "a.json", DOC), _write(tmp_path, "b.json", new)]) == 0
    del new["data"]["fedatt"]["max_weight"]  # a number of the committed figure is gone: not reproduced
    assert main([_write(tmp_path, "a.json", DOC), _write(tmp_path, "b.json", new)]) == 1


def test_unreadable_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main([str(bad), _write(tmp_path, "b.json", DOC)]) == 2
    assert "error:" in capsys.readouterr().err


def test_single_seed_values_wrapped_in_lists_and_renamed_settings_are_accepted(tmp_path):
    """A later study writer keeps one entry per seed ([x] for one seed) and renames seed -> seeds."""
    old = {"seed": 0, "data": {"z1": {"acc": [0.1, 0.2], "eps": 12.5}}}
    new = {"seeds": [0], "data": {"z1": {"acc": [[0.1, 0.2]], "eps": [12.5], "final_acc_mean": 0.2}}}
    assert main([_write(tmp_path, "a.json", old), _write(tmp_path, "b.json", new)]) == 0
    new["data"]["z1"]["acc"] = [[0.1, 0.25]]
    assert main([_write(tmp_path, "a.json", old), _write(tmp_path, "b.json", new)]) == 1
