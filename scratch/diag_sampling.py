import sys, torch
sys.path.insert(0, "tests/inference"); sys.path.insert(0, "tests")
from test_sampling import decoded_pair_distribution, tv_bound, small_model
for rows in (2000, 20000, 65536, 70000, 200000):
    try:
        freq, expected, n = decoded_pair_distribution(True, "cuda", rows)
        tv = 0.5 * (freq - expected).abs().sum().item()
        print(rows, "n", n, "tv %.4f bound %.4f" % (tv, tv_bound(8, n)), "excluded mass", freq[expected == 0].sum().item(), flush=True)
        print("  freq", [round(x, 3) for x in freq.tolist()]); print("  exp ", [round(x, 3) for x in expected.tolist()])
    except Exception as e:
        print(rows, "ERROR", type(e).__name__, str(e)[:300], flush=True)
