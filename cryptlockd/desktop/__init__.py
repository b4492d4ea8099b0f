"""cryptlockd-notify: the user-session agent that shows the daemon's results as desktop
notifications. messages.py decides what to say, agent.py does the bus I/O, main.py starts it."""
