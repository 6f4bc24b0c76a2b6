#!/usr/bin/env bash
# Replays the Dockerfile's build stage without a container builder, so the image build cannot
# drift from the manifest unnoticed (run by .ci/run).
#
# The build stage's instructions after its WORKDIR are read from the Dockerfile itself and
# run in order in an empty directory: COPY copies from the repository (the build context),
# RUN runs under `sh -c` as Docker does, with two substitutions that keep it cheap:
#   cargo build [--release] ...  ->  cargo check ...   (same manifest parse, so every target
#                                  path cargo infers must exist, same --locked resolution,
#                                  same targets; no codegen)
#   strip ...                    ->  true              (there is no release binary)
# The first cargo command (the dependency-cache stage, which sees only Cargo.toml, Cargo.lock
# and the stubs) therefore fails when a target the manifest declares has no stub, and the
# second (the real build) when a COPY misses something the crate needs.
#
# The system packages the stage installs (the RUN before WORKDIR) are not replayed: .ci/run
# installs the same ones. Checking reuses the dependencies already checked in CARGO_TARGET_DIR
# (default: the repository's target/, which `cargo clippy` has filled).
#
# Usage: tools/check-dockerfile.sh [DOCKERFILE]   (default: the repository's Dockerfile)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dockerfile=$(realpath "${1:-$repo/Dockerfile}")
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
# One fixed directory (not mktemp): the checked crate keeps the same path, so repeated runs
# overwrite its artifacts in CARGO_TARGET_DIR instead of piling up new ones.
work="${TMPDIR:-/tmp}/protloc-dockerfile-check-$(id -u)"
rm -rf "$work"
mkdir -p "$work"
export CARGO_INCREMENTAL=0

fail() {
  echo "check-dockerfile: $*" >&2
  exit 1
}

# The Dockerfile's instructions, one per line: comment lines dropped (also inside a
# continued instruction, as Docker does), continuation lines joined.
instructions() {
  awk '
    /^[[:space:]]*#/ { next }
    {
      line = $0
      if (line ~ /\\[[:space:]]*$/) {
        sub(/\\[[:space:]]*$/, "", line)
        cont = cont line " "
        next
      }
      line = cont line
      cont = ""
      if (line ~ /^[[:space:]]*$/) next
      print line
    }
  ' "$dockerfile"
}

stage=0       # build stages seen (FROM lines)
in_workdir=0  # past the first stage's WORKDIR
cargo_runs=0
dest_root=$work
while IFS= read -r line; do
  read -r op rest <<<"$line"
  op=${op^^}
  if [ "$op" = FROM ]; then
    stage=$((stage + 1))
    [ "$stage" -gt 1 ] && break
    continue
  fi
  [ "$stage" -eq 1 ] || fail "instruction before the first FROM: $line"
  case "$rest" in
    "["* | "<<"*) fail "exec-form and heredoc instructions are not replayed: $line" ;;
  esac
  case "$op" in
    WORKDIR)
      [ "$in_workdir" -eq 0 ] || fail "a second WORKDIR is not replayed: $line"
      in_workdir=1
      ;;
    RUN)
      if [ "$in_workdir" -eq 0 ]; then
        echo "skip (system packages, installed by .ci/run): RUN ${rest:0:60}..."
        continue
      fi
      cmd=$(sed -E 's/cargo build/cargo check/g; s/ --release\b//g; s/\bstrip [^&;|]*/true /g' <<<"$rest")
      [[ "$cmd" == *"cargo check"* ]] && cargo_runs=$((cargo_runs + 1))
      echo "RUN $cmd"
      (cd "$dest_root" && sh -c "$cmd") || fail "the build stage's RUN fails: $rest"
      ;;
    COPY)
      [ "$in_workdir" -eq 1 ] || fail "COPY before WORKDIR is not replayed: $line"
      read -r -a args <<<"$rest"
      for a in "${args[@]}"; do
        [[ "$a" == --* ]] && fail "COPY flag $a is not replayed: $line"
      done
      dest=${args[-1]}
      unset 'args[-1]'
      [[ "$dest" == /* ]] && fail "absolute COPY destination is not replayed: $line"
      echo "COPY ${args[*]} $dest"
      if [ "${#args[@]}" -gt 1 ] || [[ "$dest" == */ ]]; then
        mkdir -p "$dest_root/$dest"
      fi
      for src in "${args[@]}"; do
        [ -e "$repo/$src" ] || fail "COPY source $src is not in the repository"
        if [ -d "$repo/$src" ]; then
          # Docker copies a directory's contents.
          mkdir -p "$dest_root/$dest"
          cp -a "$repo/$src/." "$dest_root/$dest/"
        elif [ -d "$dest_root/$dest" ]; then
          cp -a "$repo/$src" "$dest_root/$dest/"
        else
          mkdir -p "$(dirname "$dest_root/$dest")"
          cp -a "$repo/$src" "$dest_root/$dest"
        fi
      done
      ;;
    ENV | ARG | LABEL)
      fail "$op in the build stage is not replayed yet: extend $0"
      ;;
    *)
      fail "unexpected instruction in the build stage: $line"
      ;;
  esac
done < <(instructions)

[ "$in_workdir" -eq 1 ] || fail "no WORKDIR in the build stage"
# Cargo needs the files of explicitly placed targets ([[test]] path = ...) only to build them,
# so the checks above pass without their stubs; the Dockerfile stubs them anyway, so the build
# does not hang on how lazily cargo validates. Every target the manifest lists must have a
# file at the end of the stage.
missing=()
while IFS= read -r p; do
  [ -e "$p" ] || missing+=("${p#"$work"/}")
done < <(cd "$work" && cargo metadata --no-deps --offline --format-version 1 |
  grep -o '"src_path":"[^"]*"' | cut -d'"' -f4)
[ ${#missing[@]} -eq 0 ] || fail "targets of Cargo.toml with no file in the build stage: ${missing[*]}"
# The dependency-cache build and the real one: if either disappeared, this check checks less.
[ "$cargo_runs" -ge 2 ] || fail "expected two cargo builds in the build stage, found $cargo_runs"
rm -rf "$work"
echo "check-dockerfile: the build stage of $dockerfile replays cleanly"
