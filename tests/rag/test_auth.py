"""API keys: the key file, rotation by editing it, constant-time checks, and the 0600 key the demo creates."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rag.auth import ApiKeys, bearer, create_key_file, read_client_key
from rag.config import ConfigError

OLD, NEW = "old-key-0123456789abcdef", "new-key-0123456789abcdef"


def _write(path: Path, text: str, bump_ns: int = 0) -> None:
    path.write_text(text, encoding="utf-8")
    if bump_ns:  # file systems with coarse mtimes: make the change visible
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump_ns))


def test_bearer_header_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    _write(path, f"# rotation\n{OLD}\n\n")
    keys = ApiKeys(path)
    assert keys.accepts(f"Bearer {OLD}") and keys.accepts(f"bearer {OLD}")
    for header in [None, "", OLD, f"Basic {OLD}", f"Bearer {OLD}x", "Bearer ", f"Bearer {NEW}", "Bearer \udcff"]:
        assert not keys.accepts(header), header


def test_rotation_needs_no_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    _write(path, f"{OLD}\n")
    keys = ApiKeys(path)
    _write(path, f"{NEW}\n{OLD}\n", bump_ns=1_000_000)  # both live while clients move over
    assert keys.accepts(f"Bearer {NEW}") and keys.accepts(f"Bearer {OLD}")
    _write(path, f"{NEW}\n", bump_ns=2_000_000)
    assert keys.accepts(f"Bearer {NEW}") and not keys.accepts(f"Bearer {OLD}")


@pytest.mark.parametrize("emptied", ["deleted", "empty", "comments only", "short key"])
def test_emptying_or_deleting_the_file_revokes_every_key_until_a_good_one_returns(tmp_path: Path,
                                                                                  emptied: str) -> None:
    path = tmp_path / "keys"
    _write(path, f"{NEW}\n{OLD}\n")
    keys = ApiKeys(path)
    assert keys.accepts(f"Bearer {NEW}")
    if emptied == "deleted":
        path.unlink()
    else:
        _write(path, {"empty": "", "comments only": "# revoked\n", "short key": "tiny\n"}[emptied], bump_ns=1_000_000)
    assert not keys.accepts(f"Bearer {NEW}") and not keys.accepts(f"Bearer {OLD}")
    assert not keys.accepts(f"Bearer {NEW}")  # stays closed
    _write(path, f"{OLD}\n", bump_ns=2_000_000)
    assert keys.accepts(f"Bearer {OLD}") and not keys.accepts(f"Bearer {NEW}")


@pytest.mark.parametrize(("text", "message"), [(None, "cannot be read"), ("# none\n\n", "no key"),
                                               ("short\n", "shorter than")])
def test_a_bad_key_file_is_a_clear_startup_error(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "keys"
    if text is not None:
        _write(path, text)
    with pytest.raises(ConfigError, match=message) as info:
        ApiKeys(path)
    assert str(path) in str(info.value)


def test_created_key_file_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "var" / "api_key"
    assert create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_client_key(path)
    assert len(key) >= 40 and ApiKeys(path).accepts(f"Bearer {key}")
    assert not create_key_file(path) and read_client_key(path) == key
    assert bearer(key) == {"authorization": f"Bearer {key}"} and bearer(None) == {}
