#!/usr/bin/env python3
"""Fails when a locked dependency of a published crate needs a newer Rust than the crate declares.

Reads `cargo metadata` (all features, the locked versions) and, for every workspace crate that can be
published, walks its normal and build dependencies on every target and compares each package's
`rust-version` with the crate's own. Only one toolchain is installed here, so the MSRV is checked against
what the dependencies declare rather than by building with the old compiler.
"""

import json
import subprocess
import sys


def version(text):
    """'1.89' or '1.89.0' as a comparable tuple."""
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def show(v):
    return ".".join(str(p) for p in v).removesuffix(".0")


def main():
    cargo = sys.argv[1] if len(sys.argv) > 1 else "cargo"
    raw = subprocess.run(
        [cargo, "metadata", "--format-version", "1", "--all-features", "--locked"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    meta = json.loads(raw)
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    failed = False
    for member in meta["workspace_members"]:
        crate = packages[member]
        if crate.get("publish") == []:
            continue  # publish = false: not installed by users
        if not crate.get("rust_version"):
            print(f"{crate['name']}: no rust-version declared")
            failed = True
            continue
        declared = version(crate["rust_version"])
        seen, todo = set(), [member]
        while todo:
            for dep in nodes[todo.pop()]["deps"]:
                used = any(k["kind"] in (None, "build") for k in dep["dep_kinds"])
                if used and dep["pkg"] not in seen:
                    seen.add(dep["pkg"])
                    todo.append(dep["pkg"])
        needs = sorted(
            (version(packages[p]["rust_version"]), packages[p]["name"], packages[p]["version"])
            for p in seen
            if packages[p].get("rust_version")
        )
        newest = needs[-1][0] if needs else (0, 0, 0)
        too_new = [n for n in needs if n[0] > declared]
        most = ", ".join(f"{n} {v}" for r, n, v in needs if r == newest)
        print(
            f"{crate['name']}: rust-version {show(declared)}; {len(seen)} locked dependencies, "
            f"the most demanding need {show(newest)} ({most})"
        )
        for r, n, v in too_new:
            print(f"  {n} {v} needs Rust {show(r)} > {show(declared)}")
            failed = True
    if failed:
        print("raise rust-version in Cargo.toml (or pin the dependencies above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
