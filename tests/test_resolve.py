"""resolve_model: local files and directories, pull names, hub ids (offline), errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenloom.errors import GGUFFormatError, HubUnavailableError, ModelLoadError, ModelNotFoundError
from tokenloom.loading import resolve as resolve_mod
from tokenloom.loading.hub import resolve_hub_id
from tokenloom.loading.pull import PULL_MODELS, list_pullable
from tokenloom.loading.resolve import resolve_model

GGUF_BYTES = b"GGUF\x03\x00\x00\x00" + b"\0" * 16


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hub offline, with an empty private hub cache; returns the cache directory."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _fake_snapshot(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<sha>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"  # the name does not matter, the magic bytes do
    path.write_bytes(GGUF_BYTES)
    source = resolve_model(path)
    assert source.kind == "gguf" and source.path == path
    assert resolve_model(str(path)).path == path


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFFormatError, match="not a GGUF file") as info:
        resolve_model(path)
    assert str(path) in str(info.value)


def test_gguf_file_with_gguf_file_argument(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(GGUF_BYTES)
    with pytest.raises(ModelLoadError, match="gguf_file"):
        resolve_model(path, gguf_file="m.gguf")


def test_hf_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "extra.gguf").write_bytes(GGUF_BYTES)  # config.json wins without gguf_file
    source = resolve_model(tmp_path)
    assert source.kind == "hf" and source.path == tmp_path


def test_gguf_file_in_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "a.gguf").write_bytes(GGUF_BYTES)
    (tmp_path / "b.gguf").write_bytes(GGUF_BYTES)
    source = resolve_model(tmp_path, gguf_file="b.gguf")
    assert source.kind == "gguf" and source.path == tmp_path / "b.gguf"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(tmp_path, gguf_file="c.gguf")
    assert "c.gguf" in str(info.value) and "a.gguf" in str(info.value)


def test_directory_with_single_gguf(tmp_path: Path) -> None:
    (tmp_path / "only.gguf").write_bytes(GGUF_BYTES)
    (tmp_path / "LICENSE").write_text("licence")
    source = resolve_model(tmp_path)
    assert source.kind == "gguf" and source.path == tmp_path / "only.gguf"


def test_directory_with_several_ggufs(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(GGUF_BYTES)
    (tmp_path / "b.gguf").write_bytes(GGUF_BYTES)
    with pytest.raises(ModelNotFoundError, match="gguf_file"):
        resolve_model(tmp_path)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither config.json nor a .gguf"):
        resolve_model(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)
    assert "tokenloom pull" in info.value.hint
    for name in list_pullable():
        assert name in info.value.hint
    assert isinstance(info.value, FileNotFoundError)


def test_path_object_is_never_a_hub_id(offline: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        resolve_model(Path("someorg/somemodel"))


def test_pull_name(smollm2_gguf: Path) -> None:
    source = resolve_model("smollm2-135m-instruct", progress=False)
    assert source.kind == "gguf" and source.path == smollm2_gguf
    assert resolve_model("smollm2-135m-instruct", allow_pull=False).path == smollm2_gguf
    assert resolve_model("smollm2-135m-instruct", gguf_file=smollm2_gguf.name).path == smollm2_gguf


def test_pull_name_not_pulled_without_allow_pull(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path))

    def no_pull(*args: object, **kwargs: object) -> Path:
        raise AssertionError("must not pull")

    monkeypatch.setattr(resolve_mod, "pull", no_pull)
    name = next(iter(PULL_MODELS))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name, allow_pull=False)
    assert name in str(info.value) and f"tokenloom pull {name}" in info.value.hint


def test_pull_name_calls_pull(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pulled = tmp_path / "x.gguf"
    pulled.write_bytes(GGUF_BYTES)
    calls = []
    monkeypatch.setattr(resolve_mod, "pull", lambda name, **kw: calls.append((name, kw)) or pulled)
    source = resolve_model("gemma3-270m", progress=False)
    assert source.path == pulled and calls == [("gemma3-270m", {"progress": False})]


def test_offline_hub_id(offline: Path) -> None:
    with pytest.raises(HubUnavailableError) as info:
        resolve_model("someorg/somemodel-that-is-not-cached")
    assert "someorg/somemodel-that-is-not-cached" in str(info.value)
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert "tokenloom pull" in info.value.hint


def test_offline_hub_id_direct(offline: Path) -> None:
    with pytest.raises(HubUnavailableError, match="org/name"):
        resolve_hub_id("org/name", revision="main")


def test_offline_hub_id_from_cache(offline: Path) -> None:
    snapshot = _fake_snapshot(offline, "someorg/cached", {"config.json": b"{}"})
    source = resolve_model("someorg/cached")
    assert source.kind == "hf" and source.path.resolve() == snapshot.resolve()


def test_offline_hub_gguf_file_from_cache(offline: Path) -> None:
    snapshot = _fake_snapshot(offline, "someorg/cached-gguf", {"q4.gguf": GGUF_BYTES, "q8.gguf": GGUF_BYTES})
    source = resolve_model("someorg/cached-gguf", gguf_file="q8.gguf")
    assert source.kind == "gguf" and source.path.resolve() == (snapshot / "q8.gguf").resolve()


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without offline mode, an unreachable endpoint turns into HubUnavailableError, not a hang."""
    from huggingface_hub import constants

    from tokenloom.loading import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "_endpoint_reachable", lambda timeout=5.0: False)
    with pytest.raises(HubUnavailableError) as info:
        resolve_hub_id("someorg/unreachable")
    assert "someorg/unreachable" in str(info.value) and "cannot be reached" in str(info.value)


def test_not_a_hub_id_shape(offline: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        resolve_model("a/b/c")
    with pytest.raises(ModelNotFoundError):
        resolve_model("plain-name-not-pullable")
    with pytest.raises(ModelNotFoundError):
        resolve_model("")


def test_pull_names_in_any_case_and_near_misses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pulled = tmp_path / "x.gguf"
    pulled.write_bytes(GGUF_BYTES)
    calls = []
    monkeypatch.setattr(resolve_mod, "pull", lambda name, **kw: calls.append(name) or pulled)
    assert resolve_model("SmolLM2-135M-Instruct", progress=False).path == pulled
    assert resolve_model(" GEMMA3-270M", progress=False).path == pulled
    assert calls == ["smollm2-135m-instruct", "gemma3-270m"]  # the canonical names are pulled
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("smolm2-135m-instruct")
    assert "did you mean 'smollm2-135m-instruct'?" in info.value.hint and not calls[2:]
