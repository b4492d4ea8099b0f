# cryptlockd — build, install, test and demo.
#   make install   installs on this machine (honours DESTDIR and PREFIX; pip-based, so
#                  PIP_NO_INDEX=1 PIP_FIND_LINKS=<dir> give an offline install)
#   make test      the whole suite: lint, types, unit, host integration, QEMU guest
#                  (bookworm and trixie guests; VM_SUITES=bookworm for one)
#   make demo      boots a Debian guest with root on LUKS and shows cryptlockd at work
#   make bench     times the sleep cycle in the guest (BENCH_CYCLES=5) and prints the figures

PREFIX ?= /usr/local
DESTDIR ?=
PYTHON ?= /usr/bin/python3

BINDIR = $(PREFIX)/bin
LIBDIR = $(PREFIX)/lib/cryptlockd
LIBEXECDIR ?= $(PREFIX)/libexec/cryptlockd
VENVDIR = $(LIBDIR)/venv
UNITDIR ?= $(PREFIX)/lib/systemd/system
# dbus-daemon and polkitd read only these places, whatever the prefix.
DBUS_POLICYDIR ?= /usr/share/dbus-1/system.d
DBUS_SERVICEDIR ?= /usr/share/dbus-1/system-services
DBUS_INTERFACEDIR ?= /usr/share/dbus-1/interfaces
POLKIT_ACTIONDIR ?= /usr/share/polkit-1/actions
MANDIR ?= $(PREFIX)/share/man
# bash-completion and zsh look here for /usr/local as well as /usr (XDG_DATA_DIRS, fpath).
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
SYSCONFDIR ?= /etc
# cryptlockd-notify: a user unit, and the XDG autostart file for sessions without systemd.
USERUNITDIR ?= $(PREFIX)/lib/systemd/user
XDG_AUTOSTARTDIR ?= $(SYSCONFDIR)/xdg/autostart

# System packages the test suite and the demo need on a Debian 12 host.
HOST_DEBS = python3 python3-venv python3-dev python3-pip gcc pkg-config libsystemd-dev \
	dbus python3-dbusmock python3-gi systemd umockdev gir1.2-umockdev-1.0 \
	qemu-system-x86 qemu-utils mmdebstrap e2fsprogs zstd cpio libcryptsetup12 \
	mandoc zsh bash-completion xvfb dunst $(DEB_DEBS) rpmlint swtpm

# What `make deb` needs to build and check the Debian package on a Debian 12 host.
# (dpkg-buildpackage insists on build-essential, even for an arch-all package.)
DEB_DEBS = build-essential dpkg-dev debhelper dh-python lintian

VENV = .venv
VPY = $(VENV)/bin/python

# The interpreter the installed commands and the sleep entry run, always with -I (no current
# directory or PYTHONPATH on sys.path): the venv's for `make install`; the system's for the
# Debian package, which installs the package into dist-packages (packaging/debian/rules).
RUN_PYTHON ?= $(VENVDIR)/bin/python

SUBST = sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' -e 's|@VENVDIR@|$(VENVDIR)|g' \
	-e 's|@RUN_PYTHON@|$(RUN_PYTHON)|g' -e 's|@LIBEXECDIR@|$(LIBEXECDIR)|g'

# The sleep entry, $(LIBEXECDIR)/cryptlockd-sleep: systemd-suspend.service's ExecStart=, on
# the path from logind's go to the sleep. native: the C program (cryptlockd/sleep_entry.c),
# which starts in milliseconds; python: the same entry in Python (cryptlockd/sleep_entry.py),
# which needs no compiler but costs a Python start (0.1-0.3 s) on every sleep; auto: native
# when $(CC) can build it, else python, with a warning. Packages build native.
SLEEP_ENTRY ?= auto
BUILDDIR ?= build
CFLAGS ?= -O2 -g
SLEEP_CFLAGS = -std=gnu11 -Wall -Wextra

.PHONY: all deps venv lint test test-unit test-integration test-vm demo bench install \
	install-venv install-files install-sleep-entry sleep-entry deb clean

all: venv

# Installs only what is missing, so a prepared machine needs no network here.
deps:
	@missing=$$(for p in $(HOST_DEBS); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "error: run as root to install: $$missing" >&2; exit 1; fi; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.stamp

lint: venv
	$(VENV)/bin/ruff format --check cryptlockd tests bench
	$(VENV)/bin/ruff check cryptlockd tests bench
	$(VENV)/bin/mypy --strict cryptlockd
	mandoc -Tlint -W warning man/*.[1-8]
	$(CC) $(SLEEP_CFLAGS) -Werror -Wshadow -Wconversion -Wno-sign-conversion -fanalyzer \
		-O2 -D_FORTIFY_SOURCE=2 -c -o /dev/null cryptlockd/sleep_entry.c

test-unit: venv
	$(VENV)/bin/pytest tests/unit

test-integration: venv
	$(VENV)/bin/pytest tests/integration

# The guest suite runs once per Debian release: issues 4 and 5 are accepted on both, and
# trixie's kernel (6.12) is the one with the keyring change of 6.9. The releases run at the
# same time, one guest each (a TCG guest keeps one core busy; CI has 2), each in its own
# tests/vm/artifacts/<suite>/ and with its output in <suite>/pytest.log. Each log is printed
# whole once its suite ends, the failed ones too, so a CI log reads one suite at a time;
# the target fails if any suite failed. The suites run in the background, where the shell
# makes them ignore SIGINT: the trap ends them on Ctrl-C (their QEMUs die with them).
VM_SUITES ?= bookworm trixie
VM_ARTIFACTS = $${CRYPTLOCKD_VM_ARTIFACTS:-tests/vm/artifacts}
RUN_VM = pids=; trap 'kill $$pids 2>/dev/null; exit 130' INT TERM; \
	for suite in $(VM_SUITES); do \
		log=$(VM_ARTIFACTS)/$$suite/pytest.log; mkdir -p "$${log%/*}"; \
		CRYPTLOCKD_VM_SUITE=$$suite $(VENV)/bin/pytest tests/vm >"$$log" 2>&1 & pids="$$pids $$!"; \
		echo "== QEMU guest suite $$suite: started at $$(date +%T), output in $$log"; \
	done; \
	rc=0; summary=; set -- $$pids; for suite in $(VM_SUITES); do \
		if wait $$1; then result=passed; else result=FAILED; rc=1; fi; shift; \
		echo "== QEMU guest suite $$suite: $$result at $$(date +%T); its output:"; \
		cat $(VM_ARTIFACTS)/$$suite/pytest.log; \
		summary="$$summary $$suite $$result;"; \
	done; \
	echo "== QEMU guest suites:$$summary"; exit $$rc

test-vm: venv
	@$(RUN_VM)

test: venv lint
	$(VENV)/bin/pytest tests/unit tests/integration
	@$(RUN_VM)

demo: venv
	$(VPY) -m tests.vm.demo

bench: venv
	$(VPY) -m pip install -q -e '.[test,bench]'
	$(VPY) -m bench.cycle

install: install-venv install-files

install-venv:
	install -d $(DESTDIR)$(LIBDIR)
	$(PYTHON) -m venv --system-site-packages $(DESTDIR)$(VENVDIR)
	$(DESTDIR)$(VENVDIR)/bin/python -m pip install -q .

sleep-entry: $(BUILDDIR)/cryptlockd-sleep

$(BUILDDIR)/cryptlockd-sleep: cryptlockd/sleep_entry.c
	@mkdir -p $(BUILDDIR)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(SLEEP_CFLAGS) $(LDFLAGS) -o $@ cryptlockd/sleep_entry.c

install-sleep-entry:
	@case '$(SLEEP_ENTRY)' in native|python|auto) ;; \
	*) echo "error: SLEEP_ENTRY must be native, python or auto, not '$(SLEEP_ENTRY)'" >&2; exit 2 ;; \
	esac
	install -d $(DESTDIR)$(LIBEXECDIR)
	@if [ '$(SLEEP_ENTRY)' = native ] || \
		{ [ '$(SLEEP_ENTRY)' = auto ] && $(MAKE) --no-print-directory sleep-entry; }; then \
		$(MAKE) --no-print-directory sleep-entry && \
		install -m755 $(BUILDDIR)/cryptlockd-sleep $(DESTDIR)$(LIBEXECDIR)/cryptlockd-sleep; \
	else \
		[ '$(SLEEP_ENTRY)' = python ] || echo "warning: $(CC) could not build the sleep entry;" \
			"installing its Python version, which adds a Python start (0.1-0.3 s) to every" \
			"sleep. For the fast one, install gcc and libc6-dev and rerun make install." >&2; \
		$(SUBST) packaging/cryptlockd-sleep.in | \
			install -m755 /dev/stdin $(DESTDIR)$(LIBEXECDIR)/cryptlockd-sleep; \
	fi

# Everything but the Python package itself; the Debian package's rules use it too.
install-files: install-sleep-entry
	install -d $(DESTDIR)$(BINDIR)
	for prog in cryptlockd cryptlockctl; do \
		printf '#!/bin/sh\nexec %s -I -m cryptlockd.%s "$$@"\n' '$(RUN_PYTHON)' \
			"$$( [ $$prog = cryptlockd ] && echo daemon || echo cli )" > $(DESTDIR)$(BINDIR)/$$prog; \
		chmod 0755 $(DESTDIR)$(BINDIR)/$$prog; \
	done
	install -d $(DESTDIR)$(UNITDIR)
	for f in $$(cd units && find . -path ./user -prune -o -type f \( -name '*.service' -o -name '*.conf' \) -print); do \
		install -d $(DESTDIR)$(UNITDIR)/$$(dirname $$f); \
		$(SUBST) units/$$f > $(DESTDIR)$(UNITDIR)/$$f; \
	done
	install -Dm644 dbus/org.cryptlockd1.conf $(DESTDIR)$(DBUS_POLICYDIR)/org.cryptlockd1.conf
	$(SUBST) dbus/org.cryptlockd1.service | install -Dm644 /dev/stdin $(DESTDIR)$(DBUS_SERVICEDIR)/org.cryptlockd1.service
	install -Dm644 dbus/org.cryptlockd1.Manager.xml $(DESTDIR)$(DBUS_INTERFACEDIR)/org.cryptlockd1.Manager.xml
	install -Dm644 dbus/org.cryptlockd1.policy $(DESTDIR)$(POLKIT_ACTIONDIR)/org.cryptlockd1.policy
	for m in man/*.[0-9]; do \
		[ -e "$$m" ] || continue; \
		install -Dm644 $$m $(DESTDIR)$(MANDIR)/man$${m##*.}/$$(basename $$m); \
	done
	printf '#!/bin/sh\nexec %s -I -m cryptlockd.desktop "$$@"\n' '$(RUN_PYTHON)' \
		> $(DESTDIR)$(BINDIR)/cryptlockd-notify
	chmod 0755 $(DESTDIR)$(BINDIR)/cryptlockd-notify
	$(SUBST) units/user/cryptlockd-notify.service | \
		install -Dm644 /dev/stdin $(DESTDIR)$(USERUNITDIR)/cryptlockd-notify.service
# What `systemctl --global enable cryptlockd-notify.service` does: every graphical
# session that reaches graphical-session.target starts the agent.
	install -d $(DESTDIR)$(SYSCONFDIR)/systemd/user/graphical-session.target.wants
	ln -sf $(USERUNITDIR)/cryptlockd-notify.service \
		$(DESTDIR)$(SYSCONFDIR)/systemd/user/graphical-session.target.wants/cryptlockd-notify.service
	$(SUBST) packaging/desktop/cryptlockd-notify.desktop | \
		install -Dm644 /dev/stdin $(DESTDIR)$(XDG_AUTOSTARTDIR)/cryptlockd-notify.desktop
	install -Dm644 packaging/completions/cryptlockctl.bash $(DESTDIR)$(BASHCOMPDIR)/cryptlockctl
	install -Dm644 packaging/completions/_cryptlockctl $(DESTDIR)$(ZSHCOMPDIR)/_cryptlockctl
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/cryptlockd/cryptlockd.conf.d
	[ -e $(DESTDIR)$(SYSCONFDIR)/cryptlockd/cryptlockd.conf ] || \
		install -Dm644 packaging/cryptlockd.conf $(DESTDIR)$(SYSCONFDIR)/cryptlockd/cryptlockd.conf

# The Debian package for trixie (packaging/debian; packaging/README.md): built as a binary
# package in a copy of the tree, so the checkout stays clean, and checked with lintian, which
# must find no error and no warning. The result: dist/cryptlockd_<version>_<arch>.deb.
DEB_BUILD = build/deb
DEB_SOURCES = cryptlockd units dbus man packaging Makefile pyproject.toml README.md

deb:
	@$(MAKE) --no-print-directory deps HOST_DEBS="$(DEB_DEBS)"
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/src dist
	cp -R $(DEB_SOURCES) $(DEB_BUILD)/src/
	cp -R packaging/debian $(DEB_BUILD)/src/debian
	find $(DEB_BUILD)/src -name __pycache__ -prune -exec rm -rf {} +
	cd $(DEB_BUILD)/src && dpkg-buildpackage --build=binary --no-sign
	lintian --fail-on error,warning --display-info $(DEB_BUILD)/*.changes
	rm -f dist/cryptlockd_*.deb dist/cryptlockd-dbgsym_*.deb
	cp $(DEB_BUILD)/*.deb dist/

clean:
	rm -rf $(VENV) build dist *.egg-info
