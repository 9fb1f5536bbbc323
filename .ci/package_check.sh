#!/usr/bin/env bash
# CI step: the package works outside the repository. Builds the splitcem wheel and the toy
# plugin's wheel (tests/plugin_pkg) with the project's venv, installs both into a fresh venv
# in a temporary folder (torch==2.13.0 first), and from there: lists the bundled configs,
# checks `splitcem defenses` lists the plugin's defense, and runs a bundled config by name
# for one short epoch, then the same with the plugin's defense set from the command line.
# A few minutes, most of it installing the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON_BUILD:-$REPO/.venv/bin/python}
TMP=$(mktemp -d /tmp/splitcem-pkg.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
export SPLITCEM_DATA=${SPLITCEM_DATA:-$REPO/../shared/datasets}

cp -r tests/plugin_pkg "$TMP/plugin_src"  # built there: no build/ left in the checkout
"$PY" -m pip wheel -q --no-deps -w "$TMP/dist" . "$TMP/plugin_src"
python3 -m venv "$TMP/venv"
V=$TMP/venv/bin
"$V/pip" install -q torch==2.13.0
"$V/pip" install -q "$TMP"/dist/splitcem-*.whl "$TMP"/dist/splitcem_toy_plugin-*.whl

cd "$TMP"  # outside the checkout: nothing can come from the repository any more
"$V/python" - <<'PY'
import importlib.metadata, pathlib, splitcem
where = pathlib.Path(splitcem.__file__).resolve()
assert "site-packages" in where.parts, where
assert splitcem.__version__ == importlib.metadata.version("splitcem"), splitcem.__version__
assert (where.parent / "py.typed").is_file()
print(f"splitcem {splitcem.__version__} from {where.parent}")
PY
# to a file first: grep -q would close the pipe early and the CLI's next line hit EPIPE
"$V/splitcem" configs > "$TMP/configs.txt"
grep -q "^cpu/cifar10_noise_cem " "$TMP/configs.txt"
"$V/splitcem" defenses | tee "$TMP/defenses.txt"
grep -q "toy_uniform" "$TMP/defenses.txt" || { echo "plugin defense not listed" >&2; exit 1; }
SHORT=(--set train.epochs=1 --set train.warmup_epochs=0 --set train.amp=false
       --set train.channels_last=false --set train.batch_size=64 --set data.limit_train=256
       --set data.limit_test=128 --set attack.attacks.0.epochs=1 --set attack.attacks.0.amp=false
       --set attack.attacks.0.width=8 --set attack.attacks.0.depth=1 --device cpu --quiet)
"$V/splitcem" run cifar10_noise_cem "${SHORT[@]}" --out "$TMP/runs/bundled"
test -s "$TMP/runs/bundled/metrics.json"
"$V/splitcem" run cpu/cifar10 "${SHORT[@]}" --set 'defenses=[{name: toy_uniform, scale: 0.2}]' \
  --out "$TMP/runs/plugin"
grep -q "toy_uniform" "$TMP/runs/plugin/summary.md"
echo "package check: OK"
