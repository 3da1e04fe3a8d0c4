"""Markdown table of a run.sh results CSV: median wall time per tool and scenario, repository
sizes, client peak RSS, and coffer's speed-up against each peer measured in the same run."""
import csv
import statistics
import sys

rows = [r for p in sys.argv[1:] for r in csv.DictReader(open(p)) if r["rc"] == "0"]
scen = ["S1", "S2", "S3", "S4", "S5", "S6"]
tools = [t for t in dict.fromkeys(r["tool"] for r in rows)]


def med(tool, s, col="wall_s"):
    v = [float(r[col]) for r in rows if r["tool"] == tool and r["scenario"] == s]
    return statistics.median(v) if v else None


print("| tool | " + " | ".join(scen) + " | repo after S1 (MB) | repo growth S6 (MB) | client peak RSS S1 (MB) | S4 verify |")
print("|---|" + "---:|" * 9 + "---|")
for t in tools:
    cells = [f"{med(t, s):.2f}" if med(t, s) is not None else "–" for s in scen]
    r1 = med(t, "S1", "repo_bytes")
    g = (med(t, "S6", "repo_bytes") or 0) - (med(t, "S5", "repo_bytes") or 0)
    rss = med(t, "S1", "peak_rss_kb")
    ver = next((r["verify"] for r in rows if r["tool"] == t and r["scenario"] == "S4" and r["verify"]), "")
    print(f"| {t} | " + " | ".join(cells) + f" | {r1 / 1e6:.0f} | {g / 1e6:.0f} | {rss / 1024:.0f} | {ver} |")
if "coffer" in tools:
    print()
    print("coffer's speed-up (peer time / coffer time, same run):")
    print()
    print("| peer | " + " | ".join(scen) + " |")
    print("|---|" + "---:|" * 6)
    for t in tools:
        if t == "coffer":
            continue
        cells = []
        for s in scen:
            a, b = med(t, s), med("coffer", s)
            cells.append(f"{a / b:.2f}x" if a and b else "–")
        print(f"| {t} | " + " | ".join(cells) + " |")
