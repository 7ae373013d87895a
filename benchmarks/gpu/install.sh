# Sourced by run.sh and study.sh: installs the wheels carried in .whl/ (transformers >= 5.23, datasets, ...) and
# this project, without dependencies, into a private folder (never the machine's own site-packages), and puts it
# first on PYTHONPATH. Sets PY and SITE; returns non-zero (the caller exits 3) if an install fails.
SITE=${UPCYCLE_GPU_SITE:-/tmp/upcycle-gpu-site}
PY=${PYTHON:-python3}
mkdir -p "$SITE"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "error: could not install the carried wheels in .whl/" >&2; return 3; }
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target "$SITE" . || { echo "error: could not install upcycle itself" >&2; return 3; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
