# vmbalance: `make` builds bin/vcpu_scheduler and bin/memory_coordinator; `make test` runs every test.
# Both install the Debian packages they need (libvirt-dev, pkg-config, ...) when they are missing.

CARGO ?= cargo
BIN_DIR := bin
BINARIES := vcpu_scheduler memory_coordinator
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: all build test lint clean deps test-deps

all: build

## Build the release binaries into bin/.
build: deps
	$(CARGO) build --release --locked
	@mkdir -p $(BIN_DIR)
	@for b in $(BINARIES); do cp target/release/$$b $(BIN_DIR)/$$b; done
	@echo "built: $(addprefix $(BIN_DIR)/,$(BINARIES))"

## Run the whole test suite (unit, property, libvirt test-driver and CLI tests).
test: test-deps
	$(CARGO) test --locked --all-targets

## Formatting and lints, as CI checks them.
lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf $(BIN_DIR)

# libvirt's headers and pkg-config file, needed to build the `virt` bindings.
deps:
	@if ! pkg-config --exists 'libvirt >= 6.0.0' 2>/dev/null; then \
		echo "installing libvirt-dev and pkg-config with apt-get"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) libvirt-dev pkg-config; \
	fi

# The tests also use the libvirt client library's in-process test driver (in libvirt0, which
# libvirt-dev pulls in), and kill(1) to send signals to the daemons.
test-deps: deps
	@if ! [ -x /usr/bin/kill ] && ! [ -x /bin/kill ]; then \
		echo "installing procps with apt-get"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) procps; \
	fi
