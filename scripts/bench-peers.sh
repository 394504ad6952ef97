#!/usr/bin/env bash
# Builds the peers `tokenloom bench --peers DIR` compares against, outside the repository:
#   DIR/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/{llama-bench,llama-server}
#   DIR/openvino-venv (openvino-genai, optimum-intel[openvino], nncf; CPU torch installed first)
#   DIR/smollm2-135m-instruct-hf (the GGUF dequantized by transformers) and
#   DIR/smollm2-135m-instruct-ov-int4 (its OpenVINO int4 export, group size 32).
# Each step is skipped when its result exists, so a rerun only finishes what is missing.
# Usage: scripts/bench-peers.sh PEERS_DIR TOKENLOOM_PYTHON GGUF_PATH
set -euo pipefail
peers=$1 py=$2 gguf=$3
mkdir -p "$peers"
peers=$(cd "$peers" && pwd)
nice_=(nice -n 19)
jobs=${JOBS:-$(nproc)}

# ---- llama.cpp, from the tree vendored in the llama-cpp-python sdist -----------------------------
version=0.3.36
src="$peers/llama_cpp_python-$version/vendor/llama.cpp"
bin="$src/build/bin"
if [[ ! -d "$src" ]]; then
    "$py" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$peers"
    tar -xzf "$peers/llama_cpp_python-$version.tar.gz" -C "$peers"
fi
if [[ -x "$bin/llama-bench" && -x "$bin/llama-server" ]]; then
    echo "[bench-peers] llama.cpp: reusing $bin"
elif pgrep -f "cmake.*$src/build" >/dev/null 2>&1; then
    echo "[bench-peers] llama.cpp: a build of $src/build is running already; rerun when it is done" >&2
    exit 1
else
    # A native build (-march=native) dies with SIGILL on KVM guests whose cpuid reports AMX: name the
    # instruction sets instead.
    cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX512=ON \
        -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
    "${nice_[@]}" cmake --build "$src/build" --config Release -j "$jobs" --target llama-bench llama-server
fi

# ---- OpenVINO GenAI in its own virtualenv -------------------------------------------------------
venv="$peers/openvino-venv"
if [[ ! -x "$venv/.installed" ]]; then
    "$py" -c 'import sys; sys.exit(0)'
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # CPU torch first, and pinned in the second install too: otherwise pip resolves optimum's torch
    # requirement to a newer, multi-GB CUDA build
    "${nice_[@]}" "$venv/bin/python" -m pip install -q torch==2.13.0
    "${nice_[@]}" "$venv/bin/python" -m pip install -q torch==2.13.0 openvino-genai "optimum-intel[openvino]" nncf
    # a torchvision built for another torch breaks transformers' imports in optimum-cli; text needs none
    "$venv/bin/python" -m pip uninstall -q -y torchvision || true
    touch "$venv/.installed" && chmod +x "$venv/.installed"
fi

# ---- the same weights for OpenVINO: dequantize the GGUF, export int4 group 32 ------------------
name=$(basename "$gguf" .gguf | tr '[:upper:]' '[:lower:]' | sed 's/\.q[0-9a-z_]*$//')
hf="$peers/$name-hf"
ov="$peers/$name-ov-int4"
if [[ ! -f "$hf/config.json" ]]; then
    "${nice_[@]}" "$py" - "$gguf" "$hf" <<'PY'
import sys
from pathlib import Path

import transformers

gguf, out = Path(sys.argv[1]), sys.argv[2]
kw = {"gguf_file": gguf.name}
model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kw)
# save_pretrained refuses GGUF-loaded models: copy the dequantized weights into a plain one
config = model.config.to_dict()
config.pop("quantization_config", None)
plain = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
plain.load_state_dict(model.state_dict())
plain.generation_config = model.generation_config
plain.save_pretrained(out)
transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw).save_pretrained(out)
PY
fi
if [[ ! -f "$ov/openvino_model.xml" ]]; then
    "${nice_[@]}" "$venv/bin/optimum-cli" export openvino --model "$hf" --task text-generation-with-past \
        --weight-format int4 --group-size 32 "$ov"
fi
echo "[bench-peers] ready: tokenloom bench --peers $peers"
