# Vendored copy of ../shared/checks/report_contract.py (the public report contract check), so the
# tests run it wherever the repository is cloned; tests prefer the shared file when it exists.
"""Checks a kdeploy report.json against the public contract in ../docs/ARCHITECTURE.md.

Usage: python report_contract.py OUT_DIR_OR_REPORT_JSON
Exit 0 when the report holds its contract: required fields present, every artifact it names
exists at its (report-relative) path with the size and sha256 it claims, verdicts consistent
(`ready` iff a candidate is selected, the selected candidate passed). Standard library only.
"""
import gzip, hashlib, json, os, sys

REQUIRED = ["schema_version", "ready", "selected", "model", "target", "host", "candidates", "findings"]


def main(arg):
    path = os.path.join(arg, "report.json") if os.path.isdir(arg) else arg
    base = os.path.dirname(os.path.abspath(path))
    r = json.load(open(path))
    problems = [f"missing field '{k}'" for k in REQUIRED if k not in r]
    names = set()
    for c in r.get("candidates", []):
        name = c.get("name", "?")
        names.add(name)
        for k in ("name", "passed", "artifacts", "fidelity", "latency"):
            if k not in c:
                problems.append(f"candidate {name}: missing '{k}'")
        for a in c.get("artifacts", []):
            p = a.get("path", "")
            if os.path.isabs(p):
                problems.append(f"candidate {name}: artifact path is absolute: {p}")
            full = os.path.join(base, p)
            if not os.path.isfile(full):
                problems.append(f"candidate {name}: artifact missing: {p}")
                continue
            data = open(full, "rb").read()
            if a.get("size_bytes") != len(data):
                problems.append(f"candidate {name}: {p} size_bytes {a.get('size_bytes')} != {len(data)}")
            if a.get("sha256") != hashlib.sha256(data).hexdigest():
                problems.append(f"candidate {name}: {p} sha256 does not match the file")
            if "gzip_bytes" in a and abs(a["gzip_bytes"] - len(gzip.compress(data))) > 0.05 * len(data):
                problems.append(f"candidate {name}: {p} gzip_bytes far from gzip of the file")
        for f in c.get("fidelity", []):
            if f.get("passed") and c.get("passed") is None:
                problems.append(f"candidate {name}: fidelity passed but candidate verdict missing")
    sel = r.get("selected")
    if r.get("ready") and sel not in names:
        problems.append(f"ready is true but selected={sel!r} is not a candidate")
    if not r.get("ready") and sel is not None and any(c.get("name") == sel and c.get("passed") for c in r.get("candidates", [])):
        problems.append("ready is false although the selected candidate passed")
    for c in r.get("candidates", []):
        if c.get("name") == sel and not c.get("passed"):
            problems.append(f"selected candidate {sel} did not pass")
    for p in problems:
        print("contract:", p)
    print(f"{len(problems)} contract problems in {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
