# Cinder: `make run` serves the example plugins, `make test` runs the whole suite.
# Both install what they need (the wasm32-wasip2 target, the JS test dependencies).

CARGO ?= cargo
PLUGINS := chat notifications
PLUGIN_OUT := target/wasm32-wasip2/plugin
PLUGIN_DIR := target/plugins

.PHONY: run test plugins wasm-target lint test-rust test-js clean-data

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

# Builds every example plugin once and lays them out as <name>.wasm + <name>.toml.
plugins: wasm-target
	$(CARGO) build --profile plugin --target wasm32-wasip2 $(addprefix -p ,$(PLUGINS))
	@mkdir -p $(PLUGIN_DIR)
	@for p in $(PLUGINS); do \
		cp $(PLUGIN_OUT)/$$p.wasm $(PLUGIN_DIR)/$$p.wasm && cp plugins/$$p/cinder.toml $(PLUGIN_DIR)/$$p.toml; \
	done

# Serves the example plugins; CINDER_LISTEN, CINDER_JWT_SECRET, CINDER_ADMIN_TOKEN and
# CINDER_DATA_DIR are honoured.
run: plugins
	$(CARGO) build --release -p cinder
	CINDER_PLUGINS_DIR=$${CINDER_PLUGINS_DIR:-$(PLUGIN_DIR)} ./target/release/cinder serve

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-rust: plugins
	CINDER_PLUGINS_DIR=$(CURDIR)/$(PLUGIN_DIR) $(CARGO) test --workspace

test-js: plugins
	$(CARGO) build -p cinder
	cd tests/js && npm ci --no-audit --no-fund
	cd tests/js && CINDER_BIN=$(CURDIR)/target/debug/cinder CINDER_PLUGINS_DIR=$(CURDIR)/$(PLUGIN_DIR) node --test --test-concurrency=1

# The whole suite.
test: lint test-rust test-js
