#!/usr/bin/env bash
# Debug build times of two checkouts, one at a time: a clean
# `cargo build --workspace --all-targets` into an empty target dir, then the
# same after appending a comment to one routing file (restored afterwards).
#
#   bash loadtest/build_time.sh OLD_CHECKOUT:ROUTING_FILE NEW_CHECKOUT:ROUTING_FILE
#   e.g. bash loadtest/build_time.sh /tmp/old:src/routing/scorers.rs .:crates/core/src/routing/scorers/mod.rs
#
# Env: BUILD_TIME_DIR (target dirs, default /tmp/infergate-build-time).
set -euo pipefail
DIR=${BUILD_TIME_DIR:-/tmp/infergate-build-time}
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); python3 -c "print(f'{$e - $s:.1f}')"; }
for spec in "$@"; do
  tree=${spec%%:*}; n=$(basename "$(cd "$tree" && pwd)")
  rm -rf "$DIR/$n"
  echo "$tree clean: $(cd "$tree" && CARGO_TARGET_DIR="$DIR/$n" secs cargo build --workspace --all-targets) s"
done
for spec in "$@"; do
  tree=${spec%%:*}; file=$tree/${spec#*:}; n=$(basename "$(cd "$tree" && pwd)")
  cp "$file" "$DIR/orig.rs"; echo "// touched" >>"$file"
  echo "$tree incremental after touching ${spec#*:}: $(cd "$tree" && CARGO_TARGET_DIR="$DIR/$n" secs cargo build --workspace --all-targets) s"
  cp "$DIR/orig.rs" "$file"
done
