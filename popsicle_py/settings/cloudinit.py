"""cloud-init NoCloud files for the boot partition, as Raspberry Pi OS (Trixie on) and Ubuntu
for Raspberry Pi read them: ``user-data``, ``meta-data`` (its own instance-id per drive, so
cloud-init runs on each board's first boot) and ``network-config`` (Wi-Fi, netplan v2).

The password is written hashed (SHA-512 crypt) and the Wi-Fi passphrase as its WPA PSK (the
PBKDF2 of passphrase and SSID), as Raspberry Pi Imager writes them: neither is on the drive in
clear text.
"""

from __future__ import annotations

import hashlib

from popsicle_py.settings.model import Settings, Wifi
from popsicle_py.settings.sha512crypt import hash_password
from popsicle_py.settings.yamltext import dump

__all__ = ["GROUPS", "cloud_init_files", "meta_data", "network_config", "user_data",
           "wpa_psk"]

#: The groups Raspberry Pi Imager gives the first user.
GROUPS = "users,adm,dialout,audio,netdev,video,plugdev,cdrom,games,input,gpio,spi,i2c,render,sudo"


def wpa_psk(wifi: Wifi) -> str:
    """The 64-hex-digit key WPA derives from the passphrase (a 64-hex passphrase already is)."""
    if len(wifi.passphrase) == 64:
        return wifi.passphrase.lower()
    return hashlib.pbkdf2_hmac("sha1", wifi.passphrase.encode(), wifi.ssid.encode(),
                               4096, 32).hex()


def password_hash(settings: Settings) -> str | None:
    if settings.password_hash is not None:
        return settings.password_hash
    return hash_password(settings.password) if settings.password is not None else None


def user_data(settings: Settings, hashed: str | None) -> str:
    """The ``#cloud-config`` document (``hashed``: the password, already hashed)."""
    config: dict[str, object] = {}
    if settings.hostname:
        config["hostname"] = settings.hostname
        config["manage_etc_hosts"] = True
    if settings.user:
        user: dict[str, object] = {"name": settings.user, "groups": GROUPS,
                                   "shell": "/bin/bash", "lock_passwd": hashed is None,
                                   "sudo": "ALL=(ALL) NOPASSWD:ALL"}
        if hashed is not None:
            user["passwd"] = hashed
        if settings.ssh_authorized_keys:
            user["ssh_authorized_keys"] = list(settings.ssh_authorized_keys)
        config["users"] = [user]
    if settings.ssh_enabled or settings.ssh is False:
        config["ssh_pwauth"] = settings.ssh_enabled and settings.ssh_password_auth
    if settings.timezone:
        config["timezone"] = settings.timezone
    if settings.keyboard:
        config["keyboard"] = {"layout": settings.keyboard, "model": "pc105"}
    if settings.locale:
        config["locale"] = settings.locale
    if settings.ssh_enabled:
        config["runcmd"] = [["systemctl", "enable", "--now", "ssh"]]
    return "#cloud-config\n" + (dump(config) if config else "{}\n")


def meta_data(settings: Settings, instance_id: str) -> str:
    data: dict[str, object] = {"instance-id": instance_id}
    if settings.hostname:
        data["local-hostname"] = settings.hostname
    return dump(data)


def network_config(settings: Settings) -> str | None:
    """Netplan v2 Wi-Fi with DHCP; None without Wi-Fi settings (the image's own stays)."""
    wifi = settings.wifi
    if wifi is None:
        return None
    point: dict[str, object] = {"password": wpa_psk(wifi)} if wifi.passphrase else {}
    if wifi.hidden:
        point["hidden"] = True
    return dump({"network": {"version": 2, "wifis": {"wlan0": {
        "dhcp4": True, "optional": True, "regulatory-domain": wifi.country,
        "access-points": {wifi.ssid: point}}}}})


def cloud_init_files(settings: Settings, instance_id: str) -> dict[str, bytes]:
    """Name in the boot partition -> content, for one drive."""
    files = {"user-data": user_data(settings, password_hash(settings)).encode(),
             "meta-data": meta_data(settings, instance_id).encode()}
    network = network_config(settings)
    if network is not None:
        files["network-config"] = network.encode()
    return files
