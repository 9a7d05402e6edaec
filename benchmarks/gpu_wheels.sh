#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py carries to the GPU machine (Python 3.12, x86-64, no internet,
# none of mlflow, webdataset, braceexpand), downloaded here into .whl/ at the repository root.
# Run it on a machine with PyPI, from anywhere; then pass carry=[".whl"] to the device tool.
#
# What the machine lacks for the project's tracking code (move_scale/tracking.py on a local SQLite
# store: create, resume, params, metrics, text and file artifacts) and its data code. mlflow-skinny
# instead of mlflow (same client and SQLite store, without the UI and server extras); each pin was
# found by importing on a clean Python 3.12 with only the machine's packages until nothing was
# missing, and none can be left out (tested one at a time). Exact versions: one version of each,
# or `pip install --no-deps --target` installs two. Total 19.2 MB of the 64 MiB a call may carry.
set -euo pipefail

WHEELS=(
  mlflow-skinny==3.17.2       # the MLflow client and stores
  sqlalchemy==2.1.9           # the SQLite tracking store ...
  alembic==1.20.1             # ... its schema migrations
  mako==1.4.3                 # ... needed by alembic
  cryptography==50.0.2        # imported by mlflow's database store (model registry tables)
  cffi==2.1.1                 # ... needed by cryptography
  pycparser==3.12             # ... needed by cffi
  sqlparse==0.6.1             # mlflow import chain
  cachetools==7.3.3
  importlib-metadata==9.1.0
  databricks-sdk==0.162.0     # mlflow.genai looks up databricks.agents at import
  fastapi==0.165.0            # mlflow.gateway, imported by mlflow/__init__
  starlette==1.10.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0   # pydantic needs >= 4.16; newer than the machine's may be
  opentelemetry-api==1.45.2   # mlflow tracing, imported by mlflow/__init__
  opentelemetry-sdk==1.45.2
  opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  webdataset==1.0.2           # declared data dependency
  braceexpand==0.1.7          # shard patterns (move_scale/data/shardlist.py)
)

root="$(cd "$(dirname "$0")/.." && pwd)"
exclude="$(git -C "$root" rev-parse --git-path info/exclude)"
case "$exclude" in /*) ;; *) exclude="$root/$exclude" ;; esac
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"  # never committed

rm -rf "$root/.whl"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$root/.whl" "${WHEELS[@]}"

count=$(ls "$root"/.whl/*.whl | wc -l)
bytes=$(du -cb "$root"/.whl/*.whl | tail -1 | cut -f1)
echo "$count wheels, $bytes bytes in $root/.whl (carry=[\".whl\"])"
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "expected ${#WHEELS[@]} wheels" >&2
  exit 1
fi
