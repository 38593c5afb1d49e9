"""Retrieval trained from scratch (issue 23): do models with NSA learn to use long context as dense
attention does? Models that differ only in attention (dense, the sliding window alone, NSA and its
per-branch ablations; models.py) are trained on two synthetic tasks (tasks.py): a needle in
filler, with a length curriculum up to the target length and the needle always beyond the
window, and multi-query associative recall (MQAR). Same step budget for every model, a few seeds
and a small learning-rate sweep per model (training.py); for NSA layers the selection hit rate,
the branch gates and the gradient norms of the compression networks (diagnostics.py).

Outputs in --out: runs/<task>-<length>-<model>-lr<lr>-seed<seed>.json (each written as its run
goes), summary_retrieval.json, results_retrieval.png (accuracy vs step), and a table on stdout
(report.py). Settings and presets: settings.py; the command line: cli.py.

    python -m benchmarks.retrieval --smoke --out /tmp/retrieval      # CPU, under a minute (CI)
    python -m benchmarks.retrieval --out DIR --tasks needle --needle-lengths 4096 --models dense \
        --time-budget-s 80 --stop-at-accuracy 0.99                 # 3 rates x 2 seeds: <= 8 minutes

A repeated command skips the runs whose finished JSON is in DIR (same configuration), so a sweep
larger than one command's limit is several commands with the same DIR (e.g. one per model);
`--report-only` rebuilds the table and the picture from DIR. `--define NAME=JSON` declares a
variant, `--nsa-options JSON` adds SparseAttention options to every NSA variant. The time
budget counts everything a run does (kernel compilation at each new row length included).
"""
