"""The training-speed benchmark's printed tables: attention (ms, ratios, peaks), the training step and
the cold compile time, read from its results dict; a cell without a figure says why."""

from __future__ import annotations

import json


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cell(record: dict, key: str) -> str:
    """A measured figure, or why there is none (details in the progress lines and the JSON)."""
    if record.get(key) is not None:
        return fmt(record[key])
    if "skipped" in record:
        return "skipped"
    if "error" in record or f"{key}_error" in record:
        return "failed"
    return "-"


def pair(record: dict, a: str = "fwd", b: str = "fwd_bwd") -> str:
    return f"{cell(record, a)} / {cell(record, b)}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_tables(results: dict) -> None:
    notes = "\n".join(f"- {n}" for n in results["notes"])
    print(f"\n## Training speed: {results['device']}, torch {results['torch']}, triton {results['triton']}, "
          f"{results['dtype']}, flash-nsa {results['flash_nsa']}\n{notes}")
    nsas, others = ("nsa eager", "nsa graphed"), ("best dense", "flash SDPA", "flash-nsa")
    for group, section in results.get("attention", {}).items():
        rows, heads = section["rows"], f"G = {group} ({section['heads']} q / {section['kv_heads']} kv heads)"
        paths = [p for p in next(iter(rows.values()), {}) if p not in ("ratios", "output projection alone")]
        print_table(f"### Attention, {heads}: ms, fwd / fwd+bwd", ["T"] + paths,
                    [[T] + [pair(row[p]) for p in paths] for T, row in rows.items()])

        def best(r: dict) -> str:
            names = {str(r[f"best_dense_{key}"]).removeprefix("dense ") for key in ("fwd", "fwd_bwd")}
            return " / ".join(sorted(names))

        print_table(f"nsa ms / other ms, fwd / fwd+bwd (below 1: nsa faster), {heads}",
                    ["T", "best dense"] + [f"{n.split()[1]} / {o}" for n in nsas for o in others],
                    [[T, best(row["ratios"])] + [pair(row["ratios"], f"{n} / {o} fwd", f"{n} / {o} fwd_bwd")
                                                 for n in nsas for o in others] for T, row in rows.items()])
        print_table(f"peak GiB of one fwd+bwd (graphed: over its capture and a replay), {heads}", ["T"] + paths,
                    [[T] + [cell(row[p], "peak_gib") for p in paths] for T, row in rows.items()])
        print(f"correctness, relative errors vs the float32 reference: {json.dumps(section['correctness'])}")
    if "step" in results:
        rows = results["step"]["rows"]
        paths = [p for p in next(iter(rows.values()), {}) if p != "ratios"]
        print_table("### Training step (zero_grad, loss, backward, AdamW step): ms (peak GiB)",
                    ["tokens x batch"] + paths + ["best dense / nsa, eager", "dense / nsa, graphed"],
                    [[shape] + [f"{cell(row[p], 'ms')} ({cell(row[p], 'peak_gib')})" for p in paths]
                     + [fmt(row["ratios"]["best dense eager / nsa eager"]),
                        fmt(row["ratios"]["dense graphed / nsa graphed"])] for shape, row in rows.items()])
    if "compile" in results:
        c = results["compile"]
        print("\n### Compile time: first forward+backward in a fresh process, empty Triton and Inductor caches")
        if "skipped" in c or "error" in c:
            print(c.get("skipped") or c.get("error"))
        else:
            print(f"preset {c['preset']}, T {c['seq_len']}: first call {c['first_call_s']:.1f} s (limit "
                  f"{c['limit_s']:.0f} s: {'met' if c['within_limit'] else 'NOT met'}), second call "
                  f"{c['second_call_s']:.3f} s")
        p = results.get("compile_precompiled", {})
        if "first_call_s" in p:
            print(f"after nsa_core.precompile ({p['precompile']['kernels']} kernels of {p['precompile']['launches']} "
                  f"launches, recorded in {p['precompile']['record_s']:.1f} s, compiled in "
                  f"{p['precompile']['compile_s']:.1f} s): precompile {p['precompile_s']:.1f} s + first call "
                  f"{p['first_call_s']:.2f} s (limit: {'met' if p['within_limit'] else 'NOT met'})")
        elif p:
            print(f"precompiled: {p.get('skipped') or p.get('error')}")
