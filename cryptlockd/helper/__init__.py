"""The sleep-cycle helper: a stdlib-only program that runs from the RAM filesystem.

Everything in this package is copied into the ramfs and must import with nothing but the
Python standard library (`python3 -I -S`). Nothing here may import the rest of cryptlockd.
"""
