#!/bin/sh
# mmdebstrap --customize-hook: a guest that boots, mounts the run's share and
# runs the run's guest.sh once, then powers off.  Its only network is qemu's
# user-mode NAT (10.0.2.0/24, resolver 10.0.2.3).
set -e
R="$1"
echo larkns-vm >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 larkns-vm\n::1 localhost\n' >"$R/etc/hosts"
echo 'nameserver 10.0.2.3' >"$R/etc/resolv.conf"
chroot "$R" passwd -d root >/dev/null

# DHCP on the one NIC qemu gives (its MAC is set on qemu's command line),
# and on nothing else: the tests make links by the hundred.  networkd must
# also leave alone routes and rules it did not make (the tests' own).
mkdir -p "$R/etc/systemd/network" "$R/etc/systemd/networkd.conf.d"
printf '[Match]\nMACAddress=52:54:00:12:34:56\n[Network]\nDHCP=ipv4\nIPv6AcceptRA=no\n' \
    >"$R/etc/systemd/network/20-qemu.network"
printf '[Network]\nManageForeignRoutingPolicyRules=no\nManageForeignRoutes=no\n' \
    >"$R/etc/systemd/networkd.conf.d/larkns-vm.conf"
chroot "$R" systemctl enable systemd-networkd >/dev/null 2>&1

mkdir -p "$R/mnt/run"
cat >>"$R/etc/fstab" <<'EOT'
/dev/vda / ext4 rw,errors=remount-ro 0 1
run /mnt/run 9p trans=virtio,version=9p2000.L,msize=262144,nofail,x-systemd.device-timeout=10s 0 0
EOT

cat >"$R/etc/systemd/system/larkns-vm.service" <<'EOT'
[Unit]
Description=the run's guest.sh (tests/vm), then power off
After=multi-user.target network-online.target
Wants=network-online.target
RequiresMountsFor=/mnt/run
ConditionPathExists=/mnt/run/guest.sh
[Service]
Type=oneshot
TimeoutStartSec=infinity
ExecStart=/bin/bash /mnt/run/guest.sh
ExecStopPost=/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
EOT
chroot "$R" systemctl enable larkns-vm.service systemd-networkd-wait-online.service >/dev/null 2>&1
# Nothing else to wait for at boot.
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    fstrim.timer >/dev/null 2>&1 || true
