#!/usr/bin/env bash
# `make test`: the whole suite in two pytest processes side by side.
#   - the container tests (marker `containers`: build every CPU image, then drive the compose stack) in the
#     background, their output in build/test-containers.log, printed when they end;
#   - everything else in the foreground.
# The container tests mostly wait on image downloads and on containers starting, so beside the rest of the suite
# they cost far less wall-clock time than after it. Their fixed ports (infra/compose/defaults.env) are none that
# the other tests use (those pick free ports). With arguments (`make test PYTEST_ARGS=...`) this is one plain
# pytest run of what they select, the container tests last. Exit status: the first failing process's, 0 when
# both pass or collect nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if [ $# -gt 0 ]; then
  "$PY" -m pytest "$@"
  rc=$?
  [ "$rc" -eq 5 ] && { echo "pytest collected no tests"; exit 0; }
  exit "$rc"
fi

mkdir -p build
log=build/test-containers.log
"$PY" -m pytest -m containers -p no:cacheprovider >"$log" 2>&1 &
containers=$!
trap 'kill "$containers" 2>/dev/null' INT TERM

"$PY" -m pytest -m "not containers"
rc=$?
echo "==> the rest of the suite exited $rc; waiting for the container tests ($log)"
wait "$containers"
crc=$?
echo "==> the container tests (pytest -m containers, run beside the rest) exited $crc:"
cat "$log"
for code in "$rc" "$crc"; do
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then exit "$code"; fi
done
exit 0
