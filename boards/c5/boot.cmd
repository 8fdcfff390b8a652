# picoimg boot script for the Odroid C5 with Hardkernel's u-boot, compiled into boot.scr.
# Uses the vendor environment's load addresses (loadaddr_kernel, dtb_mem_addr); the device
# and partition come from distro boot when it runs this script, else the first SD/eMMC
# partition.
if test -z "${devtype}"; then setenv devtype mmc; fi
if test -z "${devnum}"; then setenv devnum 0; fi
if test -z "${distro_bootpart}"; then setenv distro_bootpart 1; fi
setenv bootargs "@CMDLINE@"
load ${devtype} ${devnum}:${distro_bootpart} ${dtb_mem_addr} @DTB@
load ${devtype} ${devnum}:${distro_bootpart} ${loadaddr_kernel} @KERNEL@
load ${devtype} ${devnum}:${distro_bootpart} ${ramdisk_addr_r} @INITRD@
booti ${loadaddr_kernel} ${ramdisk_addr_r}:${filesize} ${dtb_mem_addr}
