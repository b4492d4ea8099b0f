"""Facts about the test guest that tests rely on: disks, names, the test passphrase."""

from __future__ import annotations

# What a user types at the resume prompt. It opens keyslot 1 of both LUKS disks. Capitals and
# symbols on purpose, so that typing it with send-key exercises the shift mapping; distinctive
# so that a RAM scan for it finds nothing else.
PASSPHRASE = "Lid-Shut_Tight!42"

ROOT_DM_NAME = "root"  # LUKS2 on /dev/vda, holds /; unlocked by the initramfs (boot keyfile)
DATA_DM_NAME = "data"  # LUKS2 on /dev/vdb, mounted on /data; opened from crypttab
ROOT_DISK = "/dev/vda"
DATA_DISK = "/dev/vdb"
DATA_MOUNT = "/data"
ROOT_KEYFILE = "/etc/keys/root.key"  # keyslot 0 of root, copied into the initramfs
DATA_KEYFILE = "/etc/keys/data.key"  # keyslot 0 of data, lives on the encrypted root
KEYFILE_SLOT = 0
PASSPHRASE_SLOT = 1
# Where the installed daemon keeps the keyslot that opened each disk last (StateDirectory=).
KEYSLOTS_FILE = "/var/lib/cryptlockd/keyslots.json"

# argon2id cost of the passphrase keyslots: small enough that TCG with 512 MiB RAM unlocks in
# a few seconds (measured in the provisioning boot and stored in the image's report.json).
ARGON2_MEMORY_KIB = 32768
ARGON2_ITERATIONS = 4
ARGON2_PARALLEL = 1

GUEST_MEMORY_MIB = 512
GUEST_CPUS = 2
AGENT_PORT = "org.cryptlockd.agent"
