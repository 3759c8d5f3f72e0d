"""The scaling table and plot read what the synth and eval jobs wrote."""
import json

import pyarrow as pa
import pytest

from cir.config import load_config
from cir.evaluation.scaling import ScalingConfig, markdown_table, plot_scaling, reference_rows, scaling_rows
from cir.outputs import write_table


def _synth(tmp_path, name, n):
    write_table(pa.table({"triplet_id": [f"t{i}" for i in range(n)]}), tmp_path / name / "triplets", rows_per_file=7)
    return str(tmp_path / name)


def _eval(tmp_path, name, r1, r10):
    folder = tmp_path / "eval" / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"metrics": {"recall@1": r1, "recall@10": r10}}))
    return str(folder)


def _config(tmp_path, series, references=None):
    path = tmp_path / "scaling.yaml"
    path.write_text(json.dumps({"plot": str(tmp_path / "plot.png"), "series": series, "references": references or {}}))
    return load_config(ScalingConfig, path)


def test_points_are_counted_from_the_tables_and_averaged_over_seeds(tmp_path):
    small, big = _synth(tmp_path, "small", 20), _synth(tmp_path, "big", 45)
    cfg = _config(tmp_path, {
        "template": [{"synth_dir": big, "evals": [_eval(tmp_path, "b0", 30.0, 80.0), _eval(tmp_path, "b1", 32.0, 82.0)]},
                     {"synth_dir": small, "evals": [_eval(tmp_path, "s0", 20.0, 70.0)]}],
    })
    rows = scaling_rows(cfg)
    assert [r["triplets"] for r in rows] == [20, 45]                  # sorted by size
    assert rows[1]["recall@1"] == pytest.approx((31.0, 2 ** 0.5))   # mean, sample sd
    assert rows[0]["recall@10"] == (70.0, 0.0)
    table = markdown_table(rows, cfg.metrics)
    assert "| template | 45 | 2 | 31.0 ± 1.4 | 81.0 ± 1.4 |" in table
    assert "| template | 20 | 1 | 20.0 | 70.0 |" in table
    assert plot_scaling(rows, cfg.metrics, cfg.plot, cfg.title).read_bytes()[:4] == b"\x89PNG"


def test_a_reference_run_is_a_level_line_beside_the_series(tmp_path):
    cfg = _config(tmp_path, {"template": [{"synth_dir": _synth(tmp_path, "s", 9), "evals": [_eval(tmp_path, "t", 30.0, 80.0)]}]},
                  {"A": [_eval(tmp_path, "a0", 20.0, 70.0), _eval(tmp_path, "a1", 22.0, 72.0)]})
    refs = reference_rows(cfg)
    assert refs == [{"series": "A", "seeds": 2, "recall@1": (21.0, pytest.approx(2 ** 0.5)),
                     "recall@10": (71.0, pytest.approx(2 ** 0.5))}]
    assert "| A | 0 | 2 | 21.0 ± 1.4 | 71.0 ± 1.4 |" in markdown_table(refs + scaling_rows(cfg), cfg.metrics)
    assert plot_scaling(scaling_rows(cfg), cfg.metrics, cfg.plot, cfg.title, refs).is_file()


def test_a_missing_run_or_table_is_named(tmp_path):
    synth = _synth(tmp_path, "s", 5)
    cfg = _config(tmp_path, {"mtst": [{"synth_dir": synth, "evals": [str(tmp_path / "eval" / "never-run")]}]})
    with pytest.raises(FileNotFoundError, match="never-run"):
        scaling_rows(cfg)
    cfg = _config(tmp_path, {"mtst": [{"synth_dir": str(tmp_path / "nothing"), "evals": [_eval(tmp_path, "e", 1.0, 2.0)]}]})
    with pytest.raises(FileNotFoundError, match="no triplets table"):
        scaling_rows(cfg)
    with pytest.raises(TypeError, match="series.mtst"):
        _config(tmp_path, {"mtst": [["not", "a", "point"]]})
