# Source this first in a command on the lent GPU machine (see bench/README.md): it has torch and triton but
# no network, so r1c's pure-Python dependencies travel as wheels in .whl/ (named in the call's `carry`).
# Installs them and r1c itself into /tmp/site and puts that on PYTHONPATH.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site/r1c_pkg . >/dev/null
export PYTHONPATH=/tmp/site/r1c_pkg:/tmp/site
export PYTHONUNBUFFERED=1
set +e
python3 -c "import torch, triton, r1c; print('gpu setup:', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
