# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv, install synclone with every extra it uses, and fetch the data they need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synclone-installed
# The field libraries must never reach the Hugging Face hub in tests or the demo (no internet here).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-all lint install data bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the build this machine class has wheels for.
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[all,test]"
	# torchattacks pins an old requests; it is only a reference in the tests, so skip its dependencies.
	$(BIN)/pip install --quiet --no-deps torchattacks
	touch $(STAMP)

# Fashion-MNIST from Debian's package when we can install it; otherwise the loader explains the options.
data:
	@if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium; \
	  else \
	    echo "note: cannot apt-get install dataset-fashion-mnist (not root); set SYNCLONE_DATA to a folder with the Fashion-MNIST .gz files"; \
	  fi; \
	fi
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium || echo "note: chromium not installed; the browser test will skip"; \
	fi

demo: install data
	$(BIN)/synclone demo --output runs/demo
	@echo "open runs/demo/report.html"

# The default suite (< 15 min on 2 cores). CI also runs the slow tests (`make test-all` locally).
test: install data
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/python .ci/pytest_run.py $(if $(CI),-m "slow or not slow",-m "not slow")

test-all: install data
	$(BIN)/python .ci/pytest_run.py -m "slow or not slow"

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

clean:
	rm -rf runs/demo .pytest_cache
