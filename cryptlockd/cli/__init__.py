"""The command-line client, cryptlockctl: talks to the daemon over D-Bus only."""
