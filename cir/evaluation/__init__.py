"""Evaluation of a query encoder on a CIR benchmark, or of a predictions file.

Two modes, both driven by `EvalConfig` (jobs/eval.py is the thin CLI around them):

* model mode (`evaluate_model`): the gallery images AND the queries of every benchmark
  go through ONE Ray Data pass of the embedding stage (`cir.embed`, an actor pool of
  callable classes holding the query encoder, `num_gpus` per actor when the cluster
  has GPUs). Queries ride along with the gallery rather than being encoded on the
  driver because a query encoder may be a trained composer (an LLM on a GPU) that the
  driver, which has no GPU on a cluster, cannot run; one pass also loads the model
  once per actor instead of once per stage. The driver then ranks (exact top-k of dot
  products, `cir.metrics.rank_by_similarity`, reference excluded where the protocol
  says so) and scores with the benchmark's protocol (`cir.metrics.evaluate_ranked`,
  the same numbers as `evaluate_embeddings`).
* predictions mode (`evaluate_prediction_files`): ranked ids per query from a JSON file
  (plain {query_id: [ids]}, CIRR's server format, CIRCO's submission format) are
  scored; no model, no Ray, no torch.

Test splits without ground truth get submission files instead of metrics (CIRR:
recall and recall_subset; CIRCO). `write_outputs` writes metrics.json (atomic),
predictions.json and those files. Nothing in this module starts Ray: the job does
(`cir.raycluster.init_ray`), and `encode_benchmarks` refuses to run without it.
"""
from __future__ import annotations

from cir.evaluation.config import (DEFAULT_ENCODER, DEFAULT_OUTPUT_ROOT, DEFAULT_SPLITS, FALLBACK_SPLIT,
                                   FILE_BENCHMARKS, EncodeSettings, EvalConfig, config_dict)
from cir.evaluation.data import WORK_SCHEMA, load_benchmarks, prepare, work_table
from cir.evaluation.encode import encode_benchmarks
from cir.evaluation.predictions import cirr_subset_from_ranking, evaluate_prediction_files
from cir.evaluation.report import format_table, write_outputs
from cir.evaluation.score import BenchResult, EvalResult, evaluate_model, score_embeddings

__all__ = [
    "DEFAULT_ENCODER", "DEFAULT_OUTPUT_ROOT", "DEFAULT_SPLITS", "FALLBACK_SPLIT",
    "FILE_BENCHMARKS", "WORK_SCHEMA",
    "BenchResult", "EncodeSettings", "EvalConfig", "EvalResult",
    "cirr_subset_from_ranking", "config_dict", "encode_benchmarks",
    "evaluate_model", "evaluate_prediction_files", "format_table", "load_benchmarks", "prepare",
    "score_embeddings", "work_table", "write_outputs",
]
