"""Raspberry Pi OS's first-run script, for images without cloud-init (Bookworm and older), as
Raspberry Pi Imager writes it: ``firstrun.sh`` in the boot partition and a hook at the end of
``cmdline.txt`` that runs it once through systemd and reboots.

The script prefers the image's own helpers (``imager_custom``, ``userconf``) and falls back to
plain commands, like Imager's; every value is quoted for the shell (:func:`shlex.quote`), the
password is hashed and the Wi-Fi passphrase written as its PSK.  The script removes itself and
the hook when it has run.
"""

from __future__ import annotations

import shlex

from popsicle_py.settings.cloudinit import password_hash, wpa_psk
from popsicle_py.settings.model import Settings

__all__ = ["BOOT", "HOOK", "cmdline_with_hook", "firstrun_files", "firstrun_script"]

#: Where Raspberry Pi OS Bookworm mounts the boot partition.
BOOT = "/boot/firmware"
HOOK = (f" systemd.run={BOOT}/firstrun.sh systemd.run_success_action=reboot "
        "systemd.unit=kernel-command-line.target")
IMAGER = "/usr/lib/raspberrypi-sys-mods/imager_custom"


def _q(value: str) -> str:
    return shlex.quote(value)


def _hostname(name: str) -> list[str]:
    return [
        'CURRENT_HOSTNAME=$(tr -d " \\t\\n\\r" < /etc/hostname)',
        f"if [ -f {IMAGER} ]; then",
        f"   {IMAGER} set_hostname {_q(name)}",
        "else",
        f"   echo {_q(name)} >/etc/hostname",
        f'   sed -i "s/127.0.1.1.*$CURRENT_HOSTNAME/127.0.1.1\\t{name}/g" /etc/hosts',  # checked
        "fi",
    ]


def _ssh(settings: Settings) -> list[str]:
    """SSH on, with password authentication as ``ssh_password_auth`` says (as cloud-init's
    ``ssh_pwauth``): the helper's ``-k`` turns it off, and without ``-k`` it stays the image's
    (on: Raspberry Pi OS leaves sshd's default); its ``-p`` is not used, as helpers before
    2023-05 turn password authentication off for it too."""
    keys = " ".join(_q(k) for k in settings.ssh_authorized_keys)
    pwauth = "yes" if settings.ssh_password_auth else "no"
    lines = [f"if [ -f {IMAGER} ]; then"]
    lines.append(f"   {IMAGER} enable_ssh" + ("" if settings.ssh_password_auth else " -k")
                 + (f" {keys}" if keys else ""))
    lines.append("else")
    if keys:
        lines += ['   install -o "$FIRSTUSER" -m 700 -d "$FIRSTUSERHOME/.ssh"',
                  f"   printf '%s\\n' {keys} >\"$FIRSTUSERHOME/.ssh/authorized_keys\"",
                  '   chown "$FIRSTUSER:" "$FIRSTUSERHOME/.ssh/authorized_keys"',
                  '   chmod 600 "$FIRSTUSERHOME/.ssh/authorized_keys"']
    lines += [f"   echo 'PasswordAuthentication {pwauth}' >>/etc/ssh/sshd_config",
              "   systemctl enable ssh", "fi"]
    return lines


def _user(name: str, hashed: str) -> list[str]:
    n, h = _q(name), _q(hashed)
    return [
        "if [ -f /usr/lib/userconf-pi/userconf ]; then",
        f"   /usr/lib/userconf-pi/userconf {n} {h}",
        "else",
        f"   echo \"$FIRSTUSER:\"{h} | chpasswd -e",
        f"   if [ \"$FIRSTUSER\" != {n} ]; then",
        f"      usermod -l {n} \"$FIRSTUSER\"",
        f"      usermod -m -d /home/{name} {n}",
        f"      groupmod -n {n} \"$FIRSTUSER\"",
        "      if grep -q '^autologin-user=' /etc/lightdm/lightdm.conf ; then",
        "         sed /etc/lightdm/lightdm.conf -i -e "
        f"\"s/^autologin-user=.*/autologin-user={name}/\"",
        "      fi",
        "      if [ -f /etc/systemd/system/getty@tty1.service.d/autologin.conf ]; then",
        "         sed /etc/systemd/system/getty@tty1.service.d/autologin.conf -i "
        f"-e \"s/$FIRSTUSER/{name}/\"",
        "      fi",
        "      if [ -f /etc/sudoers.d/010_pi-nopasswd ]; then",
        f"         sed -i \"s/^$FIRSTUSER /{name} /\" /etc/sudoers.d/010_pi-nopasswd",
        "      fi",
        "   fi",
        "fi",
    ]


def _wifi(settings: Settings) -> list[str]:
    wifi = settings.wifi
    assert wifi is not None
    psk = wpa_psk(wifi) if wifi.passphrase else ""
    ssid_hex = wifi.ssid.encode().hex()
    network = [f"\tssid={ssid_hex}"]
    network += [f"\tpsk={psk}"] if psk else ["\tkey_mgmt=NONE"]
    if wifi.hidden:
        network.append("\tscan_ssid=1")
    helper = f"   {IMAGER} set_wlan " + ("-h " if wifi.hidden else "") + \
        f"{_q(wifi.ssid)} {_q(psk)} {_q(wifi.country)}"
    return [
        f"if [ -f {IMAGER} ]; then",
        helper,
        "else",
        "cat >/etc/wpa_supplicant/wpa_supplicant.conf <<'WPAEOF'",
        f"country={wifi.country}",
        "ctrl_interface=DIR=/var/run/wpa_supplicant GROUP=netdev",
        "ap_scan=1",
        "",
        "update_config=1",
        "network={",
        *network,
        "}",
        "",
        "WPAEOF",
        "   chmod 600 /etc/wpa_supplicant/wpa_supplicant.conf",
        "   rfkill unblock wifi",
        "   for filename in /var/lib/systemd/rfkill/*:wlan ; do",
        '       echo 0 > "$filename"',
        "   done",
        "fi",
    ]


def _locale(settings: Settings) -> list[str]:
    lines = [f"if [ -f {IMAGER} ]; then"]
    if settings.keyboard:
        lines.append(f"   {IMAGER} set_keymap {_q(settings.keyboard)}")
    if settings.timezone:
        lines.append(f"   {IMAGER} set_timezone {_q(settings.timezone)}")
    lines.append("else")
    if settings.timezone:
        lines += ["   rm -f /etc/localtime", f"   echo {_q(settings.timezone)} >/etc/timezone",
                  "   dpkg-reconfigure -f noninteractive tzdata"]
    if settings.keyboard:
        lines += ["cat >/etc/default/keyboard <<'KBEOF'", 'XKBMODEL="pc105"',
                  f'XKBLAYOUT="{settings.keyboard}"', 'XKBVARIANT=""', 'XKBOPTIONS=""', "",
                  "KBEOF", "   dpkg-reconfigure -f noninteractive keyboard-configuration"]
    lines.append("fi")
    return lines


def firstrun_script(settings: Settings, hashed: str | None) -> str:
    """The script's text (``hashed``: the password, already hashed)."""
    lines = ["#!/bin/bash", "# shellcheck disable=SC2016  # a password hash is literal text", "",
             "set +e", ""]
    if settings.hostname:
        lines += _hostname(settings.hostname)
    keys = settings.ssh_enabled and bool(settings.ssh_authorized_keys)
    if keys or (settings.user and hashed is not None):
        lines.append("FIRSTUSER=$(getent passwd 1000 | cut -d: -f1)")
    if keys:
        lines.append("FIRSTUSERHOME=$(getent passwd 1000 | cut -d: -f6)")
    if settings.ssh_enabled:
        lines += _ssh(settings)
    if settings.user and hashed is not None:
        lines += _user(settings.user, hashed)
    if settings.wifi is not None:
        lines += _wifi(settings)
    if settings.timezone or settings.keyboard:
        lines += _locale(settings)
    if settings.locale:
        lines += [f"sed -i 's/^# *\\({settings.locale}\\)/\\1/' /etc/locale.gen",
                  "locale-gen", f"update-locale LANG={_q(settings.locale)}"]
    lines += [f"rm -f {BOOT}/firstrun.sh",
              f"sed -i 's| systemd.run.*||g' {BOOT}/cmdline.txt", "exit 0", ""]
    return "\n".join(lines)


#: The words of a first-run hook (ours, or Raspberry Pi Imager's before it).
_HOOK_WORDS = ("systemd.run=", "systemd.run_success_action=", "systemd.run_failure_action=",
               "systemd.unit=kernel-command-line.target")


def cmdline_with_hook(cmdline: bytes) -> bytes:
    """The image's ``cmdline.txt`` (one line) with the first-run hook at its end.

    An earlier hook is replaced, not repeated, word by word: what follows it in the line
    (``quiet splash``...) stays, and the hook stays last, where the script's own ``sed`` at
    first boot cuts it off (every word from `` systemd.run`` on)."""
    line = cmdline.decode("utf-8", "replace").strip().split("\n")[0]
    words = [w for w in line.split() if not w.startswith(_HOOK_WORDS)]
    return (" ".join(words) + HOOK + "\n").encode()


def firstrun_files(settings: Settings, cmdline: bytes) -> dict[str, bytes]:
    """Name in the boot partition -> content, for one drive (``cmdline``: the image's)."""
    return {"firstrun.sh": firstrun_script(settings, password_hash(settings)).encode(),
            "cmdline.txt": cmdline_with_hook(cmdline)}
