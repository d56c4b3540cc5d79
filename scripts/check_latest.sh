#!/usr/bin/env bash
# Try the newest releases the package index offers, and report what breaks. Not part of CI.
#
#   scripts/check_latest.sh                # newest of every dependency, our upper bounds lifted
#   scripts/check_latest.sh --write-lock   # newest within pyproject's ranges; if the suite passes,
#                                          # rewrite requirements.lock with exactly what was tested
#
# How to move the lock forward: run the first form. If it passes, lift the upper bound in
# pyproject.toml that held the new release back, then run the second form and commit
# requirements.lock. If it fails, the report names the tests and the versions that differ from
# the lock: keep the bound, and say why in pyproject.toml.
#
# Environment: VENV (default /tmp/dreambooth-latest), TORCH (default torch==2.13.0, the CPU build).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=latest
[ "${1:-}" = "--write-lock" ] && mode=lock
venv=${VENV:-/tmp/dreambooth-latest}
report=${REPORT:-$venv.report.txt}

rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH:-torch==2.13.0}"
python -m pip install -q --upgrade -e ".[test]"  # newest within pyproject's ranges, no lock
if [ "$mode" = latest ]; then
    # Every dependency named in pyproject.toml, at the newest release, whatever our bounds say
    # (pip warns about the conflicts it creates; that is the point).
    names=$(python - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
print(" ".join(sorted({re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in reqs} - {"xformers"})))
EOF
)
    python -m pip install -q --upgrade $names 2>&1 | grep -v "^WARNING: Location" || true
fi

{
    echo "# check_latest ($mode), $(date -u +%Y-%m-%dT%H:%MZ), Python $(python -c 'import platform; print(platform.python_version())')"
    echo "## versions that differ from requirements.lock"
    python -m pip freeze --exclude-editable | grep -v '^torch==' | sort > "$venv.freeze.txt"
    changed=$(grep -v '^#' requirements.lock | sort | diff - "$venv.freeze.txt" | grep '^[<>]' | sed 's/^</  locked: /; s/^>/  now:    /')
    echo "${changed:-  (none)}"
    echo "## test suite"
} | tee "$report"

HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider 2>&1 | tee "$venv.pytest.txt" | tail -n 25 | tee -a "$report"
status=${PIPESTATUS[0]}
echo "pytest exit status: $status (full log: $venv.pytest.txt)" | tee -a "$report"

if [ "$mode" = lock ]; then
    if [ "$status" -ne 0 ]; then
        echo "requirements.lock left unchanged: the suite failed" | tee -a "$report"
        exit "$status"
    fi
    {
        echo "# Tested versions: the suite passed with exactly these ($(python -c 'import platform; print("Python", platform.python_version(), platform.system(), platform.machine())'), $(date -u +%Y-%m-%d))."
        echo "# A constraints file: pip install torch==2.13.0 && pip install -c requirements.lock -e \".[test]\""
        echo "# torch is left out on purpose: install the build for your hardware first (README)."
        echo "# Move it forward deliberately with scripts/check_latest.sh (see README, 'Dependencies')."
        python -m pip freeze --exclude-editable | grep -v '^torch=='
    } > requirements.lock
    echo "requirements.lock rewritten ($(grep -vc '^#' requirements.lock) packages)" | tee -a "$report"
fi
exit "$status"
