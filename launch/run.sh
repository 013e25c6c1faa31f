#!/usr/bin/env bash
# Launch `hvdinfer ARGS...` on NP ranks: horovodrun when present, mpirun otherwise.
#
#   NP=2 launch/run.sh doctor --selftest                    # one host, 2 ranks
#   NP=8 HOSTFILE=launch/hostfile.example launch/run.sh infer --model minilm-l6 ...
#   LAUNCHER=mpirun NP=3 launch/run.sh doctor               # force mpirun
#
# Knobs (env): NP ranks (2); HOSTFILE "host slots=N" lines (none: this host only);
# LAUNCHER horovodrun|mpirun (auto); HVDINFER the command (.venv/bin/hvdinfer, else on PATH);
# FORWARD_ENV extra variable names to pass to every rank; LAUNCH_ARGS extra launcher flags.
# Root-safe and oversubscribe-safe: fine in containers and on CI.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NP="${NP:-2}"
HVDINFER="${HVDINFER:-$here/.venv/bin/hvdinfer}"
[ -x "$HVDINFER" ] || HVDINFER="$(command -v hvdinfer || true)"
[ -n "$HVDINFER" ] || { echo "launch/run.sh: hvdinfer not found; run 'make install'" >&2; exit 2; }
bindir="$(dirname "$HVDINFER")"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" PYTHONUNBUFFERED=1
forward=(TF_CPP_MIN_LOG_LEVEL PYTHONUNBUFFERED HVDINFER_CACHE HVDINFER_DEBUG ${FORWARD_ENV:-})

launcher="${LAUNCHER:-}"
if [ -z "$launcher" ]; then
  if [ -x "$bindir/horovodrun" ] || command -v horovodrun >/dev/null; then launcher=horovodrun; else launcher=mpirun; fi
fi

case "$launcher" in
  horovodrun)
    hr="$bindir/horovodrun"; [ -x "$hr" ] || hr="$(command -v horovodrun)"
    args=(-np "$NP")
    if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); else args+=(-H "localhost:$NP"); fi
    # horovodrun forwards the caller's whole environment to every rank.
    exec "$hr" "${args[@]}" ${LAUNCH_ARGS:-} "$HVDINFER" "$@"
    ;;
  mpirun)
    args=(-np "$NP" --oversubscribe --bind-to none --map-by slot)
    [ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
    for v in "${forward[@]}"; do [ -n "${!v+x}" ] && args+=(-x "$v"); done
    exec mpirun "${args[@]}" ${LAUNCH_ARGS:-} "$HVDINFER" "$@"
    ;;
  *) echo "launch/run.sh: LAUNCHER must be horovodrun or mpirun, not '$launcher'" >&2; exit 2 ;;
esac
