#!/bin/sh
# mmdebstrap --essential-hook: before the kernel is installed, an initramfs
# config that holds only what a virtio guest needs to mount its root (the
# default, MODULES=most, makes 36 MB and boots slower under emulation).
set -e
R="$1"
mkdir -p "$R/etc/initramfs-tools/conf.d" "$R/etc/initramfs-tools/hooks"
echo MODULES=list >"$R/etc/initramfs-tools/conf.d/zz-larkns-vm"
cat >"$R/etc/initramfs-tools/hooks/larkns-vm" <<'EOT'
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk ext4 crc32c_generic; do manual_add_modules $m; done
EOT
chmod +x "$R/etc/initramfs-tools/hooks/larkns-vm"
