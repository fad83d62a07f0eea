# Sourced by scripts/test.sh: run test tiers one after another, each to the end, and remember which
# failed, so a failing tier never hides the results of the ones after it.
FAILED_TIERS=()

run_tier() {  # run_tier NAME COMMAND...
  local name=$1; shift
  echo "== $name"
  "$@" || FAILED_TIERS+=("$name")
}

finish_tiers() {  # exit status: 0 when every tier passed
  if [ ${#FAILED_TIERS[@]} -gt 0 ]; then
    printf 'FAILED tier: %s\n' "${FAILED_TIERS[@]}" >&2
    return 1
  fi
}
