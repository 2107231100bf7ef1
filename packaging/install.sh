#!/usr/bin/env bash
# Install the syncd release this script ships in, with no network (docs/deployment.md):
#
#   ./install.sh [--python PYTHON] [--state-dir DIR]      install (or re-install: a no-op) this version
#   ./install.sh --rollback [--state-dir DIR]             flip back to the version installed before it
#
# Install: checks every file against SHA256SUMS, makes a venv /opt/syncd/<version> from the wheels here
# (pip --no-index), backs up the ledger when the new version will migrate it, then flips
# /opt/syncd/current to the new version with one rename (the old one becomes /opt/syncd/previous).
# It installs the unit (/usr/lib/systemd/system/syncd.service, running /opt/syncd/current/bin/syncd),
# the sysusers file (and runs systemd-sysusers), the man page and the docs. An existing /etc/syncd is
# never touched. Nothing restarts: `systemctl restart syncd` runs the new version.
#
# Rollback: refused when the ledger (DIR/ledger.sqlite3, default /var/lib/syncd) has a schema newer than
# the previous version reads; restore the backup taken at the upgrade instead.
#
# The last line says what happened: "syncd-install: changed ..." or "syncd-install: unchanged ...".
# Exit 0 on success, 1 on a refusal or failure (nothing half-done is left current), 2 on bad usage.
# --root DIR works on a tree instead of / (for tests; the venv's own paths then include DIR).
set -euo pipefail
umask 022
here=$(cd "$(dirname "$0")" && pwd)
root=/
python=""
state_dir=/var/lib/syncd
rollback=0
usage() { echo "install.sh: $* (see --help)" >&2; exit 2; }
while (($#)); do
  case $1 in
    --python|--state-dir|--root)
      [ $# -ge 2 ] && [ -n "$2" ] || usage "$1 needs a value"
      case $1 in
        --python) python=$2 ;;
        --state-dir) state_dir=$2 ;;
        --root) root=$2 ;;
      esac
      shift 2 ;;
    --rollback) rollback=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage "unknown argument $1" ;;
  esac
done
root=${root%/}
opt=$root/opt/syncd
unit_dir=$root/usr/lib/systemd/system
changed=()

say() { echo "install.sh: $*"; }
fail() { echo "install.sh: $*" >&2; exit 1; }

# One install.sh at a time per host: a second one waits (up to 10 minutes) instead of rebuilding the
# venv the first is building or flipping the links under it.
lock() {
  mkdir -p "$opt"
  exec 9>>"$opt/.install.lock"
  flock -w 600 9 || fail "another install.sh has held $opt/.install.lock for 10 minutes; is one hung?"
}

# A file put in place only when its content differs (then recorded as a change): written beside the
# target and renamed over it, so that no reader sees half of it.
place() {
  local src=$1 dest=$2 mode=$3
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  install -m "$mode" "$src" "$dest.syncd-new"
  mv -f "$dest.syncd-new" "$dest"
  changed+=("$dest")
}

# A symlink to target, made beside and renamed into place (rename(2) is atomic).
link() {
  local target=$1 dest=$2
  if [ -L "$dest" ] && [ "$(readlink "$dest")" = "$target" ]; then
    return 0
  fi
  if [ -e "$dest" ] && [ ! -L "$dest" ]; then
    fail "$dest exists and is not a symlink; move it aside first"
  fi
  mkdir -p "$(dirname "$dest")"
  ln -sfn "$target" "$dest.syncd-new"
  mv -Tf "$dest.syncd-new" "$dest"
  changed+=("$dest")
}

# The ledger's schema (PRAGMA user_version, read-only), or nothing when there is no ledger. Fails
# (exit 1, with a message) when there is one that cannot be read.
ledger_schema() {
  local ledger=$root$state_dir/ledger.sqlite3 py=$1
  [ -e "$ledger" ] || return 0
  "$py" - "$ledger" <<'PY' || fail "cannot read the schema of the ledger ${ledger#"$root"}"
import pathlib, sqlite3, sys
try:
    db = sqlite3.connect(pathlib.Path(sys.argv[1]).resolve().as_uri() + "?mode=ro", uri=True)
    print(int(db.execute("PRAGMA user_version").fetchone()[0]))
except (sqlite3.Error, OSError) as exc:
    sys.exit(f"install.sh: {sys.argv[1]}: {exc}")
PY
}

# The newest ledger schema a version reads, from its `syncd --version` (fails when it does not say).
reads_schema() {
  local out n
  out=$("$opt/$1/bin/syncd" --version 2>&1) || fail "syncd $1 does not run ($opt/$1/bin/syncd --version): $out"
  n=$(sed -n 's/^ledger schema \([0-9][0-9]*\)$/\1/p' <<<"$out")
  [ -n "$n" ] || fail "syncd $1 does not say which ledger schema it reads (its --version: $out)"
  echo "$n"
}

# Refuse to make version $1 current when the ledger is newer than it reads: it would refuse to start.
check_schema() {
  local v=$1 schema reads
  schema=$(ledger_schema "$opt/$v/bin/python")
  reads=$(reads_schema "$v")
  if [ -n "$schema" ] && [ "$schema" -gt "$reads" ]; then
    fail "refused: the ledger $state_dir/ledger.sqlite3 is at schema $schema, and syncd $v reads" \
      "schema $reads at most, so it would refuse to start. Stay on the current version, or stop syncd" \
      "and restore a ledger backed up before the upgrade ($state_dir/ledger.sqlite3.before-*) first."
  fi
}

# Before making version $1 current: when it reads a newer schema than the ledger has (it will migrate
# the ledger when it starts), a consistent copy of the ledger as it is now, refreshed every time:
# $state_dir/ledger.sqlite3.before-$1 (0600).
backup_if_migrating() {
  local v=$1 schema reads backup
  schema=$(ledger_schema "$opt/$v/bin/python")
  reads=$(reads_schema "$v")
  [ -n "$schema" ] && [ "$reads" -gt "$schema" ] || return 0
  backup=$root$state_dir/ledger.sqlite3.before-$v
  "$opt/$v/bin/python" - "$root$state_dir/ledger.sqlite3" "$backup" <<'PY' || fail "cannot back up the ledger"
import os, pathlib, sqlite3, sys
tmp = sys.argv[2] + ".tmp"
try:
    os.unlink(tmp)  # left by a backup that was killed
except FileNotFoundError:
    pass
try:
    src = sqlite3.connect(pathlib.Path(sys.argv[1]).resolve().as_uri() + "?mode=ro", uri=True)
    dst = sqlite3.connect(tmp)
    src.backup(dst)  # SQLite's online backup: consistent while syncd runs
    dst.close()
    os.chmod(tmp, 0o600)
    os.rename(tmp, sys.argv[2])
except (sqlite3.Error, OSError) as exc:
    sys.exit(f"install.sh: backing up {sys.argv[1]}: {exc}")
PY
  say "backed up the ledger (schema $schema; syncd $v migrates it to $reads) to ${backup#"$root"}"
  changed+=("$backup")
}

# The unit, sysusers file, man page and docs of version $1 (the one `current` points at).
install_system_files() {
  local share=$opt/$1/share before=${#changed[@]} unit_new=0
  place "$share/systemd/syncd.service" "$unit_dir/syncd.service" 0644
  ((${#changed[@]} > before)) && unit_new=1
  place "$share/sysusers/syncd.conf" "$root/usr/lib/sysusers.d/syncd.conf" 0644
  link "/opt/syncd/current/share/man/man1/syncd.1" "$root/usr/share/man/man1/syncd.1"
  link "/opt/syncd/current/share/doc/syncd" "$root/usr/share/doc/syncd"
  if [ ! -e "$root/etc/syncd" ]; then  # a first install: the example beside where the config goes
    install -d -m 0755 "$root/etc/syncd"
    install -m 0644 "$share/syncd.conf.example" "$root/etc/syncd/syncd.conf.example"
    changed+=("$root/etc/syncd")
  fi
  if ! command -v systemd-sysusers >/dev/null; then
    say "warning: no systemd-sysusers here; create the user syncd as $root/usr/lib/sysusers.d/syncd.conf says"
  elif [ -z "$root" ]; then
    systemd-sysusers /usr/lib/sysusers.d/syncd.conf
  else
    systemd-sysusers --root="$root" "$root/usr/lib/sysusers.d/syncd.conf"
  fi
  if [ -z "$root" ] && [ -d /run/systemd/system ] && ((unit_new)); then
    systemctl daemon-reload
  fi
}

flip() {  # make `current` point at $1; the version it pointed at becomes `previous`
  local new=$1 old=""
  old=$(readlink "$opt/current" 2>/dev/null || true)
  [ "$old" = "$new" ] && return 0
  link "$new" "$opt/current"  # first: `current` is what runs, and each rename is atomic on its own
  if [ -n "$old" ]; then link "$old" "$opt/previous"; fi
}

finish() {
  if ((${#changed[@]})); then
    if [ "$root" = "" ] && command -v systemctl >/dev/null && systemctl is-active --quiet syncd 2>/dev/null; then
      say "syncd.service is running the old version until: systemctl restart syncd"
    fi
    echo "syncd-install: changed $*"
  else
    echo "syncd-install: unchanged $*"
  fi
}

if ((rollback)); then
  lock
  previous=$(readlink "$opt/previous" 2>/dev/null || true)
  current=$(readlink "$opt/current" 2>/dev/null || true)
  [ -n "$previous" ] || fail "refused: there is no previous version to roll back to ($opt/previous)"
  [ "$previous" != "$current" ] ||
    fail "refused: previous and current are both $current (an interrupted rollback?); install the release you want with its install.sh"
  [ -f "$opt/$previous/.syncd-release" ] || fail "refused: $opt/$previous is not a complete install"
  check_schema "$previous"
  backup_if_migrating "$previous"
  flip "$previous"
  install_system_files "$previous"
  finish "rolled back to syncd $previous (from $current)"
  exit 0
fi

# --- install -----------------------------------------------------------------------------------------
version=$(cat "$here/VERSION")
if ! [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+([.+-][0-9A-Za-z.]+)?$ ]]; then
  fail "refused: VERSION '$version' is not a version (X.Y.Z)"
fi
(cd "$here" && sha256sum --quiet --strict -c SHA256SUMS) ||
  fail "refused: files of this release do not match its SHA256SUMS (a damaged or altered copy)"
# (awk reads SHA256SUMS, then the file list on stdin: no process substitution, which needs /dev/fd,
# missing in a chroot or an image build)
unlisted=$(cd "$here" && find . -type f ! -name SHA256SUMS -printf '%P\n' |
  awk 'NR == FNR { sub(/^[0-9a-f]+  /, ""); listed[$0] = 1; next } !($0 in listed)' SHA256SUMS -)
[ -z "$unlisted" ] || fail "refused: files not in SHA256SUMS: $(echo "$unlisted" | head -3 | tr '\n' ' ')"
lock
release_id=$(sha256sum "$here/SHA256SUMS" | cut -d' ' -f1)
dest=$opt/$version

if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      python=$(command -v "$candidate")
      break
    fi
  done
fi
[ -n "$python" ] || fail "no Python 3.11 found (Debian 12: apt-get install python3-venv; RHEL 9: dnf install python3.11); or give --python"
"$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null ||
  fail "$python is not a Python 3.11 with venv and ensurepip (Debian 12: apt-get install python3-venv)"

if [ -f "$dest/.syncd-release" ]; then
  if [ "$(cat "$dest/.syncd-release")" != "$release_id" ]; then
    fail "refused: $dest holds another build of syncd $version; give the new build a higher version"
  fi
else
  # A venv cannot be moved (its scripts name their own path), so it is made in place; .syncd-release,
  # written last, is what makes it complete, and `current` only ever points at a complete one.
  rm -rf "$dest"
  mkdir -p "$opt"
  "$python" -m venv "$dest"
  "$dest/bin/python" -m pip install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --find-links "$here/wheels" -r "$here/requirements.txt"
  mkdir -p "$dest/share"
  cp -R "$here/share/." "$dest/share/"
  cp "$here/requirements.lock" "$here/VERSION" "$here/install.sh" "$dest/"  # install.sh: for --rollback
  "$dest/bin/syncd" --version >/dev/null || fail "the new venv's syncd does not run ($dest)"
  echo "$release_id" > "$dest/.syncd-release.tmp"
  mv "$dest/.syncd-release.tmp" "$dest/.syncd-release"
  changed+=("$dest")
fi

# Not a version the ledger is too new for (a downgrade); and a copy of the ledger first when this
# version will migrate it (when syncd next starts).
if [ "$(readlink "$opt/current" 2>/dev/null || true)" != "$version" ]; then
  check_schema "$version"
  backup_if_migrating "$version"
fi

flip "$version"
install_system_files "$version"
finish "syncd $version in /opt/syncd/$version"
