#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (run as root):
# the project with its test extras, and the real programs the tests drive
# (tshark as the decoding oracle, tcpdump/tcpreplay, prometheus/promtool, rsyslog,
# systemd-analyze for the unit checks; it needs no running systemd).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for cmd in tshark tcpdump tcpreplay prometheus promtool rsyslogd ip systemd-analyze; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
[ -f /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so ] || [ -n "$(ls /usr/lib/*/rsyslog/lmnsd_gtls.so 2>/dev/null)" ] || need+=(gtls)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends tshark tcpdump tcpreplay prometheus \
    rsyslog rsyslog-gnutls iproute2 libpcap-dev systemd >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
