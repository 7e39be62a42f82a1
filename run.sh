#!/usr/bin/env bash
# One entry point for a fresh machine: sets everything up, then runs the demo sweep or the tests.
#   ./run.sh demo   build a synthetic demo store and run a 5-resolution sweep on a local Ray instance
#   ./run.sh test   run the test suite
# The virtual environment lives in .venv (override with CXR_VENV=/path).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${CXR_VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment $VENV"
    python3 -m venv "$VENV"
  fi
  echo "==> installing cxr-sweep and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  # fastai, for the tests that check the training recipe against fastai itself. --no-deps: its
  # declared dependencies include spacy and would move torch; the tests import only the parts that
  # need these packages (and skip without them).
  echo "==> installing fastai (tests only) without its declared dependencies"
  "$VENV/bin/python" -m pip install -q --no-deps fastai fastcore fastprogress fasttransform \
      plum-dispatch fastdownload
  "$VENV/bin/python" -m pip install -q beartype rich cloudpickle python-fasthtml
}

install_browser() {
  # The HTML report is checked in a real headless browser (Debian's chromium).
  if command -v chromium >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing chromium for the report rendering test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium not found and not installable here; the browser test will be skipped" >&2
  fi
}

case "${1:-}" in
  demo)
    setup
    shift
    exec "$VENV/bin/python" -m orchestrator.demo "$@"
    ;;
  test)
    setup
    install_browser
    shift
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./run.sh demo|test [extra args]" >&2
    exit 2
    ;;
esac
