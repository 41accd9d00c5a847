"""rescue/build.py takes its Debian mirror from --mirror, $BYOI_DEBIAN_MIRROR or the build
machine's own apt sources (one-line and deb822 formats), as an operator behind their own mirror
expects; deb.debian.org only when nothing says otherwise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("rescue_build_mirror", REPO / "rescue" / "build.py")
assert _spec and _spec.loader
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def apt_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    return etc


DEB822 = """\
Types: deb deb-src
# a comment inside the stanza
URIs: http://mirror.example.internal/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.internal/debian-security
Suites: bookworm-security
Components: main
"""


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"sources.list.d/debian.sources": DEB822}, "http://mirror.example.internal/debian"),
        (
            {
                "sources.list": "# local mirror\n"
                "deb-src http://src.example/debian bookworm main\n"
                "deb [arch=amd64 signed-by=/k.gpg] https://m.example/debian bookworm main\n"
            },
            "https://m.example/debian",
        ),
        (  # the security archive and other suites are not the base system's mirror
            {
                "sources.list": "deb http://sec.example/debian-security bookworm-security main\n"
                "deb http://old.example/debian bullseye main\n",
                "sources.list.d/cloud.list": "deb https://pkgs.example/apt cloud-sdk main\n",
                "sources.list.d/z.sources": DEB822.replace(
                    "Types: deb deb-src", "Types: deb\nEnabled: no"
                ),
            },
            None,
        ),
        ({"sources.list.d/x.list": "deb cdrom:[Debian 12]/ bookworm main\n"}, None),
        (  # .list files are read before .sources, each kind in name order
            {
                "sources.list.d/b.list": "deb http://b.example/debian bookworm main\n",
                "sources.list.d/a.sources": DEB822,
            },
            "http://b.example/debian",
        ),
    ],
)
def test_mirror_from_apt_sources(tmp_path: Path, files: dict, expected: str | None) -> None:
    assert build.mirror_from_apt("bookworm", apt_tree(tmp_path, files)) == expected


def test_mirror_option_then_env_then_apt_then_default(tmp_path: Path, monkeypatch) -> None:
    etc = apt_tree(tmp_path, {"sources.list.d/debian.sources": DEB822})
    empty = apt_tree(tmp_path / "empty", {})
    monkeypatch.setenv(build.MIRROR_ENV, "http://env.example/debian")
    assert build.choose_mirror("http://opt.example/debian", "bookworm", etc) == (
        "http://opt.example/debian"
    )
    assert build.choose_mirror(None, "bookworm", etc) == "http://env.example/debian"
    monkeypatch.delenv(build.MIRROR_ENV)
    assert build.choose_mirror(None, "bookworm", etc) == "http://mirror.example.internal/debian"
    assert build.choose_mirror(None, "bookworm", empty) == build.DEFAULT_MIRROR
