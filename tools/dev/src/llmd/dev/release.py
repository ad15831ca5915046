"""Each llmd distribution is released on its own: its version, its changelog, its wheel and
sdist, its image (for services), its git tag.

    llmd-dev release dist                     # wheel + sdist of every package into dist/
    llmd-dev release check                    # versions, changelogs and pins agree
    llmd-dev release PACKAGE VERSION          # release one package

Releasing PACKAGE at VERSION checks that VERSION is the package's version in its pyproject.toml
(a release commit bumps it), that its CHANGELOG.md has a `## VERSION` section, that the llmd
libraries it pins (`llmd-runtime==0.1.0`) are the versions in the workspace (a service is
released against the libraries it was tested with), that the working tree is clean and the tag
`PACKAGE-vVERSION` is new; then it builds the wheel and sdist into dist/, for a service its image
with the same version in its OCI labels, and tags the commit.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmd.dev.images import IMAGES, ImageError, build, repo_root, uv_binary

MEMBERS = (
    "libs/protocol",
    "libs/runtime",
    "libs/kvcache",
    "tools/vllm-cpu",
    "tools/sim",
    "tools/dev",
    "services/scheduler",
    "services/indexer",
    "services/autoscaler",
    "services/activator",
    "services/sidecar",
    "benchmarks",
)
"""The released distributions (the example plugin and the workspace root are not)."""

_PIN = re.compile(r"^(llmd-[a-z0-9-]+)\s*(==\s*([0-9][^,;\s]*))?")


class ReleaseError(RuntimeError):
    """Why a release cannot go ahead."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    path: Path
    pins: dict[str, str | None]
    """llmd dependencies and the version each is pinned to (None: not pinned)."""

    @property
    def changelog(self) -> Path:
        return self.path / "CHANGELOG.md"

    def changelog_versions(self) -> list[str]:
        if not self.changelog.is_file():
            return []
        return re.findall(r"^## ([0-9][^\s]*)", self.changelog.read_text(), re.M)


def packages(root: Path | None = None) -> dict[str, Package]:
    base = root or repo_root()
    out: dict[str, Package] = {}
    for member in MEMBERS:
        doc = tomllib.loads((base / member / "pyproject.toml").read_text())["project"]
        pins: dict[str, str | None] = {}
        for dep in doc.get("dependencies", []):
            m = _PIN.match(dep)
            if m:
                pins[m.group(1)] = m.group(3)
        out[doc["name"]] = Package(doc["name"], doc["version"], base / member, pins)
    return out


def check(root: Path | None = None) -> list[str]:
    """Problems that would stop a release of any package; empty when all agree."""
    pkgs = packages(root)
    problems = []
    for p in pkgs.values():
        if p.version not in p.changelog_versions():
            problems.append(f"{p.name}: CHANGELOG.md has no '## {p.version}' section")
        for dep, pinned in p.pins.items():
            if dep not in pkgs:
                problems.append(f"{p.name}: depends on {dep}, which is not released")
            elif pinned is None:
                problems.append(f"{p.name}: {dep} is not pinned (use {dep}=={pkgs[dep].version})")
            elif pinned != pkgs[dep].version:
                problems.append(
                    f"{p.name}: pins {dep}=={pinned} but the workspace has {pkgs[dep].version}"
                )
    return problems


def _run(cmd: Sequence[str], root: Path) -> str:
    r = subprocess.run(list(cmd), cwd=root, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise ReleaseError(f"{' '.join(cmd[:4])} failed: {(r.stderr or r.stdout)[-1500:]}")
    return r.stdout


def build_dist(names: Sequence[str], out: Path, root: Path | None = None) -> list[Path]:
    """Wheel and sdist of each package into `out`; the files written."""
    base = root or repo_root()
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    for name in names:
        print(f"==> building {name}", flush=True)
        _run([uv_binary(base), "build", "--package", name, "-q", "-o", str(out)], base)
    return sorted(set(out.iterdir()) - before)


def release(
    name: str,
    version: str,
    *,
    root: Path | None = None,
    image: bool = True,
    tag: bool = True,
) -> list[str]:
    """Release one package (see the module doc); what it produced."""
    base = root or repo_root()
    pkgs = packages(base)
    if name not in pkgs:
        raise ReleaseError(f"{name} is not a released package: {', '.join(sorted(pkgs))}")
    p = pkgs[name]
    if p.version != version:
        raise ReleaseError(
            f"{name} is at {p.version} in {p.path.relative_to(base)}/pyproject.toml: bump it to "
            f"{version} (and its dependents' pins) in the release commit first"
        )
    if version not in p.changelog_versions():
        raise ReleaseError(f"{p.changelog.relative_to(base)} has no '## {version}' section")
    mine = [x for x in check(base) if x.startswith(f"{name}:")]
    if mine:
        raise ReleaseError("; ".join(mine))
    tag_name = f"{name}-v{version}"
    if tag:
        if _run(["git", "status", "--porcelain"], base).strip():
            raise ReleaseError("the working tree has uncommitted changes: commit them first")
        if _run(["git", "tag", "--list", tag_name], base).strip():
            raise ReleaseError(f"tag {tag_name} exists already")
    produced = [str(f) for f in build_dist([name], base / "dist", base)]
    images = [i for i in IMAGES if i.package == name]
    if image and images:
        try:
            produced += build(images, root=base)
        except ImageError as exc:
            raise ReleaseError(str(exc)) from None
    if tag:
        _run(["git", "tag", "-a", tag_name, "-m", f"{name} {version}"], base)
        produced.append(f"tag {tag_name}")
    return produced


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmd-dev release",
        description="Release one llmd package (wheel, sdist, image, tag), check that versions, "
        "changelogs and pins agree, or build every package's distributions.",
    )
    parser.add_argument("package", help="a package name, or 'check', or 'dist'")
    parser.add_argument("version", nargs="?", help="the version to release")
    parser.add_argument("--no-image", action="store_true", help="do not build the image")
    parser.add_argument(
        "--no-tag", action="store_true", help="do not tag (nor require a clean tree)"
    )
    args = parser.parse_args(argv)
    root = repo_root()
    try:
        if args.package == "check":
            problems = check(root)
            for line in problems:
                print(f"  {line}")
            print("release metadata OK" if not problems else f"{len(problems)} problem(s)")
            return 1 if problems else 0
        if args.package == "dist":
            files = build_dist(list(packages(root)), root / "dist", root)
            for f in files:
                print(f"  {f.relative_to(root)}")
            return 0
        if not args.version:
            parser.error("give the version to release")
        for item in release(
            args.package, args.version, root=root, image=not args.no_image, tag=not args.no_tag
        ):
            print(f"  {item}")
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"released {args.package} {args.version}")
    return 0
