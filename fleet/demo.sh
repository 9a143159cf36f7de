#!/usr/bin/env bash
# `make demo`: from a fresh machine to a handover A -> B -> C on a local fleet of three cloudlets.
# Every step is idempotent, so a second `make demo` reuses what the first one built (warm run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg" CONTAINERS_CONF="$PWD/etc/containers.conf"

ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs() { printf '%d.%d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }
t0=$(ms)
step_start=$t0
timings=()
step() {
  local now; now=$(ms)
  if [ -n "${step_name:-}" ]; then
    timings+=("$(printf '%-48s %7s s' "$step_name" "$(secs $(( now - step_start )))")")
  fi
  step_name=$1; step_start=$now
  echo; echo "######## $1"
}

step "dependencies (.ci/install)"
bash .ci/install
step "wheelhouse (make wheelhouse)"
make -s wheelhouse
step "service images (demo, redis)"
cloudlet image build-demo
cloudlet image build-redis
step "local fleet: host image and hosts"
python fleet/fleet.py up
step "rollout (ansible-playbook site.yml)"
ansible-playbook site.yml
step "launch the demo service (playbooks/launch.yml)"
ansible-playbook playbooks/launch.yml
step "launch redis from its own image (playbooks/launch.yml)"
ansible-playbook playbooks/launch.yml -e launch_name=redis -e launch_image=localhost/cloudlet-redis:latest \
  -e launch_port=6379 -e '{"launch_limits": {"cpus": 1.0, "memory_mb": 256}}'
step "a device credential for the client (playbooks/devices.yml)"
ansible-playbook playbooks/devices.yml
step "client: stream, move A -> B -> C, check"
status=0
python fleet/demo_client.py || status=$?
step "agent: redis-benchmark while the device drives a -> b -> c and the agent follows by itself"
python fleet/demo_drive.py || status=$?
step "done"
echo "== timings"
printf '   %s\n' "${timings[@]}"
printf '   %-48s %7s s\n' "total" "$(secs $(( $(ms) - t0 )))"
echo "== the fleet keeps running: ansible-playbook playbooks/status.yml, make fleet-status; make demo-down removes it"
exit $status
