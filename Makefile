# Cinder: `make run` serves the example plugins, `make test` runs the whole suite.
# Both install what they need (the wasm32-wasip2 target, the JS build and test tools from
# npm, componentize-py from PyPI into a local venv).

CARGO ?= cargo
EXAMPLES := chat notifications presence counter
TEST_ONLY := misbehave hostile
PLUGIN_OUT := target/wasm32-wasip2/plugin
PLUGIN_DIR := target/plugins
TEST_PLUGIN_DIR := target/test-plugins
# The Rust test plugins plus the chat plugin in JavaScript and in Python: the JS suite's.
JS_TEST_PLUGIN_DIR := target/test-plugins-js
LANG_PLUGINS := chat-js chat-py
PY_VENV := target/py-venv
# Versions the hot-reload tests upload at run time (not served at start).
UPLOAD_DIR := target/test-uploads

.PHONY: run test plugins rust-plugins lang-plugins wasm-target redis-server chromium promtool lint test-rust test-js bench fuzz

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

# The cluster tests start redis-server processes of their own (on free ports): installed
# from the system's packages where it is missing, or a one-line stop saying how.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis-server:
	@command -v redis-server >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@command -v redis-server >/dev/null 2>&1 || \
		{ echo "make test needs redis-server on PATH: install it with your system's package manager (Debian: apt-get install redis-server)"; exit 1; }

# The browser tests drive Debian's Chromium with playwright-core (from npm, with the JS
# tests' other dependencies): installed from the system's packages where it is missing.
CHROMIUM ?= $(shell command -v chromium 2>/dev/null || echo /usr/bin/chromium)
chromium:
	@[ -x "$(CHROMIUM)" ] || ! command -v apt-get >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@[ -x "$(CHROMIUM)" ] || \
		{ echo "make test needs Chromium for the browser tests: install it with your system's package manager (Debian: apt-get install chromium), or set CHROMIUM=/path/to/chromium"; exit 1; }

# The metrics test checks /metrics with promtool, Prometheus's own checker, taken from
# Debian's prometheus package: the package is downloaded and only unpacked here (nothing
# is installed, no service starts).
PROMTOOL := $(CURDIR)/target/promtool/usr/bin/promtool
promtool:
	@[ -x "$(PROMTOOL)" ] || ! command -v apt-get >/dev/null 2>&1 || { \
		mkdir -p target/promtool && cd target/promtool && \
		{ apt-get download -qq prometheus 2>/dev/null || { $(SUDO) apt-get update -qq && apt-get download -qq prometheus; }; } && \
		dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb usr/bin/prometheus; }
	@[ -x "$(PROMTOOL)" ] || \
		{ echo "make test needs promtool (Debian: apt-get download prometheus, then dpkg-deb -x it into target/promtool)"; exit 1; }

# Builds every plugin once, then lays them out as <name>.wasm + <name>.toml: the examples
# in $(PLUGIN_DIR), the Rust examples and the test plugins in $(TEST_PLUGIN_DIR), all of
# them in $(JS_TEST_PLUGIN_DIR), and version 2 of `counter` in $(UPLOAD_DIR) as
# counter-2.0.0.wasm + .toml. The test dirs also hold each chat component a second time as
# <name>-intercept, under its cinder-intercept.toml (new_message through handle_out).
plugins: rust-plugins lang-plugins
	@mkdir -p $(JS_TEST_PLUGIN_DIR)
	cp $(TEST_PLUGIN_DIR)/* $(JS_TEST_PLUGIN_DIR)/
	@for p in $(LANG_PLUGINS); do \
		cp $(PLUGIN_OUT)/$$p.wasm $(PLUGIN_DIR)/$$p.wasm && cp plugins/$$p/cinder.toml $(PLUGIN_DIR)/$$p.toml; \
		cp $(PLUGIN_OUT)/$$p.wasm $(JS_TEST_PLUGIN_DIR)/$$p.wasm && cp plugins/$$p/cinder.toml $(JS_TEST_PLUGIN_DIR)/$$p.toml; \
		cp $(PLUGIN_OUT)/$$p.wasm $(JS_TEST_PLUGIN_DIR)/$$p-intercept.wasm && cp plugins/$$p/cinder-intercept.toml $(JS_TEST_PLUGIN_DIR)/$$p-intercept.toml; \
	done

# The chat plugin in JavaScript (componentize-qjs: QuickJS; docs/plugins/javascript.md says
# why) and in Python (componentize-py), each tool pinned and installed locally.
lang-plugins: $(PY_VENV)/bin/componentize-py plugins/chat-js/node_modules/.package-lock.json
	@mkdir -p $(PLUGIN_OUT)
	cd plugins/chat-js && npx componentize-qjs --wit ../../wit --world channel --sync --js chat.js --output ../../$(PLUGIN_OUT)/chat-js.wasm
	$(PY_VENV)/bin/componentize-py --quiet -d wit -w channel componentize -p plugins/chat-py app -o $(PLUGIN_OUT)/chat-py.wasm

plugins/chat-js/node_modules/.package-lock.json: plugins/chat-js/package-lock.json
	cd plugins/chat-js && npm ci --no-audit --no-fund

$(PY_VENV)/bin/componentize-py: plugins/chat-py/requirements.txt
	python3 -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install --quiet --disable-pip-version-check -r plugins/chat-py/requirements.txt
	@touch $@

rust-plugins: wasm-target
	@mkdir -p $(PLUGIN_DIR) $(TEST_PLUGIN_DIR) $(UPLOAD_DIR)
	$(CARGO) build --profile plugin --target wasm32-wasip2 -p counter --features v2
	cp $(PLUGIN_OUT)/counter.wasm $(UPLOAD_DIR)/counter-2.0.0.wasm && cp plugins/counter/cinder-v2.toml $(UPLOAD_DIR)/counter-2.0.0.toml
	$(CARGO) build --profile plugin --target wasm32-wasip2 $(addprefix -p ,$(EXAMPLES) $(TEST_ONLY))
	@for p in $(EXAMPLES); do \
		cp $(PLUGIN_OUT)/$$p.wasm $(PLUGIN_DIR)/$$p.wasm && cp plugins/$$p/cinder.toml $(PLUGIN_DIR)/$$p.toml; \
	done
	@for p in $(EXAMPLES) $(TEST_ONLY); do \
		cp $(PLUGIN_OUT)/$$p.wasm $(TEST_PLUGIN_DIR)/$$p.wasm && cp plugins/$$p/cinder.toml $(TEST_PLUGIN_DIR)/$$p.toml; \
	done
	cp $(PLUGIN_OUT)/chat.wasm $(TEST_PLUGIN_DIR)/chat-intercept.wasm && cp plugins/chat/cinder-intercept.toml $(TEST_PLUGIN_DIR)/chat-intercept.toml

# Serves the example plugins; CINDER_LISTEN, CINDER_JWT_SECRET, CINDER_ADMIN_TOKEN and
# CINDER_DATA_DIR are honoured.
run: plugins
	$(CARGO) build --release -p cinder
	CINDER_PLUGINS_DIR=$${CINDER_PLUGINS_DIR:-$(PLUGIN_DIR)} ./target/release/cinder serve

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Some tests run the binary as a process of its own (to limit its open files): it is built
# first, with the workspace's features, as test-js builds it.
test-rust: plugins redis-server promtool
	$(CARGO) build --workspace --bins
	PROMTOOL=$(PROMTOOL) CINDER_BIN=$(CURDIR)/target/debug/cinder CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) $(CARGO) test --workspace

# The binary is built with the workspace's features, as `cargo test --workspace` built
# everything else, so nothing is compiled twice.
test-js: plugins redis-server chromium
	$(CARGO) build --workspace --bins
	cd tests/js && npm ci --no-audit --no-fund
	cd tests/js && CHROMIUM=$(CHROMIUM) CINDER_BIN=$(CURDIR)/target/debug/cinder CINDER_TEST_PLUGINS=$(CURDIR)/$(JS_TEST_PLUGIN_DIR) node --test --test-concurrency=1 --test-timeout=60000 --test-force-exit

# The whole suite.
test: lint test-rust test-js

# Benchmarks (not part of the suite); docs/benchmarks.md explains the method.
bench: plugins redis-server
	@mkdir -p target/bench-plugins
	cp $(JS_TEST_PLUGIN_DIR)/chat* target/bench-plugins/
	cd plugins/chat-js && npx componentize-js chat.js --wit ../../wit --world-name channel --disable http fetch-event -o ../../target/bench-plugins/chat-js-starlingmonkey.wasm
	cp plugins/chat-js/cinder.toml target/bench-plugins/chat-js-starlingmonkey.toml
	CINDER_LANG_PLUGINS=$(CURDIR)/target/bench-plugins $(CARGO) bench -p cinder --bench languages
	$(CARGO) build --release -p cinder -p cinder-bench
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) $(CARGO) bench -p cinder --bench plugin_calls
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) $(CARGO) bench -p cinder --bench presence
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) ./target/release/cinder-bench first-join 1000
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) ./target/release/cinder-bench neighbour 3000
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) ./target/release/cinder-bench idle 19000
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) ./target/release/cinder-bench reload 100
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) ./target/release/cinder-bench fanout 10000
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) ./target/release/cinder-bench chat 1000 10000
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) ./target/release/cinder-bench chat 1000 20000
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) ./target/release/cinder-bench cluster 10000 500 5000
	CINDER_TEST_PLUGINS=$(CURDIR)/$(TEST_PLUGIN_DIR) ./target/release/cinder-bench owned 2000

# Fuzzing (not part of the suite): each target of host/fuzz (the frame decoders, connect
# tokens, the plugin manifest) for FUZZ_SECS seconds with libFuzzer. Needs a nightly
# toolchain (cargo fuzz's sanitizer flags); installs cargo-fuzz when missing. Findings land
# in host/fuzz/artifacts/<target>/.
FUZZ_SECS ?= 120
FUZZ_TARGETS := frames token manifest
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	cd host/fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t && \
		cargo +nightly fuzz run -O $$t corpus/$$t -- -max_total_time=$(FUZZ_SECS) -print_final_stats=1 || exit 1; \
	done
