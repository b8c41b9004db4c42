#!/bin/bash
# customize.sh IMAGE PUBKEY: makes a copy of the VM tier's Debian 12 image
# (an ext4 file system, no partition table, no bootloader) a Vagrant box's
# disk: what Vagrant needs to log in and provision (sshd, sudo, rsync, the
# QEMU guest agent that tells vagrant-libvirt the guest's address), a
# `vagrant` user with this box's own key, DHCP (address and resolver) on
# every NIC a hypervisor gives, and none of the VM tier's run-once machinery.
#
# tests/vm/vagrant.py runs it as root under `unshare --mount`: the image's
# mounts exist in that mount namespace only and go with it, whatever happens.
set -euo pipefail
IMAGE=$1
PUBKEY=$2
PACKAGES=(openssh-server sudo rsync qemu-guest-agent systemd-resolved)

if [ "$(readlink /proc/self/ns/mnt)" = "$(readlink /proc/1/ns/mnt)" ]; then
    echo "customize.sh: run it in a mount namespace of its own (unshare --mount)" >&2
    exit 1
fi
R=$(mktemp -d /tmp/lkgbox.XXXXXX)
trap 'umount -R "$R" 2>/dev/null || umount -l "$R" 2>/dev/null; rmdir "$R"' EXIT
mount -o loop "$IMAGE" "$R"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t sysfs sysfs "$R/sys"
# The host's resolver for apt (the image names QEMU's, 10.0.2.3); the box's
# own comes from DHCP (systemd-resolved, below).
cp --remove-destination /etc/resolv.conf "$R/etc/resolv.conf"

# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"
chmod 755 "$R/usr/sbin/policy-rc.d"
# The image's lists may be older than the mirror's packages.
chroot "$R" apt-get update -q >/dev/null
chroot "$R" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
rm -f "$R/usr/sbin/policy-rc.d"
chroot "$R" apt-get clean
# The resolver networkd learnt by DHCP, on any network.
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"
chroot "$R" systemctl enable systemd-resolved.service >/dev/null 2>&1

echo larkns-box >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 larkns-box\n::1 localhost\n' >"$R/etc/hosts"
# No password for root (the VM tier's guest has an empty one).
chroot "$R" passwd -l root >/dev/null

chroot "$R" useradd --create-home --shell /bin/bash vagrant
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$R/etc/sudoers.d/vagrant"
chmod 440 "$R/etc/sudoers.d/vagrant"
install -d -m 700 "$R/home/vagrant/.ssh"
install -m 600 "$PUBKEY" "$R/home/vagrant/.ssh/authorized_keys"
chroot "$R" chown -R vagrant:vagrant /home/vagrant/.ssh

# Host keys are made at each machine's first boot, not shared by every
# machine of the box.
rm -f "$R"/etc/ssh/ssh_host_*
cat >"$R/etc/systemd/system/ssh-hostkeys.service" <<'EOT'
[Unit]
Description=SSH host keys of this machine
Before=ssh.service
ConditionFileNotEmpty=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=ssh.service
EOT
chroot "$R" systemctl enable ssh-hostkeys.service ssh.service >/dev/null 2>&1

# DHCP on every NIC the hypervisor gives (libvirt's management network, QEMU's
# user-mode one), whatever its MAC: they are PCI devices; the links larkns
# and its tests make are not.
rm -f "$R/etc/systemd/network/20-qemu.network"
printf '[Match]\nPath=pci-*\n[Network]\nDHCP=ipv4\nIPv6AcceptRA=no\n' \
    >"$R/etc/systemd/network/20-wired.network"

# Not the VM tier's guest: no run-once service, no 9p share to mount.
chroot "$R" systemctl disable larkns-vm.service >/dev/null 2>&1 || true
rm -f "$R/etc/systemd/system/larkns-vm.service"
sed -i '/ 9p /d' "$R/etc/fstab"
echo "customize.sh: $(chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' "${PACKAGES[@]}" | tr '\n' ' ')"
