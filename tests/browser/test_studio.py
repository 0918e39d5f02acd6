"""How the browser tests find Chromium, and the one line they fail with when there is none."""

from __future__ import annotations

from browser import studio


def test_chromium_is_found_by_env_path_or_debian_location(monkeypatch, tmp_path):
    binary = tmp_path / "my-chromium"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("NIJIMI_CHROMIUM", str(binary))
    assert studio.find_chromium() == str(binary)
    monkeypatch.setenv("NIJIMI_CHROMIUM", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(studio, "DEBIAN_CHROMIUM", str(binary))
    assert studio.find_chromium() == str(binary)
    (tmp_path / "chromium").symlink_to(binary)
    assert studio.find_chromium() == str(tmp_path / "chromium")


def test_without_chromium_the_reason_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("NIJIMI_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(studio, "DEBIAN_CHROMIUM", str(tmp_path / "chromium"))
    assert studio.missing_browser() == (
        "Chromium not found (looked at $NIJIMI_CHROMIUM, chromium and chromium-browser on the PATH, "
        "/usr/bin/chromium): apt-get install chromium (make test does as root), or set NIJIMI_CHROMIUM")
