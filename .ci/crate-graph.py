#!/usr/bin/env python3
"""Check that the workspace's crate graph keeps its direction.

    bindings (faultline-uffd) <- runtime (faultline) <- daemon (faultline-daemon) <- cli (faultline-cli)

A crate may depend on crates of lower layers only (never on its own layer or above), and
faultline-testing, the test helpers, only as a dev-dependency: nothing of it may reach the
product's dependency graph. A workspace member missing from LAYERS fails the check until it is
placed (faultline-daemon may exist or not).

Reads `cargo metadata --format-version 1 --no-deps` (run here, or given as a file argument),
prints every offending edge and exits 1 if there is one.
"""
import json
import subprocess
import sys

# Layer of each crate: an edge must go to a strictly lower layer.
LAYERS = {
    "faultline-uffd": 0,    # bindings
    "faultline": 1,         # runtime
    "faultline-daemon": 2,  # the serving daemon as a library
    "faultline-cli": 3,     # the `faultline` command
}
# Test helpers: above every product crate, reachable only through dev-dependencies.
TESTING = "faultline-testing"
TESTING_LAYER = 3


def layer(name):
    return TESTING_LAYER if name == TESTING else LAYERS.get(name)


def main():
    if len(sys.argv) > 1:
        with open(sys.argv[1]) as f:
            meta = json.load(f)
    else:
        out = subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            check=True, capture_output=True, text=True,
        ).stdout
        meta = json.loads(out)
    members = set(meta["workspace_members"])
    packages = [p for p in meta["packages"] if p["id"] in members]
    names = {p["name"] for p in packages}
    bad = []
    for p in sorted(packages, key=lambda p: p["name"]):
        src = p["name"]
        if layer(src) is None:
            bad.append(f"{src}: a workspace member with no place in .ci/crate-graph.py's LAYERS")
            continue
        for d in p["dependencies"]:
            dst = d["name"]
            if dst not in names:
                continue  # a third-party crate
            kind = d["kind"] or "normal"
            target = f" (target {d['target']})" if d.get("target") else ""
            edge = f"{src} -> {dst} [{kind}{target}]"
            if dst == TESTING:
                if kind != "dev":
                    bad.append(f"{edge}: {TESTING} may only be a dev-dependency")
                continue
            if layer(dst) is None:
                continue  # reported as a member with no place
            if kind != "dev" and layer(dst) >= layer(src):
                bad.append(
                    f"{edge}: goes against the crate graph's direction "
                    "(bindings <- runtime <- daemon <- cli)"
                )
            if kind == "dev" and layer(dst) > layer(src) and src != TESTING:
                bad.append(f"{edge}: a dev-dependency on a crate of a higher layer")
    if bad:
        print("crate graph: wrong direction", file=sys.stderr)
        for b in bad:
            print(f"  {b}", file=sys.stderr)
        return 1
    print(f"crate graph: ok ({', '.join(sorted(names))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
