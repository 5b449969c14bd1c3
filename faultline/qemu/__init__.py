"""The qemu backend: faultline's guest under the system's QEMU with KVM (docs/qemu.md)."""
