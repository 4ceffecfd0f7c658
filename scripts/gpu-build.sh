#!/usr/bin/env bash
# Builds temper's GPU binaries on this GPU-less machine and packs them for the device machine
# so that the device machine only runs them: the `temper` binary, the test executables and
# the bench executables, built with feature `cuda`, stripped, and packed into one
# xz-compressed tar under .gpu/, with .gpu/run-on-device.sh to unpack and run them there.
#
#   scripts/gpu-build.sh              # temper + tests named gpu_* + every bench: what
#                                     # scripts/gpu-check.sh runs (benches as bench-NAME)
#   TEMPER_GPU_TESTS='*' scripts/gpu-build.sh   # every test executable (lib/bin unit tests too)
#   TEMPER_GPU_BENCHES='gae lora' scripts/gpu-build.sh
#
# On the device (repository root): .gpu/run-on-device.sh list | tests | benches | NAME [args]
#
# Size: every binary that links candle's CUDA side embeds all of candle's kernels (~50 MB
# stripped), and the repository plus carried paths must stay under 64 MiB. One tar compressed
# with a dictionary larger than a binary stores those shared bytes once, so each extra binary
# costs only its own code. The script fails if the bundle passes TEMPER_GPU_MAX_MB (48).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# 1. Toolchain (CUDA 13.0 from PyPI), installed only if missing.
scripts/install-cuda-toolchain.sh >/dev/null
# shellcheck disable=SC1090
source <(scripts/install-cuda-toolchain.sh --env)
# No GPU here: candle-kernels must be told the arch (90: H100/H200); ours default to 80,90.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export TEMPER_CUDA_ARCHS="${TEMPER_CUDA_ARCHS:-80,90}"

# 2. Link directory: unversioned symlinks into the wheel's lib/ and a stub libcuda.so.
LINKDIR="${TEMPER_LINK_DIR:-$HOME/.cache/temper/cuda-link}"
link_flags="$(scripts/cuda-link-stub.sh "$LINKDIR")"
export RUSTFLAGS="$link_flags ${TEMPER_EXTRA_RUSTFLAGS:-}"

# 3. Build. A target directory of its own: RUSTFLAGS is part of every artifact's fingerprint,
# so sharing the one `cargo check --features cuda` uses would rebuild everything (candle's
# kernels included, ~10 minutes on 2 cores) each time one alternates with the other.
export CARGO_TARGET_DIR="${TEMPER_GPU_TARGET_DIR:-$(dirname "$ROOT")/target-gpu}"
echo "building into $CARGO_TARGET_DIR (release, feature cuda, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)" >&2

ARTIFACTS="$(mktemp)"
trap 'rm -f "$ARTIFACTS"' EXIT
cargo build --release --features nccl --bin temper --message-format=json-render-diagnostics >>"$ARTIFACTS"
cargo test --release --features nccl --no-run --message-format=json-render-diagnostics >>"$ARTIFACTS"
cargo bench --features nccl --no-run --message-format=json-render-diagnostics >>"$ARTIFACTS"

# 4. Pick the executables: name on the device <- path here.
STAGE="$(mktemp -d)"
trap 'rm -f "$ARTIFACTS"; rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin"
TESTS_GLOB="${TEMPER_GPU_TESTS:-gpu_*}"
BENCHES="${TEMPER_GPU_BENCHES:-*}"
python3 - "$ARTIFACTS" "$TESTS_GLOB" "$BENCHES" >"$STAGE/list" <<'PY'
import fnmatch, json, sys
path, tests_glob, benches = sys.argv[1], sys.argv[2], sys.argv[3].split()
picked = {}
for line in open(path):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    kind, name = msg["target"]["kind"][0], msg["target"]["name"]
    test = msg["profile"]["test"]
    if kind == "bin" and not test:
        out = name
    elif kind == "bench":
        if not any(fnmatch.fnmatch(name, b) for b in benches):
            continue
        out = f"bench-{name}"
    elif kind == "test":
        # gpu_check_scripts checks these scripts on CPU CI; it reads them from the build tree.
        if not fnmatch.fnmatch(name, tests_glob) or name == "gpu_check_scripts":
            continue
        out = f"test-{name}"
    elif test and tests_glob == "*":
        out = f"test-{kind}-{name}"  # unit tests of the lib or the bin
    else:
        continue
    picked[out] = msg["executable"]
for out, exe in sorted(picked.items()):
    print(out, exe)
PY
while read -r name exe; do
  strip -o "$STAGE/bin/$name" "$exe"
done <"$STAGE/list"

# 5. Pack. dict=256MiB spans several binaries, so candle's kernels compress once.
OUTDIR="$ROOT/.gpu"
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR"
tar -C "$STAGE" -cf - bin | xz -T1 --lzma2=preset=6,dict=256MiB >"$OUTDIR/bundle.tar.xz"
cat >"$OUTDIR/run-on-device.sh" <<'SH'
#!/usr/bin/env bash
# Unpacks the bundle built by scripts/gpu-build.sh and runs its executables against the
# device machine's CUDA (libraries in /usr/local/cuda/lib64; the driver's libcuda.so.1 is
# found by default; NCCL's libnccl.so.2 from PyTorch's nvidia-nccl wheel). Run from the
# repository root, where tests expect to be.
#   .gpu/run-on-device.sh list                # what is in the bundle
#   .gpu/run-on-device.sh tests [filter]      # every test-* executable
#   .gpu/run-on-device.sh benches             # every bench-* executable
#   .gpu/run-on-device.sh NAME [args...]      # one executable, e.g. temper --help
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${TEMPER_GPU_UNPACK:-/tmp/temper-gpu}"
if [[ ! -f "$DEST/.unpacked" || "$HERE/bundle.tar.xz" -nt "$DEST/.unpacked" ]]; then
  rm -rf "$DEST"
  mkdir -p "$DEST"
  xz -dc "$HERE/bundle.tar.xz" | tar -x -C "$DEST"
  touch "$DEST/.unpacked"
fi
NCCL_LIB="$(python3 -c 'import os, nvidia.nccl as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${NCCL_LIB:+:$NCCL_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cmd="${1:-list}"
shift || true
case "$cmd" in
  list) ls -1 "$DEST/bin" ;;
  tests)
    status=0
    for exe in "$DEST"/bin/test-*; do
      echo "== ${exe##*/}"
      "$exe" "$@" || status=1
    done
    exit "$status"
    ;;
  benches)
    status=0
    for exe in "$DEST"/bin/bench-*; do
      echo "== ${exe##*/}"
      "$exe" --bench "$@" || status=1
    done
    exit "$status"
    ;;
  *) exec "$DEST/bin/$cmd" "$@" ;;
esac
SH
chmod +x "$OUTDIR/run-on-device.sh"

size_mb=$(( $(stat -c %s "$OUTDIR/bundle.tar.xz") / 1048576 ))
echo "packed $(wc -l <"$STAGE/list") executables into .gpu/bundle.tar.xz (${size_mb} MiB):" >&2
sed 's/ .*//; s/^/  /' "$STAGE/list" >&2
if ((size_mb > ${TEMPER_GPU_MAX_MB:-48})); then
  echo "error: the bundle is over ${TEMPER_GPU_MAX_MB:-48} MiB; narrow TEMPER_GPU_TESTS / TEMPER_GPU_BENCHES" >&2
  exit 1
fi
echo "on the device (carry .gpu: it is git-ignored): scripts/gpu-check.sh   (docs/GPU.md)" >&2
