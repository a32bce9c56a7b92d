# vmbalance: `make` builds bin/vcpu_scheduler, bin/memory_coordinator and bin/vmbalance_plot; `make test`
# runs every test.
# Both install the Debian packages they need (libvirt-dev, pkg-config, ...) when they are missing;
# `make deps` is that step alone. `make install` never installs packages: it only builds and copies.

CARGO ?= cargo
BIN_DIR := bin
# Where `make install` puts things (DESTDIR is prepended to all of them).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man/man1
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
# The Grafana dashboard (import it in Grafana, or point a dashboard provisioner at this directory).
DATADIR ?= $(PREFIX)/share/vmbalance
DOCDIR ?= $(PREFIX)/share/doc/vmbalance
# The operator's documentation, installed beside the man pages (the units and --help point at it).
OPERATOR_DOCS = README.md docs/operations.md docs/vcpu_scheduler.md docs/memory_coordinator.md docs/metrics.md docs/fleet.md
UNITS := vcpu-scheduler memory-coordinator
# Where `make e2e` builds its lab of real guests (outside the source tree; removed afterwards).
LAB_DIR ?= /tmp/vmbalance-lab
BINARIES := vcpu_scheduler memory_coordinator vmbalance_plot
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: all build binaries test test-unit e2e e2e-scale demo lint clean deps test-deps install uninstall rust-version deb deb-check

# The oldest Rust that builds vmbalance (Cargo.toml's rust-version).
RUST_MIN := $(shell sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml)

all: build

## Install missing packages, then build the release binaries into bin/.
build: deps
	@$(MAKE) --no-print-directory binaries

## Build the release binaries into bin/, without installing packages. Each binary is written beside
## its old one and renamed over it, so this works while a daemon started from bin/ is running (a
## copy in place fails with "Text file busy"); the running daemon keeps its old file.
binaries: rust-version
	$(CARGO) build --release --locked
	@mkdir -p $(BIN_DIR)
	@for b in $(BINARIES); do \
		install -m 755 target/release/$$b $(BIN_DIR)/.$$b.new && mv -f $(BIN_DIR)/.$$b.new $(BIN_DIR)/$$b || exit 1; \
	done
	@echo "built: $(addprefix $(BIN_DIR)/,$(BINARIES))"

## Run the whole test suite: the fast tests, then the end-to-end tests on real guests.
test: test-unit e2e

## Unit, property, simulated-host, libvirt test-driver and CLI tests (no root, no guests).
test-unit: test-deps rust-version
	$(CARGO) test --locked --all-targets

## End-to-end tests: set up the lab (root: packages, libvirtd, guests), run the daemons against
## real QEMU guests, tear the lab down whatever happened.
e2e: test-deps
	lab/lab.sh setup $(LAB_DIR)
	VMB_LAB_DIR=$(LAB_DIR) $(CARGO) test --locked --test e2e --test e2e_scale -- --ignored --test-threads=1 --nocapture; \
		status=$$?; lab/lab.sh teardown $(LAB_DIR); exit $$status

## The host-scale test on real guests alone (root; about 7 minutes; `make e2e` runs it too).
e2e-scale: test-deps
	lab/lab.sh setup $(LAB_DIR)
	VMB_LAB_DIR=$(LAB_DIR) $(CARGO) test --locked --test e2e_scale -- --ignored --test-threads=1 --nocapture; \
		status=$$?; lab/lab.sh teardown $(LAB_DIR); exit $$status

## Watch both daemons fix a real host (about three minutes; needs root).
demo: build
	lab/demo.sh

## Formatting and lints, as CI checks them.
lint: deps rust-version
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## Install the binaries, their man pages (generated from --help's definitions), the operator's
## documentation, the systemd units and their configuration files in $(SYSCONFDIR)/vmbalance (kept
## if already there). Honours PREFIX and DESTDIR.
## Never installs packages: a packager's build machine has them, or runs `make deps` first.
install: binaries
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/default $(DESTDIR)$(DATADIR) $(DESTDIR)$(DOCDIR)
	install -m 644 $(OPERATOR_DOCS) $(DESTDIR)$(DOCDIR)/
	install -m 644 dist/grafana-dashboard.json dist/vmbalance-alerts.yml dist/vmbalance-fleet-rules.yml $(DESTDIR)$(DATADIR)/
	install -m 755 $(addprefix $(BIN_DIR)/,$(BINARIES)) $(DESTDIR)$(BINDIR)/
	for b in $(BINARIES); do $(BIN_DIR)/$$b --man > $(DESTDIR)$(MANDIR)/$$b.1; done
	for u in $(UNITS); do \
		sed 's|@BINDIR@|$(BINDIR)|g; s|@SYSCONFDIR@|$(SYSCONFDIR)|g' dist/$$u.service > $(DESTDIR)$(UNITDIR)/$$u.service; \
	done
	for b in vcpu_scheduler memory_coordinator; do \
		[ -e $(DESTDIR)$(SYSCONFDIR)/vmbalance/$$b.toml ] || install -D -m 644 dist/$$b.toml $(DESTDIR)$(SYSCONFDIR)/vmbalance/$$b.toml; \
	done

## Remove what `make install` installed (same PREFIX and DESTDIR).
uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(BINARIES)) $(foreach b,$(BINARIES),$(DESTDIR)$(MANDIR)/$(b).1)
	rm -f $(foreach u,$(UNITS),$(DESTDIR)$(UNITDIR)/$(u).service)
	rm -f $(DESTDIR)$(SYSCONFDIR)/vmbalance/vcpu_scheduler.toml $(DESTDIR)$(SYSCONFDIR)/vmbalance/memory_coordinator.toml
	-rmdir $(DESTDIR)$(SYSCONFDIR)/vmbalance 2>/dev/null
	rm -f $(DESTDIR)$(DATADIR)/grafana-dashboard.json $(DESTDIR)$(DATADIR)/vmbalance-alerts.yml $(DESTDIR)$(DATADIR)/vmbalance-fleet-rules.yml
	-rmdir $(DESTDIR)$(DATADIR) 2>/dev/null
	rm -f $(addprefix $(DESTDIR)$(DOCDIR)/,$(notdir $(OPERATOR_DOCS)))
	-rmdir $(DESTDIR)$(DOCDIR) 2>/dev/null

clean:
	$(CARGO) clean
	rm -rf $(BIN_DIR)

## Install the Debian packages the build needs (libvirt's headers and pkg-config file, for the
## `virt` bindings) when they are missing; `make`, `make test` and `make lint` run it first.
## Build target/debian/vmbalance_<version>_<arch>.deb (dist/deb/build.sh, with dpkg-deb), installing
## dpkg-dev (for dpkg-shlibdeps) when it is missing.
deb: deps rust-version
	@command -v dpkg-shlibdeps >/dev/null 2>&1 || { echo "installing dpkg-dev with apt-get"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) dpkg-dev; }
	dist/deb/build.sh

## Build the package and check it as Debian does: lintian with no error and no warning (the info
## tags left are explained in docs/operations.md). Installs lintian with apt-get when missing.
deb-check: deb
	@command -v lintian >/dev/null 2>&1 || { echo "installing lintian with apt-get"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) lintian; }
	lintian --fail-on error,warning --info target/debian/vmbalance_*.deb

## Say clearly when the installed Rust is older than the one vmbalance needs.
rust-version:
	@have=$$($(CARGO) --version 2>/dev/null | awk '{print $$2}'); \
	if [ -z "$$have" ]; then \
		echo "error: cargo is not installed; install Rust $(RUST_MIN) or newer (https://rustup.rs)" >&2; exit 1; \
	fi; \
	if [ "$$(printf '%s\n%s\n' "$(RUST_MIN)" "$$have" | sort -V | head -n1)" != "$(RUST_MIN)" ]; then \
		echo "error: vmbalance needs Rust $(RUST_MIN) or newer; this machine has $$have (rustup update)" >&2; exit 1; \
	fi

deps:
	@if ! pkg-config --exists 'libvirt >= 6.0.0' 2>/dev/null; then \
		echo "installing libvirt-dev and pkg-config with apt-get"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) libvirt-dev pkg-config; \
	fi

# The tests also use the libvirt client library's in-process test driver (in libvirt0, which
# libvirt-dev pulls in), kill(1) to send signals to the daemons, and promtool (Debian's prometheus
# package) to lint the metrics.
test-deps: deps
	@if ! [ -x /usr/bin/kill ] && ! [ -x /bin/kill ]; then \
		echo "installing procps with apt-get"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) procps; \
	fi
	@if ! command -v promtool >/dev/null; then \
		echo "installing prometheus (for promtool) with apt-get"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) prometheus; \
	fi
