#!/bin/sh
# The one install recipe of the svd-vllm images, run from /opt/svd-vllm (the build context's
# package sources) by every target, so the GPU target runs exactly the lines the cpu target's CI
# lane exercises:
#   install.sh engine    on a base that already has vLLM (vllm/vllm-openai, or the cpu base stage)
#   install.sh sidecar   on a plain Python base: the management API and front, without torch
# Both end with a non-root user of uid 1000 (whatever the base names it) owning /registry.
set -eu
role=${1:?usage: install.sh engine|sidecar}

python3 -m pip install --no-cache-dir ".[server]"
case $role in
  engine)
    # The base's vllm, torch and transformers are used as they are (never swapped by pip).
    python3 - <<'PY'
from importlib.metadata import entry_points
import vllm
names = {e.name for e in entry_points(group="vllm.logits_processors")}
assert "svd" in names, f"the svd logits processor is not registered: {names}"
print("[install] vllm", vllm.__version__, "with the svd plugin")
PY
    ;;
  sidecar)
    python3 - <<'PY'
import importlib.util, sys
import svd_sidecar.app  # noqa: F401  (the whole app imports)
assert importlib.util.find_spec("torch") is None, "the sidecar image must not carry torch"
assert "torch" not in sys.modules
print("[install] sidecar without torch")
PY
    ;;
  *) echo "install.sh: unknown role $role (engine or sidecar)" >&2; exit 2 ;;
esac

# uid 1000: Debian's slim Python has none; an Ubuntu base may have one already (user "ubuntu").
if ! getent passwd 1000 >/dev/null; then
  useradd --create-home --home-dir /home/svd --uid 1000 --user-group svd
fi
mkdir -p /registry /home/svd
chown 1000:1000 /registry /home/svd
