#!/usr/bin/env bash
# Runs every husk-vmm fuzz target for a fixed time each.
#
#   vmm/fuzz/run.sh [SECONDS]     (default 30 per target)
#
# Exits non-zero as soon as a target finds a crash (libFuzzer leaves the input
# in vmm/fuzz/artifacts/<target>/). Installs cargo-fuzz if it is missing. The
# toolchain is stable; RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only
# sanitizer flags.
set -euo pipefail

secs="${1:-30}"
case "$secs" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS]" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
# The targets make scratch directories (a share, vsock sockets) under the
# temporary directory; one of this run's own, removed at the end, leaves
# nothing behind in /tmp, crash or not.
scratch=$(mktemp -d -t husk-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch
targets=$(cargo fuzz list)
for t in $targets; do
    mkdir -p "corpus/$t"
    # Hand-built valid inputs (seeds/gen.py) start each run; corpus/ itself is
    # not committed.
    if [ -d "seeds/$t" ]; then
        cp seeds/"$t"/* "corpus/$t/"
    fi
    echo "== $t: ${secs}s" >&2
    # -max_len covers both guest memory regions (see fuzz_targets/common.rs);
    # -rss_limit_mb keeps a leak visible as a failure rather than a slow host.
    cargo fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=9000 -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzzing: no crashes in ${secs}s per target ($targets)" | tr '\n' ' ' >&2
echo >&2
