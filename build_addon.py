"""Build the HoloFusion Blender extension: installable zips in dist/, one per platform and Python line.

    python build_addon.py [--platforms linux-x64,windows-x64,macos-arm64,macos-x64] [--lines py311,py313]
                          [--wheels DIR] [--out dist]

Each zip holds blender_addon/ with its manifest completed for that zip (platforms, wheels, the Blender version range
of its Python line), the wire-protocol client (backend/holofusion/client.py and server/protocol.py, unchanged, as the
extension's `wire` package) and the matching pyzmq wheels, unmodified from the package registry (downloaded once
with pip into --wheels, default dist/wheels). Blender 4.2 to 5.0 run Python 3.11 (pyzmq's cp311 wheels); 5.1 and
newer run 3.13 (pyzmq's cp312-abi3 wheels). One zip per line, because Blender's packaging drops an abi3 wheel when a
version-specific one is present, and one per platform, because a zip may only carry its platform's wheels.

The manifest is checked against Blender's extension rules first; every problem is reported in one line each and the
build exits with code 2.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON = ROOT / "blender_addon"
WIRE = {"wire/__init__.py": None, "wire/client.py": ROOT / "backend/holofusion/client.py",
        "wire/server/__init__.py": None, "wire/server/protocol.py": ROOT / "backend/holofusion/server/protocol.py"}
PYZMQ = "27.1.0"


@dataclass(frozen=True)
class Line:
    name: str
    python: str
    blender_min: str
    blender_max: str | None
    abi: str


LINES = {"py311": Line("py311", "3.11", "4.2.0", "5.1.0", "cp311"),
         "py313": Line("py313", "3.13", "5.1.0", None, "abi3")}
PLATFORMS = {  # Blender's platform name: pip --platform tags to try, newest first
    "linux-x64": ["manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64"],
    "windows-x64": ["win_amd64"],
    "macos-arm64": ["macosx_11_0_arm64"],
    "macos-x64": ["macosx_10_15_x86_64"],
}

WHEEL_FITS = {  # does a wheel's platform tag serve this Blender platform? (universal2 serves both Macs)
    "linux-x64": lambda tag: "manylinux" in tag and tag.endswith("x86_64"),
    "windows-x64": lambda tag: tag == "win_amd64",
    "macos-arm64": lambda tag: tag.startswith("macosx") and tag.endswith(("arm64", "universal2")),
    "macos-x64": lambda tag: tag.startswith("macosx") and tag.endswith(("x86_64", "universal2")),
}

REQUIRED = ("schema_version", "id", "version", "name", "tagline", "maintainer", "type", "license",
            "blender_version_min")
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


class BuildError(Exception):
    pass


def check_manifest(manifest: dict) -> list[str]:
    """Blender's extension manifest rules: every broken one, in words."""
    problems = [f"blender_manifest.toml: {k!r} is required" for k in REQUIRED if k not in manifest]

    def empty(v) -> bool:
        return v in ("", [], {}) or (isinstance(v, dict) and any(empty(x) for x in v.values()))

    problems += [f"blender_manifest.toml: {k!r} is empty; remove it or give it a value"
                 for k, v in manifest.items() if empty(v)]
    if manifest.get("schema_version") not in (None, "1.0.0"):
        problems.append(f"schema_version {manifest['schema_version']!r}: this builder writes 1.0.0")
    if "id" in manifest and not re.fullmatch(r"[a-z][a-z0-9_]*", str(manifest["id"])):
        problems.append(f"id {manifest['id']!r}: lowercase letters, digits and underscores, starting with a letter")
    for key in ("version", "blender_version_min", "blender_version_max"):
        if key in manifest and not SEMVER.match(str(manifest[key])):
            problems.append(f"{key} {manifest[key]!r}: must be a version like 1.2.3")
    if SEMVER.match(str(manifest.get("blender_version_min", ""))) and \
            tuple(map(int, manifest["blender_version_min"].split("."))) < (4, 2, 0):
        problems.append("blender_version_min: extensions need Blender 4.2.0 or newer")
    tagline = str(manifest.get("tagline", ""))
    if len(tagline) > 64:
        problems.append(f"tagline is {len(tagline)} characters; at most 64")
    if tagline and not tagline[-1].isalnum():
        problems.append(f"tagline {tagline!r} ends in punctuation; Blender refuses that")
    if manifest.get("type") not in (None, "add-on", "theme"):
        problems.append(f"type {manifest['type']!r}: choose 'add-on' or 'theme'")
    licenses = manifest.get("license", [])
    if not isinstance(licenses, list) or not all(isinstance(x, str) and x.startswith("SPDX:") for x in licenses):
        problems.append("license: a list of SPDX identifiers such as [\"SPDX:MIT\"]")
    perms = manifest.get("permissions", {})
    if "network" not in perms:
        problems.append("permissions: 'network' must be declared (the extension talks to its backend)")
    for name, reason in perms.items():
        if name not in ("files", "network", "clipboard", "camera", "microphone"):
            problems.append(f"permissions: {name!r} is not a Blender permission")
        elif not isinstance(reason, str) or len(reason) > 64 or reason.endswith("."):
            problems.append(f"permissions.{name}: a reason of at most 64 characters, without a final full stop")
    return problems


def download_wheels(platform: str, line: Line, cache: Path) -> list[Path]:
    """The pyzmq wheel for one platform and Python line, from the registry (pip download), cached."""
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"pyzmq-{PYZMQ}-{'cp311-cp311' if line.abi == 'cp311' else 'cp312-abi3'}-*.whl"

    def matches() -> list[Path]:
        return sorted(p for p in cache.glob(pattern) if WHEEL_FITS[platform](p.name[:-4].rsplit("-", 1)[1]))

    if not matches():
        errors = []
        for tag in PLATFORMS[platform]:
            cmd = [sys.executable, "-m", "pip", "download", f"pyzmq=={PYZMQ}", "--only-binary=:all:", "--no-deps",
                   "--platform", tag, "--python-version", line.python, "--implementation", "cp", "-d", str(cache),
                   "-q", "--disable-pip-version-check"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0 and matches():
                break
            errors.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"no wheel for {tag}")
        if not matches():
            raise BuildError(f"no pyzmq {PYZMQ} wheel for {platform} / Python {line.python} "
                             f"({'; '.join(errors)}); put one in {cache} or check the network")
    return matches()[:1]


def manifest_text(base: str, platform: str, line: Line, wheels: list[Path]) -> str:
    """The source manifest with this zip's platforms, wheels and version range written in."""
    lines = [ln for ln in base.splitlines() if not ln.startswith(("platforms", "wheels", "blender_version_"))]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("license"))
    extra = [f'blender_version_min = "{line.blender_min}"']
    if line.blender_max:
        extra.append(f'blender_version_max = "{line.blender_max}"')
    extra.append(f'platforms = ["{platform}"]')
    extra.append("wheels = [" + ", ".join(f'"./wheels/{w.name}"' for w in wheels) + "]")
    return "\n".join(lines[:at + 1] + extra + lines[at + 1:]) + "\n"


def build(platforms: list[str], lines: list[str], out: Path, cache: Path) -> list[Path]:
    base = (ADDON / "blender_manifest.toml").read_text()
    manifest = tomllib.loads(base)
    problems = check_manifest(manifest)
    if problems:
        raise BuildError("\n".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in ADDON.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and p.name != "blender_manifest.toml")
    written = []
    for platform in platforms:
        for name in lines:
            line = LINES[name]
            wheels = download_wheels(platform, line, cache)
            text = manifest_text(base, platform, line, wheels)
            problems = check_manifest(tomllib.loads(text))
            if problems:
                raise BuildError("\n".join(problems))
            path = out / f"{manifest['id']}-{manifest['version']}-{platform}-{name}.zip"
            tmp = path.with_suffix(".zip.partial")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("blender_manifest.toml", text)
                for f in files:
                    z.write(f, f.relative_to(ADDON).as_posix())
                for arc, src in WIRE.items():
                    if src is None:
                        z.writestr(arc, '"""The HoloFusion wire-protocol client, as shipped in holofusion."""\n')
                    else:
                        z.write(src, arc)
                for w in wheels:
                    z.write(w, f"wheels/{w.name}")
            tmp.replace(path)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--platforms", default=",".join(PLATFORMS),
                    help=f"comma-separated, of: {', '.join(PLATFORMS)} (default: all)")
    ap.add_argument("--lines", default=",".join(LINES),
                    help="Python lines: py311 (Blender 4.2 to 5.0), py313 (5.1 and newer) (default: both)")
    ap.add_argument("--wheels", default=str(ROOT / "dist" / "wheels"), help="pyzmq wheel cache (default: dist/wheels)")
    ap.add_argument("--out", default=str(ROOT / "dist"), help="folder for the zips (default: dist)")
    args = ap.parse_args(argv)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    lines = [x.strip() for x in args.lines.split(",") if x.strip()]
    bad = [p for p in platforms if p not in PLATFORMS] + [x for x in lines if x not in LINES]
    if bad:
        print(f"build_addon: unknown {', '.join(map(repr, bad))}; platforms: {', '.join(PLATFORMS)}; "
              f"lines: {', '.join(LINES)}", file=sys.stderr)
        return 2
    try:
        for path in build(platforms, lines, Path(args.out), Path(args.wheels)):
            print(f"wrote {path}")
    except BuildError as e:
        for line in str(e).splitlines():
            print(f"build_addon: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
