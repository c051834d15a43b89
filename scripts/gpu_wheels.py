#!/usr/bin/env python
"""The wheels a lent GPU machine needs, as a closed set (``scripts/gpu_session.sh wheels`` runs ``build``).

The GPU image (``scripts/gpu_image.txt``: CPython 3.12, torch 2.11, transformers 5.17, huggingface-hub 1.33, ...)
has no package index. What tagi-ds needs there and the image lacks travels as wheels; what the image has and
setup.py accepts is used as it is (carrying a newer transformers would drag huggingface-hub 2.x and HF kernels
along, and break the image's own packages). Rules:

- needs: setup.py's install_requires plus the GPU checks' test tools, minus ``SKIP`` (each with its reason);
- a need (or a carried wheel's requirement) the image satisfies stays the image's (a package whose version was
  not read satisfies only a requirement without a version bound); otherwise it is carried at
  the version the CPU suite last passed with (``requirements/tested.txt``), and its own requirements follow;
- ``check``: every Requires-Dist of every carried wheel (markers evaluated for the image) is carried or present
  on the image at an accepted version. ``build`` ends with it; the CPU test of the runbook runs both.

    python scripts/gpu_wheels.py build --wheels .whl      # download / build, then check
    python scripts/gpu_wheels.py check --wheels .whl      # the closure check alone
"""

from __future__ import annotations

import argparse
import email.parser
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "scripts" / "gpu_image.txt"
TESTED = ROOT / "requirements" / "tested.txt"
# The GPU image's interpreter and platform: markers are evaluated for it, wheels downloaded for it.
MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# The GPU checks' test tools (pytest runs the GPU-marked kernel tests; peft loads the exported adapter).
GPU_TEST_NEEDS = ("pytest", "pytest-timeout", "peft")
# Declared needs that the GPU stages never import, and why they stay home.
SKIP = {
    "datasets": "read lazily, only for text:/p3: sources; the GPU stages use the built-in suite (pyarrow+pandas "
    "alone would exceed the 64 MiB the device call carries)"
}


def parse_image(path: Path = IMAGE) -> dict[str, Version | None]:
    """``name==version`` (version known) or ``name`` (present, version not recorded) per line; # comments."""
    out: dict[str, Version | None] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def parse_tested(path: Path = TESTED) -> dict[str, str]:
    out = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version.strip()
    return out


def wheel_meta(path: Path) -> tuple[str, Version, list[Requirement]]:
    """Name, version and the requirements that apply on the image (no extras) of one wheel file."""
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        msg = email.parser.Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    reqs = []
    for text in msg.get_all("Requires-Dist") or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(MARKERS):
            reqs.append(req)
    return canonicalize_name(msg["Name"]), Version(msg["Version"]), reqs


def satisfied_on_image(req: Requirement, image: dict[str, Version | None]) -> bool:
    """On the image at an accepted version. A package whose version was not read satisfies only a requirement
    without a version bound: a bound on it is carried rather than hoped for."""
    name = canonicalize_name(req.name)
    if name not in image:
        return False
    version = image[name]
    if version is None:
        return not req.specifier
    return req.specifier.contains(version, prereleases=True)


def check(wheels: Path, image: dict[str, Version | None]) -> list[str]:
    """One line per requirement of a carried wheel that is neither carried nor on the image at an accepted
    version (empty: the set is closed)."""
    carried = {}
    for whl in sorted(wheels.glob("*.whl")):
        name, version, reqs = wheel_meta(whl)
        carried[name] = (version, reqs, whl.name)
    problems = []
    for _, (_, reqs, file) in sorted(carried.items()):
        for req in reqs:
            dep = canonicalize_name(req.name)
            if dep in carried:
                if not req.specifier.contains(carried[dep][0], prereleases=True):
                    problems.append(f"{file}: needs {req}, carried {dep} {carried[dep][0]}")
            elif not satisfied_on_image(req, image):
                have = "absent" if dep not in image else f"version {image[dep]}" if image[dep] else "version not read"
                problems.append(f"{file}: needs {req}, neither carried nor on the image ({have})")
    return problems


def setup_requires() -> list[Requirement]:
    """install_requires from setup.py (read as text: running setup.py would need setuptools' machinery)."""
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    block = re.search(r"install_requires=\[(.*?)\]", text, re.S).group(1)
    return [Requirement(m) for m in re.findall(r'"([^"]+)"', block)]


def _fetch(name: str, version: str, dest: Path) -> Path:
    """The wheel of ``name==version`` for the image in ``dest``: a binary download, else built here (pure
    Python sdists such as deepspeed's)."""
    pattern = canonicalize_name(name).replace("-", "_")
    found = [p for p in dest.glob("*.whl") if canonicalize_name(p.name.split("-")[0]).replace("-", "_") == pattern]
    if found:
        return found[0]
    spec = f"{name}=={version}"
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *plat,
        "-d",
        str(dest),
        spec,
    ]
    if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            raise SystemExit(
                f"error: {spec}: no wheel for CPython 3.12 x86-64 and building one failed: "
                f"{build.stderr.strip().splitlines()[-1] if build.stderr.strip() else build.returncode}"
            )
    return _fetch(name, version, dest)


def build(wheels: Path, image: dict[str, Version | None], tested: dict[str, str]) -> list[str]:
    """Carry every need the image does not satisfy, and their requirements, at the tested versions."""
    wheels.mkdir(parents=True, exist_ok=True)
    todo = [r for r in setup_requires() if canonicalize_name(r.name) not in SKIP]
    todo += [Requirement(n) for n in GPU_TEST_NEEDS]
    carried: dict[str, str] = {}
    while todo:
        req = todo.pop(0)
        name = canonicalize_name(req.name)
        if name in carried or satisfied_on_image(req, image):
            continue
        if name not in tested:
            raise SystemExit(
                f"error: {TESTED.relative_to(ROOT)}: no tested version of {name} (needed on the GPU image as {req})"
            )
        _, version, reqs = wheel_meta(_fetch(req.name, tested[name], wheels))
        carried[name] = str(version)
        todo += reqs
    return [f"{n}=={v}" for n, v in sorted(carried.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", choices=["build", "check"])
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the wheel folder (default .whl/)")
    ap.add_argument("--image", type=Path, default=IMAGE, help="what the GPU image has (default scripts/gpu_image.txt)")
    ap.add_argument("--tested", type=Path, default=TESTED, help="versions to carry (default requirements/tested.txt)")
    args = ap.parse_args(argv)
    image = parse_image(args.image)
    if args.command == "build":
        carried = build(args.wheels, image, parse_tested(args.tested))
        print("carried:", " ".join(carried))
        kept = sorted(str(r) for r in setup_requires() if satisfied_on_image(r, image))
        print("the image's own:", ", ".join(kept))
        print("left home:", "; ".join(f"{k} ({v})" for k, v in SKIP.items()))
    problems = check(args.wheels, image)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 1
    n = len(list(args.wheels.glob("*.whl")))
    size = sum(p.stat().st_size for p in args.wheels.glob("*.whl")) / 2**20
    print(f"closure ok: {n} wheels ({size:.1f} MiB) in {args.wheels}, every requirement carried or on the image")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InvalidRequirement as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
